"""The training loop: ``accelerate launch -m trainer --config RECIPE [section.key=value ...]``.

One process per device. accelerate prepares the model and the optimizer; the
streaming data (``trainer.data``) already splits the shards by rank and stays
outside ``prepare``; batches are moved to the device here, non-blocking from
pinned memory. Each epoch is ``steps_per_epoch`` batches on every rank, grouped
into optimizer updates of ``train.grad_accum`` batches (the last update of an
epoch takes what is left). Checkpoints are written at update boundaries, so a
run resumed with ``--resume latest`` continues with exactly the batches, RNG
streams and optimizer state of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from shard_tools import storage

from .recipe import ConfigError, Recipe

__all__ = ["main", "Trainer", "TrainState", "set_train_mode", "EXAMPLES"]

log = logging.getLogger("trainer.train")

EXAMPLES = """examples:
  python -m trainer --config configs/demo-bluemarble.yaml
  python -m trainer --config configs/demo-bluemarble.yaml --check train.epochs=2
  accelerate launch --num_processes 2 -m trainer --config configs/earthloc.yaml \\
      data.train_shards=s3://bucket/earthloc/places model.pretrained=/models/resnet50.pth \\
      train.run_dir=s3://bucket/runs/earthloc
  accelerate launch -m trainer --config configs/earthloc.yaml --resume latest
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
    p.add_argument("--check", action="store_true",
                   help="validate the recipe, print the resolved YAML and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


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

    trainer = Trainer(recipe, progress=not args.no_progress)
    try:
        trainer.setup(args.resume)
    except (ValueError, FileNotFoundError, OSError) as exc:
        trainer.close()
        return _error(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    try:
        trainer.fit()
    except NoUsableDataError as exc:   # found while streaming (maybe in a DataLoader worker)
        return _error(error_message(exc))
    finally:
        trainer.close()
    leave_process_group()
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------- the trainer

class Trainer:
    """Builds everything from a ``Recipe`` (``setup``), then trains (``fit``)."""

    def __init__(self, recipe: Recipe, progress: bool = True) -> None:
        self.recipe = recipe
        self.progress = progress and recipe.log.progress
        self.run_dir = storage.normalize(recipe.run_dir)
        self.state = TrainState()
        self.data = None
        self.tracker = None
        self.acc = None
        self.summary: dict[str, Any] = {}
        self._throughput: dict[str, float] = {}
        self._lr_used = math.nan

    # -- construction
    def _accelerator(self):
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
        self.acc = acc = self._accelerator()
        self.rank, self.world = acc.process_index, acc.num_processes
        if r.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        set_seed(r.train.seed)
        self.store = CheckpointStore(self.run_dir)
        resume_from = None
        if resume:
            resume_from = CheckpointStore.resolve(resume, self.run_dir)
            if resume_from is None:
                log.info("--resume %s: no checkpoint in %s yet, starting fresh", resume, self.run_dir)
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
        if resume_from:
            self._load(resume_from)
        if acc.is_main_process:
            self._write_config()
            if not resume_from and r.train.save_init:
                # the starting point, for an untrained-vs-trained comparison of the same weights
                self._save_encoder("init", {"update": 0, "epoch": 0})
        self.tracker = RunTracker(acc, self.run_dir, self.logging_dir, r.log.tensorboard)
        self.tracker.start()
        log.info("rank %d/%d on %s, %s: %d batches/epoch (%d images each), %d updates to go",
                 self.rank, self.world, acc.device, self.precision, self.steps_per_epoch,
                 r.data.places_per_batch * r.data.images_per_place,
                 self.total_updates - self.state.update)

    def _write_config(self) -> None:
        path = storage.join(self.run_dir, "config.yaml")
        text = self.recipe.to_yaml()
        if storage.exists(path):
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
        self.store.save(self.state.update, shared, per_rank, self.rank, self.world,
                        self.acc.wait_for_everyone, self.recipe.train.keep_checkpoints)
        self._last_ckpt = self.state.update
        if self.tracker is not None:
            self.tracker.sync()

    def _load(self, folder: str) -> None:
        from .checkpoint import CheckpointStore, set_rng_state

        shared, per_rank, info = CheckpointStore.load(folder, self.rank)
        self.acc.unwrap_model(self.model).load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
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
        log.info("resumed from %s: epoch %d, batch %d, update %d", folder, self.state.epoch,
                 self.state.step, self.state.update)

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
    def _image_grid(self, batch) -> None:
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
        while not done and st.epoch < r.train.epochs:
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
                if done:
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
        self.summary = {"updates": st.update, "epochs": st.epoch, "world_size": self.world,
                        "param_sha256_by_rank": digests, **final,
                        **{k: v for k, v in self._throughput.items()}}
        if acc.is_main_process:
            storage.write_json_atomic(storage.join(self.run_dir, "summary.json"), self.summary)
        acc.wait_for_everyone()
        return self.summary

    def _log_window(self, meter, window_t0: float, bar) -> float:
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
        self._throughput = {"images_per_s": values["perf/images_per_s"],
                            "data_wait_fraction": values["perf/data_wait_fraction"],
                            "mined_queries": self.state.mined_queries_total}
        self.tracker.scalars(values, self.state.update)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['train/lr']:.2e}",
                        img_s=f"{values['perf/images_per_s']:.0f}", refresh=False)
        return loss

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None
        if self.data is not None:
            self.data.close()
            self.data = None
