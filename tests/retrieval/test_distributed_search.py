"""2-rank search under a real ``accelerate launch`` on the CPU equals 1-rank search; a bad
input on one rank is that rank's one error line, and the other rank stops without one."""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, REPO, run_env
from retrieval import ShardedIndex, build_index, dedupe, search, Embeddings
from tests.retrieval.helpers import unit_rows
from tests.retrieval.test_index_search import write_embeddings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_search(tmp_path, idx, qemb, out, *more) -> subprocess.CompletedProcess:
    env = dict(run_env(), ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(Path(PYTHON).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "retrieval", "search", "--index",
         str(idx), "--queries", str(qemb), "--output", str(out), "--no-progress", *more],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path):
    n_img, rots = 300, (0, 90, 180, 270)
    db = unit_rows(n_img * 4, 12, 11)
    records = [{"key": f"tile{i // 4}", "rotation": rots[i % 4], "image": i // 4}
               for i in range(len(db))]
    emb = write_embeddings(tmp_path / "db", db, 400, records, rotations=rots)
    q = unit_rows(25, 12, 12)
    qemb = write_embeddings(tmp_path / "q", q, 25)
    idx = tmp_path / "idx"
    build_index(str(emb), str(idx), "Flat", num_shards=3, progress=False)
    out = tmp_path / "two.jsonl"
    proc = launch_search(tmp_path, idx, qemb, out, "-k", "7", "--dedupe")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stdout
    lines = [json.loads(ln) for ln in out.read_text().splitlines()]
    # one process, all shards
    one = ShardedIndex.load(str(idx))
    ref = dedupe(search(one, q, 7 * 4), Embeddings.open(str(emb)).image_of_row, 7)
    assert [ln["ids"] for ln in lines] == ref.ids.tolist()
    assert np.allclose([ln["scores"] for ln in lines], ref.scores, atol=1e-5)
    # dedupe: one row per tile; keys are the database keys of the ids
    for ln in lines:
        assert len(set(ln["keys"])) == 7 == len(ln["keys"])
        assert ln["keys"] == [f"tile{i // 4}" for i in ln["ids"]]
    assert lines[0]["query"] == "k0" and lines[0]["rotation"] == 0


@pytest.mark.slow
def test_a_bad_shard_on_one_rank_is_one_error_line_and_both_ranks_stop(tmp_path):
    emb = write_embeddings(tmp_path / "db", unit_rows(60, 8, 1), 20)
    qemb = write_embeddings(tmp_path / "q", unit_rows(4, 8, 2), 4)
    idx = tmp_path / "idx"
    build_index(str(emb), str(idx), "Flat", num_shards=2, progress=False)
    shard = idx / "shard-001.index"          # rank 1's shard
    shard.write_bytes(shard.read_bytes()[:-16])
    proc = launch_search(tmp_path, idx, qemb, tmp_path / "r.jsonl", "-k", "3")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {shard}: "), proc.stderr[-3000:]
    ours = [ln for ln in proc.stderr.splitlines() if "retrieval" in ln and "File " in ln]
    assert not ours and "gloo" not in proc.stderr.lower(), proc.stderr[-3000:]
    assert not (tmp_path / "r.jsonl").exists()
