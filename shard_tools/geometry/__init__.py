"""Geometry: WMTS tiles, footprints, IoU, distances (all vectorised)."""
from .distances import (  # noqa: F401
    MEAN_EARTH_RADIUS_KM, haversine_km, haversine_matrix_km, km_to_chord, latlon_to_unit,
    utm_distance_m,
)
from .footprints import (  # noqa: F401
    crosses_antimeridian, equal_area_xy, footprint_area_km2,
    footprint_polygons, footprints_from_records, polygons_from_xy, rectangles_to_footprints,
    unwrap_footprints, xy_area,
)
from .overlap import (  # noqa: F401
    FootprintSet, candidate_pairs, group_by_query, intersection_area, intersects_matrix,
    iou_matrix, iou_pairs, pair_iou,
)
from .wmts import (  # noqa: F401
    EARTH_RADIUS_KM, MOSAIC, STEP, col_to_lon, format_tile_id, lat_to_row, lon_to_col,
    parse_tile_id, parse_tile_ids, row_to_lat, tile_area_km2, tile_bounds, tile_center,
    tile_footprint, tile_grid, tile_id_at, tile_id_from_bounds, tiles_bounds,
)
