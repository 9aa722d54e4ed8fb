"""Training data streamed from S3: a real moto server on 127.0.0.1, through s3fs."""
from __future__ import annotations


import pytest

from conftest import make_earthloc_tree
from shard_tools import storage
from shard_tools.__main__ import main as shard_main
from trainer.data import build_train_data

pytestmark = pytest.mark.s3

TILES = [f"08_{r:04d}_{c:04d}" for r in range(100, 108, 2) for c in range(60, 72, 2)]   # 24


def test_stream_from_s3_equals_local_and_a_missing_shard_is_counted(s3_server, monkeypatch,
                                                                    tmp_path):
    for k, v in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    make_earthloc_tree(tmp_path / "db", TILES, years=(2019, 2020, 2021))
    local = tmp_path / "places"
    assert shard_main(["convert", "--no-progress", "--format", "earthloc", "--kind", "places",
                       "--input", str(tmp_path / "db"), "--output", str(local),
                       "--shard-size", "3"]) == 0
    fs, _ = storage.filesystem("s3://streamloc-data/")
    fs.clear_instance_cache()
    fs, _ = storage.filesystem("s3://streamloc-data/")
    fs.mkdir("streamloc-data")
    fs.put(str(local) + "/", "streamloc-data/places/", recursive=True)
    url = "s3://streamloc-data/places"
    cfg = dict(places_per_batch=3, images_per_place=3, workers=2, augment="earthloc",
               read_retries=1)
    want = [b.summary() for b in build_train_data({**cfg, "train_shards": str(local)}, 32,
                                                  1, 2, num_workers=0).batches(0)]
    td = build_train_data({**cfg, "train_shards": url}, 32, 1, 2)      # worker processes
    try:
        got = list(td.batches(0))
    finally:
        td.close()
    assert [b.summary() for b in got] == want and len(want) == td.steps_per_epoch == 4
    assert got[0].images.shape == (9, 3, 32, 32)

    # a shard that goes missing during the run (after retries) is skipped and counted, never
    # a hang; one missing before the run is refused, naming it
    td = build_train_data({**cfg, "train_shards": url}, 32, 0, 1, num_workers=0, decode=False)
    fs.rm("streamloc-data/places/places-000001.tar")
    batches = list(td.batches(0))
    assert len(batches) == td.steps_per_epoch
    assert td.counters()["shard_errors"] == 1 and td.counters()["repeated"] > 0
    with pytest.raises(ValueError, match="places-000001.tar: missing, but listed in the manifest"):
        build_train_data({**cfg, "train_shards": url}, 32, 0, 1, num_workers=0)
