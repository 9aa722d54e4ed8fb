"""Scan an input (folder, .txt list, CSV, fsspec URL) into records, per format.

Scanning only reads names and tables, never images: a malformed name or a
table row without its image becomes a ``Reject`` instead of an error, so the
converter can report it and keep every good image.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tqdm.auto import tqdm

from . import formats, storage

log = logging.getLogger(__name__)

FORMATS = ("earthloc", "gsv-cities", "vpr", "csv")


@dataclass(frozen=True)
class Item:
    """One image to pack: where to read it, and its metadata record."""

    url: str
    record: dict
    stat: tuple | None = None   # (size, mtime) when a listing gave it; else read at planning


@dataclass(frozen=True)
class Reject:
    """One input left out, as a line of ``rejects.jsonl``.

    ``reason`` is a short category where one exists (``duplicate``, ``too large``,
    ``symlink loop``, ``broken symlink``) with the particulars in ``detail``, or a
    message naming the bad field.
    """

    path: str
    reason: str
    stage: str = "scan"
    detail: str = ""

    def to_json(self) -> dict:
        out = {"path": self.path, "reason": self.reason, "stage": self.stage}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class Scan:
    items: list[Item] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _listing_rejects(inputs: storage.InputList, prefix: str = "") -> list[Reject]:
    return [Reject(prefix + name, reason, detail=detail) for name, reason, detail in inputs.skipped]


def _scan_names(inputs: storage.InputList, parse) -> Scan:
    out = Scan(rejects=_listing_rejects(inputs))
    for name in inputs.names:
        try:
            _check_path_text(name)
            rec = parse(name)
        except ValueError as exc:
            out.rejects.append(Reject(name, str(exc)))
            continue
        out.items.append(Item(inputs.url(name), rec, inputs.sizes.get(name)))
    return out


def scan_earthloc(src: str, storage_options: Mapping[str, Any] | None = None) -> Scan:
    return _scan_names(storage.list_inputs(src, storage_options), formats.parse_earthloc_name)


def scan_vpr(src: str, storage_options: Mapping[str, Any] | None = None) -> Scan:
    return _scan_names(storage.list_inputs(src, storage_options), formats.parse_vpr_name)


def _read_csv(url: str, storage_options: Mapping[str, Any] | None) -> list[dict]:
    try:
        text = storage.read_bytes(url, storage_options).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise storage.BadFile(f"{url}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return list(csv.DictReader(io.StringIO(text)))
    except csv.Error as exc:
        raise storage.BadFile(f"{url}: not a CSV table ({exc})") from None


def _check_path_text(path: str) -> None:
    """A path with a NUL or another control character cannot name a file."""
    bad = next((c for c in path if ord(c) < 32), None)
    if bad is not None:
        raise ValueError(f"malformed path {path!r}: control character {bad!r}")


def scan_gsv_cities(src: str, storage_options: Mapping[str, Any] | None = None) -> Scan:
    """``SRC/Dataframes/<City>.csv`` joined with ``SRC/Images/<City>/*.jpg``.

    A row without its image and an image without its row are both rejected.
    """
    fs, root = storage.filesystem(src, storage_options)
    frames = storage.join(src, "Dataframes")
    images_root = storage.join(src, "Images")
    _, frames_path = storage.filesystem(frames, storage_options)
    if not fs.isdir(frames_path):
        raise FileNotFoundError(f"gsv-cities input needs a Dataframes/ folder: {frames}")
    images = storage.list_inputs(images_root, storage_options)
    present = set(images.names)
    out = Scan(rejects=_listing_rejects(images, "Images/"))
    seen: dict[str, str] = {}
    for csv_path in sorted(p for p in fs.ls(frames_path, detail=False) if p.endswith(".csv")):
        city = posixpath.splitext(posixpath.basename(csv_path))[0]
        csv_url = storage.join(frames, posixpath.basename(csv_path))
        for i, row in enumerate(_read_csv(csv_url, storage_options)):
            where = f"Dataframes/{city}.csv:{i + 2}"
            try:
                row = {k.strip(): v for k, v in row.items() if k}
                name = f"{city}/{formats.gsv_cities_image_name(row)}"
                rec = formats.parse_gsv_cities_row(row, source=f"Images/{name}")
            except (ValueError, KeyError, TypeError) as exc:
                reason = str(exc) if isinstance(exc, ValueError) else f"missing column {exc}"
                out.rejects.append(Reject(where, reason))
                continue
            if name in seen:
                out.rejects.append(Reject(where, "duplicate",
                                          detail=f"Images/{name} already given by {seen[name]}"))
                continue
            if name not in present:
                out.rejects.append(Reject(f"Images/{name}", f"missing image for CSV row {where}"))
                continue
            seen[name] = where
            out.items.append(Item(images.url(name), rec, images.sizes.get(name)))
    for name in sorted(present - set(seen)):
        out.rejects.append(Reject(f"Images/{name}", "missing CSV row for image"))
    return out


def scan_csv(src: str, storage_options: Mapping[str, Any] | None = None) -> Scan:
    """A table with ``path, lat, lon, place_id`` (+ optional columns); paths are
    relative to the table's folder unless absolute or URLs."""
    src = storage.normalize(src)
    if not src.endswith(".csv"):
        raise ValueError(f"--format csv needs a .csv table as --input, got {src}")
    root = src.rsplit("/", 1)[0] if storage.is_remote(src) else os.path.dirname(
        os.path.abspath(src))
    out = Scan()
    seen: dict[str, str] = {}
    for i, row in enumerate(_read_csv(src, storage_options)):
        where = f"{os.path.basename(src)}:{i + 2}"
        try:
            rec = formats.parse_csv_row(row)
            _check_path_text(rec["source"])
        except ValueError as exc:
            out.rejects.append(Reject(where, str(exc)))
            continue
        path = rec["source"]
        url = path if ("://" in path or os.path.isabs(path)) else storage.join(root, path)
        ident = url if "://" in url else os.path.normpath(url)
        if ident in seen:
            out.rejects.append(Reject(where, "duplicate",
                                      detail=f"{path} already given by {seen[ident]}"))
            continue
        seen[ident] = where
        out.items.append(Item(url, rec))
    return out


SCANNERS = {
    "earthloc": scan_earthloc,
    "gsv-cities": scan_gsv_cities,
    "vpr": scan_vpr,
    "csv": scan_csv,
}


def read_records(src: str, parse: Callable[[str], dict], what: str,
                 storage_options: Mapping[str, Any] | None = None) -> list[dict]:
    """Records of every name in SRC, in SRC's order; only names are read.

    Unlike ``scan``, a malformed name is an error: ground truth is indexed by
    position, so skipping a name would shift every index after it.
    """
    names = storage.list_inputs(src, storage_options).names
    if not names:
        raise ValueError(f"no images in {what} {src}")
    return [parse(n) for n in tqdm(names, desc=f"parse {what}", unit="name", leave=False,
                                   disable=len(names) < 50_000)]


def scan(fmt: str, src: str, storage_options: Mapping[str, Any] | None = None) -> Scan:
    if fmt not in SCANNERS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    result = SCANNERS[fmt](src, storage_options)
    log.info("scanned %s input %s: %d images, %d rejected", fmt, src, len(result.items),
             len(result.rejects))
    return result
