"""Argument types shared by the commands: one convention for every list.

Lists are comma-separated (``--zooms 6,7,8``, ``--regions alps,gobi``); a region
spec ``name:lat,lon,query_km,db_km`` keeps its own commas, so
``--regions alps,paris:48.86,2.35,800,1500,gobi`` is three regions. The older
forms still parse: space-separated values (``--regions alps gobi``) and ``;``
between specs.
"""
from __future__ import annotations

import argparse


def int_range(lo: int, hi: int | None = None, name: str = "value"):
    """An ``int`` type for argparse that rejects values outside ``[lo, hi]``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bounds = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{name} must be {bounds}, got {value}")
        return value
    return parse


def int_list(text: str) -> tuple[int, ...]:
    """``6,7,8`` -> (6, 7, 8)."""
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 6,7,8, got {text!r}") from None


def split_regions(text: str) -> list[str]:
    """Region names and specs from ``alps,paris:48.86,2.35,800,1500,gobi`` (or with ``;``).

    A token with ``:`` starts a spec that takes the next three comma-separated numbers.
    """
    out: list[str] = []
    for chunk in text.split(";"):
        tokens = [t.strip() for t in chunk.split(",")]
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if ":" in tok:
                spec = ",".join(tokens[i:i + 4])
                out.append(spec)
                i += 4
            else:
                if tok:
                    out.append(tok)
                i += 1
    return out


def region_list(text: str) -> list[str]:
    """argparse type: one comma-separated region list (``none`` for an empty list)."""
    if text.strip().lower() == "none":
        return []
    regions = split_regions(text)
    if not regions and text.strip():
        raise argparse.ArgumentTypeError(f"no region in {text!r}")
    return regions


class ExtendFlat(argparse.Action):
    """``nargs='+'`` of lists, flattened: ``--regions a,b c`` -> [a, b, c]."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        for v in values:
            items.extend(v)
        setattr(namespace, self.dest, items)
