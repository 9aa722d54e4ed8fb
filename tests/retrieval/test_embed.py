"""Embedding shards: layout, rotations, float16, rank split, SIGKILL + resume, bad input."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import PYTHON, REPO, run_env, write_jpegs
from retrieval import Embeddings, embed_shards, load_views
from tests.retrieval.helpers import convert, run_cli, tiny_encoder


def test_layout_records_and_normalised_rows(tile_shards, tmp_path):
    enc = tiny_encoder()
    out = tmp_path / "emb"
    stats = embed_shards(enc, str(tile_shards), str(out), (32, 32), rotations=(0, 90),
                         dtype="float16", progress=False)
    assert stats.complete and stats.images == 24 and stats.rows == 48
    meta = json.loads((out / "embeddings.json").read_text())
    assert meta["dim"] == 16 and meta["dtype"] == "float16" and meta["rotations"] == [0, 90]
    assert meta["rows"] == 48 and len(meta["shards"]) == 6 == len(meta["shard_rows"])
    first = np.load(out / f"{meta['shards'][0]}.npy")
    assert first.dtype == np.float16 and first.shape == (8, 16)
    emb = Embeddings.open(str(out))
    rows = emb.all()
    assert np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=2e-3)
    recs = emb.records
    assert [r["rotation"] for r in recs[:4]] == [0, 90, 0, 90]        # image-major
    assert recs[0]["key"] == recs[1]["key"] != recs[2]["key"]
    assert recs[0]["footprint"] and recs[0]["image_id"]                 # the shard's record
    assert emb.image_of_row.tolist()[:6] == [0, 0, 1, 1, 2, 2]
    # float16 storage is the float32 result rounded
    out32 = tmp_path / "emb32"
    embed_shards(enc, str(tile_shards), str(out32), (32, 32), rotations=(0, 90), progress=False)
    full = Embeddings.open(str(out32)).all()
    assert np.allclose(full, rows, atol=1e-3) and not np.array_equal(full, rows)
    assert os.path.getsize(out / f"{meta['shards'][0]}.npy") < \
        os.path.getsize(out32 / f"{meta['shards'][0]}.npy")


def test_rotation_is_counter_clockwise_and_lossless():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    for deg, k in ((90, 1), (180, 2), (270, 3)):
        rotated = load_views(png(a), (40, 40), (deg,))[0]
        reference = load_views(png(np.ascontiguousarray(np.rot90(a, k))), (40, 40), (0,))[0]
        assert np.array_equal(rotated.numpy(), reference.numpy()), deg


def test_ranks_take_disjoint_shards_and_together_equal_one_process(tile_shards, tmp_path):
    enc = tiny_encoder()
    one, two = tmp_path / "one", tmp_path / "two"
    embed_shards(enc, str(tile_shards), str(one), (32, 32), progress=False)
    s0 = embed_shards(enc, str(tile_shards), str(two), (32, 32), rank=0, world_size=2,
                      progress=False)
    s1 = embed_shards(enc, str(tile_shards), str(two), (32, 32), rank=1, world_size=2,
                      progress=False)
    assert not set(s0.written) & set(s1.written)
    assert len(s0.written) + len(s1.written) == 6
    assert not s0.complete and s1.complete            # the last one writes embeddings.json
    a, b = Embeddings.open(str(one)), Embeddings.open(str(two))
    assert np.allclose(a.all(), b.all(), atol=1e-6) and list(a.keys) == list(b.keys)


def test_other_arguments_are_refused(tile_shards, tmp_path):
    enc = tiny_encoder()
    embed_shards(enc, str(tile_shards), str(tmp_path), (32, 32), progress=False)
    with pytest.raises(ValueError, match="rotations"):
        embed_shards(enc, str(tile_shards), str(tmp_path), (32, 32), rotations=(0, 90),
                     progress=False)


def test_truncated_shard_writes_nothing_for_it_and_resumes_once_restored(tile_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tile_shards, shards)
    victim = shards / "images-000003.tar"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])          # a tar cut mid-stream
    enc, out = tiny_encoder(), tmp_path / "emb"
    with pytest.raises(ValueError, match=r"shard images-000003 read incompletely \(\d of 4 samples"):
        embed_shards(enc, str(shards), str(out), (32, 32), progress=False)
    assert not (out / "images-000003.npy").exists() and not (out / "embeddings.json").exists()
    assert (out / "images-000002.npy").exists()        # the shards before it are kept
    victim.write_bytes(good)
    stats = embed_shards(enc, str(shards), str(out), (32, 32), progress=False)
    assert stats.shards_skipped == 3 and stats.written[0] == "images-000003"
    assert stats.complete and len(Embeddings.open(str(out))) == 24


def test_a_place_shard_set_is_refused(tile_shards, tmp_path):
    places = convert(tile_shards.parent / "db", tmp_path / "places", kind="places")
    with pytest.raises(ValueError, match="holds places shards; embedding reads image shards"):
        embed_shards(tiny_encoder(), str(places), str(tmp_path / "emb"), (32, 32), progress=False)


def test_cli_bad_inputs_are_one_line(tile_shards, encoder_dir, tmp_path):
    # a missing shard
    broken = tmp_path / "broken"
    convert(tile_shards.parent / "db", broken, shard_size=4)
    os.unlink(broken / "images-000002.tar")
    proc = run_cli("embed", "--model", encoder_dir, "--shards", broken, "--output",
                   tmp_path / "e1", "--no-progress")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: shard missing") and "images-000002.tar" in proc.stderr
    # an encoder file that does not load
    bad = tmp_path / "bad-encoder"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes(b"garbage")
    proc = run_cli("embed", "--model", bad, "--shards", tile_shards, "--output", tmp_path / "e2")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: cannot load encoder")
    assert f"{bad / 'config.json'}: not valid JSON" in last      # the file, not only the folder
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_embed_sigkilled_then_resumed(tmp_path):
    """A real SIGKILL mid-run; the re-run skips complete shards and finishes the rest."""
    from trainer.models import build_model, save_encoder

    import torch
    torch.manual_seed(1)
    save_encoder(build_model({"backbone": "resnet18", "image_size": 96,
                              "aggregator": {"name": "gem"}}), tmp_path / "enc")
    names = [f"img{i:03d}/x.jpg" for i in range(24)]
    write_jpegs(tmp_path / "src", names, size=(96, 96))
    listing = tmp_path / "src" / "list.csv"
    listing.write_text("path,lat,lon,place_id\n" + "".join(
        f"{n},{10 + i * 0.01},{20 + i * 0.01},{i}\n" for i, n in enumerate(names)))
    shards = tmp_path / "shards"
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "csv", "--kind",
                           "images", "--input", str(listing), "--output", str(shards),
                           "--shard-size", "1", "--no-progress"], capture_output=True, text=True,
                          env=run_env())
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "emb"
    args = [PYTHON, "-m", "retrieval", "embed", "--model", str(tmp_path / "enc"), "--shards",
            str(shards), "--output", str(out), "--rotations", "0,90,180,270", "--batch-size",
            "1", "--no-progress"]
    victim = subprocess.Popen(args, env=run_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("images-*.npy"))) < 3:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("images-*.npy")}
    assert 3 <= len(done) < 24, len(done)
    assert not (out / "embeddings.json").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".npy") and p.name.startswith(".")]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        Embeddings.open(str(out))
    proc = subprocess.run(args, env=run_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(done)} already done" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("images-*.npy") if p.name in done} == done
    emb = Embeddings.open(str(out))
    assert len(emb) == 24 * 4 and len(set(emb.keys)) == 24
    assert np.allclose(np.linalg.norm(emb.all(), axis=1), 1.0, atol=1e-5)


def _manifest_sha256(shards) -> list[str]:
    return [s["sha256"] for s in json.loads((shards / "manifest.json").read_text())["shards"]]


def test_embeddings_record_encoder_shard_digests_and_a_digest_of_their_rows(tile_shards,
                                                                           encoder_dir, tmp_path):
    from retrieval.provenance import embeddings_digest, file_sha256

    out = tmp_path / "emb"
    proc = run_cli("embed", "--model", encoder_dir, "--shards", tile_shards, "--output", out,
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((out / "embeddings.json").read_text())
    params = json.loads((out / "params.json").read_text())
    weights = file_sha256(encoder_dir / "model.safetensors")
    for doc in (meta, params):
        assert doc["encoder"] == {"path": str(encoder_dir), "weights_sha256": weights}
        assert doc["shard_sha256"] == _manifest_sha256(tile_shards)
    emb = Embeddings.open(str(out))
    # the recorded digest is the one computed over the same rows anywhere else
    assert meta["digest"] == embeddings_digest(Embeddings(emb.arrays)) == emb.digest
    assert emb.encoder == meta["encoder"]


def test_a_shard_changed_since_embedded_is_embedded_again_and_said_so(tile_shards, tmp_path,
                                                                     caplog):
    from tests.retrieval.helpers import copy_shards, reconvert_with_other_images

    shards = copy_shards(tile_shards, tmp_path / "shards")
    enc, out = tiny_encoder(), tmp_path / "emb"
    embed_shards(enc, str(shards), str(out), (32, 32), progress=False)
    before = Embeddings.open(str(out))
    old_rows, old_digest = before.all(), before.digest
    reconvert_with_other_images(shards)              # same names and count, other images
    with caplog.at_level("WARNING", logger="retrieval.embed"):
        stats = embed_shards(enc, str(shards), str(out), (32, 32), progress=False)
    assert stats.shards_skipped == 0 and stats.shards_changed == 6 == stats.shards_written
    assert "shard images-000000 changed since it was embedded" in caplog.text
    after = Embeddings.open(str(out))
    assert after.digest != old_digest and not np.allclose(after.all(), old_rows)
    assert after.meta["shard_sha256"] == _manifest_sha256(shards)
    # unchanged shards are still skipped on the next run
    assert embed_shards(enc, str(shards), str(out), (32, 32), progress=False).shards_skipped == 6


def test_opening_embeddings_hashes_only_files_whose_size_or_mtime_changed(tmp_path, monkeypatch,
                                                                        caplog):
    import shutil

    import retrieval.embed as embed_module
    from retrieval.provenance import rows_digest
    from tests.retrieval.helpers import unit_rows
    from tests.retrieval.test_index_search import write_embeddings

    src = write_embeddings(tmp_path / "emb", unit_rows(40, 8, 1), 10)
    digest = Embeddings.open(str(src)).digest
    hashed: list[str] = []
    real_sha256 = embed_module.file_sha256
    monkeypatch.setattr(embed_module, "file_sha256",
                        lambda path: hashed.append(os.path.basename(path)) or real_sha256(path))
    assert Embeddings.open(str(src)).digest == digest and hashed == []    # stat only
    copy = shutil.copytree(src, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    with caplog.at_level("WARNING", logger="retrieval.embed"):
        assert Embeddings.open(str(copy)).digest == digest      # same bytes: accepted
    assert sorted(hashed) == [f"images-{i:06d}.npy" for i in range(4)] and not caplog.text
    hashed.clear()
    assert Embeddings.open(str(copy)).digest == digest and hashed == []   # mtimes recorded
    np.save(copy / "images-000002.npy", unit_rows(10, 8, 9))     # other rows, same shape
    with caplog.at_level("WARNING", logger="retrieval.embed"):
        changed = Embeddings.open(str(copy))
    assert hashed == ["images-000002.npy"]
    assert changed.digest != digest and changed.digest == rows_digest(Embeddings(changed.arrays))
    assert f"{copy / 'images-000002.npy'} is not the file {copy / 'embeddings.json'} records" \
        in caplog.text


def test_another_encoder_into_the_same_folder_is_refused_naming_both(tile_shards, tmp_path):
    a = {"path": "/encoders/init", "weights_sha256": "a" * 64}
    b = {"path": "/encoders/trained", "weights_sha256": "b" * 64}
    out = tmp_path / "emb"
    embed_shards(tiny_encoder(), str(tile_shards), str(out), (32, 32), progress=False,
                 encoder_id=a)
    with pytest.raises(ValueError, match=r"holds embeddings of encoder /encoders/init "
                                         r"\(weights aaaaaaaaaaaa\), not of /encoders/trained "
                                         r"\(weights bbbbbbbbbbbb\)"):
        embed_shards(tiny_encoder(1), str(tile_shards), str(out), (32, 32), progress=False,
                     encoder_id=b)
    # the same weights from another folder are the same encoder
    stats = embed_shards(tiny_encoder(), str(tile_shards), str(out), (32, 32), progress=False,
                         encoder_id={**a, "path": "/copies/init"})
    assert stats.shards_skipped == 6


def test_a_folder_embedded_before_provenance_was_recorded_opens_and_resumes(tile_shards,
                                                                            tmp_path):
    out = tmp_path / "emb"
    embed_shards(tiny_encoder(), str(tile_shards), str(out), (32, 32), progress=False)
    for p in out.glob("*.source.json"):           # what the old layout lacked
        p.unlink()
    for name in ("params.json", "embeddings.json"):
        doc = json.loads((out / name).read_text())
        for key in ("encoder", "shard_sha256", "digest"):
            doc.pop(key, None)
        (out / name).write_text(json.dumps(doc))
    emb = Embeddings.open(str(out))
    assert len(emb) == 24 and emb.encoder is None and len(emb.digest) == 64
    stats = embed_shards(tiny_encoder(), str(tile_shards), str(out), (32, 32), progress=False)
    assert stats.shards_skipped == 6 and stats.complete


def _foreign_embeddings(root, meta: dict, rows_per_shard=(5, 3), dim: int = 8):
    """An embeddings folder as another tool writes it: .npy + .jsonl + the given meta."""
    from tests.retrieval.helpers import unit_rows

    root.mkdir()
    for i, n in enumerate(rows_per_shard):
        np.save(root / f"part{i}.npy", unit_rows(n, dim, seed=i))
        (root / f"part{i}.jsonl").write_text("".join(
            json.dumps({"image": j}) + "\n" for j in range(n)))
    (root / "embeddings.json").write_text(json.dumps(meta))
    return root


def test_embeddings_with_only_the_documented_fields_open_index_and_search(tmp_path):
    from retrieval import build_index, search

    meta = {"model": "other-tool", "dim": 8, "dtype": "float32", "rotations": [0],
            "shards": ["part0", "part1"], "rows": 8}      # no shard_rows, digest, encoder
    root = _foreign_embeddings(tmp_path / "emb", meta)
    emb = Embeddings.open(str(root))
    assert emb.meta["shard_rows"] == [5, 3] and len(emb) == 8 and emb.dim == 8
    assert list(emb.keys[:2]) == ["part0:0", "part0:1"] and emb.keys[5] == "part1:0"
    res = search(build_index(emb, None, "Flat", progress=False), emb.take([6]), 1)
    assert res.ids[0, 0] == 6
    # the command line too
    proc = run_cli("index", "--embeddings", root, "--output", tmp_path / "idx", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    # only "shards" is needed
    minimal = _foreign_embeddings(tmp_path / "minimal", {"shards": ["part0", "part1"]})
    emb = Embeddings.open(str(minimal))
    assert (emb.dim, len(emb), emb.meta["dtype"], emb.rotations) == (8, 8, "float32", [0])


@pytest.mark.parametrize("meta, message", [
    ({"dim": 8, "rows": 8}, r"embeddings.json: no 'shards' \(the embedding shard names"),
    ({"shards": ["part0", "part1"], "rows": 9}, r"embeddings.json: 'rows' is 9, the .npy "
                                                r"files hold 8"),
    ({"shards": ["part0", "part1"], "dim": 16}, r"embeddings.json: 'dim' is 16"),
    ({"shards": ["part0", "part2"]}, r"embedding shard missing: .*part2.npy"),
])
def test_a_missing_or_wrong_field_of_embeddings_json_is_named_in_one_line(tmp_path, meta,
                                                                           message):
    root = _foreign_embeddings(tmp_path / "emb", meta)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Embeddings.open(str(root))
    proc = run_cli("index", "--embeddings", root, "--output", tmp_path / "idx", "--no-progress")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.slow
def test_a_bad_shard_on_one_rank_of_two_is_one_error_line_and_both_ranks_stop(tile_shards,
                                                                               encoder_dir,
                                                                               tmp_path):
    import shutil

    from tests.retrieval.helpers import assert_one_error_line_and_no_traceback, launch_two_ranks

    shards = tmp_path / "shards"
    shutil.copytree(tile_shards, shards)
    victim = shards / "images-000003.tar"                 # rank 1 of 2 takes shards 1, 3, 5
    victim.write_bytes(victim.read_bytes()[:3000])
    out = tmp_path / "emb"
    proc = launch_two_ranks("embed", "--model", encoder_dir, "--shards", shards, "--output", out,
                            "--no-progress", "--workers", "1")
    assert_one_error_line_and_no_traceback(proc, "images-000003")
    assert not (out / "images-000003.npy").exists() and not (out / "embeddings.json").exists()
    assert (out / "images-000000.npy").exists()         # rank 0's shards are kept
