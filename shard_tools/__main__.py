"""``python -m shard_tools <command>``: the shard tools' command line.

Each command lives in ``shard_tools/cli/<name>.py`` and defines ``HELP`` (one
line), ``EXAMPLES`` (shown under ``--help``), ``add_arguments(parser)`` and
``run(args) -> int``. Commands are imported lazily so ``--help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

COMMANDS = ("convert", "manifest", "verify", "pairs", "positives", "regions", "bluemarble")


class CommandError(Exception):
    """Bad input: printed as one line, exit code 2."""


def version() -> str:
    """The installed ``streamloc`` version (the source tree's when not installed)."""
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        return dist_version("streamloc")
    except (ImportError, PackageNotFoundError):
        return "0+unknown"


def _load(name: str):
    return importlib.import_module(f"shard_tools.cli.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shard_tools",
        description="Pack localization datasets into WebDataset shards, and build their "
                    "ground truth.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m shard_tools convert --format earthloc --kind images \\\n"
               "      --input data/database --output shards/db\n"
               "  python -m shard_tools verify shards/db\n"
               "  python -m shard_tools pairs --help   # every command has its own examples",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ImportError as exc:  # a command whose module is not there yet
            logging.getLogger(__name__).debug("command %s unavailable: %s", name, exc)
            continue
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP,
                           epilog="examples:\n" + mod.EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .cli import error_line
    from .convert import Terminated, _raise_terminated

    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # SIGTERM ends as Ctrl-C does
    try:
        return int(args._run(args) or 0)
    except (CommandError, ValueError, OSError, RuntimeError) as exc:
        # bad input, unusable output (permission, read-only, full disk, not a folder),
        # malformed bookkeeping, a held lock: one line, exit 2
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except Terminated:
        print("error: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
