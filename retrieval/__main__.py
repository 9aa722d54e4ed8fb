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
    from .distributed import PeerFailed, leave_after_failure, leave_process_group

    try:
        code = int(args._run(args) or 0)
        leave_process_group()
        return code
    except PeerFailed as exc:     # the failing rank printed the error
        logging.getLogger(__name__).debug("stopping: %s", exc)
        leave_after_failure(exc)
        return 2
    except (CommandError, ValueError, OSError, IndexError) as exc:
        return _fail(exc)
    except RuntimeError as exc:
        if not is_faiss_error(exc):
            raise
        return _fail(exc)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def is_faiss_error(exc: BaseException) -> bool:
    """FAISS raises RuntimeError("Error in <C++ signature> at <file>:<line>: ...")."""
    from shard_tools.cli import strip_cpp_location

    text = str(exc).strip()
    return bool(text) and strip_cpp_location(text.splitlines()[0]) != text.splitlines()[0]


def _fail(exc: BaseException) -> int:
    """Bad input: one ``error:`` line, exit code 2 (the group left when every rank knows)."""
    from shard_tools.cli import error_line

    from .distributed import leave_after_failure

    print(f"error: {error_line(exc)}", file=sys.stderr)
    leave_after_failure(exc)
    return 2

if __name__ == "__main__":
    sys.exit(main())
