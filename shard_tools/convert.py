"""Conversion: scan -> plan -> write this task's shards (resumable) -> merge manifest."""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from tqdm.auto import tqdm

from . import plan as planning
from . import sources, storage
from .jpeg import DEFAULT_MAX_PIXELS
from .lock import OutputLock
from .manifest import PLAN, completed_shards, merge_manifest, write_plan
from .writer import (TMP_MARK, StrictReject, WriteOptions, remote_temp_dir, temporary_name,
                     write_shard)

log = logging.getLogger(__name__)

# Arguments that change the shards' bytes; the others (workers, task split) do not.
PLAN_ARGS = ("format", "kind", "input", "shard_size", "max_side", "quality", "queries",
             "query_pairs", "max_pixels")


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
    max_pixels: int | None = DEFAULT_MAX_PIXELS


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
    values = {}
    for var, default in (("SLURM_ARRAY_TASK_ID", None), ("SLURM_ARRAY_TASK_COUNT", None),
                         ("SLURM_ARRAY_TASK_MIN", "0")):
        text = os.environ.get(var, default)
        try:
            values[var] = int(text)
        except ValueError:
            raise ValueError(f"{var}={text!r} is not an integer; pass --task-index and "
                             "--num-tasks instead") from None
    lo = values["SLURM_ARRAY_TASK_MIN"]
    index, count = values["SLURM_ARRAY_TASK_ID"] - lo, values["SLURM_ARRAY_TASK_COUNT"]
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
            pairs = read_query_pairs(cfg.query_pairs, cfg.storage_options)
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


def read_query_pairs(url: str, storage_options: Mapping[str, Any] | None = None
                     ) -> dict[str, list[str]]:
    """``{database path: [query names]}`` from ``--query-pairs``, checked entry by entry."""
    pairs = storage.read_json(url, storage_options)
    if not isinstance(pairs, dict):
        raise storage.BadFile(f"{url}: expected a JSON object {{database path: [query names]}}, "
                              f"found {type(pairs).__name__}")
    for db, queries in pairs.items():
        if not (isinstance(queries, list) and all(isinstance(q, str) and q for q in queries)):
            raise storage.BadFile(f"{url}: the entry {db!r} must be a list of query names, "
                                  f"found {json.dumps(queries)[:80]}")
    return pairs


def _item_fingerprint(item: sources.Item) -> list:
    st = item.stat if item.stat is not None else storage.local_stat(item.url)
    return [item.record["source"], item.url, *(st or ())]


def plan_digests(plan: planning.Plan) -> tuple[list[str], str]:
    """(one digest per shard, one for the whole input): names, URLs, sizes and mtimes of
    every planned image, and the rejects. A resume compares them with ``plan.json``."""
    per_shard = []
    for spec in plan.shards:
        h = hashlib.sha256()
        for sample in spec.samples:
            h.update(json.dumps([sample.key, sample.place_id,
                                 [_item_fingerprint(it) for it in sample.images],
                                 [_item_fingerprint(it) for it in sample.queries]]).encode())
        per_shard.append(h.hexdigest())
    whole = hashlib.sha256(json.dumps([per_shard, [r.to_json() for r in plan.rejects]],
                                      sort_keys=True).encode()).hexdigest()
    return per_shard, whole


def plan_document(plan: planning.Plan) -> dict:
    """``plan.json``'s body: the shard list with per-shard input digests."""
    doc = plan.summary()
    per_shard, whole = plan_digests(plan)
    for entry, digest in zip(doc["shards"], per_shard):
        entry["input_sha256"] = digest
    doc["input_digest"] = whole
    return doc


def plan_args(cfg: ConvertConfig) -> dict:
    args = {k: v for k, v in asdict(cfg).items() if k in PLAN_ARGS}
    for k in ("input", "queries", "query_pairs"):
        args[k] = _normalise(args[k])
    args["shard_size"] = cfg.shard_size or planning.DEFAULT_SHARD_SIZE[cfg.kind]
    return args


def _remove_stale_temporaries(out_url: str, todo: list[planning.ShardSpec]) -> None:
    """Delete what killed runs left of this task's unfinished shards: in the output
    folder (local output) or in the output's own local temp folder (remote output).

    Called with the output lock held, so a temporary of these shards belongs to a
    dead run, unless its name says it is this host's and that PID still lives.
    """
    folder = remote_temp_dir(out_url) if storage.is_remote(out_url) else out_url
    if not os.path.isdir(folder):
        return
    prefixes = tuple(f".{spec.name}{TMP_MARK}" for spec in todo)
    host = socket.gethostname()
    for name in os.listdir(folder):
        if not name.startswith(prefixes):
            continue
        owner = name.rsplit(TMP_MARK, 1)[1]
        owner_host, _, pid = owner.rpartition("-")
        if owner_host == host and pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # a live process of this host: not ours to delete
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        log.info("removing %s left by an interrupted run", os.path.join(folder, name))
        try:
            os.unlink(os.path.join(folder, name))
        except FileNotFoundError:
            pass


class Terminated(KeyboardInterrupt):
    """SIGTERM: shut down as for Ctrl-C (workers stopped, temporaries removed)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


_WRITING = False


def _worker_sigterm(signum, frame) -> None:
    """In a worker: abandon the shard being written (its temporary is removed on the way
    out), or exit quietly when idle."""
    if _WRITING:
        raise Terminated()
    os._exit(128 + signum)


def _write_shard_in_worker(spec, out_url, opts) -> dict:
    global _WRITING
    _WRITING = True
    try:
        return write_shard(spec, out_url, opts)   # removes its temporary on any exception
    except Terminated:
        os._exit(128 + signal.SIGTERM)            # stopped by the parent, or orphaned
    finally:
        _WRITING = False


def _worker_init(parent_pid: int) -> None:
    """Workers die with their parent, even when it is SIGKILLed.

    Linux: the kernel sends SIGTERM when the parent exits (PR_SET_PDEATHSIG);
    SIGTERM raises in the worker, so ``write_shard`` removes its temporary.
    Elsewhere a thread polls the parent's PID.
    """
    signal.signal(signal.SIGTERM, _worker_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; it stops us by SIGTERM
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            _watch_parent(parent_pid)
    else:
        _watch_parent(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _watch_parent(parent_pid: int) -> None:
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """SIGTERM every worker (each removes its temporary), then shut the pool down."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(30)


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
    check_config(cfg)
    storage.check_output_dir(cfg.output, cfg.storage_options)
    plan = build_plan(cfg)
    span = planning.task_range(len(plan.shards), task_index, num_tasks)
    with OutputLock(cfg.output, span.start, span.stop, cfg.storage_options):
        return _convert_locked(cfg, plan, span, task_index, num_tasks)


def check_config(cfg: ConvertConfig) -> None:
    """Argument ranges, checked before any input is read."""
    if cfg.shard_size is not None and cfg.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if not 1 <= cfg.quality <= 95:
        raise ValueError(f"--quality must be in [1, 95], got {cfg.quality}")
    if cfg.max_side is not None and cfg.max_side < 16:
        raise ValueError(f"--max-side must be >= 16, got {cfg.max_side}")
    if cfg.max_pixels is not None and cfg.max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {cfg.max_pixels}")
    if cfg.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {cfg.workers}")


def _convert_locked(cfg: ConvertConfig, plan: planning.Plan, span: range, task_index: int,
                    num_tasks: int) -> ConvertResult:
    write_plan(cfg.output, plan_document(plan), plan_args(cfg), cfg.storage_options)
    mine = [plan.shards[i] for i in span]
    done = completed_shards(cfg.output, cfg.storage_options, check=True,
                            names={s.name for s in mine})
    todo = [s for s in mine if s.name not in done]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d shards of this task are already complete",
                 len(mine) - len(todo), len(mine))
    _remove_stale_temporaries(cfg.output, todo)
    opts = WriteOptions(kind=cfg.kind, max_side=cfg.max_side, quality=cfg.quality,
                        strict=cfg.strict, storage_options=cfg.storage_options,
                        max_pixels=cfg.max_pixels)
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
            pool = ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_worker_init,
                                       initargs=(os.getpid(),))
            try:
                futures = {pool.submit(_write_shard_in_worker, spec, cfg.output, opts): spec
                           for spec in todo}
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in finished:
                        st = fut.result()  # re-raises StrictReject and I/O errors
                        images += st["images"]
                        rejects += len(st["rejects"])
                        bar.update(futures[fut].num_images)
            except BaseException:
                _stop_workers(pool)
                raise
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
