"""``python -m trainer``: training (the default command), ``inspect-data`` and ``demo``.

``accelerate launch -m trainer --config CFG [section.key=value ...]`` trains;
``python -m trainer inspect-data ...`` prints the batches a rank would see.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from typing import Callable, Sequence

log = logging.getLogger("trainer")

INSPECT_EXAMPLES = """examples:
  python -m trainer inspect-data --shards runs/demo/shards/train-places --steps 3
  python -m trainer inspect-data --config configs/earthloc.yaml data.train_shards=runs/demo/shards/train-places \\
      --rank 1 --world-size 2 --epoch 3 --steps 5
  python -m trainer inspect-data --shards s3://bucket/places data.places_per_batch=8 \\
      data.batch_grouping=spatial --no-decode
"""


def _inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer inspect-data",
        description="Print one JSON line per batch that a rank would train on: "
                    '{"epoch", "step", "rank", "keys" (places in batch order), "queries", '
                    '"skipped"}. No model, no GPU; the batches are exactly those of training '
                    "with the same recipe, world size and data.workers.",
        epilog=INSPECT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", metavar="CFG", help="a recipe YAML with a data: section")
    src.add_argument("--shards", metavar="SRC", help="a place-shard set, with default data settings")
    p.add_argument("--steps", type=int, metavar="N", help="stop after N batches (default: the epoch)")
    p.add_argument("--epoch", type=int, default=0, metavar="E")
    p.add_argument("--start-step", type=int, default=0, metavar="S",
                   help="begin at step S, as a resumed run does")
    p.add_argument("--rank", type=int, default=0, metavar="R")
    p.add_argument("--world-size", type=int, default=1, metavar="W")
    p.add_argument("--image-size", type=int, metavar="PX",
                   help="decode size (default: model.image_size of the recipe, else 224)")
    p.add_argument("--no-decode", action="store_true",
                   help="do not decode images (fast; corrupt JPEGs then go unnoticed)")
    p.add_argument("--loader", choices=("inline", "workers"), default="inline",
                   help="inline: every stream in this process (same batches); "
                        "workers: through the DataLoader's worker processes")
    p.add_argument("--counts", action="store_true",
                   help="end with a JSON line of the totals (skipped data by kind)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def _check_inspect_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range numbers instead of replacing or misreporting them."""
    for flag, value, low in (("--world-size", args.world_size, 1), ("--epoch", args.epoch, 0),
                             ("--image-size", args.image_size, 1), ("--steps", args.steps, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 <= args.rank < args.world_size:
        raise ValueError(f"--rank {args.rank} must be in 0..{args.world_size - 1}")


def _recipe_image_size(recipe: dict) -> tuple[int, int]:
    """model.image_size of the recipe (default 224), checked like the model section does."""
    from .models.config import image_hw

    size = (recipe.get("model") or {}).get("image_size")
    try:
        return image_hw(224 if size is None else size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model.image_size: {exc}") from None


def inspect_data(argv: Sequence[str]) -> int:
    from .config import apply_overrides, load_recipe
    from .data import DataConfig, NoUsableDataError, build_train_data, error_message

    args = _inspect_parser().parse_intermixed_args(list(argv))
    try:
        recipe = load_recipe(args.config) if args.config else {}
        recipe = apply_overrides(recipe, args.overrides)
        data = dict(recipe.get("data") or {})
        if args.shards:
            data["train_shards"] = args.shards
        cfg = DataConfig.from_dict(data)
        _check_inspect_args(args)
        size = args.image_size if args.image_size is not None else _recipe_image_size(recipe)
        td = build_train_data(cfg, size, args.rank, args.world_size,
                              num_workers=0 if args.loader == "inline" else None,
                              decode=not args.no_decode)
        if not 0 <= args.start_step <= td.steps_per_epoch:
            raise ValueError(f"--start-step must be in 0..{td.steps_per_epoch}")
    except (ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    total = td.steps_per_epoch - args.start_step
    if args.steps is not None:
        total = min(total, args.steps)
    bar = tqdm(total=total, unit="batch", disable=args.no_progress or not sys.stderr.isatty(),
               file=sys.stderr)
    try:
        for batch in itertools.islice(td.batches(args.epoch, args.start_step), total):
            print(json.dumps(batch.summary()), flush=True)
            bar.update()
        if args.counts:
            print(json.dumps({"steps_per_epoch": td.steps_per_epoch, "counts": td.counters()}))
    except BrokenPipeError:   # `| head`: the reader has seen enough
        sys.stderr.close()
    except NoUsableDataError as exc:   # found while streaming, maybe in a worker
        print(f"error: {error_message(exc)}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        td.close()
    return 0


def _train(argv: Sequence[str]) -> int:
    try:
        from .train import main as train_main  # the training loop
    except ImportError as exc:
        print(f"error: training is not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(train_main(list(argv)) or 0)


def _demo(argv: Sequence[str]) -> int:
    from .demo import main as demo_main

    return int(demo_main(list(argv)) or 0)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"inspect-data": inspect_data, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print("usage: python -m trainer [inspect-data|demo] ...\n\n"
              "  (default)     train: accelerate launch -m trainer --config CFG [section.key=value ...]\n"
              "                (python -m trainer --config CFG -h for the options)\n"
              "  inspect-data  print the batches a rank would see (python -m trainer inspect-data -h)\n"
              "  demo          the end-to-end Blue Marble demo (python -m trainer demo -h)")
        return 0
    return _train(argv)


if __name__ == "__main__":
    sys.exit(main())
