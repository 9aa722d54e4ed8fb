"""``python -m retrieval localize``: photographs -> predicted footprints (GeoJSON, map PNG)."""
from __future__ import annotations

import io
import json
import logging
import os

from . import CommandError, add_common, add_search_params, load_model, search_params

HELP = "localize photographs: top-k footprints as GeoJSON (RFC 7946), optionally a map PNG"
EXAMPLES = """\
  python -m retrieval localize --model runs/demo/train/final --index runs/demo/index \\
      photo1.jpg photo2.jpg --top-k 10 --output out.geojson --map out.png

The index must have been built from embeddings made by the same encoder (same
weights: compared by digest). With several images, --map writes one image per
photograph (out-0.png, out-1.png, ...); a --map without an extension is a PNG.
Photographs are turned upright by their EXIF orientation. The true footprint is
drawn (green) when an image's name is an EarthLoc name.
"""

GEOJSON_EXTENSIONS = (".geojson", ".json")
MIN_MAP_HEIGHT = 64


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photographs (JPEG, PNG, ...)")
    p.add_argument("--model", required=True, metavar="ENCODER", help="saved encoder folder")
    p.add_argument("--index", required=True, metavar="IDX", help="index folder")
    p.add_argument("--top-k", type=int, default=10, help="predictions per image (default 10)")
    add_search_params(p)
    p.add_argument("--output", required=True, metavar="OUT.geojson", help="GeoJSON output")
    p.add_argument("--map", metavar="OUT.png", help="draw a map (PNG, or the extension's format)")
    p.add_argument("--map-height", type=int, default=512, help="map height in pixels")
    add_common(p, progress=False)


def check_geojson_output(path: str) -> None:
    """--output is a writable file named .geojson/.json (or without extension)."""
    from shard_tools import storage

    ext = os.path.splitext(path)[1].lower()
    if ext and ext not in GEOJSON_EXTENSIONS:
        raise CommandError(f"--output {path}: a GeoJSON file is named .geojson or .json, "
                           f"not {ext}")
    storage.check_output_file(path)


def map_format(path: str) -> str:
    """The Pillow format a map path is written in: its extension's, PNG without one."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    if not ext:
        return "PNG"
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        raise CommandError(f"--map {path}: {ext} is not an image format Pillow writes "
                           "(use .png)")
    return fmt


def map_paths(map_arg: str, n_images: int) -> list[str]:
    """One map file per photograph, checked writable before any work."""
    from shard_tools import storage

    map_format(map_arg)
    stem, ext = os.path.splitext(map_arg)
    ext = ext or ".png"
    paths = [stem + ext] if n_images == 1 else [f"{stem}-{i}{ext}" for i in range(n_images)]
    for path in paths:
        storage.check_output_file(path)
    return paths


def check_outputs(args) -> list[str]:
    """Everything this command will write, checked first: the map paths (may be [])."""
    if args.top_k < 1:
        raise CommandError(f"--top-k must be >= 1, got {args.top_k}")
    check_geojson_output(args.output)
    if args.map is None:
        return []
    if args.map_height < MIN_MAP_HEIGHT:
        raise CommandError(f"--map-height must be >= {MIN_MAP_HEIGHT}, got {args.map_height}")
    return map_paths(args.map, len(args.images))


def run(args) -> int:
    from shard_tools import storage

    from ..index import ShardedIndex
    from ..localize import encoder_mismatch, localize, map_image, to_geojson

    params = search_params(args)
    maps = check_outputs(args)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    index = ShardedIndex.load(args.index)
    if not index.embeddings:
        raise CommandError(f"{args.index} names no source embeddings")
    database = index.open_embeddings()       # checked against the digest the index records
    model, size, dim = load_model(args.model)
    mismatch = encoder_mismatch(database.meta, args.model)
    if mismatch:
        logging.getLogger(__name__).warning("%s", mismatch)
    if dim != index.dim:
        raise CommandError(f"dimension mismatch: the index holds {index.dim}-d vectors, "
                           f"the encoder makes {dim}-d")
    results = localize(model, args.images, index, database, size, args.top_k, **params)
    storage.write_bytes_atomic(args.output, json.dumps(to_geojson(results)).encode())
    print(f"{len(results)} images, top {args.top_k} footprints each -> {args.output}")
    for loc, path, out in zip(results, args.images, maps):
        buf = io.BytesIO()
        map_image(loc, path, args.map_height).save(buf, format=map_format(out))
        storage.write_bytes_atomic(out, buf.getvalue())
        print(f"map -> {out}")
    return 0
