"""Localize photographs: embed, search the index, answer with footprints (GeoJSON, map).

The prediction of rank r is the database image of the r-th best row, each
database image once (its best rotation, which also tells the photo's
orientation). When a query's file name is an EarthLoc name, its true footprint
is added to the output.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from shard_tools.formats import parse_earthloc_name

from .embed import Embeddings, encode_batch
from .geojson import feature, feature_collection, footprint_geometry, record_geometry
from .images import load_photo, to_tensor
from .index import ShardedIndex
from .provenance import describe_encoder, encoder_identity, same_encoder
from .search import dedupe, search

log = logging.getLogger(__name__)


@dataclass
class Localization:
    """One query's answer: ranked database records with scores, and the truth if known."""

    query: str
    predictions: list[dict] = field(default_factory=list)   # {rank, score, row, record}
    truth: list[list[float]] | None = None


def true_footprint(path: str) -> list[list[float]] | None:
    """The footprint in an EarthLoc file name, or None."""
    try:
        fp = parse_earthloc_name(os.path.basename(path)).get("footprint")
    except ValueError:
        return None
    return fp if fp and len(fp) == 4 else None


def encoder_mismatch(embeddings_meta: Mapping[str, Any], model_path: str) -> str | None:
    """Why the photographs and the database may be embedded by different weights, or None.

    Encoders are compared by weights digest, never by folder: a copy of the same
    weights is the same encoder. Embeddings written before digests were recorded carry
    only a ``path@size:mtime`` label; a different size still tells, anything else cannot
    be checked (said at debug level, not warned).
    """
    try:
        current = encoder_identity(model_path)
    except OSError as exc:
        log.debug("cannot digest the weights of %s (%s): encoder not checked", model_path, exc)
        return None
    recorded = embeddings_meta.get("encoder")
    label = embeddings_meta.get("model")
    same, made_by = same_encoder(recorded, current), describe_encoder(recorded)
    if same is None and isinstance(label, str):
        same, made_by = _same_size_as_label(label, current), label.rsplit("@", 1)[0]
    if same is None:
        log.debug("the index's embeddings record no encoder weights digest (made by %s): "
                  "cannot check that --model %s made them", made_by, model_path)
        return None
    if same:
        return None
    return (f"the index's embeddings were made by {made_by}, not by --model "
            f"{describe_encoder(current)}: the photographs and the database are embedded by "
            "different weights")


def _same_size_as_label(label: str, current: Mapping[str, str]) -> bool | None:
    """False when an old ``path@size:mtime`` label names weights of another size, else None."""
    if "@" not in label:
        return None
    try:
        size = int(label.rsplit("@", 1)[1].split(":")[0])
        now = os.path.getsize(os.path.join(current["path"], "model.safetensors"))
    except (ValueError, OSError):
        return None
    return False if size != now else None


def embed_photos(encoder: nn.Module, images: Sequence[str], image_size: tuple[int, int],
                 batch_size: int = 16) -> np.ndarray:
    """``[N, D]`` descriptors of photograph files, each upright (EXIF) and decoded at
    reduced size; a file that is not a readable image is a ``ValueError`` naming it."""
    vectors = []
    was_training = encoder.training
    encoder.eval()
    try:
        for a in range(0, len(images), batch_size):
            batch = [to_tensor(load_photo(path, max(image_size)), image_size)
                     for path in images[a:a + batch_size]]
            vectors.append(encode_batch(encoder, torch.stack(batch)))
    finally:
        encoder.train(was_training)
    return np.concatenate(vectors)


def localize(encoder: nn.Module, images: Sequence[str], index: ShardedIndex, database: Embeddings,
             image_size: tuple[int, int], top_k: int = 10, nprobe: int | None = None,
             batch_size: int = 16, ef_search: int | None = None,
             k_factor: float | None = None) -> list[Localization]:
    """Top-k distinct database images for each image file."""
    if top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {top_k}")
    q = embed_photos(encoder, images, image_size, batch_size)
    n_rot = max(1, len(database.rotations))
    wide = search(index, q, min(top_k * n_rot, max(1, index.ntotal)), nprobe,
                  ef_search=ef_search, k_factor=k_factor)
    best = dedupe(wide, database.image_of_row, top_k)
    out = []
    for path, scores, ids in zip(images, best.scores, best.ids):
        loc = Localization(os.path.basename(path), truth=true_footprint(path))
        for r, (s, i) in enumerate(zip(scores, ids)):
            if i < 0:
                break
            loc.predictions.append({"rank": r + 1, "score": float(s), "row": int(i),
                                    "record": database.records[int(i)]})
        out.append(loc)
    return out


def to_geojson(results: Sequence[Localization]) -> dict:
    """A FeatureCollection: one feature per prediction (rank, score) and per known truth."""
    feats = []
    for loc in results:
        for p in loc.predictions:
            rec: dict[str, Any] = p["record"]
            feats.append(feature(record_geometry(rec), query=loc.query, role="prediction",
                                 rank=p["rank"], score=round(p["score"], 6),
                                 key=rec.get("key"), image_id=rec.get("image_id"),
                                 source=rec.get("source"), year=rec.get("year"),
                                 rotation=rec.get("rotation")))
        if loc.truth is not None:
            feats.append(feature(footprint_geometry(loc.truth), query=loc.query, role="truth",
                                 rank=None, score=None))
    return feature_collection(feats)


def map_image(loc: Localization, query_path: str | None = None, height: int = 512,
              use_bluemarble: bool = True) -> Image.Image:
    """The map of one localization (top-k shapes, the truth, the query beside)."""
    from .mapdraw import draw_map

    shapes = []
    for p in loc.predictions:
        rec = p["record"]
        fp = rec.get("footprint")
        shapes.append(np.asarray(fp if fp else [[rec["lat"], rec["lon"]]], np.float64))
    query = load_photo(query_path, height) if query_path else None
    return draw_map(shapes, None if loc.truth is None else np.asarray(loc.truth), query, height,
                    use_bluemarble)
