"""Recipes: a YAML file of sections, plus ``section.key=value`` overrides from the command line.

Only the generic part lives here; each section is validated by its own dataclass
(``ModelConfig``, ``DataConfig``, ...), so a typo fails with the nearest valid key.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["load_recipe", "apply_overrides", "parse_override"]


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file as a dict of sections (an empty file is an empty recipe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``data.places_per_batch=8`` -> (["data", "places_per_batch"], 8); values are YAML."""
    if "=" not in text:
        raise ValueError(f"override '{text}' is not section.key=value")
    dotted, _, raw = text.partition("=")
    parts = [p for p in dotted.strip().split(".")]
    if len(parts) < 2 or not all(parts):
        raise ValueError(f"override '{text}' must name a section and a key (section.key=value)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(recipe: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``recipe`` with each ``section.key[.sub]=value`` set (sections are created)."""
    out = copy.deepcopy(dict(recipe))
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ValueError(f"override '{text}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return out
