"""slurm/embed.sbatch and slurm/index.sbatch as real SLURM jobs: a 2-task embedding array
equals a single-process embed, and an index array plus its dependent merge job equals a
single-process index."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import PYTHON, REPO, TEST_TILES, make_earthloc_tree, run_env
from tests.retrieval.helpers import convert, run_cli, tiny_encoder

pytestmark = pytest.mark.slurm


def _results(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_embed_array_and_index_array_with_merge_equal_single_process(slurm_cluster, tmp_path):
    from trainer.models import save_encoder

    make_earthloc_tree(tmp_path / "src", TEST_TILES)
    shards = convert(tmp_path / "src", tmp_path / "shards", shard_size=4)   # 6 shards
    encoder = save_encoder(tiny_encoder(), tmp_path / "enc")
    env = {**run_env(), "STREAMLOC_PYTHON": PYTHON, "OMP_NUM_THREADS": "1"}

    single = tmp_path / "emb-single"
    proc = run_cli("embed", "--model", encoder, "--shards", shards, "--output", single,
                   "--rotations", "0,90", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    array = tmp_path / "emb-array"
    proc = slurm_cluster.sbatch("--array=0-1", f"--output={tmp_path}/embed-%a.out",
                                "--cpus-per-task=1", "--mem=1G",
                                str(REPO / "slurm" / "embed.sbatch"), str(encoder), str(shards),
                                str(array), "--rotations", "0,90", cwd=REPO, env=env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("embed-*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    meta_single = json.loads((single / "embeddings.json").read_text())
    meta_array = json.loads((array / "embeddings.json").read_text())
    assert meta_array["shards"] == meta_single["shards"] and len(meta_array["shards"]) == 6
    assert meta_array["rows"] == meta_single["rows"] == 24 * 2
    for name in meta_single["shards"]:
        stem = name.rsplit(".", 1)[0] if name.endswith(".npy") else name
        a, b = np.load(single / f"{stem}.npy"), np.load(array / f"{stem}.npy")
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-6)
        assert (single / f"{stem}.jsonl").read_text() == (array / f"{stem}.jsonl").read_text()

    factory = "IVF4,Flat"
    one = tmp_path / "idx-single"
    proc = run_cli("index", "--embeddings", single, "--output", one, "--factory", factory,
                   "--num-shards", "3", "--merge", "--no-progress")
    assert proc.returncode == 0, proc.stderr

    many = tmp_path / "idx-array"
    script = str(REPO / "slurm" / "index.sbatch")
    job = slurm_cluster.submit("--array=0-2", f"--output={tmp_path}/index-%a.out",
                               "--cpus-per-task=1", "--mem=1G", script, str(array), str(many),
                               factory, "3", cwd=REPO, env=env)
    proc = slurm_cluster.sbatch(f"--dependency=afterok:{job}", f"--output={tmp_path}/merge.out",
                                "--cpus-per-task=1", "--mem=1G", script, str(array), str(many),
                                factory, "3", "--merge", cwd=REPO, env=env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    assert "merged into" in (tmp_path / "merge.out").read_text()
    meta = json.loads((many / "index.json").read_text())
    assert len(meta["shards"]) == 3 and meta["merged"]

    for idx in (one, many):
        proc = run_cli("search", "--index", idx, "--queries", single, "-k", "5", "--nprobe", "4",
                       "--output", idx / "results.jsonl", "--no-progress")
        assert proc.returncode == 0, proc.stderr
    a, b = _results(one / "results.jsonl"), _results(many / "results.jsonl")
    assert len(a) == 48 and [r["ids"] for r in a] == [r["ids"] for r in b]
    # every row finds itself first (exact IVF with nprobe = nlist)
    assert all(r["ids"][0] == i for i, r in enumerate(a))
