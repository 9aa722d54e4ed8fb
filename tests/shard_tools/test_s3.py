"""Shards on S3: a real moto server on 127.0.0.1, reached through s3fs."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import webdataset as wds

from conftest import PYTHON, TEST_TILES, make_earthloc_tree
from shard_tools.__main__ import main
from shard_tools.reader import iter_dataset, list_shards, webdataset_urls

pytestmark = pytest.mark.s3







def test_convert_to_s3_verify_and_stream_back(s3_env, tmp_path):
    root = tmp_path / "in"
    names = make_earthloc_tree(root, TEST_TILES)
    dst = "s3://streamloc-test/earthloc/images"
    assert main(["convert", "--format", "earthloc", "--kind", "images", "--input", str(root),
                 "--output", dst, "--shard-size", "7", "--workers", "2", "--no-progress"]) == 0
    listing = sorted(p.rsplit("/", 1)[-1]
                     for p in s3_env.ls("streamloc-test/earthloc/images", refresh=True))
    assert "manifest.json" in listing and "rejects.jsonl" in listing
    assert [n for n in listing if n.endswith(".tar")] == [f"images-{i:06d}.tar" for i in range(4)]
    assert not [n for n in listing if "tmp" in n]
    assert main(["verify", dst, "--no-progress"]) == 0

    # the same conversion on local disk gives the same bytes
    local = tmp_path / "local"
    assert main(["convert", "--format", "earthloc", "--kind", "images", "--input", str(root),
                 "--output", str(local), "--shard-size", "7", "--no-progress"]) == 0
    remote = json.loads(s3_env.cat_file("streamloc-test/earthloc/images/manifest.json"))
    assert [s["sha256"] for s in remote["shards"]] == \
        [s["sha256"] for s in json.loads((local / "manifest.json").read_text())["shards"]]

    # stream back: our reader, and webdataset with the registered s3 opener (no pipe:)
    sources = sorted(json.loads(s["json"])["source"] for s in iter_dataset(dst))
    assert sources == sorted(names)
    urls = webdataset_urls(dst)
    assert urls[0].startswith("s3://")
    got = [json.loads(s["json"])["source"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(got) == sorted(names)
    assert sum(s.samples for s in list_shards(dst)) == len(names)


def test_convert_from_s3_input_with_storage_options(s3_env, s3_server, tmp_path, monkeypatch):
    root = tmp_path / "in"
    names = make_earthloc_tree(root, TEST_TILES[:4])
    s3_env.put(str(root) + "/", "streamloc-test/raw/", recursive=True)
    # explicit --storage-options instead of the environment's endpoint
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = json.dumps({"client_kwargs": {"endpoint_url": s3_server}})
    out = tmp_path / "out"
    assert main(["convert", "--format", "earthloc", "--kind", "places", "--input",
                 "s3://streamloc-test/raw", "--output", str(out), "--storage-options", opts,
                 "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"]["samples"] == 4 and m["totals"]["images"] == len(names)
    assert main(["verify", str(out), "--no-progress"]) == 0

    # shards on S3 streamed by webdataset with the endpoint from the options only
    dst = "s3://streamloc-test/opts-only"
    assert main(["convert", "--format", "earthloc", "--kind", "images", "--input", str(root),
                 "--output", dst, "--storage-options", opts, "--no-progress"]) == 0
    urls = webdataset_urls(dst, json.loads(opts))
    got = [json.loads(s["json"])["source"] for s in wds.WebDataset(urls, shardshuffle=False)]
    assert sorted(got) == sorted(names)


def test_killed_s3_runs_leave_no_temporary_behind(s3_env, tmp_path):
    """Issue 11, item 13: a killed run's local temporary of an S3 shard is removed by the
    re-run (temporaries live in a folder of the output's own, named by host and PID)."""
    import os
    import signal
    from conftest import REPO, run_env

    root = tmp_path / "earthloc"
    names = sorted(make_earthloc_tree(root, TEST_TILES))
    blocker = root / names[13]                       # shard 2 at --shard-size 5
    good = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(run_env(), TMPDIR=str(tmpdir))
    cmd = [PYTHON, "-m", "shard_tools", "convert", "--format", "earthloc", "--kind", "images",
           "--input", str(root), "--output", "s3://streamloc-test/issue11-tmp",
           "--shard-size", "5", "--no-progress"]

    def files() -> list:
        return [p for p in tmpdir.rglob("*") if p.is_file()]

    for _ in range(2):                               # two killed runs
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 60
            while time.time() < deadline and not any(".tmp-" in p.name for p in files()):
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert any(".tmp-" in p.name for p in files())   # what a killed run leaves
    blocker.unlink()
    blocker.write_bytes(good)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert files() == []
