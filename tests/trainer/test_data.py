"""The streaming place-grouped pipeline on place shards made by the real converter.

Most tests run every stream inline (``num_workers=0``), which gives exactly the
batches the DataLoader workers give (checked here too), and skip decoding where
only the order matters.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import earthloc_query_name, make_earthloc_tree, write_jpegs
from shard_tools.__main__ import main as shard_main
from trainer import data as data_mod
from trainer.data import DataConfig, build_train_data, plan_epoch, steps_per_stream

YEARS = (2018, 2019, 2020, 2021)


def grid_tiles(rows, cols, zoom: int = 8) -> list[str]:
    return [f"{zoom:02d}_{r:04d}_{c:04d}" for r in rows for c in cols]


def make_place_shards(root: Path, tiles: list[str], shard_size: int,
                      queries: dict[int, list[str]] | None = None, years=YEARS) -> Path:
    """Place shards of ``tiles`` x ``years``; ``queries``: query number -> the tiles it pairs with."""
    src = root / "db"
    names = make_earthloc_tree(src, tiles, years=years)
    out = root / "places"
    args = ["convert", "--no-progress", "--format", "earthloc", "--kind", "places",
            "--input", str(src), "--output", str(out), "--shard-size", str(shard_size)]
    if queries:
        qnames = {n: earthloc_query_name(paired[0], n) for n, paired in queries.items()}
        write_jpegs(root / "q", list(qnames.values()), seed0=900)
        pairs: dict[str, list[str]] = {}
        for n, paired in queries.items():
            for t in paired:
                db = next(x for x in names if t in x and f"/{years[-1]}_" in x)
                pairs.setdefault(db, []).append(qnames[n])
        (root / "pairs.json").write_text(json.dumps(pairs))
        args += ["--queries", str(root / "q"), "--query-pairs", str(root / "pairs.json")]
    assert shard_main(args) == 0
    return out


TILES48 = grid_tiles(range(100, 116, 2), range(60, 72, 2))          # 48 places, close together
# queries 0..19 pair with tiles 0..19; query 20 pairs with tiles 0..5 (distinctness in a batch)
QUERIES = {**{i: [TILES48[i]] for i in range(20)}, 20: TILES48[:6]}


@pytest.fixture(scope="module")
def even(tmp_path_factory) -> Path:
    """48 places in 8 shards of 6, 21 mined queries."""
    return make_place_shards(tmp_path_factory.mktemp("even"), TILES48, 6, QUERIES)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """48 places in shards of 5 (the last holds 3)."""
    return make_place_shards(tmp_path_factory.mktemp("uneven"), TILES48, 5)


def cfg(shards, **kw) -> DataConfig:
    base = dict(train_shards=str(shards), places_per_batch=4, images_per_place=4, workers=2,
                shuffle_buffer=8, seed=3)
    base.update(kw)
    return DataConfig(**base)


def epoch_keys(c: DataConfig, world: int, epoch: int = 0, size: int = 32,
               decode: bool = False) -> dict[int, list[list[str]]]:
    out = {}
    for rank in range(world):
        td = build_train_data(c, size, rank, world, num_workers=0, decode=decode)
        out[rank] = [b.place_keys for b in td.batches(epoch)]
    return out


# ---------------------------------------------------------------- order and splitting

def test_two_ranks_two_workers_each_place_once_and_disjoint(even):
    c = cfg(even)
    keys = epoch_keys(c, 2)
    assert len(keys[0]) == len(keys[1]) == 6            # 12 places per stream / 4 per batch x 2
    per_rank = {r: [k for b in bs for k in b] for r, bs in keys.items()}
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == 48   # every place exactly once
    for bs in keys.values():
        assert all(len(b) == len(set(b)) == 4 for b in bs)


def test_equal_steps_with_uneven_shards_and_no_repeats(uneven):
    c = cfg(uneven)
    manifest = json.loads((uneven / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [5] * 9 + [3]
    plan = plan_epoch(data_mod.reader.list_shards(str(uneven)), c, 2)
    for epoch in range(3):
        keys = epoch_keys(c, 2, epoch)
        assert len(keys[0]) == len(keys[1]) == plan.steps_per_epoch > 0
        used = [k for bs in keys.values() for b in bs for k in b]
        assert len(used) == len(set(used))              # no place twice in an epoch
    # the per-slot place counts do not depend on the epoch (size-sorted split)
    counts = {tuple(tuple(sum(s.samples for s in slot) for slot in row)
                    for row in plan_epoch(data_mod.reader.list_shards(str(uneven)), c, 2, e).slots)
              for e in range(6)}
    assert len(counts) == 1


def test_order_changes_with_epoch_and_repeats_with_seed(even):
    c = cfg(even)
    e0, e1 = epoch_keys(c, 2, 0), epoch_keys(c, 2, 1)
    assert e0 != e1
    assert {k for bs in e0.values() for b in bs for k in b} == \
           {k for bs in e1.values() for b in bs for k in b}
    assert epoch_keys(cfg(even), 2, 1) == e1
    assert epoch_keys(cfg(even, seed=4), 2, 1) != e1


def test_steps_per_stream_partition_the_steps():
    for steps in range(0, 12):
        for start in range(0, steps + 1):
            assert sum(steps_per_stream(steps, 3, w, start) for w in range(3)) == steps - start


def test_workers_give_the_inline_batches(even):
    c = cfg(even, mine_queries=True, augment="earthloc")
    inline = build_train_data(c, 32, 1, 2, num_workers=0)
    workers = build_train_data(c, 32, 1, 2)
    try:
        a, b = list(inline.batches(0)), list(workers.batches(0))
        assert [x.summary() for x in a] == [x.summary() for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert a[0].images.shape[1:] == (3, 32, 32)
    finally:
        workers.close()


def test_batches_carry_uint8_and_to_normalises_as_the_old_float_path(even):
    """Workers send uint8; Batch.to() gives what ToDtype(scale) + Normalize in the worker gave."""
    from torchvision.transforms import v2

    from trainer.augment import IMAGENET_MEAN, IMAGENET_STD

    c = cfg(even, mine_queries=True, augment="earthloc")
    td = build_train_data(c, 32, 0, 1)
    try:
        batch = next(iter(td.batches(0)))
    finally:
        td.close()
    assert batch.images.dtype == torch.uint8 and batch.images.shape[1:] == (3, 32, 32)
    old = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    want = torch.stack([old(im) for im in batch.images])
    moved = batch.to("cpu")
    assert moved.images.dtype == torch.float32
    assert (moved.images - want).abs().max().item() <= 1e-6
    assert torch.equal(moved.labels, batch.labels) and moved.keys == batch.keys
    assert batch.images.dtype == torch.uint8          # the original batch is left as it was


def test_fewer_shards_than_slots_resample_with_one_warning(tmp_path, caplog):
    shards = make_place_shards(tmp_path, TILES48[:12], 6)        # 2 shards, 2 ranks x 2 streams
    c = cfg(shards)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        tds = [build_train_data(c, 32, r, 2, num_workers=0, decode=False) for r in range(2)]
    assert sum("resampling shards" in r.message for r in caplog.records) == 2   # once per rank
    assert tds[0].resampling and tds[0].steps_per_epoch == 12 // (2 * 4)
    assert [len(list(td.batches(0))) for td in tds] == [tds[0].steps_per_epoch] * 2


# ---------------------------------------------------------------- resume

def test_resume_mid_epoch_equals_uninterrupted_with_persistent_workers(even, monkeypatch):
    c = cfg(even, mine_queries=True, augment="earthloc")
    td = build_train_data(c, 32, 0, 2)
    try:
        full0, full1 = list(td.batches(0)), list(td.batches(1))
        tail = list(td.batches(0, start_step=3))        # the same persistent workers, back to epoch 0
    finally:
        td.close()
    assert td.cfg.persistent_workers
    fresh = build_train_data(c, 32, 0, 2)
    try:
        tail1 = list(fresh.batches(1, start_step=4))    # a restarted process
    finally:
        fresh.close()
    for want, got in ((full0[3:], tail), (full1[4:], tail1)):
        assert [b.summary() for b in want] == [b.summary() for b in got]
        for x, y in zip(want, got):
            assert torch.equal(x.images, y.images) and torch.equal(x.is_query, y.is_query)

    # consumed steps are replayed without decoding a single image
    decoded = []
    real = data_mod.decode_jpeg
    monkeypatch.setattr(data_mod, "decode_jpeg", lambda d, s=None: decoded.append(1) or real(d, s))
    inline = build_train_data(c, 32, 0, 2, num_workers=0)
    rows = sum(len(b) for b in inline.batches(0, start_step=3))
    assert len(decoded) == rows == sum(len(b) for b in full0[3:])


# ---------------------------------------------------------------- batch content

def test_mined_queries_carry_their_place_label_and_are_distinct(even):
    c = cfg(even, mine_queries=True, queries_per_place=1, places_per_batch=6, workers=1,
            shuffle_buffer=48)
    td = build_train_data(c, 32, 0, 1, num_workers=0, decode=False)
    seen_queries = 0
    for b in td.batches(0):
        q = b.is_query.tolist()
        assert q == [False] * q.count(False) + [True] * q.count(True)   # queries after database
        assert b.labels[~b.is_query].tolist() == [i for i in range(6) for _ in range(4)]
        qkeys = b.query_keys
        for key, label in zip(qkeys, b.labels[b.is_query].tolist()):
            assert key.split("_q")[0] == b.place_keys[label]             # the candidate's label
        sources = [k for k in qkeys]
        assert len(sources) == len(set(sources))
        seen_queries += len(qkeys)
        # one query shared by six places appears at most once per batch
        assert len(b.keys) == 24 + len(qkeys)
    assert seen_queries >= 15


def test_shared_query_used_once_per_batch(even):
    # all 6 places of tiles 0..5 share query 20; each also has its own query
    c = cfg(even, mine_queries=True, queries_per_place=2, places_per_batch=48, workers=1,
            shuffle_buffer=48)
    td = build_train_data(c, 32, 0, 1, num_workers=0, decode=False)
    (b,) = list(td.batches(0))
    # 20 own queries + query 20 once (up to 2 per place, but never twice in the batch)
    assert len(b.query_keys) == 21
    assert b.footprints is not None and b.footprints.shape == (len(b), 4, 2)
    assert torch.isfinite(b.footprints).all()


def _spread(batch) -> float:
    """Mean great-circle distance (deg) between the batch's place centres."""
    lat = np.radians(batch.positions[:, 0].numpy())
    lon = np.radians(batch.positions[:, 1].numpy())
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], 1)
    cos = np.clip(xyz @ xyz.T, -1, 1)
    return float(np.degrees(np.arccos(cos)).mean())


def test_spatial_batches_are_tighter_than_random(tmp_path):
    tiles = grid_tiles(range(20, 230, 10), range(0, 256, 16))   # 21 x 16 places across the globe
    shards = make_place_shards(tmp_path, tiles, 84, years=(2021,))
    spreads = {}
    for grouping in ("random", "spatial"):
        c = cfg(shards, batch_grouping=grouping, images_per_place=1, places_per_batch=8,
                min_images_per_place=1, shuffle_buffer=84)
        td = build_train_data(c, 32, 0, 1, num_workers=0, decode=False)
        spreads[grouping] = float(np.mean([_spread(b) for b in td.batches(0)]))
    print("mean pairwise distance in a batch (deg):", spreads)
    assert spreads["spatial"] < 0.5 * spreads["random"]


# ---------------------------------------------------------------- bad data

def _rewrite(tar_path: Path, edit) -> None:
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, data in members:
            data = edit(m.name, data)
            if data is None:
                continue
            m.size = len(data)
            out.addfile(m, io.BytesIO(data))
    tar_path.write_bytes(buf.getvalue())


def _edit_manifest(shards: Path, edit) -> None:
    """Apply ``edit(entry, tar path)`` to every shard entry of the manifest."""
    path = shards / "manifest.json"
    doc = json.loads(path.read_text())
    for entry in doc["shards"]:
        edit(entry, shards / entry["name"])
    path.write_text(json.dumps(doc))


def _record_sizes(shards: Path) -> None:
    """A manifest that records the files' present sizes: damage it cannot see by size."""
    _edit_manifest(shards, lambda entry, tar: entry.update(bytes=tar.stat().st_size))


def test_corrupt_and_truncated_data_are_skipped_and_counted(tmp_path, caplog):
    shards = make_place_shards(tmp_path, TILES48, 6)
    tars = sorted(shards.glob("*.tar"))

    def corrupt(name, data):
        if name.endswith(".img1.jpg") and name.startswith("000000000"):
            return data[: len(data) // 2]                  # truncated JPEG
        if name.endswith(".img2.jpg") and name.startswith("000000001"):
            return None                                    # missing member
        if name == "000000002.json":
            return b"{not json"                            # unreadable place record
        if name.endswith(".img0.jpg") and name.startswith("000000003"):
            return data[:20] + bytes(len(data) - 22) + data[-2:]   # garbage body, valid markers
        return data
    _rewrite(tars[0], corrupt)
    size = tars[1].stat().st_size
    tars[1].write_bytes(tars[1].read_bytes()[: size // 2])          # truncated tar
    _record_sizes(shards)     # else refused before reading (see the size test below)
    c = cfg(shards, min_images_per_place=3)
    totals = collections.Counter()
    used = []
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        for rank in range(2):
            td = build_train_data(c, 32, rank, 2, num_workers=0)
            batches = list(td.batches(0))
            assert len(batches) == td.steps_per_epoch
            totals.update(td.counters())
            assert sum(b.skipped for b in batches) == sum(
                td.counters()[k] for k in data_mod.SKIP_COUNTERS)
            used += [k for b in batches for k in b.place_keys if not b.counts.get("repeated")]
    assert totals["shard_errors"] >= 1                    # met again by the refill pass
    assert totals["missing_members"] == 1 and totals["bad_samples"] == 1
    assert totals["bad_images"] >= 1                      # the truncated JPEG (structure check)
    assert totals["repeated"] > 0                          # the lost places were made up, counted
    assert "000000002" not in used
    assert any("skipped" in r.message for r in caplog.records)


def test_no_usable_place_is_an_error_not_a_hang(tmp_path):
    shards = make_place_shards(tmp_path, TILES48[:8], 2, years=(2021,))
    c = cfg(shards, min_images_per_place=2, workers=1)              # every place has 1 image
    td = build_train_data(c, 32, 0, 1, num_workers=0, decode=False)
    with pytest.raises(RuntimeError, match="no usable place"):
        list(td.batches(0))


def test_config_errors():
    with pytest.raises(ValueError, match="did you mean 'batch_grouping'"):
        DataConfig.from_dict({"batch_groupin": "spatial"})
    with pytest.raises(ValueError, match="batch_grouping"):
        DataConfig(batch_grouping="kmeans")
    with pytest.raises(ValueError, match="did you mean 'earthloc'"):
        DataConfig(augment="earthlok")
    with pytest.raises(ValueError, match="train_shards"):
        build_train_data({}, 32)


def _cut_in_a_member_header(tar: Path) -> None:
    """Cut ``tar`` 100 bytes into the header of its 9th member (3rd place, 3rd member)."""
    with tarfile.open(tar) as t:
        offset = t.getmembers()[8].offset
    tar.write_bytes(tar.read_bytes()[: offset + 100])


def test_a_shard_of_another_size_than_its_manifest_entry_is_refused(tmp_path):
    shards = make_place_shards(tmp_path, TILES48[:12], 6, years=(2020, 2021))
    tar = sorted(shards.glob("*.tar"))[1]
    _cut_in_a_member_header(tar)
    with pytest.raises(ValueError) as err:
        build_train_data(cfg(shards, images_per_place=2, workers=1), 32, 0, 1, num_workers=0)
    assert str(err.value).startswith(f"{tar}: {tar.stat().st_size} bytes, the manifest says ")
    tar.unlink()
    with pytest.raises(ValueError, match=f"{tar}: missing, but listed in the manifest"):
        build_train_data(cfg(shards, images_per_place=2, workers=1), 32, 0, 1, num_workers=0)


def _count_epoch(shards: Path, caplog) -> tuple[collections.Counter, list[str]]:
    td = build_train_data(cfg(shards, images_per_place=2, workers=1, places_per_batch=2), 32, 0, 1,
                          num_workers=0, decode=False)
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        keys = [k for b in td.batches(0) for k in b.place_keys]
    return collections.Counter(td.counters()), keys


def test_a_shard_cut_inside_a_member_header_is_a_counted_shard_error(tmp_path, caplog):
    shards = make_place_shards(tmp_path, TILES48[:12], 6, years=(2020, 2021))
    _cut_in_a_member_header(sorted(shards.glob("*.tar"))[1])
    _record_sizes(shards)            # the size check cannot see it: the stream must
    counts, _ = _count_epoch(shards, caplog)
    assert counts["shard_errors"] == 1 and counts["repeated"] > 0
    assert any("tar ends early at byte" in r.getMessage() for r in caplog.records)


def test_a_manifest_that_overstates_a_shards_places_is_a_counted_shard_error(tmp_path, caplog):
    shards = make_place_shards(tmp_path, TILES48[:12], 6, years=(2020, 2021))
    _edit_manifest(shards, lambda entry, tar: entry.update(samples=entry["samples"] + 3))
    counts, keys = _count_epoch(shards, caplog)
    assert counts["shard_errors"] == 2 and counts["repeated"] > 0
    assert len(set(keys)) == 12
    assert any("ended after 6 of the 9 samples" in r.getMessage() for r in caplog.records)
