"""The training loop: ``accelerate launch -m trainer --config RECIPE [section.key=value ...]``.

One process per device. accelerate prepares the model and the optimizer; the
streaming data (``trainer.data``) already splits the shards by rank and stays
outside ``prepare``; batches are moved to the device here, non-blocking from
pinned memory. Each epoch is ``steps_per_epoch`` batches on every rank, grouped
into optimizer updates of ``train.grad_accum`` batches (the last update of an
epoch takes what is left). Checkpoints are written at update boundaries, so a
run resumed with ``--resume latest`` continues with exactly the batches, RNG
streams and optimizer state of an uninterrupted run.

The run folder is trusted by what made it (``trainer.runfolder``): one process trains
into it at a time (a lock), a fresh run refuses another run's checkpoints, and a
resume compares the recipe with the checkpoint's key by key (``trainer.resume``).

SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before the time limit) stop the
run at the end of the current update: every rank agrees on that update (a max-reduce
of the stop flag after each update), writes its part of a checkpoint, and the process
exits with 128 + the signal number (143, 130, 138) and one line on stderr. A second
Ctrl-C stops at once, without a checkpoint. Under ``accelerate launch`` the launcher
passes SIGTERM to the ranks and SIGKILLs them after a grace period: 5 s with one process
(accelerate's own launcher, fixed), 30 s with several (torchrun's agent,
``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``). A checkpoint cut short there never counts; the
previous one stands.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
from torch import nn

from shard_tools import storage
from shard_tools.cli import error_line

from .recipe import ConfigError, Recipe

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .data import Batch
    from .resume import RecipeChange
    from .tracking import WindowMeter

__all__ = ["main", "Trainer", "TrainState", "RunError", "set_train_mode", "json_safe", "EXAMPLES",
           "STOP_SIGNALS"]

log = logging.getLogger("trainer.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

T = TypeVar("T")

EXAMPLES = """examples:
  python -m trainer --config configs/demo-bluemarble.yaml
  python -m trainer --config configs/demo-bluemarble.yaml --check train.epochs=2
  accelerate launch --num_processes 2 -m trainer --config configs/earthloc.yaml \\
      data.train_shards=s3://bucket/earthloc/places model.pretrained=/models/resnet50.pth \\
      train.run_dir=s3://bucket/runs/earthloc
  accelerate launch -m trainer --config configs/earthloc.yaml --resume latest
  python -m trainer --config configs/demo-bluemarble.yaml --resume latest optim.lr=1e-5
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="accelerate launch -m trainer",
        description="Train an encoder from a YAML recipe (sections model, loss, data, optim, "
                    "train, eval, log). Without accelerate, `python -m trainer ...` runs one "
                    "process. The resolved recipe is saved to RUN/config.yaml; checkpoints "
                    "to RUN/checkpoints; the best encoder by the validation metric to RUN/best "
                    "(python -m retrieval evaluate --model RUN/best), the last to RUN/final.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="RECIPE", help="a YAML recipe (configs/*.yaml)")
    p.add_argument("--resume", metavar="latest|PATH",
                   help="continue from the run's latest checkpoint (none yet: start fresh), "
                        "a checkpoint folder, or another run folder")
    p.add_argument("--run-dir", metavar="RUN", help="the run folder (same as train.run_dir=RUN)")
    p.add_argument("--overwrite", action="store_true",
                   help="start fresh in a run folder that holds another run's checkpoints, "
                        "after moving that run's files to RUN/overwritten/")
    p.add_argument("--allow-recipe-change", action="store_true",
                   help="resume although keys that break an exact resume changed (model.*, "
                        "data.*, loss.*, optim.optimizer, seeds, world size); logged and "
                        "recorded in RUN/resumes.jsonl")
    p.add_argument("--check", action="store_true",
                   help="validate the recipe, print the resolved YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _error(msg: str, echo: bool = True) -> int:
    if echo:
        print(f"error: {msg}", file=sys.stderr)
    return 2


class RunError(ValueError):
    """A run that must not go on: one line, printed by the rank that found it (``echo``);
    the other ranks stop quietly. Every rank raises it at the same point (the checks are
    collective or read the same files), so they can leave the process group together
    (``retrieval.distributed.leave_after_failure`` reads ``all_ranks_know``)."""

    all_ranks_know = True

    def __init__(self, message: str, echo: bool = True) -> None:
        super().__init__(message)
        self.echo = echo


def _fail_together(trainer: "Trainer", exc: RunError) -> int:
    """A failure every rank agreed on: one line (from the rank that found it), every rank
    leaves the process group (a live gloo group can abort at exit), exit 2."""
    from retrieval.distributed import leave_after_failure

    trainer.close()
    code = _error(str(exc), exc.echo)
    leave_after_failure(exc)
    return code


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies under ``folder`` (local paths compared absolute)."""
    if not storage.is_remote(path) and not storage.is_remote(folder):
        path, folder = os.path.abspath(path), os.path.abspath(folder)
    return (path.rstrip("/") + "/").startswith(folder.rstrip("/") + "/")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: JSON has no NaN."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        argv = argv[1:]
    args = _parser().parse_intermixed_args(argv)
    try:
        recipe = Recipe.load(args.config, args.overrides)
        if args.run_dir:
            recipe.train.run_dir = args.run_dir
        if args.check:
            sys.stdout.write(recipe.to_yaml())
            return 0
        recipe.require_training_data()
        storage.check_output_dir(recipe.run_dir)
    except ConfigError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"cannot write the run folder: {exc}")
    from retrieval.distributed import leave_process_group

    from .data import NoUsableDataError, error_message

    from shard_tools.lock import LockHeld

    if args.overwrite and args.resume == "latest":
        return _error("--overwrite starts a fresh run; it cannot go with --resume latest")
    trainer = Trainer(recipe, progress=not args.no_progress, overwrite=args.overwrite,
                      allow_recipe_change=args.allow_recipe_change)
    try:
        trainer.setup(args.resume)
    except RunError as exc:
        return _fail_together(trainer, exc)
    except (ValueError, FileNotFoundError, OSError, LockHeld) as exc:
        trainer.close()
        return _error(error_line(exc))
    except KeyboardInterrupt:
        trainer.close()
        print("interrupted before training started: nothing was trained", file=sys.stderr)
        return 128 + signal.SIGINT
    try:
        trainer.fit()
    except NoUsableDataError as exc:   # found while streaming (maybe in a DataLoader worker)
        trainer.close()
        return _error(error_message(exc))
    except RunError as exc:
        return _fail_together(trainer, exc)
    except OSError as exc:             # a full disk, a lost mount: the last checkpoint stands
        trainer.close()
        return _error(error_line(exc))
    except KeyboardInterrupt:          # the second Ctrl-C
        trainer.close()
        print("interrupted again: stopped without a checkpoint", file=sys.stderr)
        return 128 + signal.SIGINT
    trainer.close()
    leave_process_group()
    if trainer.stopped_by is not None:
        if trainer.acc.is_main_process:
            saved = (f"checkpoint {trainer.last_checkpoint}" if trainer.last_checkpoint
                     else "nothing trained in this start, so no new checkpoint")
            print(f"stopped by {signal.Signals(trainer.stopped_by).name} at update "
                  f"{trainer.state.update}: {saved}; continue with --resume latest",
                  file=sys.stderr)
        return 128 + int(trainer.stopped_by)
    return 0


# ---------------------------------------------------------------- helpers

def set_train_mode(model: nn.Module, freeze_bn_stats: bool = True) -> None:
    """Train mode, except frozen BatchNorm layers (every parameter frozen) when
    ``freeze_bn_stats``: their running statistics then stay those of pre-training."""
    model.train()
    if not freeze_bn_stats:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


def param_digest(model: nn.Module) -> str:
    """sha256 of every parameter's values: equal on every rank while DDP keeps them in step."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers everywhere (BatchNorm statistics drift per rank between DDP forwards)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b.data, 0)


@dataclass
class TrainState:
    """Where the run is: the next batch to read and the optimizer updates done."""

    epoch: int = 0
    step: int = 0                 # next batch of the epoch
    update: int = 0               # optimizer updates done
    best_metric: float | None = None
    best_update: int | None = None
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_update: int | None = None
    # run totals over all ranks as of the last logged window (kept across resumes)
    skipped_total: float = 0.0
    mined_queries_total: float = 0.0
    # the last logged window's speed (kept across resumes, so a resume with nothing
    # left to do still reports it)
    throughput: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Builds everything from a ``Recipe`` (``setup``), then trains (``fit``)."""

    def __init__(self, recipe: Recipe, progress: bool = True, overwrite: bool = False,
                 allow_recipe_change: bool = False) -> None:
        self.recipe = recipe
        self.progress = progress and recipe.log.progress
        self.run_dir = storage.normalize(recipe.run_dir)
        self.overwrite = overwrite
        self.allow_recipe_change = allow_recipe_change
        self.state = TrainState()
        self.data = None
        self.tracker = None
        self.acc = None
        self.lock = None
        self.run_id: str | None = None
        self.summary: dict[str, Any] = {}
        self._lr_used = math.nan
        self.stopped_by: int | None = None        # the signal that stopped the run
        self.last_checkpoint: str | None = None
        self._signal_seen: int = 0
        self._old_handlers: dict[int, Any] = {}

    # -- construction
    def _accelerator(self) -> "Accelerator":
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        from .tracking import RunTracker

        r = self.recipe
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[r.train.precision]
        use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        if mp == "fp16" and (use_cpu or not torch.cuda.is_available()):
            log.warning("train.precision fp16 needs a GPU; training in fp32")
            mp = "no"
        self.logging_dir = RunTracker.logging_dir_for(self.run_dir, r.log.local_dir)
        acc = Accelerator(mixed_precision=mp,
                          log_with="tensorboard" if r.log.tensorboard else None,
                          project_config=ProjectConfiguration(project_dir=self.logging_dir,
                                                              logging_dir=self.logging_dir))
        self.precision = {"no": "fp32"}.get(mp, mp)
        return acc

    def setup(self, resume: str | None = None) -> None:
        from accelerate.utils import set_seed

        from .checkpoint import CheckpointStore
        from .data import build_train_data
        from .losses import build_criterion
        from .models import build_model
        from .optim import build_optimizer, build_scheduler, trainable_parameters
        from .tracking import RunTracker

        r = self.recipe
        # from the start: a SIGTERM during setup (SLURM cancelling a job that waits for its
        # data) stops the run before its first update instead of killing it with the lock held
        self._catch_stop_signals()
        self.acc = acc = self._accelerator()
        self.rank, self.world = acc.process_index, acc.num_processes
        if r.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        set_seed(r.train.seed)
        self.store = CheckpointStore(self.run_dir)
        self._take_run_folder()
        resume_from = None
        if resume:
            resume_from = CheckpointStore.resolve(resume, self.run_dir)
            if resume_from is None:
                log.info("--resume %s: no checkpoint in %s yet, starting fresh", resume, self.run_dir)
        self._claim_run(resume_from)
        loaded = self._read_checkpoint(resume_from) if resume_from else None
        if loaded and _inside(loaded[0], self.store.root):
            self.store.continue_from(loaded[4])   # later saves of the old run: abandoned
        # data before the model: a bad shard set fails before anything large is built
        self.data = build_train_data(r.data, r.model.image_hw, self.rank, self.world)
        self.steps_per_epoch = self.data.steps_per_epoch
        accum = r.train.grad_accum
        self.updates_per_epoch = math.ceil(self.steps_per_epoch / accum)
        self.total_updates = r.train.epochs * self.updates_per_epoch
        if r.train.max_steps:
            self.total_updates = min(self.total_updates, r.train.max_steps)

        model_cfg = r.model.replace(channels_last=r.model.channels_last or r.train.channels_last,
                                    compile=r.model.compile or r.train.compile)
        model = build_model(model_cfg)
        self.criterion = build_criterion(r.loss).to(acc.device)
        self.params = trainable_parameters(model)
        optimizer = build_optimizer(self.params, r.optim)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.params = trainable_parameters(acc.unwrap_model(self.model))
        self.scheduler = build_scheduler(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                         else self.optimizer, r.optim,
                                         r.train.epochs * self.updates_per_epoch,
                                         self.updates_per_epoch)
        if loaded:
            self._load(*loaded[:4])
        if acc.is_main_process:
            self._write_config(resumed=bool(loaded))
            if not resume_from and r.train.save_init:
                # the starting point, for an untrained-vs-trained comparison of the same weights
                self._save_encoder("init", {"update": 0, "epoch": 0})
        self.tracker = RunTracker(acc, self.run_dir, self.logging_dir, r.log.tensorboard)
        self.tracker.start()
        log.info("rank %d/%d on %s, %s: %d batches/epoch (%d images each), %d updates to go",
                 self.rank, self.world, acc.device, self.precision, self.steps_per_epoch,
                 r.data.places_per_batch * r.data.images_per_place,
                 self.total_updates - self.state.update)

    # -- the run folder: lock, identity, the checkpoint to resume
    def agree(self, ok: bool) -> bool:
        """True on every rank when every rank passes True (a collective: all ranks call it)."""
        from retrieval.distributed import all_ok

        return all_ok(ok)

    def _collective(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn`` on the main process; its error stops every rank (printed once)."""
        result, error = None, None
        if self.acc.is_main_process:
            try:
                result = fn(*args)
            except (ValueError, OSError, RuntimeError) as exc:
                error = exc
        if not self.agree(error is None):
            if error is not None:
                raise RunError(error_line(error)) from None
            raise RunError("the main process refused the run folder", echo=False)
        return result

    def _take_run_folder(self) -> None:
        """The lock: one process trains into a run folder at a time."""
        from .runfolder import run_lock

        def take() -> None:
            storage.makedirs(self.run_dir)
            lock = run_lock(self.run_dir)
            lock.acquire()
            self.lock = lock
        self._collective(take)

    def _claim_run(self, resume_from: str | None) -> None:
        """Refuse another run's checkpoints on a fresh start (or move them aside with
        ``--overwrite``), then read or write this folder's run id."""
        from .runfolder import archive_previous_run, refuse_foreign_checkpoints, start_run

        here = bool(resume_from) and _inside(resume_from, self.store.root)
        if here and self.overwrite:
            raise RunError("--overwrite starts a fresh run; it cannot resume from a checkpoint "
                           f"of the same folder ({resume_from})", echo=self.acc.is_main_process)

        def claim() -> str:
            if self.overwrite:
                archive_previous_run(self.run_dir)
            refuse_foreign_checkpoints(self.run_dir, bool(self.store.complete()), here)
            return start_run(self.run_dir)
        self.run_id = self._collective(claim)

    def _read_checkpoint(self, folder: str
                         ) -> tuple[str, dict, dict | None, "RecipeChange", dict[str, Any]]:
        """The newest intact checkpoint of ``folder``'s line, how its recipe differs, and its
        ``complete.json``. Breaking changes are refused here, before the data or the model
        are built."""
        from .checkpoint import CheckpointError, CheckpointStore
        from .resume import compare_recipes

        parent = folder.rsplit("/checkpoints/", 1)[0] if "/checkpoints/" in folder else None
        candidates = CheckpointStore(parent).fallbacks(folder) if parent else [folder]
        try:
            folder, (shared, per_rank, info) = CheckpointStore.load_newest_intact(
                candidates, self.rank, self.agree)
        except CheckpointError as exc:
            raise RunError(str(exc), echo=self.acc.is_main_process) from None
        change = compare_recipes(shared.get("recipe"), self.recipe.to_dict(),
                                 shared.get("world_size"), self.world)
        if change.breaking and not self.allow_recipe_change:
            raise RunError(
                f"--resume {folder}: the recipe changed in keys that break an exact resume: "
                f"{change.describe(change.breaking)}; resume with the checkpoint's values, or "
                "pass --allow-recipe-change", echo=self.acc.is_main_process)
        if change.breaking:
            log.warning("--allow-recipe-change: resuming with changes that break an exact "
                        "resume: %s", change.describe(change.breaking))
        return folder, shared, per_rank, change, info

    def _write_config(self, resumed: bool = False) -> None:
        path = storage.join(self.run_dir, "config.yaml")
        text = self.recipe.to_yaml()
        if storage.exists(path) and not resumed:   # a resume names its changes itself
            old = storage.read_bytes(path).decode()
            if old != text:
                log.warning("the recipe differs from %s (saved run); the new one replaces it", path)
        storage.write_bytes_atomic(path, text.encode())

    # -- checkpoints
    def _shared_state(self) -> dict[str, Any]:
        scaler = getattr(self.acc, "scaler", None)
        return {"model": self.acc.unwrap_model(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "train_state": self.state.to_dict(),
                "world_size": self.world,
                "recipe": self.recipe.to_dict()}

    def save_checkpoint(self) -> None:
        from .checkpoint import rng_state

        _sync_buffers(self.acc.unwrap_model(self.model))
        shared = self._shared_state() if self.acc.is_main_process else None
        per_rank = {"rng": rng_state(), "epoch": self.state.epoch, "step": self.state.step,
                    "update": self.state.update, "rank": self.rank}
        from .checkpoint import CheckpointWriteError

        try:
            self.last_checkpoint = self.store.save(
                self.state.update, shared, per_rank, self.rank, self.world, self.agree,
                self.recipe.train.keep_checkpoints, self.run_id)
        except CheckpointWriteError as exc:
            raise RunError(str(exc), echo="another rank failed" not in str(exc)) from None
        self._last_ckpt = self.state.update
        if self.tracker is not None:
            self.tracker.sync()

    def _load(self, folder: str, shared: dict[str, Any], per_rank: dict[str, Any] | None,
              change: "RecipeChange") -> None:
        """Restore a checkpoint, then apply the recipe's changeable keys for real."""
        from .checkpoint import set_rng_state
        from .runfolder import record_resume

        echo = self.acc.is_main_process
        try:
            self.acc.unwrap_model(self.model).load_state_dict(shared["model"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise RunError(f"--resume {folder}: the checkpoint's weights do not fit this "
                           f"recipe's model ({error_line(exc)})", echo=echo) from None
        self._load_optimizer(folder, shared, "optim.optimizer" in change.changed)
        scaler = getattr(self.acc, "scaler", None)
        if scaler is not None and shared.get("scaler"):
            scaler.load_state_dict(shared["scaler"])
        self.state = TrainState(**shared["train_state"])
        if shared.get("world_size") != self.world:
            log.warning("checkpoint made with %s processes, resuming with %d: the run continues "
                        "but will not repeat the uninterrupted one exactly",
                        shared.get("world_size"), self.world)
        if per_rank is not None:
            set_rng_state(per_rank["rng"])
        if self.state.step >= self.steps_per_epoch:
            self.state.epoch, self.state.step = self.state.epoch + 1, 0
        changes = change.describe() if change.changed else "none"
        log.info("resumed from %s: epoch %d, batch %d, update %d; recipe changes: %s", folder,
                 self.state.epoch, self.state.step, self.state.update, changes)
        if echo:
            record_resume(self.run_dir, {"checkpoint": folder, "update": self.state.update,
                                         "world_size": self.world, **change.to_record(),
                                         "allowed": bool(change.breaking)})

    def _load_optimizer(self, folder: str, shared: dict[str, Any], replaced: bool) -> None:
        """Restore the optimizer's state and the schedule's position, keeping this recipe's
        hyper-parameters (lr, weight decay, momentum, betas) and schedule: restored as they
        were saved, a changed ``optim.lr`` would be recorded but not used."""
        inner = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        wanted = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups]
        if replaced:
            log.warning("optim.optimizer changed: the optimizer's state starts afresh")
        else:
            try:
                self.optimizer.load_state_dict(shared["optimizer"])
            except (RuntimeError, KeyError, ValueError) as exc:
                raise RunError(f"--resume {folder}: the checkpoint's optimizer state does not "
                               f"fit this recipe ({error_line(exc)})",
                               echo=self.acc.is_main_process) from None
        for group, hyper in zip(inner.param_groups, wanted):
            group.update(hyper)
        self.scheduler.load_state_dict(shared["scheduler"])
        sched = self.scheduler
        sched.base_lrs = [g["initial_lr"] for g in inner.param_groups]
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    # -- validation
    def validate(self) -> dict[str, float]:
        """Recall@K with every rank embedding its share of the validation shards."""
        import numpy as np
        from accelerate.utils import gather_object

        import retrieval as R

        ev = self.recipe.eval
        enc = self.acc.unwrap_model(self.model)
        _sync_buffers(enc)
        size = self.recipe.eval_image_size
        t0 = time.perf_counter()
        parts = []
        for kind, source, rots in (("db", ev.database_shards, ev.rotations),
                                   ("q", ev.query_shards, [0])):
            urls = R.resolve_shards(source, ev.storage_options or None)
            for i in range(self.rank, len(urls), self.world):
                rows, recs = R.embed_shard(enc, urls[i], size, rots, ev.batch_size, ev.workers,
                                           ev.storage_options or None)
                parts.append((kind, i, rows.astype(np.float32), recs))
        enc.train()
        set_train_mode(enc, self.recipe.train.freeze_bn_stats)
        everything = gather_object(parts) if self.world > 1 else parts
        sets = {}
        for kind in ("db", "q"):
            mine = sorted((p for p in everything if p[0] == kind), key=lambda p: p[1])
            rows = [p[2] for p in mine if len(p[2])]
            recs = [r for p in mine for r in p[3]]
            if not rows:
                raise ValueError(f"validation: no image embedded from the {kind} shards")
            sets[kind] = R.Embeddings.from_arrays(np.concatenate(rows), recs)
        report = R.evaluate(sets["db"], sets["q"], protocol=ev.protocol, regions=ev.regions,
                            ks=ev.ks, year=ev.year, radius_m=ev.radius_m)
        recall = report.average_dedupe if (ev.dedupe and report.average_dedupe) else report.average
        out = {f"val/R@{k}": float(v) for k, v in report.average.items()}
        if report.average_dedupe:
            out.update({f"val/dedupe_R@{k}": float(v) for k, v in report.average_dedupe.items()})
        out["val/seconds"] = time.perf_counter() - t0
        metric = float(recall[ev.metric_k])
        self.state.last_eval = dict(out)
        self.state.last_eval_update = self.state.update
        if self.acc.is_main_process:
            storage.write_json_atomic(
                storage.join(self.run_dir, "eval", f"update-{self.state.update:09d}.json"),
                {"epoch": self.state.epoch, "update": self.state.update, **report.to_dict()})
            log.info("validation at update %d: %s = %.2f\n%s", self.state.update, ev.metric,
                     metric, report.table())
        if not math.isnan(metric) and (self.state.best_metric is None
                                       or metric > self.state.best_metric):
            self.state.best_metric, self.state.best_update = metric, self.state.update
            if self.acc.is_main_process:
                self._save_encoder("best", {"metric": ev.metric, "value": metric,
                                            "update": self.state.update, "epoch": self.state.epoch})
        out[f"val/best_{ev.metric}"] = float(self.state.best_metric) \
            if self.state.best_metric is not None else math.nan
        return out

    def _save_encoder(self, name: str, extra: dict[str, Any]) -> None:
        from .models import save_encoder

        target = storage.join(self.run_dir, name)
        enc = self.acc.unwrap_model(self.model)
        if not storage.is_remote(target):
            save_encoder(enc, target, extra)
            return
        with tempfile.TemporaryDirectory(prefix="streamloc-enc-") as tmp:
            save_encoder(enc, tmp, extra)
            for fname in ("model.safetensors", "config.json"):   # weights first, config last
                storage.put_file_atomic(os.path.join(tmp, fname), storage.join(target, fname))

    # -- the loop
    def _image_grid(self, batch: "Batch") -> None:
        from .tracking import batch_grid

        try:
            grid = batch_grid(batch.images, batch.labels, batch.is_query,
                              self.recipe.data.images_per_place)
            self.tracker.image("data/batch", grid, self.state.update)
        except Exception as exc:  # noqa: BLE001 - a picture must never stop a run
            log.warning("could not draw the batch grid: %s", exc)

    def fit(self) -> dict[str, Any]:
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        from .tracking import WindowMeter

        r, acc, st = self.recipe, self.acc, self.state
        model, criterion, optimizer = self.model, self.criterion, self.optimizer
        accum = r.train.grad_accum
        device = acc.device
        # the criterion filters by distance only with loss.overlap_distance_km set
        use_positions = r.loss.overlap_distance_km is not None
        self._last_ckpt = st.update if st.update else None
        meter = WindowMeter()
        bar = tqdm(total=self.total_updates, initial=min(st.update, self.total_updates),
                   unit="it", desc="train", dynamic_ncols=True,
                   disable=not (self.progress and acc.is_main_process),
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        if r.eval.enabled and r.eval.at_start and st.update == 0 and st.last_eval_update is None:
            self.tracker.scalars(self.validate(), 0)
        set_train_mode(model, r.train.freeze_bn_stats)
        grid_pending = r.log.image_grid and st.update == 0 and acc.is_main_process
        window_t0 = time.perf_counter()
        done = st.update >= self.total_updates
        last_loss = math.nan
        # before the loader forks its workers: they inherit the handlers and so are not
        # killed by the SIGTERM that SLURM sends to every process of the step
        self._catch_stop_signals()
        self.stopped_by = self._stop_requested()    # a signal during setup: no update at all
        while not done and st.epoch < r.train.epochs and self.stopped_by is None:
            batches = iter(self.data.batches(st.epoch, st.step))
            while st.step < self.steps_per_epoch:
                n_micro = min(accum, self.steps_per_epoch - st.step)
                t_update = time.perf_counter()
                wait = 0.0
                images = 0
                for i in range(n_micro):
                    t_wait = time.perf_counter()
                    batch = next(batches)
                    wait += time.perf_counter() - t_wait
                    if grid_pending:
                        self._image_grid(batch)
                        grid_pending = False
                    images += len(batch)
                    meter.add("skipped", batch.skipped)
                    meter.add("queries", int(batch.is_query.sum()))
                    batch = batch.to(device, non_blocking=True)
                    sync = i == n_micro - 1
                    with (contextlib.nullcontext() if sync or self.world == 1
                          else acc.no_sync(model)):
                        with acc.autocast():
                            desc = model(batch.images)
                        loss, stats = criterion(desc, batch.labels, footprints=batch.footprints,
                                                is_query=batch.is_query,
                                                positions=batch.positions if use_positions else None)
                        acc.backward(loss / n_micro)
                    meter.add("loss", loss)
                    for k, v in stats.items():
                        meter.add(k, float(v))
                if r.train.clip_grad_norm:
                    acc.clip_grad_norm_(self.params, r.train.clip_grad_norm)
                self._lr_used = optimizer.param_groups[0]["lr"]
                optimizer.step()
                if not getattr(optimizer, "step_was_skipped", False):
                    self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                st.step += n_micro
                st.update += 1
                meter.add("time", time.perf_counter() - t_update)
                meter.add("wait", wait)
                meter.add("images", images)
                bar.update()
                if st.update % r.log.every_steps == 0 or st.update == self.total_updates:
                    last_loss = self._log_window(meter, window_t0, bar)
                    meter.reset()
                    window_t0 = time.perf_counter()
                epoch_end = st.step >= self.steps_per_epoch
                done = st.update >= self.total_updates
                if r.eval.enabled and r.eval.every_steps and st.update % r.eval.every_steps == 0:
                    self.tracker.scalars(self.validate(), st.update)
                if (r.train.checkpoint_every and st.update % r.train.checkpoint_every == 0
                        and not epoch_end and not done):
                    self.save_checkpoint()
                self.stopped_by = self._stop_requested()
                if done or self.stopped_by is not None:
                    break
            if self.stopped_by is not None:
                break
            # end of an epoch (or of max_steps)
            if r.eval.enabled and st.last_eval_update != st.update and (
                    not r.eval.every_steps or done):
                self.tracker.scalars(self.validate(), st.update)
            if st.step >= self.steps_per_epoch:
                st.epoch, st.step = st.epoch + 1, 0
            if self._last_ckpt != st.update:
                self.save_checkpoint()
        bar.close()
        if self.stopped_by is not None:
            if self._last_ckpt != st.update and st.update:   # nothing to save before update 1
                self.save_checkpoint()
            return {}
        if acc.is_main_process:
            self._save_encoder("final", {"update": st.update, "epoch": st.epoch})
        digest = param_digest(acc.unwrap_model(model))
        digests = gather_object([digest]) if self.world > 1 else [digest]
        if len(set(digests)) > 1:
            log.error("parameters differ across ranks at the end of training: %s", digests)
        final = {"final/loss": last_loss}
        if st.best_metric is not None:
            final[f"final/best_{r.eval.metric}"] = st.best_metric
        final.update({f"final/{k.split('/', 1)[1]}": v for k, v in st.last_eval.items()
                      if k.startswith("val/R@")})
        if self.tracker is not None:
            self.tracker.hparams(self.recipe.flat(), final)
        throughput = {"images_per_s": None, "data_wait_fraction": None,
                      **st.throughput, "mined_queries": st.mined_queries_total}
        from retrieval.environment import environment

        self.summary = json_safe({"updates": st.update, "epochs": st.epoch,
                                  "world_size": self.world, "param_sha256_by_rank": digests,
                                  **final, **throughput,
                                  "seeds": {"train": r.train.seed, "data": r.data.seed},
                                  "environment": environment(seed=r.train.seed)})
        if acc.is_main_process:
            storage.write_json_atomic(storage.join(self.run_dir, "summary.json"), self.summary)
        acc.wait_for_everyone()
        return self.summary

    def _log_window(self, meter: "WindowMeter", window_t0: float, bar: Any) -> float:
        """Average the window over ranks and log it (every rank takes part in the reduce)."""
        acc = self.acc
        n = meter.counts.get("loss", 0)
        vec = torch.tensor([meter.total("loss"), float(n), meter.total("skipped"),
                            meter.total("images"), meter.total("queries")],
                           dtype=torch.float64, device=acc.device)
        if self.world > 1:
            vec = acc.reduce(vec, reduction="sum")
        loss = float(vec[0] / max(vec[1], 1))
        self.state.skipped_total += float(vec[2])
        self.state.mined_queries_total += float(vec[4])
        elapsed = max(time.perf_counter() - window_t0, 1e-9)
        step_time = meter.total("time")
        values = {
            "train/loss": loss,
            "train/lr": self._lr_used,
            "train/batch_acc": meter.mean("batch_acc"),
            "train/mined_pos": meter.mean("mined_pos"),
            "train/mined_neg": meter.mean("mined_neg"),
            "train/removed_neg": meter.mean("removed_neg"),
            "perf/images_per_s": float(vec[3]) / elapsed,
            "perf/data_wait_fraction": meter.total("wait") / max(step_time, 1e-9),
            "data/skipped": self.state.skipped_total,
            "data/mined_queries": self.state.mined_queries_total,
            "train/epoch": self.state.epoch + self.state.step / self.steps_per_epoch,
        }
        if torch.cuda.is_available() and acc.device.type == "cuda":
            values["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self.state.throughput = {"images_per_s": values["perf/images_per_s"],
                                 "data_wait_fraction": values["perf/data_wait_fraction"]}
        self.tracker.scalars(values, self.state.update)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['train/lr']:.2e}",
                        img_s=f"{values['perf/images_per_s']:.0f}", refresh=False)
        return loss

    # -- stopping on a signal
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._signal_seen == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt       # a second Ctrl-C: stop now
        self._signal_seen = signum

    def _catch_stop_signals(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return                       # signal handlers belong to the main thread
        for sig in STOP_SIGNALS:
            self._old_handlers.setdefault(sig, signal.signal(sig, self._on_signal))

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    def _stop_requested(self) -> int | None:
        """The signal every rank stops for (the highest number any rank received), or None."""
        from retrieval.distributed import max_over_ranks

        seen = max_over_ranks(self._signal_seen)
        if seen and self._signal_seen == 0:
            self._signal_seen = seen
        return seen or None

    def close(self) -> None:
        self._restore_signals()
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
        if self.data is not None:
            self.data.close()
            self.data = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
