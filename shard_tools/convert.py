"""Conversion: scan -> plan -> write this task's shards (resumable) -> merge manifest."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from tqdm.auto import tqdm

from . import plan as planning
from . import sources, storage
from .manifest import completed_shards, merge_manifest, write_plan
from .writer import StrictReject, WriteOptions, write_shard

log = logging.getLogger(__name__)

# Arguments that change the shards' bytes; the others (workers, task split) do not.
PLAN_ARGS = ("format", "kind", "input", "shard_size", "max_side", "quality", "queries",
             "query_pairs")


@dataclass
class ConvertConfig:
    format: str
    kind: str
    input: str
    output: str
    shard_size: int | None = None
    max_side: int | None = None
    quality: int = 90
    workers: int = 1
    task_index: int | None = None
    num_tasks: int | None = None
    queries: str | None = None
    query_pairs: str | None = None
    strict: bool = False
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)
    progress: bool = True


@dataclass
class ConvertResult:
    shards_written: int
    shards_skipped: int
    images: int
    rejects: int
    manifest_complete: bool
    missing: list[str]


def slurm_task() -> tuple[int, int]:
    """(task index, task count) from a SLURM array, or (0, 1) outside one."""
    tid = os.environ.get("SLURM_ARRAY_TASK_ID")
    count = os.environ.get("SLURM_ARRAY_TASK_COUNT")
    if tid is None or count is None:
        return 0, 1
    lo = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    index, count = int(tid) - lo, int(count)
    if not 0 <= index < count or os.environ.get("SLURM_ARRAY_TASK_STEP", "1") != "1":
        raise ValueError(f"SLURM_ARRAY_TASK_ID={tid} (min {lo}, count {count}) is not an index of "
                         "a contiguous array: submit --array=0-N, or pass --task-index and "
                         "--num-tasks")
    return index, count


def _normalise(url: str | None) -> str | None:
    if url is None or storage.is_remote(url):
        return url
    return os.path.abspath(url)


def build_plan(cfg: ConvertConfig) -> planning.Plan:
    if cfg.kind not in planning.KINDS:
        raise ValueError(f"--kind must be one of {planning.KINDS}, got {cfg.kind!r}")
    if (cfg.queries or cfg.query_pairs) and cfg.kind != "places":
        raise ValueError("--queries/--query-pairs only apply to --kind places")
    if bool(cfg.queries) != bool(cfg.query_pairs):
        raise ValueError("--queries and --query-pairs go together")
    scan = sources.scan(cfg.format, cfg.input, cfg.storage_options)
    rejects = list(scan.rejects)
    if not scan.items:
        why = (f"; all {len(rejects)} inputs were rejected, e.g. {rejects[0].path}: "
               f"{rejects[0].reason}" if rejects else "")
        raise ValueError(f"no {cfg.format} images found in {cfg.input}{why}")
    if cfg.kind == "images":
        samples = planning.plan_images(scan.items)
    else:
        query_items = []
        pairs = None
        if cfg.queries:
            qscan = sources.scan(cfg.format, cfg.queries, cfg.storage_options)
            rejects += qscan.rejects
            query_items = qscan.items
            pairs = json.loads(storage.read_bytes(cfg.query_pairs, cfg.storage_options))
            if not isinstance(pairs, dict):
                raise ValueError(f"{cfg.query_pairs}: expected a JSON object "
                                 "{database path: [query names]}")
        samples, plan_rejects = planning.plan_places(scan.items, query_items, pairs)
        rejects += plan_rejects
    if cfg.strict and rejects:
        raise StrictReject(f"{rejects[0].path}: {rejects[0].reason}")
    if not samples:
        raise ValueError(f"nothing to convert as {cfg.kind} from {cfg.input}: "
                         f"{rejects[0].path}: {rejects[0].reason}" if rejects else
                         f"nothing to convert as {cfg.kind} from {cfg.input}")
    size = cfg.shard_size or planning.DEFAULT_SHARD_SIZE[cfg.kind]
    shards = planning.split_shards(samples, size, cfg.kind)
    return planning.Plan(kind=cfg.kind, shards=shards, rejects=rejects)


def plan_args(cfg: ConvertConfig) -> dict:
    args = {k: v for k, v in asdict(cfg).items() if k in PLAN_ARGS}
    for k in ("input", "queries", "query_pairs"):
        args[k] = _normalise(args[k])
    args["shard_size"] = cfg.shard_size or planning.DEFAULT_SHARD_SIZE[cfg.kind]
    return args


def _remove_stale_temporaries(out_url: str, todo: list[planning.ShardSpec]) -> None:
    """Delete what a killed run left of this task's unfinished shards (local output)."""
    if storage.is_remote(out_url) or not os.path.isdir(out_url):
        return
    prefixes = tuple(f".{spec.name}.tmp-" for spec in todo)
    for name in os.listdir(out_url):
        if name.startswith(prefixes):
            log.info("removing %s left by an interrupted run", name)
            os.unlink(os.path.join(out_url, name))


def convert(cfg: ConvertConfig) -> ConvertResult:
    """Convert this task's range of the plan, skipping shards that are already complete."""
    task_index, num_tasks = (cfg.task_index, cfg.num_tasks)
    if task_index is None or num_tasks is None:
        env_index, env_count = slurm_task()
        task_index = env_index if task_index is None else task_index
        num_tasks = env_count if num_tasks is None else num_tasks
    cfg = replace(cfg, **{k: storage.normalize(getattr(cfg, k))
                          for k in ("input", "output", "queries", "query_pairs")
                          if getattr(cfg, k)})
    plan = build_plan(cfg)
    write_plan(cfg.output, plan.summary(), plan_args(cfg), cfg.storage_options)

    mine = [plan.shards[i] for i in planning.task_range(len(plan.shards), task_index, num_tasks)]
    done = completed_shards(cfg.output, cfg.storage_options)
    todo = [s for s in mine if s.name not in done]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d shards of this task are already complete",
                 len(mine) - len(todo), len(mine))
    _remove_stale_temporaries(cfg.output, todo)
    opts = WriteOptions(kind=cfg.kind, max_side=cfg.max_side, quality=cfg.quality,
                        strict=cfg.strict, storage_options=cfg.storage_options)
    bar = tqdm(total=sum(s.num_images for s in todo), unit="img", unit_scale=True,
               desc=f"convert task {task_index}/{num_tasks}", disable=not cfg.progress,
               dynamic_ncols=True, smoothing=0.1)
    images = rejects = 0
    with bar:
        if cfg.workers <= 1:
            for spec in todo:
                st = write_shard(spec, cfg.output, opts, on_image=bar.update)
                images += st["images"]
                rejects += len(st["rejects"])
        else:
            # spawn: s3fs/aiohttp state does not survive fork
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx)
            try:
                futures = {pool.submit(write_shard, spec, cfg.output, opts): spec for spec in todo}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        st = fut.result()  # re-raises StrictReject and I/O errors
                        images += st["images"]
                        rejects += len(st["rejects"])
                        bar.update(futures[fut].num_images)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    merged = merge_manifest(cfg.output, cfg.storage_options)
    if merged.complete:
        total_rejects = merged.manifest["totals"]["rejects"]
    else:
        total_rejects = len(plan.rejects) + rejects
        log.info("manifest waits for %d shard(s) from other tasks; any task, or "
                 "`python -m shard_tools manifest %s`, completes it", len(merged.missing),
                 cfg.output)
    return ConvertResult(shards_written=len(todo), shards_skipped=len(mine) - len(todo),
                         images=images, rejects=total_rejects,
                         manifest_complete=merged.complete, missing=merged.missing)
