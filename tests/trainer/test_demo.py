"""``python -m trainer demo``: its arguments are checked before the long data steps."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO
from trainer.demo import Step, main, run_step

RECIPE = str(REPO / "configs" / "demo-bluemarble.yaml")


def test_dry_run_lists_the_steps_with_the_overrides_after_options(tmp_path, capsys):
    assert main(["--output", str(tmp_path / "d"), "--recipe", RECIPE, "train.epochs=1",
                 "--dry-run", "optim.lr=0.002"]) == 0
    out = capsys.readouterr().out
    train = [ln for ln in out.splitlines() if " -m trainer " in ln]
    assert len(train) == 1 and "train.epochs=1" in train[0] and "optim.lr=0.002" in train[0]
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("argv, message", [
    (["optim.lrr=1"], "error: unknown key 'lrr' in section 'optim'; did you mean 'lr'?"),
    (["eval.regions=[alsp]"], "error: eval.regions: unknown region 'alsp'"),
    (["--workers", "0"], "error: --workers must be >= 1 and --localize >= 0, got 0 and 3"),
])
def test_bad_arguments_fail_before_any_step(tmp_path, capsys, argv, message):
    assert main(["--output", str(tmp_path / "d"), "--recipe", RECIPE, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and not (tmp_path / "d").exists()


def test_a_failed_step_ends_the_demo_with_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        run_step(Step("broken", [sys.executable, "-c", "raise SystemExit(3)"]), {})
    assert stop.value.code == 2
    assert "error: demo step 'broken' failed with exit code 3" in capsys.readouterr().err
