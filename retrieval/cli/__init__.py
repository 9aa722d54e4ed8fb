"""One module per ``python -m retrieval`` command, plus the few helpers they share.

Only this layer loads saved encoders (``trainer.models.load_encoder``): the
library below it sees an ``nn.Module``.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


class CommandError(Exception):
    """Bad input: printed as one line, exit code 2."""


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise CommandError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CommandError(f"{what} is empty")
    return values


def add_search_params(p: argparse.ArgumentParser) -> None:
    """The index's search-time knobs, shared by search, evaluate and localize."""
    p.add_argument("--nprobe", type=int, metavar="P",
                   help="IVF lists to visit (tune by recall@100 against Flat)")
    p.add_argument("--ef-search", type=int, metavar="EF", help="HNSW search depth (efSearch)")
    p.add_argument("--k-factor", type=float, metavar="F",
                   help="for ',RFlat' factories: re-rank the top k*F candidates exactly")


def search_params(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for ``retrieval.search`` from ``add_search_params``'s flags."""
    for flag, value in (("--nprobe", args.nprobe), ("--ef-search", args.ef_search),
                        ("--k-factor", args.k_factor)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be >= 1, got {value:g}")
    return dict(nprobe=args.nprobe, ef_search=args.ef_search, k_factor=args.k_factor)


def device() -> "Any":
    """This process's device: its local GPU under a launcher, else the CPU."""
    import torch

    if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in (
            "1", "true", "yes"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(path: str) -> "tuple[Any, tuple[int, int], int]":
    """``(encoder, (H, W), dim)`` from a saved encoder; a one-line error when it does not load."""
    if not os.path.exists(path):
        raise CommandError(f"encoder not found: {path}")
    try:
        from trainer.models import load_encoder

        return load_encoder(path, device=device())
    except CommandError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to load is the user's input
        from shard_tools.cli import error_line

        raise CommandError(f"cannot load encoder {path}: {error_line(exc)}") from None


def model_identity(path: str) -> dict:
    """What identifies a saved encoder: ``provenance.encoder_identity`` (its folder and the
    sha256 of its weights), recorded by embeddings and compared by their readers."""
    from ..provenance import encoder_identity

    return encoder_identity(path)


def model_label(path: str) -> str:
    """What an embeddings folder records as its ``model``, for people: the encoder's folder.
    Comparisons use ``model_identity``'s weights digest, never this name."""
    return model_identity(path)["path"]


def add_common(p: argparse.ArgumentParser, progress: bool = True) -> None:
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
