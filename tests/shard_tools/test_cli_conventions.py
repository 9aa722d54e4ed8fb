"""What a newcomer meets: the documented name round trip,
--help examples that run as written, the pairs figures, one list convention, --version."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, TEST_TILES, earthloc_query_name, run_env
from shard_tools.__main__ import COMMANDS, _load, build_parser, main
from shard_tools.formats import (format_earthloc_name, format_vpr_name, parse_earthloc_name,
                                 parse_vpr_name)


def _lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


# ---------------------------------------------------------------- the round-trip property

def _round_trip_holds(x: str) -> None:
    """The property as the docstring and README state it, for one name."""
    r = parse_earthloc_name(x)
    y = format_earthloc_name(r, keep_folder=True)
    assert parse_earthloc_name(y) == {**r, "source": y}, x
    assert format_earthloc_name(parse_earthloc_name(y), keep_folder=True) == y, x


def test_round_trip_on_every_real_name(shared_data):
    el = shared_data / "earthloc"
    names = _lines(el / "queries.txt") + _lines(el / "database_candidates.txt")
    assert len(names) == 17752 + 8475
    for x in names:
        _round_trip_holds(x)
    # y is not x as text: the shortest exact number form is written
    x = next(n for n in names if re.search(r"\d0@", n))
    assert format_earthloc_name(parse_earthloc_name(x), keep_folder=True) != x


def test_round_trip_with_the_year_only_in_the_folder():
    x = "database/2019_08/30_-80/@27.05@-92.8@27.05@-90@24.5@-90@24.5@-92.8@08_0104_0060@@1@2@3@0@.jpg"
    r = parse_earthloc_name(x)
    assert r["year"] == 2019 and r["timestamp"] == ""
    _round_trip_holds(x)
    # without the folder the year survives as the timestamp: the documented exception
    y = format_earthloc_name(r)
    assert parse_earthloc_name(y)["timestamp"] == "2019"


def test_source_is_the_only_field_that_differs_without_the_folder(shared_data):
    for x in _lines(shared_data / "earthloc" / "queries.txt")[:2000]:
        r = parse_earthloc_name(x)
        y = format_earthloc_name(r)
        assert "/" not in y and parse_earthloc_name(y) == {**r, "source": y}


def test_vpr_round_trip_on_every_real_name(shared_data):
    for split, kind in (("val_database.txt", "database"), ("val_queries.txt", "query")):
        for x in _lines(shared_data / "sf-xs" / split):
            r = parse_vpr_name(x, kind)
            y = format_vpr_name(r)
            assert parse_vpr_name(y, kind) == {**r, "source": y}, x


# ---------------------------------------------------------------- --help examples run

def _examples(text: str) -> list[str]:
    """Command lines of an examples block, continuation lines joined."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if current:
            current += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(current)
                current = ""
            continue
        if line.startswith(("python -m shard_tools", "sbatch ")):
            current = line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(current)
                current = ""
    return out


def _all_examples() -> list[tuple[str, str]]:
    found = [("python -m shard_tools", ex) for ex in _examples(build_parser().epilog)]
    for name in COMMANDS:
        found += [(name, ex) for ex in _examples(_load(name).EXAMPLES)]
    return found


def _sbatch_usage() -> int:
    text = (REPO / "slurm" / "convert.sbatch").read_text()
    return int(re.search(r"if \[ \$# -lt (\d+) \]", text).group(1))


@pytest.mark.parametrize("where, example", _all_examples())
def test_every_help_example_parses(where, example):
    words = shlex.split(example, comments=True)
    if words[0] == "sbatch":
        script = next(w for w in words if w.endswith(".sbatch"))
        assert (REPO / script).is_file()
        rest = words[words.index(script) + 1:]
        assert len(rest) >= _sbatch_usage(), f"{example}: the script needs FORMAT KIND SRC DST"
        fmt, kind, src, dst, *options = rest
        words = ["python", "-m", "shard_tools", "convert", "--format", fmt, "--kind", kind,
                 "--input", src, "--output", dst, *options]
    assert words[:3] == ["python", "-m", "shard_tools"]
    try:
        args = build_parser().parse_args(words[3:])
    except SystemExit as exc:  # argparse: 0 after --help/--version, 2 on an error
        if exc.code == 0:
            return
        pytest.fail(f"{where}: does not parse ({exc.code}): {example}")
    assert getattr(args, "_run", None), example


def test_the_examples_cover_every_command():
    assert {w for w, _ in _all_examples()} >= set(COMMANDS)
    assert len(_all_examples()) >= 20


def test_the_extractor_catches_a_bad_example():
    bad = "  sbatch --array=0-15 slurm/convert.sbatch\n"
    (example,) = _examples(bad)
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_every_help_example_parses("convert", example)


# ---------------------------------------------------------------- the pairs figures

def test_pairs_figures_against_the_published_file(shared_data, tmp_path):
    el = shared_data / "earthloc"
    out = tmp_path / "pairs.json"
    r = subprocess.run([PYTHON, "-m", "shard_tools", "pairs", "--database",
                        str(el / "database_candidates.txt"), "--queries", str(el / "queries.txt"),
                        "--exclude-regions", "earthloc-test", "--min-iou", "0.5",
                        "--output", str(out)], cwd=REPO, env=run_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert "1628 database images, 3082 pairs" in r.stdout
    got = json.loads(out.read_text())
    ref = json.loads((el / "pairs_iou050.json").read_text())
    g = {(k, v) for k, vs in got.items() for v in vs}
    w = {(k, v) for k, vs in ref.items() for v in vs}
    assert (len(got), len(g), len(ref), len(w)) == (1628, 3082, 1618, 3062)
    assert w <= g and len(g - w) == 20 and len(set(got) - set(ref)) == 10


# ---------------------------------------------------------------- one list convention

@pytest.fixture
def one_query(tmp_path) -> Path:
    q = tmp_path / "q.txt"
    q.write_text(earthloc_query_name(TEST_TILES[0], 0) + "\n")
    return q


def _table_regions(out: str) -> list[str]:
    return [ln.split()[0] for ln in out.splitlines()[1:-1]]


def test_regions_take_comma_separated_lists(one_query, capsys):
    assert main(["regions", "--queries", str(one_query),
                 "--regions", "alps,paris:48.86,2.35,800,1500,gobi"]) == 0
    assert _table_regions(capsys.readouterr().out) == ["alps", "paris", "gobi"]
    # the older space-separated form still parses to the same list
    assert main(["regions", "--queries", str(one_query),
                 "--regions", "alps", "paris:48.86,2.35,800,1500", "gobi"]) == 0
    assert _table_regions(capsys.readouterr().out) == ["alps", "paris", "gobi"]


def test_pairs_exclude_regions_take_the_same_lists(one_query, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["pairs", "--database", str(one_query), "--queries", str(one_query),
                 "--exclude-regions", "alps,mine:0,0,1,1", "--output", str(out)]) == 0
    args = build_parser().parse_args(["pairs", "--database", "d", "--queries", "q", "--output",
                                      "o", "--exclude-regions", "earthloc-test,x:1,2,3,4"])
    assert args.exclude_regions == ["earthloc-test", "x:1,2,3,4"]


def test_bluemarble_test_regions_use_the_same_parser():
    p = build_parser()
    a = p.parse_args(["bluemarble", "--output", "o", "--test-regions",
                      "alps,mine:1,2,3,4,gobi", "--zooms", "6,7"])
    assert a.test_regions == ("alps", "mine:1,2,3,4", "gobi") and a.zooms == (6, 7)
    assert p.parse_args(["bluemarble", "--output", "o", "--test-regions",
                         "a:1,2,3,4;b:5,6,7,8"]).test_regions == ("a:1,2,3,4", "b:5,6,7,8")
    assert p.parse_args(["bluemarble", "--output", "o", "--test-regions",
                         "none"]).test_regions == ()


@pytest.mark.parametrize("argv", [["--version"], ["convert", "--version"],
                                  ["regions", "--version"]])
def test_version(argv):
    from importlib.metadata import version
    r = subprocess.run([PYTHON, "-m", "shard_tools", *argv], cwd=REPO, env=run_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0 and version("streamloc") in r.stdout
