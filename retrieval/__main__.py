"""``python -m retrieval <command>``: embed, index, search, evaluate, localize.

Each command lives in ``retrieval/cli/<name>.py`` with ``HELP``, ``EXAMPLES``,
``add_arguments(parser)`` and ``run(args) -> int``, imported lazily so that
``--help`` stays fast. Bad input is one ``error: ...`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("embed", "index", "search", "evaluate", "localize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retrieval",
        description="Retrieval at database scale: embed image shards, build sharded FAISS "
                    "indexes, search, evaluate recall@K, localize photographs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m retrieval embed --model runs/x/best --shards shards/db --output emb/db\n"
               "  python -m retrieval index --embeddings emb/db --output idx/db --num-shards 4\n"
               "  python -m retrieval <command> --help",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in COMMANDS:
        mod = importlib.import_module(f"retrieval.cli.{name}")
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           epilog="examples:\n" + mod.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .cli import CommandError
    from .distributed import leave_process_group

    try:
        code = int(args._run(args) or 0)
        leave_process_group()
        return code
    except (CommandError, ValueError, OSError, IndexError) as exc:
        from shard_tools.cli import error_line

        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
