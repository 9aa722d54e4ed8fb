"""Process-group lifetime: a command that finishes leaves (destroys) the group it joined.

A process that exits with a gloo group alive can abort in interpreter teardown
("terminate called without an active exception", SIGABRT); that failed the 2-rank
search test about one run in ten. Each case runs in its own interpreter so the
group cannot leak into pytest.
"""
from __future__ import annotations

import subprocess
import textwrap

from conftest import PYTHON, REPO, run_env
from retrieval import build_index
from tests.retrieval.helpers import unit_rows
from tests.retrieval.test_index_search import write_embeddings

IN_GROUP = textwrap.dedent("""
    import sys, torch.distributed as dist
    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    from retrieval.__main__ import main
    code = main(sys.argv[2:])
    print("exit", code, "initialized", dist.is_initialized())
""")


def run_in_group(tmp_path, *argv: str) -> str:
    proc = subprocess.run([PYTHON, "-c", IN_GROUP, str(tmp_path / "store"), *argv],
                          capture_output=True, text=True, env=run_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_a_finished_command_leaves_the_group_a_failed_one_does_not_wait(tmp_path):
    emb = write_embeddings(tmp_path / "db", unit_rows(40, 8, 1), 20)
    q = write_embeddings(tmp_path / "q", unit_rows(5, 8, 2), 5)
    build_index(str(emb), str(tmp_path / "idx"), "Flat", num_shards=2, progress=False)
    search = ["search", "--index", str(tmp_path / "idx"), "--queries", str(q), "--no-progress"]
    assert run_in_group(tmp_path, *search, "-k", "3", "--output", str(tmp_path / "r.jsonl")) \
        == "exit 0 initialized False"
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 5
    # the error path returns at once (a barrier there could hang on ranks in a collective)
    (tmp_path / "store").unlink(missing_ok=True)
    assert run_in_group(tmp_path, *search, "-k", "0", "--output", str(tmp_path / "bad.jsonl")) \
        == "exit 2 initialized True"
