"""``python -m trainer demo``: the embedded end-to-end job on NASA's Blue Marble.

It runs the commands a user would type, in order, each as its own process: build the
dataset, mine query pairs, pack shards, train (``accelerate launch``), evaluate the
untrained and the trained encoder, index and localize. Every step is resumable, so a
re-run skips what is done. The exact command lines go into ``DIR/report.md``
(``trainer.report``) so that each step can be reproduced by hand.

Ctrl-C (or SIGTERM) stops the demo cleanly: each step runs in its own session, and the
demo passes the signal to it once, as a terminal would (torchrun starts its workers
alike), then waits for it: the trainer finishes its update and writes a checkpoint
(``accelerate launch`` gives it 5 s before a SIGKILL). The demo then exits 130 (143)
with one line, and the same command continues.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Iterator

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  python -m trainer demo                              # everything, into runs/demo (make demo)
  python -m trainer demo --output runs/demo2 --dry-run   # print the commands only
  python -m trainer demo --recipe configs/demo-bluemarble.yaml train.epochs=2
  python -m trainer demo --report-table runs/demo      # the README's Results table

Each step resumes: a killed demo re-run with the same command continues where it stopped.
The demo starts from random weights (nothing is downloaded); give model.pretrained=/path
to start from a local weights file."""


@dataclass
class Step:
    name: str
    argv: list[str]
    done: Path | None = None        # a file that marks the step complete (skip it when present)

    def shell(self) -> str:
        """The command as a user would type it here (the venv's tools, relative paths)."""
        return " ".join(shlex.quote(_short(a)) for a in _user_argv(self.argv))


def _short(arg: str) -> str:
    """Paths under the working directory are shown relative to it."""
    if os.path.isabs(arg) and arg.startswith(os.getcwd() + os.sep):
        return os.path.relpath(arg)
    return arg


def _user_argv(argv: list[str]) -> list[str]:
    """``<venv>/python -m accelerate.commands.launch`` is ``<venv>/accelerate launch``."""
    if argv[1:3] == ["-m", "accelerate.commands.launch"]:
        tool = os.path.join(os.path.dirname(argv[0]), "accelerate")
        if os.path.exists(tool):
            return [tool, "launch", *argv[3:]]
    return argv


@dataclass
class DemoPlan:
    """The commands of the demo, with the paths they share."""

    out: Path
    recipe: str
    overrides: list[str] = field(default_factory=list)
    workers: int = 2
    localize: int = 3
    python: str = "python"

    @property
    def bm(self) -> Path:
        return self.out / "bluemarble"

    @property
    def run(self) -> Path:
        return self.out / "train"

    def shards(self, name: str) -> Path:
        return self.out / "shards" / name

    def _py(self, *args: str) -> list[str]:
        return [self.python, "-m", *args]

    def data_steps(self) -> list[Step]:
        bm, w = self.bm, str(self.workers)
        pairs = self.out / "pairs_iou050.json"
        convert = lambda *a: self._py("shard_tools", "convert", "--format", "earthloc", *a)  # noqa: E731
        return [
            # --area-scale 64: the demo's zooms 6-8 are three levels (4^3 in area) coarser than
            # EarthLoc's 9-11, so the real query areas are scaled alike; a query then has about
            # as many positives as a real one (~60) and enough IoU > 0.5 pairs to mine
            Step("dataset", self._py("shard_tools", "bluemarble", "--output", str(bm),
                                     "--area-scale", "64", "--workers", w)),
            Step("pairs", self._py("shard_tools", "pairs", "--database", str(bm / "database"),
                                   "--queries", str(bm / "queries" / "train"), "--min-iou", "0.5",
                                   "--output", str(pairs)), done=pairs),
            Step("train shards", convert("--kind", "places", "--input", str(bm / "database"),
                                         "--queries", str(bm / "queries" / "train"),
                                         "--query-pairs", str(pairs), "--output",
                                         str(self.shards("train-places")), "--workers", w)),
            Step("database shards", convert("--kind", "images", "--input",
                                             str(bm / "database-2021.txt"), "--output",
                                             str(self.shards("database")), "--workers", w)),
            Step("query shards", convert("--kind", "images", "--input",
                                         str(bm / "queries" / "test"), "--output",
                                         str(self.shards("queries-test")))),
            Step("verify", self._py("shard_tools", "verify", str(self.shards("train-places")),
                                    "--quick")),
            Step("verify", self._py("shard_tools", "verify", str(self.shards("database")),
                                    "--quick")),
            Step("verify", self._py("shard_tools", "verify", str(self.shards("queries-test")))),
        ]

    def train_step(self) -> Step:
        paths = [f"train.run_dir={self.run}", f"data.train_shards={self.shards('train-places')}",
                 f"eval.database_shards={self.shards('database')}",
                 f"eval.query_shards={self.shards('queries-test')}"]
        # one training thread, set rather than left to accelerate (which picks 1 or the
        # physical core count): the thread count changes how reductions round, so the
        # trained weights, and the README's figures, depend on it
        launch = [self.python, "-m", "accelerate.commands.launch", "--num_processes", "1",
                  "--num_machines", "1", "--num_cpu_threads_per_process", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]
        return Step("train", launch + ["-m", "trainer", "--config", self.recipe, "--resume",
                                       "latest", *paths, *self.overrides],
                    done=self.run / "summary.json")

    def evaluate_step(self, which: str) -> Step:
        # trained = RUN/final, the end of the cosine schedule: the demo's validation region
        # holds only ~10 queries, too few for RUN/best (selected on it) to be the better model
        model = self.run / ("init" if which == "untrained" else "final")
        out = self.out / f"eval-{which}.json"
        return Step(f"evaluate {which}", self._py(
            "retrieval", "evaluate", "--model", str(model), "--database",
            str(self.shards("database")), "--queries", str(self.shards("queries-test")),
            "--protocol", "apl", "--regions", "earthloc-test", "--rotations", "0,90,180,270",
            "--k", "1,5,10,20,100", "--cache", str(self.out / "embeddings"), "--output", str(out)),
            done=out)

    def localize_steps(self, database_embeddings: str, images: list[str]) -> list[Step]:
        index = self.out / "index"
        return [
            Step("index", self._py("retrieval", "index", "--embeddings", database_embeddings,
                                   "--output", str(index), "--factory", "Flat")),
            Step("localize", self._py("retrieval", "localize", "--model", str(self.run / "final"),
                                      "--index", str(index), *images, "--top-k", "10",
                                      "--output", str(self.out / "localize.geojson"),
                                      "--map", str(self.out / "localize.png"))),
        ]


def pick_queries(folder: Path, n: int) -> list[str]:
    """``n`` test photographs spread over the regions (every k-th of the sorted names)."""
    names = sorted(str(p) for p in folder.glob("*.jpg"))
    if not names or n < 1:
        return []
    stride = max(1, len(names) // n)
    return names[::stride][:n]


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A stop signal reached the demo; ``step`` (if one was running) stopped with ``code``."""

    def __init__(self, signum: int, step: str | None = None, code: int | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.step, self.code = signum, step, code

    def message(self) -> str:
        where = (f"demo step '{self.step}' stopped with exit code {self.code}" if self.step
                 else "the demo stopped")
        return (f"interrupted by {signal.Signals(self.signum).name}: {where}; run the same "
                "command again to continue")


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` while the demo runs (SIGTERM would
    otherwise end the demo at once and leave its step running)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield                            # signal handlers belong to the main thread
        return
    old = {sig: signal.signal(sig, _raise_interrupted) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _wait(proc: subprocess.Popen) -> tuple[int, int | None]:
    """(the child's exit code, the first stop signal that arrived meanwhile). The child has
    its own process group: each signal is passed to that group once, as a terminal passes
    Ctrl-C to a foreground job, and the child decides how to stop (the trainer finishes its
    update and checkpoints; a second Ctrl-C stops it at once)."""
    stopped: int | None = None
    while True:
        try:
            return proc.wait(), stopped
        except (KeyboardInterrupt, Interrupted) as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            stopped = stopped or signum
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signum)


def run_step(step: Step, env: dict) -> float:
    """Run one command with its output on the console; a failure ends the demo (exit 2), a
    stop signal ``Interrupted`` once the command has stopped."""
    if step.done is not None and step.done.exists():
        log.info("%s: done already (%s)", step.name, step.done)
        return 0.0
    print(f"\n== {step.name}: {step.shell()}", flush=True)
    t0 = time.perf_counter()
    code, stopped = _wait(subprocess.Popen(step.argv, env=env, start_new_session=True))
    if stopped is not None:
        raise Interrupted(stopped, step.name, code)
    if code != 0:
        print(f"error: demo step '{step.name}' failed with exit code {code}: "
              f"{step.shell()}", file=sys.stderr)
        raise SystemExit(2)
    return time.perf_counter() - t0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer demo",
        description="The end-to-end demo on NASA's Blue Marble: dataset, shards, training, "
                    "evaluation of the untrained and the trained encoder, localization, and a "
                    "report (DIR/report.md).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="runs/demo", metavar="DIR", help="demo folder (default runs/demo)")
    p.add_argument("--recipe", default="configs/demo-bluemarble.yaml", metavar="YAML",
                   help="training recipe (default configs/demo-bluemarble.yaml)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for building and packing (default min(2, CPUs))")
    p.add_argument("--localize", type=int, default=3, metavar="N",
                   help="test photographs to localize and map (default 3)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-table", metavar="DIR", type=Path,
                   help="print the README's Results table (recall, date, environment) of the "
                        "finished demo in DIR, and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="recipe overrides for the training step")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.report_table is not None:
        from .report import results_table

        try:
            print(results_table(args.report_table))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        with stop_signals_raise():
            return _run(args)
    except KeyboardInterrupt:            # before the handlers were in place
        return _interrupted(Interrupted(signal.SIGINT))
    except Interrupted as exc:
        return _interrupted(exc)


def _interrupted(exc: Interrupted) -> int:
    print(exc.message(), file=sys.stderr)
    return 128 + exc.signum


def _run(args: argparse.Namespace) -> int:
    """The demo's steps in order (``main`` turns a stop signal into one line)."""
    if not Path(args.recipe).is_file():
        print(f"error: {args.recipe}: no such recipe", file=sys.stderr)
        return 2
    if args.workers < 1 or args.localize < 0:
        print(f"error: --workers must be >= 1 and --localize >= 0, got {args.workers} and "
              f"{args.localize}", file=sys.stderr)
        return 2
    from .recipe import ConfigError, Recipe

    try:   # a typo in an override fails now, not after the data steps
        Recipe.load(args.recipe, list(args.overrides))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    plan = DemoPlan(Path(args.output), args.recipe, list(args.overrides), args.workers,
                    args.localize, python=sys.executable)
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    steps = plan.data_steps() + [plan.train_step(), plan.evaluate_step("untrained"),
                                 plan.evaluate_step("trained")]
    if args.dry_run:
        for step in steps:
            print(step.shell())
        print(f"# then: retrieval index over the trained model's database embeddings, "
              f"retrieval localize on {args.localize} test photographs, and the report")
        return 0
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in steps:
        timings[step.name] = timings.get(step.name, 0.0) + run_step(step, env)
    trained = json.loads((plan.out / "eval-trained.json").read_text())
    images = pick_queries(plan.bm / "queries" / "test", args.localize)
    tail = plan.localize_steps(trained["database_embeddings"], images) if images else []
    for step in tail:
        timings[step.name] = run_step(step, env)
    timings["total"] = time.perf_counter() - t0

    from .report import write_demo_report

    report, table = write_demo_report(plan, steps + tail, timings)
    print("\n" + table)
    print(f"\nreport: {report}")
    return 0
