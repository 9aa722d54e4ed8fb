"""``python -m trainer demo``: its arguments are checked before the long data steps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, run_env
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


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

def _start_demo(out: Path, *python: str) -> subprocess.Popen:
    """The demo in a session of its own, so that a signal to its group is what a terminal
    sends to a foreground job on Ctrl-C."""
    return subprocess.Popen([PYTHON, *python, "--output", str(out), "--recipe", RECIPE,
                             "--workers", "1"], cwd=REPO, env=run_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _when(pred, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no {what}: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_during_a_step_stops_the_demo_with_exit_130_and_one_line(tmp_path):
    demo = _start_demo(tmp_path / "d", "-m", "trainer", "demo")
    # read line by line (readline returns "" once the demo ended) until the first step
    # has started and logs its work (a Ctrl-C during its imports is its own traceback)
    _when(lambda: "== dataset:" in demo.stdout.readline(), demo, "first step")
    _when(lambda: "shard_tools.bluemarble" in demo.stderr.readline(), demo, "work")
    os.killpg(demo.pid, signal.SIGINT)
    out, err = demo.communicate(timeout=120)
    assert demo.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "interrupted by SIGINT: demo step 'dataset' stopped with exit code 130; run the same "
        "command again to continue")


CHILD = """
import pathlib, signal, sys, time
marker = pathlib.Path(sys.argv[1])
got = []
signal.signal(signal.SIGINT, lambda s, f: got.append(s))
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
marker.with_suffix(".ready").write_text("")
while not got:
    time.sleep(0.05)
time.sleep(1.5)                       # a trainer finishing its update and checkpoint
marker.write_text(",".join(signal.Signals(s).name for s in got))
sys.exit(7)
"""

DRIVER = """
import sys, types
# the recipe check imports torch (5 s), which is not what this test is about
sys.modules["trainer.recipe"] = types.SimpleNamespace(
    ConfigError=ValueError, Recipe=types.SimpleNamespace(load=lambda *args: None))
from trainer import demo
child, marker = sys.argv[1], sys.argv[2]
demo.DemoPlan.data_steps = lambda plan: [demo.Step("slow", [sys.executable, child, marker])]
sys.exit(demo.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_reaches_the_step_once_and_the_demo_waits_for_it(tmp_path, sig):
    (tmp_path / "child.py").write_text(CHILD)
    marker = tmp_path / "stopped.txt"
    demo = _start_demo(tmp_path / "d", "-c", DRIVER, str(tmp_path / "child.py"), str(marker))
    _when(lambda: marker.with_suffix(".ready").exists(), demo, "running step")
    os.killpg(demo.pid, sig)        # the demo's group: the step runs in a session of its own
    _, err = demo.communicate(timeout=60)
    assert marker.read_text() == signal.Signals(sig).name     # once, and waited for
    assert demo.returncode == 128 + sig and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"interrupted by {signal.Signals(sig).name}: demo step 'slow' stopped with exit code 7; "
        "run the same command again to continue"]


def test_report_table_prints_the_readme_table_from_a_finished_demo(tmp_path, capsys):
    import json

    from retrieval.environment import environment
    from trainer.demo import main

    def report(r1: float) -> dict:
        rec = {"1": r1, "5": 2 * r1, "10": 50.0, "20": 60.0, "100": 90.0}
        return {"protocol": "apl", "ks": [1, 5, 10, 20, 100],
                "regions": [{"name": "alps", "queries": 40, "recall": rec,
                             "recall_dedupe": rec}],
                "average": rec, "average_dedupe": rec, "environment": environment()}

    (tmp_path / "eval-untrained.json").write_text(json.dumps(report(12.5)))
    (tmp_path / "eval-trained.json").write_text(json.dumps(report(25.0)))
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text(json.dumps(
        {"updates": 3, "environment": environment(seed=4)}))
    assert main(["--report-table", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| alps | 40 | 12.5 → **25.0** | 25.0 → **50.0** |" in out
    assert "| **average** | | 12.5 → **25.0** |" in out and "rotation dedupe" in out
    import torch

    assert torch.__version__ in out and "seed 4" in out and "Measured " in out
    assert main(["--report-table", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_the_demo_report_ends_with_the_environment_it_was_made_in(tmp_path):
    import json

    import torch

    from retrieval.environment import environment
    from trainer.demo import DemoPlan
    from trainer.report import write_demo_report

    plan = DemoPlan(tmp_path, "configs/demo-bluemarble.yaml")
    rec = {"1": 10.0, "5": 20.0, "10": 30.0, "20": 40.0, "100": 50.0}
    doc = {"regions": [{"name": "alps", "queries": 4, "recall": rec}], "average": rec,
           "environment": environment()}
    for which in ("untrained", "trained"):
        (tmp_path / f"eval-{which}.json").write_text(json.dumps(doc))
    plan.run.mkdir()
    (plan.run / "summary.json").write_text(json.dumps({"updates": 2,
                                                       "environment": environment(seed=3)}))
    path, _ = write_demo_report(plan, [], {"total": 1.0})
    text = path.read_text()
    tail = text[text.index("## Environment"):]
    assert torch.__version__ in tail and "seed 3" in tail
    assert torch.backends.cpu.get_cpu_capability() in tail
