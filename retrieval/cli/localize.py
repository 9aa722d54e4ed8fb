"""``python -m retrieval localize``: photographs -> predicted footprints (GeoJSON, map PNG)."""
from __future__ import annotations

import json
import logging
import os

from . import CommandError, add_common, add_search_params, load_model, model_label, search_params

HELP = "localize photographs: top-k footprints as GeoJSON (RFC 7946), optionally a map PNG"
EXAMPLES = """\
  python -m retrieval localize --model runs/demo/train/final --index runs/demo/index \\
      photo1.jpg photo2.jpg --top-k 10 --output out.geojson --map out.png

The index must have been built from embeddings made by the same encoder. With
several images, --map writes one PNG per image (out-0.png, out-1.png, ...).
The true footprint is drawn (green) when an image's name is an EarthLoc name.
"""


def add_arguments(p) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG photographs")
    p.add_argument("--model", required=True, metavar="ENCODER", help="saved encoder folder")
    p.add_argument("--index", required=True, metavar="IDX", help="index folder")
    p.add_argument("--top-k", type=int, default=10, help="predictions per image (default 10)")
    add_search_params(p)
    p.add_argument("--output", required=True, metavar="OUT.geojson", help="GeoJSON output")
    p.add_argument("--map", metavar="OUT.png", help="draw a map PNG")
    p.add_argument("--map-height", type=int, default=512, help="map height in pixels")
    add_common(p, progress=False)


def run(args) -> int:
    from shard_tools import storage

    from ..embed import Embeddings
    from ..index import ShardedIndex
    from ..localize import localize, map_image, to_geojson

    params = search_params(args)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"image not found: {missing[0]}")
    index = ShardedIndex.load(args.index)
    if not index.embeddings:
        raise CommandError(f"{args.index} names no source embeddings")
    database = Embeddings.open(index.embeddings)
    model, size, dim = load_model(args.model)
    made_by = database.meta.get("model")
    if made_by and made_by != model_label(args.model):
        logging.getLogger(__name__).warning(
            "the index's embeddings were made by %s, not by --model %s: the photographs and "
            "the database are embedded by different weights", made_by.split("@")[0], args.model)
    if dim != index.dim:
        raise CommandError(f"dimension mismatch: the index holds {index.dim}-d vectors, "
                           f"the encoder makes {dim}-d")
    results = localize(model, args.images, index, database, size, args.top_k, **params)
    storage.write_bytes_atomic(args.output, json.dumps(to_geojson(results)).encode())
    print(f"{len(results)} images, top {args.top_k} footprints each -> {args.output}")
    if args.map:
        stem, ext = os.path.splitext(args.map)
        for i, (loc, path) in enumerate(zip(results, args.images)):
            out = args.map if len(results) == 1 else f"{stem}-{i}{ext or '.png'}"
            map_image(loc, path, args.map_height).save(out)
            print(f"map -> {out}")
    return 0
