"""The inputs' checksums fanned out: `tile-checksum --parts N` hashes one of N shares of the input
bytes in any process and records the checksums with the files' stamps in the store's build; the survey (and a
resumed build) takes a recorded checksum for every file whose size and stamp are unchanged, and hashes
the rest. The store is the same bytes as the one-process `tile()`, and its lineage holds the inputs'
true SHA-256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from helpers import folder_bytes, use_moto
from sarflow.data.catalog import load_catalog
from sarflow.data.ingest import catalog_files, input_sizes, input_stamps
from sarflow.data.tile import TileOptions, tile
from sarflow.data.tile_units import (BUILD, CHECKSUMS, Location, checksum_part, checksum_shares, commit_plan, finalize,
                                     run_units, screen_part, survey)

SARFLOW = str(Path(sys.executable).with_name("sarflow"))

OPTIONS = dict(shard_chips=16, unit_shards=1, workers=1, block_chips=4)
FLAGS = ["--shard-chips", "16", "--unit-shards", "1", "--workers", "1", "--block-chips", "4"]


@pytest.fixture(scope="module")
def reference(tiny_scene, tmp_path_factory) -> Path:
    return tile(load_catalog(tiny_scene), tmp_path_factory.mktemp("ref") / "chips.zarr", TileOptions(**OPTIONS),
                show_progress=False)


@pytest.fixture()
def scene_copy(tiny_scene, tmp_path) -> Path:
    """A copy of the tiny scene whose files a test may change."""
    shutil.copytree(tiny_scene.parent, tmp_path / "scene")
    return tmp_path / "scene" / tiny_scene.name


def _input_sha256(store: Path) -> dict[str, str]:
    """The inputs' SHA-256 as the store's lineage records them (the manifest written into the store)."""
    manifest = json.loads((store / "manifest.json").read_text())
    return {f["uri"]: f["sha256"] for s in manifest["sources"] for f in s["files"]}


def _hashlib_of(catalog: Path) -> dict[str, str]:
    """The independent reference: every input file hashed with hashlib here."""
    cat = load_catalog(catalog)
    return {cat.relative(u): hashlib.sha256(Path(u).read_bytes()).hexdigest() for u in catalog_files(cat)}


def _no_hashing(monkeypatch):
    def refuse(uri):
        raise AssertionError(f"{uri} was read again for its checksum")

    monkeypatch.setattr("sarflow.data.storage.sha256_of", refuse)
    monkeypatch.setattr("sarflow.data.ingest.sha256_of", refuse)


def test_two_checksum_processes_spare_the_survey_every_read_and_give_tile_store(reference, tiny_scene, tmp_path):
    out = tmp_path / "parts.zarr"
    env = dict(os.environ)
    env.pop("JOB_COMPLETION_INDEX", None)
    procs = [subprocess.Popen([SARFLOW, "tile-checksum", str(tiny_scene), "--out", str(out), "--parts", "2",
                               *(["--part", "0"] if i == 0 else [])],
                              env=env if i == 0 else {**env, "JOB_COMPLETION_INDEX": "1"},  # an Indexed Job's pod
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    hashed = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        hashed.append(json.loads(stdout)["hashed"])
    inputs = catalog_files(load_catalog(tiny_scene))
    files = len(inputs)
    assert hashed == [len(share) for share in checksum_shares(input_sizes(inputs), 2)]  # each file once, by one part
    assert sum(hashed) == files
    done = subprocess.run([SARFLOW, "tile-plan", str(tiny_scene), "--out", str(out), "--survey", "2", *FLAGS],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"checksums: 0 of {files} input files hashed" in done.stderr  # the survey read no input for its checksum
    records = sorted(p.name for p in Path(Location(out).work, BUILD, CHECKSUMS).iterdir())
    assert records == ["survey.json"]  # the parts' records merged into the survey's
    for part in range(2):
        screen_part(out, part)
    commit_plan(out)
    run_units(out)
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)
    assert _input_sha256(out) == _hashlib_of(tiny_scene)


def test_a_file_changed_after_its_part_was_hashed_is_hashed_again(scene_copy, tmp_path, caplog):
    cat = load_catalog(scene_copy)
    out = tmp_path / "changed.zarr"
    shares = checksum_shares(input_sizes(catalog_files(cat)), 3)
    assert [checksum_part(cat, out, i, 3) for i in range(3)] == [len(share) for share in shares]
    changed = Path(catalog_files(cat)[0])
    with rasterio.open(changed, "r+") as ds:  # other bytes
        band = ds.read(1)
        band[0, 0] = band[0, 1] if band[0, 0] != band[0, 1] else band[0, 0] + 1
        ds.write(band, 1)
    with caplog.at_level("INFO"):
        survey(cat, out, TileOptions(**OPTIONS), 1)
    assert f"checksums: 1 of {len(catalog_files(cat))} input files hashed" in caplog.text  # that file alone
    commit_plan(out)
    run_units(out)
    finalize(out)
    assert _input_sha256(out) == _hashlib_of(scene_copy)  # the changed file's checksum is of its new bytes


def test_a_resumed_tile_reads_no_input_again(reference, tiny_scene, tmp_path, monkeypatch):
    cat = load_catalog(tiny_scene)
    out = tmp_path / "resumed.zarr"
    survey(cat, out, TileOptions(**OPTIONS), 2)  # a run stopped after its survey (kill -9 at any later point)
    _no_hashing(monkeypatch)
    tile(cat, out, TileOptions(**OPTIONS), show_progress=False)
    assert folder_bytes(out) == folder_bytes(reference)


def test_checksum_records_of_other_files_or_other_bytes_are_not_taken(scene_copy, tmp_path, caplog):
    cat = load_catalog(scene_copy)
    out = tmp_path / "stale.zarr"
    folder = Path(Location(out).work, BUILD, CHECKSUMS)
    folder.mkdir(parents=True)
    first = catalog_files(cat)[0]
    size = Path(first).stat().st_size
    (folder / "part-000000-of-000001.json").write_text(json.dumps([
        [first, size, "mtime_ns:1:ino:1", "0" * 64],  # a stamp the file does not have
        [first + ".gone", size, "whatever", "1" * 64],  # a file of another catalog
        [first, size, "x", "not a checksum"],  # not a row: skipped, counted in the log
    ]))
    (folder / "part-000001-of-000002.json").write_text("{not json")  # skipped, named in the log
    with caplog.at_level("INFO"):
        tile(cat, out, TileOptions(**OPTIONS), show_progress=False)
    assert _input_sha256(out) == _hashlib_of(scene_copy)
    assert "part-000001-of-000002.json: not a checksum record" in caplog.text
    assert "part-000000-of-000001.json: 1 rows are not [uri, size, stamp, sha256]" in caplog.text
    assert "1 input files were recorded with another size or stamp and are hashed again" in caplog.text


@pytest.mark.parametrize("args, env, message", [
    (["--parts", "2"], {}, "give the part with --part or $JOB_COMPLETION_INDEX"),
    (["--parts", "2", "--part", "-1"], {}, "checksum part -1 of 2 does not exist"),
    (["--parts", "2", "--part", "2"], {}, "checksum part 2 of 2 does not exist"),
    (["--parts", "2"], {"JOB_COMPLETION_INDEX": "3"}, "checksum part 3 of 2 does not exist"),  # more pods than parts
    (["--parts", "2"], {"JOB_COMPLETION_INDEX": "x"}, "$JOB_COMPLETION_INDEX is 'x'"),
])
def test_tile_checksum_refuses_a_part_it_cannot_name(tiny_scene, tmp_path, args, env, message):
    out = tmp_path / "none.zarr"
    base = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    done = subprocess.run([SARFLOW, "tile-checksum", str(tiny_scene), "--out", str(out), *args],
                          env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
    assert not Path(str(out) + ".partial").exists() and not out.exists()  # nothing written


def test_tile_checksum_names_a_missing_input_and_refuses_a_finished_store(scene_copy, reference, tmp_path):
    missing = Path(catalog_files(load_catalog(scene_copy))[0])
    missing.unlink()
    out = tmp_path / "missing.zarr"
    done = subprocess.run([SARFLOW, "tile-checksum", str(scene_copy), "--out", str(out), "--parts", "1", "--part", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and str(missing) in done.stderr and "file does not exist" in done.stderr, done.stderr
    assert not Path(str(out) + ".partial").exists()
    before = folder_bytes(reference)
    done = subprocess.run([SARFLOW, "tile-checksum", str(scene_copy), "--out", str(reference), "--parts", "1",
                           "--part", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "already exists" in done.stderr, done.stderr
    assert folder_bytes(reference) == before and not Path(str(reference) + ".partial").exists()


def test_a_part_past_the_files_does_nothing(tiny_scene, tmp_path):
    cat = load_catalog(tiny_scene)
    out = tmp_path / "past.zarr"
    assert checksum_part(cat, out, len(catalog_files(cat)), len(catalog_files(cat)) + 1) is None
    assert not Path(str(out) + ".partial").exists()


def test_an_s3_object_rewritten_with_other_bytes_of_the_same_size_gets_another_stamp(moto_url, monkeypatch):
    from sarflow.data.storage import ensure_bucket, file_stamp, s3_filesystem

    use_moto(monkeypatch, moto_url)
    ensure_bucket("stamps")
    fs = s3_filesystem()
    fs.pipe_file("stamps/a.tif", np.arange(64, dtype=np.uint8).tobytes())
    first = file_stamp("s3://stamps/a.tif")
    fs.pipe_file("stamps/a.tif", np.arange(64, dtype=np.uint8)[::-1].tobytes())
    second = file_stamp("s3://stamps/a.tif")
    assert first[0] == second[0] == 64 and first[1] != second[1]


def test_checksum_shares_cut_the_bytes_not_the_file_count():
    sizes = {"s3://b/scene.tif": 1000, **{f"s3://b/label_{i}.tif": 1 for i in range(6)}}
    assert checksum_shares(sizes, 2) == [["s3://b/scene.tif"], sorted(f"s3://b/label_{i}.tif" for i in range(6))]
    # largest first, each to the share with the fewest bytes so far (known answer of that rule)
    assert checksum_shares({"a": 10, "b": 9, "c": 8, "d": 1, "e": 1}, 2) == [["a", "d", "e"], ["b", "c"]]
    # files of no bytes spread by count; more parts than files leave the last parts empty
    assert checksum_shares({"x": 0, "y": 0, "z": 0}, 2) == [["x", "z"], ["y"]]
    assert checksum_shares({"x": 5}, 3) == [["x"], [], []]


def test_checksum_shares_of_the_scene_hold_every_file_once_within_one_file_of_even(tiny_scene):
    sizes = input_sizes(catalog_files(load_catalog(tiny_scene)))
    assert sizes == {u: Path(u).stat().st_size for u in sizes}  # stat'ed, every file
    for parts in (2, 3, 4):
        shares = checksum_shares(sizes, parts)
        assert sorted(u for share in shares for u in share) == sorted(sizes)
        loads = [sum(sizes[u] for u in share) for share in shares]
        assert max(loads) - min(loads) <= max(sizes.values())
        assert shares == checksum_shares(dict(reversed(list(sizes.items()))), parts)  # the same in every process


def test_s3_input_stamps_come_from_the_folder_listing_as_a_head_gives_them_and_a_missing_object_is_named(moto_url, monkeypatch):
    from sarflow.data import storage
    from sarflow.errors import SarflowError

    use_moto(monkeypatch, moto_url)
    storage.ensure_bucket("sizes")
    fs = storage.s3_filesystem()
    written = {"s3://sizes/s1/a.tif": 3, "s3://sizes/s1/b.tif": 70, "s3://sizes/s1/c.tif": 5, "s3://sizes/top.tif": 11}
    for uri, n in written.items():
        fs.pipe_file(uri[5:], bytes(n))
    fs.pipe_file("sizes/s1/not_asked.tif", bytes(2))
    asked = dict(written)
    asked.pop("s3://sizes/s1/c.tif")  # a file between two asked for, not asked: not returned

    def no_head(uri, settings=None):
        raise AssertionError(f"{uri}: asked alone although its folder was listed")

    with monkeypatch.context() as m:
        m.setattr(storage, "check_s3_object", no_head)
        listed = input_stamps(sorted(asked))  # one listing per folder, no HEAD
    # the listing's stamps are those a HEAD answers (the survey's): a part's record is taken by the survey
    assert listed == {uri: storage.file_stamp(uri) for uri in asked}
    assert {uri: size for uri, (size, _) in listed.items()} == asked
    with pytest.raises(SarflowError, match="s3://sizes/s1/missing.tif"):
        input_stamps(sorted(asked) + ["s3://sizes/s1/missing.tif"])


def test_an_s3_folder_listing_stops_past_its_budget_and_the_rest_are_asked_for_alone(moto_url, monkeypatch):
    """A catalog taking a few objects of a folder of millions lists a bounded part of it: past
    LISTING_OBJECTS_PER_KEY per object asked for (plus a page) the objects not yet seen get one HEAD."""
    from sarflow.data import storage

    use_moto(monkeypatch, moto_url)
    storage.ensure_bucket("budget")
    fs = storage.s3_filesystem()
    for name, n in (("a", 3), ("b", 4), ("c", 5), ("d", 6)):
        fs.pipe_file(f"budget/f/{name}.tif", bytes(n))
    heads = []
    real = storage.check_s3_object
    monkeypatch.setattr(storage, "check_s3_object", lambda uri, settings=None: heads.append(uri) or real(uri, settings))
    monkeypatch.setattr(storage, "LISTING_OBJECTS_PER_KEY", 0)
    monkeypatch.setattr(storage, "LISTING_PAGE", 2)  # two objects listed: a and b; d asked for alone
    assert input_sizes(["s3://budget/f/a.tif", "s3://budget/f/b.tif", "s3://budget/f/d.tif"]) == {
        "s3://budget/f/a.tif": 3, "s3://budget/f/b.tif": 4, "s3://budget/f/d.tif": 6}
    assert heads == ["s3://budget/f/d.tif"]
