"""Recipes: a YAML file of sections, plus ``section.key=value`` overrides from the command line.

Only the generic part lives here; each section is validated by its own dataclass
(``ModelConfig``, ``DataConfig``, ...), so a typo fails with the nearest valid key.
A key given twice in one mapping (two ``model:`` sections, ``lr`` twice) is refused:
plain YAML would keep the last one without a word.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

__all__ = ["load_recipe", "apply_overrides", "parse_override", "safe_load_unique",
           "DuplicateKeyError"]


class DuplicateKeyError(ValueError):
    """A mapping that names a key twice; ``line`` and ``first_line`` are 1-based."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key '{key}' at line {line} (first at line {first_line}); "
                         "YAML would keep only the last one: remove one")
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, at any depth
    (keys brought in by a ``<<`` merge may still be overridden, as YAML intends)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(key, line, seen[key])
                seen[key] = line
            except TypeError:      # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that raises ``DuplicateKeyError`` for a key given twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe file as a dict of sections (an empty file is an empty recipe)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        data = safe_load_unique(path.read_text()) or {}
    except DuplicateKeyError as exc:
        raise ValueError(f"{path}: {exc}") from None
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
        value = safe_load_unique(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ValueError(f"override '{text}': duplicate key '{exc.key}'") from None
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
