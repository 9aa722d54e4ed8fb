"""The environment recorded with results is the one the running process sees."""
from __future__ import annotations

import json
import subprocess

import faiss
import numpy as np
import torch

from conftest import PYTHON, REPO, run_env
from retrieval.environment import environment, environment_lines


def test_environment_holds_what_this_process_runs_with():
    env = environment(seed=7)
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["numpy"] == np.__version__
    assert env["versions"]["faiss"] == faiss.__version__
    assert set(env["versions"]) >= {"torchvision", "timm", "opencv", "webdataset", "accelerate"}
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
    assert env["seed"] == 7
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    if head:
        assert env["git_commit"].split("-")[0] == head
    text = "\n".join(environment_lines(env))
    assert torch.__version__ in text and "seed 7" in text


def test_cpu_kernels_and_threads_are_read_from_the_process_not_assumed():
    code = ("import json; from retrieval.environment import environment; "
            "print(json.dumps(environment()))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(run_env(), ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="1"),
                         check=True).stdout
    env = json.loads(out)
    assert env["cpu_capability"] == "DEFAULT" and env["threads"] == 1
    assert env["ATEN_CPU_CAPABILITY"] == "default"


def test_an_evaluate_report_records_its_environment(tmp_path):
    from tests.retrieval.helpers import unit_rows
    from tests.retrieval.test_index_search import write_embeddings

    recs = [{"key": f"k{i}", "utm": [500000.0 + 10 * i, 4000000.0, 10, "S"], "rotation": 0, "image": i}
            for i in range(6)]
    db = write_embeddings(tmp_path / "db", unit_rows(6, 8), 3, recs)
    q = write_embeddings(tmp_path / "q", unit_rows(6, 8, seed=1), 6, recs)
    out = tmp_path / "report.json"
    proc = subprocess.run([PYTHON, "-m", "retrieval", "evaluate", "--database-embeddings", str(db),
                           "--query-embeddings", str(q), "--protocol", "vpr", "--k", "1",
                           "--output", str(out)], capture_output=True, text=True, cwd=REPO,
                          env=dict(run_env(), OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = json.loads(out.read_text())["environment"]
    assert env["versions"]["torch"] == torch.__version__ and env["threads"] == 1
