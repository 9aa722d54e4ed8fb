"""Geometry: WMTS tiles, footprints, IoU, distances (all vectorised)."""
from .wmts import (  # noqa: F401
    EARTH_RADIUS_KM, MOSAIC, STEP, col_to_lon, format_tile_id, lat_to_row, lon_to_col,
    parse_tile_id, row_to_lat, tile_area_km2, tile_bounds, tile_center, tile_footprint,
    tile_id_at,
)
