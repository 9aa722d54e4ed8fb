"""The quick start installs the locked versions; ``LOCK=`` opts out (read with ``make -n``)."""
from __future__ import annotations

import configparser
import re
import subprocess

from conftest import REPO

LOCK = REPO / "configs" / "constraints.txt"


def make_dry(*args: str) -> str:
    """What ``make`` would run, every target rebuilt (-B), nothing executed (-n)."""
    return subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def _pip_install_line(out: str) -> str:
    return next(ln for ln in out.splitlines() if "pip install" in ln and "-e " in ln)


def test_install_uses_the_lock_and_lock_empty_takes_the_newest(tmp_path):
    assert f"-c {LOCK.relative_to(REPO)}" in _pip_install_line(make_dry("install"))
    assert " -c " not in _pip_install_line(make_dry("install", "LOCK="))
    other = tmp_path / "other.txt"
    other.write_text("numpy==2.0.0\n")
    assert f"-c {other}" in _pip_install_line(make_dry("install", f"LOCK={other}"))


def test_demo_and_test_install_through_the_lock():
    for target in ("demo", "test"):
        assert f"-c {LOCK.relative_to(REPO)}" in _pip_install_line(make_dry(target))


def _requirement_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.add(re.split(r"[<>=!~\[; ]", line, 1)[0].lower().replace("_", "-"))
    return names


def test_the_lock_pins_every_dependency_setup_cfg_names_exactly():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    wanted = _requirement_names(cfg["options"]["install_requires"])
    for extra in ("cpu", "s3", "demo", "dev"):
        wanted |= _requirement_names(cfg["options.extras_require"][extra])
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.+!-]+", version), f"not an exact pin: {line}"
            pins[name.lower().replace("_", "-")] = version
    assert not wanted - set(pins), f"unpinned: {sorted(wanted - set(pins))}"
    assert "streamloc" not in pins       # the project itself installs from the checkout
