"""What moves the trained weights: the demo's training, changing one thing at a time.

(Each rank streams its own share of the places, so the number of ranks changes the batches
by design; it is held fixed here, at one.)

Trains the demo recipe for ``--updates`` optimizer updates (no validation) on a finished
demo's shards, once per variant, and compares the weights (sha256 of ``RUN/final``):

- ``baseline`` twice: the same environment must give the same weights;
- ``avx2``: ``ATEN_CPU_CAPABILITY=avx2``, ATen's kernels of a machine without AVX-512;
- ``oneDNN avx2``: ``ONEDNN_MAX_CPU_ISA=AVX2``, the convolution library's kernels alike;
- ``1 thread``: ``OMP_NUM_THREADS=1`` against the default;
- ``--python PY``: another interpreter (a venv with other torch/torchvision versions and the
  project's dependencies) runs the same training.

    python benchmarks/train_determinism.py --demo runs/demo --updates 30
    python benchmarks/train_determinism.py --python /tmp/venv-torch213/bin/python

Prints a table (variant, environment, weights digest, same as baseline) and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from retrieval.provenance import file_sha256  # noqa: E402


def train_argv(python: str, demo: Path, run: Path, updates: int, ranks: int) -> list[str]:
    shards = demo / "shards"
    recipe = [f"train.run_dir={run}", f"data.train_shards={shards / 'train-places'}",
              "eval.database_shards=null", "eval.query_shards=null", f"train.max_steps={updates}",
              "train.checkpoint_every=null", "train.save_init=false", "log.tensorboard=false"]
    if ranks > 1:
        launch = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(ranks), "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "-m", "trainer"]
    else:
        launch = [python, "-m", "trainer"]
    return launch + ["--config", str(REPO / "configs" / "demo-bluemarble.yaml"),
                     "--no-progress", *recipe]


def run_variant(name: str, argv: list[str], env: dict, run: Path) -> dict:
    probe = ("import json, torch, torchvision; print(json.dumps([torch.__version__, "
             "torchvision.__version__, torch.backends.cpu.get_cpu_capability(), "
             "torch.get_num_threads()]))")
    seen = json.loads(subprocess.run([argv[0], "-c", probe], env=env, capture_output=True,
                                     text=True, check=True).stdout)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: variant {name} failed: {proc.stderr.strip().splitlines()[-1]}")
    weights = run / "final" / "model.safetensors"
    return {"variant": name, "torch": seen[0], "torchvision": seen[1], "cpu_capability": seen[2],
            "threads": seen[3], "seconds": round(time.perf_counter() - t0, 1),
            "weights_sha256": file_sha256(weights)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("runs/demo"), help="a finished demo folder")
    p.add_argument("--output", type=Path, default=Path("runs/determinism"))
    p.add_argument("--updates", type=int, default=30, help="optimizer updates per run")
    p.add_argument("--python", action="append", default=[], metavar="PY",
                   help="another interpreter to compare (repeatable)")
    args = p.parse_args(argv)
    if not (args.demo / "shards" / "train-places" / "manifest.json").exists():
        print(f"error: {args.demo}/shards/train-places: run make demo first", file=sys.stderr)
        return 2
    base_env = dict(os.environ, PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1")
    base_env.pop("ATEN_CPU_CAPABILITY", None)
    variants = [("baseline", sys.executable, {}, 1), ("baseline again", sys.executable, {}, 1),
                ("avx2 kernels", sys.executable, {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
                ("oneDNN avx2", sys.executable, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, 1),
                ("1 thread", sys.executable, {"OMP_NUM_THREADS": "1"}, 1)]
    variants += [(f"python {py}", py, {}, 1) for py in args.python]
    rows = []
    for i, (name, python, extra, ranks) in enumerate(variants):
        run = args.output / f"run-{i}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        rows.append(run_variant(name, train_argv(python, args.demo, run, args.updates, ranks),
                                {**base_env, **extra}, run) | {"ranks": ranks})
    base = rows[0]["weights_sha256"]
    for r in rows:
        r["same_as_baseline"] = r["weights_sha256"] == base
    cols = ("variant", "torch", "torchvision", "cpu_capability", "threads", "ranks", "seconds",
            "same_as_baseline")
    print(f"demo recipe, {args.updates} updates; weights compared by sha256 of RUN/final")
    print("  ".join(f"{c:>14}" for c in cols) + "  weights")
    for r in rows:
        print("  ".join(f"{str(r[c]):>14}" for c in cols) + f"  {r['weights_sha256'][:12]}")
    print(json.dumps({"updates": args.updates, "variants": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
