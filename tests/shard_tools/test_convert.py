"""The converter end to end on generated images named like the real ones."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from conftest import (PYTHON, REPO, TEST_TILES, earthloc_query_name, jpeg_bytes,
                      make_earthloc_tree, run_env, write_jpegs)
from shard_tools.__main__ import main
from shard_tools.formats import format_vpr_name, empty_record
from shard_tools.reader import ReadErrors, iter_dataset, iter_samples, list_shards, member_images


def convert(*args) -> int:
    return main(["convert", "--no-progress", *map(str, args)])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def rejects(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "rejects.jsonl").read_text().splitlines()]


@pytest.fixture
def earthloc(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "earthloc"
    return root, make_earthloc_tree(root, TEST_TILES)


# ---------------------------------------------------------------- earthloc

def test_earthloc_images_counts_records_and_readers(earthloc, tmp_path):
    root, names = earthloc
    out = tmp_path / "shards"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 5) == 0
    m = manifest(out)
    assert m["kind"] == "images" and m["format_version"] == 1
    assert m["totals"]["images"] == m["totals"]["samples"] == len(names) == 24
    assert [s["name"] for s in m["shards"]] == [f"images-{i:06d}.tar" for i in range(5)]
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    assert (out / "rejects.jsonl").read_text() == ""

    # python's tarfile: keys sortable, dot-free, unique; json next to jpg
    keys = []
    for shard in m["shards"]:
        with tarfile.open(out / shard["name"]) as tar:
            members = tar.getnames()
        assert len(members) == 2 * shard["samples"]
        keys += sorted({n.split(".", 1)[0] for n in members})
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 24

    # webdataset reads every sample; records carry the parsed metadata and the bytes are untouched
    ds = wds.WebDataset([str(out / s["name"]) for s in m["shards"]], shardshuffle=False)
    seen = {}
    for sample in ds:
        rec = json.loads(sample["json"])
        assert rec["key"] == sample["__key__"] and rec["kind"] == "database"
        seen[rec["source"]] = sample["jpg"]
    assert sorted(seen) == sorted(names)
    for name, data in seen.items():
        assert data == (root / name).read_bytes()


def test_earthloc_places_group_years_and_attach_mined_queries(earthloc, tmp_path):
    root, names = earthloc
    qroot = tmp_path / "queries"
    qnames = [earthloc_query_name(t, i) for i, t in enumerate(TEST_TILES[:3])]
    write_jpegs(qroot, qnames, seed0=500)
    # pairs keyed by the database path as EarthLoc2 publishes them (2021 tiles)
    pairs = {next(n for n in names if TEST_TILES[i] in n and "/2021_" in n): [qnames[i]]
             for i in range(3)}
    pairs[next(n for n in names if TEST_TILES[0] in n and "/2021_" in n)].append(qnames[1])
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    out = tmp_path / "places"
    assert convert("--format", "earthloc", "--kind", "places", "--input", root, "--output", out,
                   "--queries", qroot, "--query-pairs", tmp_path / "pairs.json",
                   "--shard-size", 4) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == len(TEST_TILES)
    assert m["totals"]["images"] == len(names) + 4
    places = {}
    for sample in iter_dataset(str(out)):
        place = json.loads(sample["json"])
        imgs, qs = member_images(sample)
        assert len(imgs) == len(place["images"]) == 2 and len(qs) == len(place["queries"])
        assert [r["year"] for r in place["images"]] == [2019, 2021]
        assert {r["image_id"] for r in place["images"]} == {place["place_id"]}
        for r in place["queries"]:
            assert r["kind"] == "query" and r["place_id"] == place["place_id"]
        places[place["place_id"]] = sorted(r["source"] for r in place["queries"])
    assert places[TEST_TILES[0]] == sorted([qnames[0], qnames[1]])
    assert places[TEST_TILES[1]] == [qnames[1]] and places[TEST_TILES[2]] == [qnames[2]]
    assert all(not q for t, q in places.items() if t not in TEST_TILES[:3])


def test_query_pairs_naming_a_missing_query_is_rejected(earthloc, tmp_path):
    root, names = earthloc
    qroot = tmp_path / "queries"
    write_jpegs(qroot, [earthloc_query_name(TEST_TILES[0], 0)])
    missing = earthloc_query_name(TEST_TILES[1], 1)
    (tmp_path / "pairs.json").write_text(json.dumps({names[1]: [missing]}))
    out = tmp_path / "places"
    assert convert("--format", "earthloc", "--kind", "places", "--input", root, "--output", out,
                   "--queries", qroot, "--query-pairs", tmp_path / "pairs.json") == 0
    assert [r["path"] for r in rejects(out)] == [missing]


# ---------------------------------------------------------------- other formats

def _gsv_rows(city: str, n_places: int, per_place: int) -> list[dict]:
    return [{"place_id": p, "year": 2015 + i, "month": 1 + i, "northdeg": 90 * i,
             "city_id": city, "lat": f"{40 + p * 0.01:.4f}", "lon": f"{-3.7 - i * 0.0001:.4f}",
             "panoid": f"pano_{city}_{p}_{i}"}
            for p in range(n_places) for i in range(per_place)]


def make_gsv_cities(root: Path) -> int:
    from shard_tools.formats import gsv_cities_image_name
    n = 0
    for city in ("Madrid", "Osaka"):
        rows = _gsv_rows(city, 3, 4)
        (root / "Dataframes").mkdir(parents=True, exist_ok=True)
        with open(root / "Dataframes" / f"{city}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        n += len(write_jpegs(root / "Images" / city, [gsv_cities_image_name(r) for r in rows],
                             seed0=n))
    return n


def test_gsv_cities_places_and_images(tmp_path):
    root = tmp_path / "gsv"
    n = make_gsv_cities(root)
    out = tmp_path / "places"
    assert convert("--format", "gsv-cities", "--kind", "places", "--input", root,
                   "--output", out) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 6 and m["totals"]["images"] == n == 24
    place_ids = []
    for sample in iter_dataset(str(out)):
        place = json.loads(sample["json"])
        place_ids.append(place["place_id"])
        assert len(member_images(sample)[0]) == 4
        assert {r["place_id"] for r in place["images"]} == {place["place_id"]}
    # place ids are unique only within a city: the city keeps them apart
    assert place_ids == sorted(f"{c}_{p:07d}" for c in ("Madrid", "Osaka") for p in range(3))
    out2 = tmp_path / "images"
    assert convert("--format", "gsv-cities", "--kind", "images", "--input", root,
                   "--output", out2) == 0
    assert manifest(out2)["totals"]["images"] == 24


def test_gsv_cities_missing_rows_and_images_are_rejected(tmp_path):
    root = tmp_path / "gsv"
    make_gsv_cities(root)
    lonely = root / "Images" / "Madrid" / "Madrid_0000099_2015_01_000_40.0_-3.7_zzz.jpg"
    lonely.write_bytes(jpeg_bytes(99))
    gone = sorted((root / "Images" / "Osaka").glob("*.jpg"))[0]
    gone.unlink()
    out = tmp_path / "out"
    assert convert("--format", "gsv-cities", "--kind", "images", "--input", root,
                   "--output", out) == 0
    reasons = {r["path"]: r["reason"] for r in rejects(out)}
    assert "missing CSV row" in reasons[f"Images/Madrid/{lonely.name}"]
    assert "missing image for CSV row" in reasons[f"Images/Osaka/{gone.name}"]
    assert manifest(out)["totals"]["images"] == 23


def test_vpr_images_keep_kind_from_folder(tmp_path):
    root = tmp_path / "sfxs"
    names = []
    for i in range(6):
        kind = "query" if i % 3 == 0 else "database"
        rec = empty_record(utm=[550000.0 + i, 4180000.0 + i, 10, "S"], lat=37.7 + i * 1e-4,
                           lon=-122.4, image_id=f"pano{i}", heading_deg=90.0,
                           timestamp="201511")
        folder = "queries" if kind == "query" else "database"
        names.append(f"val/{folder}/{format_vpr_name(rec)}")
    write_jpegs(root, names)
    out = tmp_path / "out"
    assert convert("--format", "vpr", "--kind", "images", "--input", root, "--output", out) == 0
    kinds = sorted(json.loads(s["json"])["kind"] for s in iter_dataset(str(out)))
    assert kinds == ["database"] * 4 + ["query"] * 2
    # vpr has no place ids: a places conversion has nothing to pack, and says why
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "vpr", "--kind",
                           "places", "--input", str(root), "--output", str(tmp_path / "places")],
                          capture_output=True, text=True, env=run_env(), cwd=REPO)
    assert proc.returncode == 2 and "no place id" in proc.stderr.strip().splitlines()[-1]


def test_csv_table_with_a_missing_image_and_a_bad_row(tmp_path):
    (tmp_path / "img").mkdir()
    write_jpegs(tmp_path / "img", [f"{i}.jpg" for i in range(4)])
    table = tmp_path / "table.csv"
    table.write_text("path,lat,lon,place_id\n" + "".join(
        f"img/{i}.jpg,{10 + i},{20 + i},p{i // 2}\n" for i in range(4))
        + "img/missing.jpg,1,2,p9\nimg/0.jpg,north,2,p0\n")
    out = tmp_path / "out"
    assert convert("--format", "csv", "--kind", "places", "--input", table, "--output", out) == 0
    m = manifest(out)
    assert m["totals"]["samples"] == 2 and m["totals"]["images"] == 4
    reasons = [r["reason"] for r in rejects(out)]
    assert len(reasons) == 2  # the bad row, and the missing image (its place is then empty)
    assert any("field 'lat'" in r for r in reasons) and any("unreadable" in r for r in reasons)


# ---------------------------------------------------------------- bad input

def test_malformed_names_and_corrupt_jpegs_are_rejected_and_nothing_good_is_lost(earthloc,
                                                                                  tmp_path):
    root, names = earthloc
    folder = root / "database" / "2021_08"
    (folder / "@1@2@3@.jpg").write_bytes(jpeg_bytes(1))
    bad_lat = "@95.0@1@1@1@1@1@1@1@08_0100_0060@2021@1@1@1@0@.jpg"
    (folder / bad_lat).write_bytes(jpeg_bytes(2))
    corrupt = root / names[3]
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    truncated = root / names[7]
    truncated.write_bytes(truncated.read_bytes()[:200])
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 7) == 0
    rej = {r["path"]: r for r in rejects(out)}
    assert set(rej) == {"database/2021_08/@1@2@3@.jpg", f"database/2021_08/{bad_lat}",
                        names[3], names[7]}
    assert "field 'lat1'" in rej[f"database/2021_08/{bad_lat}"]["reason"]
    assert "truncated" in rej[names[7]]["reason"] and rej[names[7]]["stage"] == "write"
    kept = sorted(json.loads(s["json"])["source"] for s in iter_dataset(str(out)))
    assert kept == sorted(set(names) - {names[3], names[7]})
    assert manifest(out)["totals"]["rejects"] == 4
    assert main(["verify", str(out), "--no-progress"]) == 0


def test_strict_stops_at_the_first_bad_input_with_exit_2(earthloc, tmp_path):
    root, names = earthloc
    (root / names[5]).write_bytes(b"garbage")
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "earthloc",
                           "--kind", "images", "--input", str(root), "--output",
                           str(tmp_path / "out"), "--strict", "--no-progress"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and names[5] in last and "JPEG" in last
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_arguments_give_one_line_errors(earthloc, tmp_path):
    root, _ = earthloc
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "earthloc",
                           "--kind", "images", "--input", str(tmp_path / "nowhere"),
                           "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env=run_env(), cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: input not found")


def test_empty_or_wrong_format_input_is_an_error(earthloc, tmp_path):
    root, _ = earthloc
    (tmp_path / "empty").mkdir()
    assert convert("--format", "earthloc", "--kind", "images", "--input", tmp_path / "empty",
                   "--output", tmp_path / "o1") == 2
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--format", "vpr", "--kind",
                           "images", "--input", str(root), "--output", str(tmp_path / "o2")],
                          capture_output=True, text=True, env=run_env(), cwd=REPO)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "no vpr images found" in last and "all 24" in last
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_file_urls_and_manifest_paths_work_like_folders(earthloc, tmp_path):
    root, names = earthloc
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", f"file://{root}",
                   "--output", f"file://{out}", "--shard-size", 10) == 0
    assert manifest(out)["totals"]["images"] == len(names)
    assert main(["verify", str(out / "manifest.json"), "--no-progress"]) == 0
    assert main(["verify", f"file://{out}", "--no-progress"]) == 0
    assert len(list_shards(f"file://{out}/manifest.json")) == 3
    assert len(list_shards(str(out), kind="images")) == 3
    with pytest.raises(ValueError, match="holds images shards; training reads place shards"):
        list_shards(str(out), kind="places", reader="training")
    # the storage layer itself treats file:// as a local path (any command's --output)
    from shard_tools import storage
    storage.write_bytes_atomic(f"file://{tmp_path}/deep/x.json", b"{}")
    assert (tmp_path / "deep" / "x.json").read_bytes() == b"{}"
    assert storage.read_bytes(f"file://{tmp_path}/deep/x.json") == b"{}"


def test_sparse_slurm_array_is_a_clear_error(earthloc, tmp_path, monkeypatch):
    root, _ = earthloc
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    with pytest.raises(ValueError, match="contiguous array"):
        from shard_tools.convert import slurm_task
        slurm_task()


def test_queries_of_a_place_without_database_images_are_rejected_not_lost(earthloc, tmp_path):
    root, names = earthloc
    qroot = tmp_path / "queries"
    qname = earthloc_query_name(TEST_TILES[0], 0)
    write_jpegs(qroot, [qname])
    for n in names:
        if TEST_TILES[0] in n:
            (root / n).write_bytes(b"broken")
    (tmp_path / "pairs.json").write_text(json.dumps(
        {next(n for n in names if TEST_TILES[0] in n): [qname]}))
    out = tmp_path / "places"
    assert convert("--format", "earthloc", "--kind", "places", "--input", root, "--output", out,
                   "--queries", qroot, "--query-pairs", tmp_path / "pairs.json") == 0
    rej = {r["path"]: r["reason"] for r in rejects(out)}
    assert "no readable database image" in rej[qname]
    assert len(rej) == 3 and manifest(out)["totals"]["samples"] == len(TEST_TILES) - 1


def test_truncated_shard_is_reported_by_verify_and_skipped_by_the_reader(earthloc, tmp_path):
    root, names = earthloc
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 12) == 0
    shard = out / "images-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])
    assert main(["verify", str(out), "--quick", "--no-progress"]) == 1
    errors = ReadErrors()
    got = list(iter_samples(str(shard), errors=errors))
    assert errors.count == 1 and 0 < len(got) < 12
    assert all(json.loads(s["json"])["key"] == s["__key__"] for s in got)
    with pytest.raises(tarfile.TarError):
        list(iter_samples(str(shard)))


def test_verify_detects_a_changed_image_and_a_missing_shard(earthloc, tmp_path):
    root, _ = earthloc
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 12) == 0
    assert main(["verify", str(out), "--no-progress"]) == 0
    (out / "images-000001.tar").unlink()
    assert main(["verify", str(out), "--no-progress"]) == 1


# ---------------------------------------------------------------- determinism, resume, arrays

def test_two_runs_and_any_worker_count_give_byte_identical_shards(earthloc, tmp_path):
    root, _ = earthloc
    for name, extra in (("a", []), ("b", []), ("c", ["--workers", "2"])):
        assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                       "--output", tmp_path / name, "--shard-size", 5, *extra) == 0
    a, b, c = (shard_hashes(tmp_path / n) for n in "abc")
    assert a == b == c and len(a) == 5
    assert (tmp_path / "a" / "manifest.json").read_bytes() == \
        (tmp_path / "c" / "manifest.json").read_bytes()


def test_array_of_three_tasks_equals_one_task(earthloc, tmp_path, monkeypatch):
    root, _ = earthloc
    args = ["--format", "earthloc", "--kind", "places", "--input", root, "--shard-size", 2]
    assert convert(*args, "--output", tmp_path / "one") == 0
    out = tmp_path / "array"
    assert convert(*args, "--output", out, "--task-index", 2, "--num-tasks", 3) == 0
    assert not (out / "manifest.json").exists()
    assert main(["manifest", str(out)]) == 1  # still incomplete
    # a SLURM array task takes its index and count from the environment
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert convert(*args, "--output", out) == 0
    assert not (out / "manifest.json").exists()
    assert convert(*args, "--output", out, "--task-index", 0, "--num-tasks", 3) == 0
    assert (out / "manifest.json").read_bytes() == (tmp_path / "one" / "manifest.json").read_bytes()
    assert shard_hashes(out) == shard_hashes(tmp_path / "one")
    assert main(["manifest", str(out)]) == 0


def test_resume_refuses_other_arguments(earthloc, tmp_path):
    root, _ = earthloc
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 5) == 0
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 6) == 2


def test_killed_conversion_resumes_to_identical_shards(earthloc, tmp_path):
    """A real SIGKILL mid-conversion: a FIFO in the input blocks the converter there."""
    root, names = earthloc
    order = sorted(names)
    blocker = root / order[13]  # shard 2 of 5 (shard size 5) blocks on this one
    good = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{root / n}\n" for n in order))  # a .txt list of absolute paths
    out = tmp_path / "out"
    cmd = [PYTHON, "-m", "shard_tools", "convert", "--format", "earthloc", "--kind", "images",
           "--input", str(listing), "--output", str(out), "--shard-size", "5", "--no-progress"]
    proc = subprocess.Popen(cmd, env=run_env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("*.stats.json"))) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the converter should be blocked on the FIFO"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in out.glob("*.stats.json")) == [
        "images-000000.tar.stats.json", "images-000001.tar.stats.json"]
    assert not (out / "manifest.json").exists() and not (out / "images-000002.tar").exists()
    before = shard_hashes(out)
    blocker.unlink()
    blocker.write_bytes(good)
    subprocess.run(cmd, env=run_env(), cwd=REPO, check=True, capture_output=True)
    after = shard_hashes(out)
    assert {k: after[k] for k in before} == before  # complete shards were skipped, not redone
    clean = tmp_path / "clean"
    subprocess.run(cmd[:-4] + [str(clean), *cmd[-3:]], env=run_env(), cwd=REPO, check=True,
                   capture_output=True)
    assert after == shard_hashes(clean) and len(after) == 5
    assert not list(out.glob(".*tmp*"))  # the killed shard's temporary file was replaced
    assert manifest(out)["totals"]["images"] == 24


# ---------------------------------------------------------------- resize

def test_max_side_resizes_large_images_and_copies_small_ones(tmp_path):
    root = tmp_path / "in"
    names = make_earthloc_tree(root, TEST_TILES[:2], years=(2021,))
    big = root / names[0]
    big.write_bytes(jpeg_bytes(7, size=(300, 200)))
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--max-side", 64) == 0
    from PIL import Image
    import io
    sizes = {json.loads(s["json"])["source"]: (Image.open(io.BytesIO(s["jpg"])).size, s["jpg"])
             for s in iter_dataset(str(out))}
    assert sizes[names[0]][0] == (64, 43)
    assert sizes[names[1]][1] == (root / names[1]).read_bytes()  # 32x24 stays untouched


def test_help_has_examples():
    proc = subprocess.run([PYTHON, "-m", "shard_tools", "convert", "--help"],
                          capture_output=True, text=True, env=run_env(), cwd=REPO)
    assert proc.returncode == 0 and "examples:" in proc.stdout and "--query-pairs" in proc.stdout


def test_list_shards_gives_urls_in_manifest_order(earthloc, tmp_path):
    root, _ = earthloc
    out = tmp_path / "out"
    assert convert("--format", "earthloc", "--kind", "images", "--input", root,
                   "--output", out, "--shard-size", 10) == 0
    shards = list_shards(str(out))
    assert [Path(s.url).name for s in shards] == [f"images-{i:06d}.tar" for i in range(3)]
    assert sum(s.samples for s in shards) == 24


def test_console_script_is_installed():
    script = Path(PYTHON).parent / "streamloc-shards"
    if not script.exists():
        pytest.skip("streamloc is not pip-installed in this interpreter's environment")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "convert" in proc.stdout and "verify" in proc.stdout
