"""Tiling in three steps (plan, units, finalize) by separate processes into one store, local or on
S3 (moto on 127.0.0.1): the same bytes as the one-process `tile()`, also after a unit is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import zarr

from helpers import folder_bytes, use_moto
from sarflow.data.catalog import load_catalog
from sarflow.data.tile import TileOptions, tile
from sarflow.data.tile_units import BUILD, finalize, job_runs, plan, unit_done, unit_runs, write_unit

SARFLOW = str(Path(sys.executable).with_name("sarflow"))
OPTIONS = dict(shard_chips=16, unit_shards=1, workers=1)


@pytest.fixture(scope="module")
def reference(tiny_scene, tmp_path_factory) -> Path:
    return tile(load_catalog(tiny_scene), tmp_path_factory.mktemp("ref") / "chips.zarr", TileOptions(**OPTIONS),
                show_progress=False)


@pytest.fixture()
def s3env(moto_url, monkeypatch):
    from sarflow.data.storage import ensure_bucket

    env = use_moto(monkeypatch, moto_url)
    ensure_bucket("chips")
    return env


def _s3_files(uri: str) -> dict[str, bytes]:
    from sarflow.data.storage import s3_filesystem

    fs = s3_filesystem()
    prefix = uri[len("s3://"):]
    return {k[len(prefix) + 1:]: fs.cat_file(k) for k in sorted(fs.find(prefix))}


def test_reference_has_several_units_and_equals_a_single_unit_build(reference, tiny_scene, tmp_path):
    # the unit division does not change a byte (windows are whole blocks, statistics summed chip by chip)
    one = tile(load_catalog(tiny_scene), tmp_path / "one.zarr", TileOptions(shard_chips=16, unit_shards=0, workers=2),
               show_progress=False)
    n = zarr.open_group(str(reference), mode="r").attrs["chips"]
    assert n > 3 * 16  # more than three units of one shard
    assert folder_bytes(one) == folder_bytes(reference)


@pytest.mark.slow
def test_three_runner_processes_into_s3_equal_tile(reference, tiny_scene, s3env):
    uri = "s3://chips/three.zarr"
    # the plan in its steps too, on S3: the inputs' checksums in two parts recorded in the store, the survey
    # (which takes them), the screening in another process, the commit
    flags = ["--shard-chips", "16", "--unit-shards", "1", "--workers", "1"]
    checksums = [["tile-checksum", str(tiny_scene), "--out", uri, "--parts", "2", "--part", str(i)] for i in range(2)]
    for cmd in (*checksums, ["tile-plan", str(tiny_scene), "--out", uri, "--survey", "2", *flags], ["tile-screen", uri],
                ["tile-plan", "--out", uri]):
        done = subprocess.run([SARFLOW, *cmd], env=s3env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        if "--survey" in cmd:
            assert "checksums: 0 of" in done.stderr  # every input's checksum taken from the parts' records on S3
    n = json.loads(done.stdout)["units"]
    assert n >= 4
    runners = [subprocess.Popen([SARFLOW, "tile-unit", uri, *sum((["--unit", str(u)] for u in range(k, n, 3)), [])],
                                env=s3env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for k in range(3)]
    for r in runners:
        _, err = r.communicate(timeout=300)
        assert r.returncode == 0, err
    with pytest.raises(Exception):  # a reader refuses nothing yet, but the group has no `chips` before finalize
        zarr.open_group(uri, mode="r", storage_options={"anon": True}).attrs["chips"]
    assert finalize(uri) == uri
    got, want = _s3_files(uri), folder_bytes(reference)
    assert not any(k.startswith(BUILD) for k in got)
    assert sorted(got) == sorted(want)
    for key in want:  # arrays, chips.parquet, statistics (in zarr.json), manifest
        assert got[key] == want[key], key

    from sarflow.data.chipstore import open_chip_group

    g = open_chip_group(uri)
    ref = zarr.open_group(str(reference), mode="r")
    assert g.attrs["chips"] == ref.attrs["chips"]
    np.testing.assert_array_equal(g["s1grd"][:], ref["s1grd"][:])


def test_unit_runs_cut_consecutive_units_evenly():
    assert unit_runs(list(range(10)), 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert unit_runs(list(range(10)), 1) == [list(range(10))]
    assert unit_runs([2, 3, 7], 5) == [[2], [3], [7]]  # never an empty run: at most one per unit
    runs = unit_runs(list(range(1000)), 64)
    assert sum(runs, []) == list(range(1000)) and {len(r) for r in runs} == {15, 16}
    with pytest.raises(ValueError):
        unit_runs([0, 1], 0)
    # an Indexed Job: 4 runs per pod slot, at most one per unit
    assert job_runs(5000, 64) == 256 and job_runs(10, 64) == 10 and job_runs(0, 8) == 1


@pytest.mark.slow
def test_two_runs_of_consecutive_units_in_two_processes_equal_tile(reference, tiny_scene, tmp_path):
    out = tmp_path / "runs.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    assert len(p.units) >= 4
    env = {**os.environ, "JOB_COMPLETION_INDEX": "1"}
    cmds = [[SARFLOW, "tile-unit", str(out), "--runs", "2", "--run", "0"],  # run 0 named
            [SARFLOW, "tile-unit", str(out), "--runs", "2"]]  # run 1 from the Indexed Job's index
    runners = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [r.communicate(timeout=300) for r in runners]
    assert [r.returncode for r in runners] == [0, 0], [e for _, e in outs]
    first, second = unit_runs(list(range(len(p.units))), 2)
    assert outs[0][0].strip() == f"units written: {first}" and outs[1][0].strip() == f"units written: {second}"
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_run_reads_the_build_state_once_and_gives_the_same_store(reference, tiny_scene, tmp_path, monkeypatch):
    from sarflow.data import tile_units

    out = tmp_path / "once.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    reads = []
    real = tile_units._load_build
    monkeypatch.setattr(tile_units, "_load_build", lambda loc: reads.append(loc.uri) or real(loc))
    tile_units.run_units(out)
    assert len(p.units) >= 4 and len(reads) == 1  # not once per unit
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_given_run_skips_its_units_already_written_without_listing_the_units_folder(reference, tiny_scene,
                                                                                       tmp_path, monkeypatch):
    # a ParallelFor task or a Job's pod is given a run of a few units: each unit checks its own report,
    # the units' folder (hundreds of thousands of names at continental scale) is not listed
    from sarflow.data import tile_units

    out = tmp_path / "given.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    assert tile_units.run_units(out, [0]) == [0]
    report = Path(str(out) + ".partial", BUILD, "units", "000000.json")
    first = report.stat().st_mtime_ns
    listed = []
    monkeypatch.setattr(tile_units.Location, "names", lambda self, *parts: listed.append(parts) or iter(()))
    assert tile_units.run_units(out, list(range(len(p.units)))) == list(range(1, len(p.units)))  # those it wrote
    assert listed == [] and report.stat().st_mtime_ns == first  # unit 0 was not written again
    loads = []
    monkeypatch.setattr(tile_units, "_load_build", lambda loc: loads.append(loc.uri))
    assert tile_units.run_units(out, [0, 1]) == [] and loads == []  # a rerun pod has nothing to do, nor state to load
    monkeypatch.undo()
    assert tile_units.units_not_done(out, len(p.units)) == []
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_run_past_the_units_has_nothing_to_do(tiny_scene, tmp_path):
    # an Indexed Job cut into more runs than the store has units: the extra pods succeed, writing nothing
    out = tmp_path / "few.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    n = len(p.units)
    done = subprocess.run([SARFLOW, "tile-unit", str(out), "--runs", str(n + 5), "--run", str(n + 2)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "units written: []" and not any(unit_done(out, u) for u in range(n))
    # one unit a pod ($JOB_COMPLETION_INDEX, no --runs) and more completions than units: the same
    done = subprocess.run([SARFLOW, "tile-unit", str(out)], env={**os.environ, "JOB_COMPLETION_INDEX": str(n)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "units written: []" and not any(unit_done(out, u) for u in range(n))


@pytest.mark.parametrize("args, env, message", [
    (["--runs", "2"], {}, "--runs 2: give the run with --run or $JOB_COMPLETION_INDEX"),
    (["--runs", "2", "--run", "2"], {}, "run 2 does not exist (runs 0..1)"),
    (["--runs", "2"], {"JOB_COMPLETION_INDEX": "7"}, "run 7 does not exist (runs 0..1)"),
    (["--run", "0"], {}, "--run needs --runs"),
    (["--unit", "0", "--runs", "2"], {}, "--unit cannot be combined with --runs/--run"),
])
def test_tile_unit_refuses_a_run_it_cannot_name(tiny_scene, tmp_path, args, env, message):
    out = tmp_path / "bad.zarr"
    plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    base = {k: v for k, v in os.environ.items() if k != "JOB_COMPLETION_INDEX"}
    done = subprocess.run([SARFLOW, "tile-unit", str(out), *args], env={**base, **env}, capture_output=True, text=True)
    assert done.returncode == 2 and message in " ".join(done.stderr.split())
    assert not any(unit_done(out, u) for u in range(2))  # nothing written


@pytest.mark.slow
def test_sarflow_tile_to_s3_in_one_process_equals_tile(reference, tiny_scene, s3env):
    uri = "s3://chips/one.zarr"
    done = subprocess.run([SARFLOW, "tile", str(tiny_scene), "--out", uri, "--shard-chips", "16", "--unit-shards", "1",
                           "--workers", "1", "--quiet"], env=s3env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"chip store written: {uri}" in done.stdout
    assert _s3_files(uri) == folder_bytes(reference)
    again = subprocess.run([SARFLOW, "tile", str(tiny_scene), "--out", uri], env=s3env, capture_output=True, text=True)
    assert again.returncode != 0 and "already exists" in " ".join(again.stderr.split())


@pytest.mark.slow
def test_a_unit_killed_with_kill_9_and_rerun_gives_the_same_store(reference, tiny_scene, tmp_path):
    out = tmp_path / "killed.zarr"
    work = out.with_name(out.name + ".partial")
    opts = TileOptions(**{**OPTIONS, "unit_shards": 3})  # a unit writes 3 shards of each array, then its report
    p = plan(load_catalog(tiny_scene), out, opts)
    for u in range(1, len(p.units)):
        write_unit(out, u)
    first_shard = work / "s1grd" / "c" / "0" / "0" / "0" / "0"
    proc = subprocess.Popen([SARFLOW, "tile-unit", str(out), "--unit", "0", "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not first_shard.exists() and time.time() < deadline:
        assert proc.poll() is None, "the unit finished before it could be killed"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first_shard.exists() and not unit_done(out, 0)  # killed between its first shard and its report
    with pytest.raises(Exception, match="not written yet"):
        finalize(out)
    # killed in the middle of a shard's write, the unit leaves zarr's temporary file beside it (CI once
    # killed it there): the store must not keep it
    (first_shard.parent / "0.64121961c82a4afc8d74708cb9a05dda.partial").write_bytes(b"")
    rerun = subprocess.run([SARFLOW, "tile-unit", str(out)], capture_output=True, text=True)  # every unit not done
    assert rerun.returncode == 0, rerun.stderr
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)
    assert gpd.read_parquet(out / "chips.parquet").equals(gpd.read_parquet(reference / "chips.parquet"))


def test_indexed_job_manifest_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    from sarflow.data.tile_units import indexed_job_manifest

    job = indexed_job_manifest("s3://sarflow-chips/m3leo.zarr", 256, "ghcr.io/sarflow/sarflow:0.1.0", parallelism=64)
    for version in ("1.30", "1.37"):
        kubernetes_validate.validate(job, version, strict=True)
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 256 and spec["parallelism"] == 64
    assert spec["template"]["spec"]["containers"][0]["command"] == ["sarflow", "tile-unit", "s3://sarflow-chips/m3leo.zarr",
                                                                    "--runs", "256"]
    broken = {**job, "spec": {**spec, "completionMode": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30", strict=True)


class _JobsAPI:
    """The part of kubernetes' BatchV1Api that run_indexed_job calls, over an in-memory set of jobs
    with the API server's answers (409 on a taken name, 404 on a missing one); no cluster here.
    A created job succeeds after `polls_to_finish` status reads; a deleted one is gone after one read."""

    def __init__(self, existing=None, polls_to_finish=2):
        from types import SimpleNamespace

        self.ns = SimpleNamespace
        self.jobs = dict(existing or {})
        self.calls, self.polls_to_finish = [], polls_to_finish

    def create_namespaced_job(self, ns, body):
        from kubernetes.client.rest import ApiException

        name = body["metadata"]["name"]
        self.calls.append(("create", name))
        if name in self.jobs:
            raise ApiException(status=409, reason="AlreadyExists")
        self.jobs[name] = {"units": body["spec"]["completions"], "polls": 0, "state": "running"}
        self.created = body

    def read_namespaced_job_status(self, name, ns):
        from kubernetes.client.rest import ApiException

        self.calls.append(("read", name))
        job = self.jobs.get(name)
        if job is None:
            raise ApiException(status=404, reason="NotFound")
        if job["state"] == "deleting":
            del self.jobs[name]
            return self.ns(spec=self.ns(completions=job["units"]), status=self.ns(succeeded=0, failed=0, conditions=[]))
        job["polls"] += 1
        if job["state"] == "running" and job["polls"] >= self.polls_to_finish:
            job["state"] = "complete"
        done = job["state"] == "complete"
        conditions = [self.ns(type="Complete" if done else "Failed", status="True")] if job["state"] != "running" else []
        return self.ns(spec=self.ns(completions=job["units"]),
                       status=self.ns(succeeded=job["units"] if done else job.get("succeeded", 0),
                                      failed=0 if done or job["state"] == "running" else 1, conditions=conditions))

    def delete_namespaced_job(self, name, ns, propagation_policy=None):
        self.calls.append(("delete", name))
        self.jobs[name]["state"] = "deleting"


def test_indexed_job_rerun_replaces_a_finished_job_and_adopts_a_running_one():
    from sarflow.data.tile_units import indexed_job_manifest, run_indexed_job

    uri = "s3://chips/big.zarr"
    name = indexed_job_manifest(uri, 4, "img")["metadata"]["name"]
    # first run: created, waited for
    api = _JobsAPI()
    run_indexed_job(uri, 4, "img", namespace="ns", poll_s=0, api=api)
    assert [c for c in api.calls if c[0] != "read"] == [("create", name)] and api.jobs[name]["state"] == "complete"
    # a rerun while the finished job is kept (ttl): deleted, gone, created anew, waited for (no 409 error)
    api.calls.clear()
    api.jobs[name] = {"units": 4, "polls": 0, "state": "failed"}
    run_indexed_job(uri, 4, "img", namespace="ns", poll_s=0, api=api)
    assert [c for c in api.calls if c[0] != "read"] == [("create", name), ("delete", name), ("create", name)]
    assert api.jobs[name]["state"] == "complete"
    # a second launcher while the store's job is still running: adopted (no second writer), waited for
    api = _JobsAPI(existing={name: {"units": 4, "polls": 0, "state": "running"}})
    run_indexed_job(uri, 4, "img", namespace="ns", poll_s=0, api=api)
    assert [c for c in api.calls if c[0] != "read"] == [("create", name)] and api.jobs[name]["state"] == "complete"
    # an adopted job cut into more runs than this launcher's (an earlier launch): done when ITS completions
    # are, not when as many pods as this launcher would have run have succeeded
    api = _JobsAPI(existing={name: {"units": 8, "polls": 0, "state": "running", "succeeded": 4}}, polls_to_finish=3)
    run_indexed_job(uri, 4, "img", namespace="ns", poll_s=0, api=api)
    assert api.jobs[name]["state"] == "complete" and api.jobs[name]["polls"] == 3
    # a job that does not finish in time is an error naming it
    api = _JobsAPI(polls_to_finish=10**9)
    with pytest.raises(TimeoutError, match=name):
        run_indexed_job(uri, 4, "img", namespace="ns", poll_s=0, timeout_s=0, api=api)


@pytest.mark.slow
def test_a_store_on_s3_is_versioned_by_its_object_manifest_and_lineage_reads_it(reference, tiny_scene, s3env):
    from sarflow.data.storage import s3_filesystem
    from sarflow.data.versioning import version_store
    from sarflow.mlops.lineage import dataset_lineage

    uri = "s3://chips/versioned.zarr"
    tile(load_catalog(tiny_scene), uri, TileOptions(**OPTIONS), show_progress=False)
    v = version_store(uri)
    assert v["dvc_md5"].startswith("s3sha256:") and v["chips"] == zarr.open_group(str(reference), mode="r").attrs["chips"]
    assert version_store(uri)["dvc_md5"] == v["dvc_md5"]  # same objects, same version
    tags = dataset_lineage(uri)
    assert tags["sarflow.dataset_dvc_md5"] == v["dvc_md5"]
    fs = s3_filesystem()
    fs.pipe_file("chips/versioned.zarr/chips.parquet", b"changed")  # any rewritten object: another version
    assert version_store(uri)["dvc_md5"] != v["dvc_md5"]


def test_an_input_error_with_overwrite_on_s3_leaves_the_finished_store_there(tiny_scene, s3env, tmp_path):
    """A store on S3 is built in place: a catalog refused before anything is planned must not remove
    the finished store that --overwrite would have replaced (the local path builds beside it)."""
    import json

    import yaml

    from sarflow.data.catalog import load_catalog
    from sarflow.data.storage import s3_filesystem
    from sarflow.data.tile import TileOptions, tile
    from sarflow.errors import InputError

    fs = s3_filesystem()
    uri = "s3://chips/finished.zarr"
    fs.pipe_file("chips/finished.zarr/zarr.json", json.dumps({"zarr_format": 3, "node_type": "group",
                                                               "attributes": {"chips": 1}}).encode())
    fs.pipe_file("chips/finished.zarr/chips.parquet", b"the old store's table")
    data = yaml.safe_load(tiny_scene.read_text())
    data["grid"]["aoi"] = [100.0, 10.0, 100.1, 10.1]  # overlaps no source: refused by the plan's ingest
    for s in data["sources"]:
        s["uris"] = [[str(tiny_scene.parent / x) for x in u] if isinstance(u, list) else str(tiny_scene.parent / u)
                     for u in s["uris"]]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="overlaps none of the sources"):
        tile(load_catalog(bad), uri, TileOptions(overwrite=True), show_progress=False)
    assert fs.cat_file("chips/finished.zarr/chips.parquet") == b"the old store's table"


def test_finalize_records_the_units_shard_hashes_without_reading_the_shards_back(reference, tiny_scene, tmp_path,
                                                                                 monkeypatch):
    """At scale a store is terabytes on S3: finalize takes each shard's size and SHA-256 from the unit
    that wrote it, and reads only the small files it wrote itself. The record must still be what the
    bytes say (verify --full hashes every file independently). A report whose size disagrees with
    the file (here: an older report) is not trusted: that shard is read and hashed."""
    from sarflow.data import integrity

    out = tmp_path / "hashed.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    reports = [write_unit(out, u) for u in range(len(p.units))]
    shards = {k: v for r in reports for k, v in r["shards"].items()}
    assert shards and all("/c/" in k for k in shards)
    lied = sorted(shards)[0]
    path = out.with_name(out.name + ".partial") / BUILD / "units" / "000000.json"
    first = json.loads(path.read_text())
    assert lied in first["shards"]
    first["shards"][lied] = [first["shards"][lied][0] + 1, "0" * 64]  # a size the file does not have
    path.write_text(json.dumps(first))
    read: list[str] = []
    real_read = integrity._Files.read
    monkeypatch.setattr(integrity._Files, "read", lambda self, rel: read.append(rel) or real_read(self, rel))
    finalize(out)
    assert [r for r in read if "/c/" in r and not r.startswith(("chip_x", "chip_y", "spatial_ref"))] == [lied]
    assert integrity.verify(out, full=True) == []
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_block_shared_by_two_units_is_warped_once_in_one_process(tiny_scene, tmp_path, monkeypatch):
    """Units are whole shards and blocks are not, so a block's chips can run on into the next unit.
    In one process that unit takes the block warped (HANDOVER) instead of warping it again, and the
    store is the one a single unit writes."""
    from collections import Counter

    from sarflow.data import tile as tile_module

    warps: Counter = Counter()
    real_warp = tile_module.BlockRenderer.warp

    def counting_warp(self, source, block):
        warps[(block.iy0, block.ix0, source.name)] += 1
        return real_warp(self, source, block)

    monkeypatch.setattr(tile_module.BlockRenderer, "warp", counting_warp)
    shared = tile(load_catalog(tiny_scene), tmp_path / "shared.zarr",  # blocks of 8x8 chips, units of 16 chips
                  TileOptions(shard_chips=16, unit_shards=1, workers=2, block_chips=8), show_progress=False)
    table = gpd.read_parquet(shared / "chips.parquet")
    per_block = Counter(zip(table["iy"] // 8, table["ix"] // 8))
    assert max(per_block.values()) > 16  # a block holds the chips of several units
    assert warps and max(warps.values()) == 1, [k for k, v in warps.items() if v > 1]
    monkeypatch.setattr(tile_module.BlockRenderer, "warp", real_warp)
    one = tile(load_catalog(tiny_scene), tmp_path / "one.zarr",
               TileOptions(shard_chips=16, unit_shards=0, workers=2, block_chips=8), show_progress=False)
    assert folder_bytes(shared) == folder_bytes(one)


# ---------------------------------------------------------------- finalize at scale: nothing whole in memory

def test_finalize_streams_chips_table_and_coordinates_in_pieces_and_gives_the_same_store(reference, tiny_scene,
                                                                                         tmp_path, monkeypatch):
    """chips.parquet streamed from the units' rows into row groups of a fixed size, and the coordinate
    arrays written a few rows at a time: the same store whatever the units (one unit, or a unit per
    shard), readable by geopandas and DuckDB with the whole table's GeoParquet bounding box."""
    import duckdb
    import pyarrow.parquet as pq

    from sarflow.data import chipstore, tile_units

    monkeypatch.setattr(tile_units, "CHIPS_ROW_GROUP", 10)
    monkeypatch.setattr(chipstore, "COORD_WRITE_CHIPS", 3)
    stores = [tile(load_catalog(tiny_scene), tmp_path / f"{k}.zarr", TileOptions(shard_chips=16, unit_shards=k,
                                                                                 workers=1), show_progress=False)
              for k in (0, 1)]
    assert folder_bytes(stores[0]) == folder_bytes(stores[1])
    table = pq.ParquetFile(stores[1] / "chips.parquet")
    n = zarr.open_group(str(reference), mode="r").attrs["chips"]
    assert table.metadata.num_rows == n and table.metadata.num_row_groups == -(-n // 10)
    assert [table.metadata.row_group(i).num_rows for i in range(table.metadata.num_row_groups)][:-1] == \
        [10] * (table.metadata.num_row_groups - 1)
    got, want = gpd.read_parquet(stores[1] / "chips.parquet"), gpd.read_parquet(reference / "chips.parquet")
    assert got.to_wkb().equals(want.to_wkb())
    bbox = json.loads(table.schema_arrow.metadata[b"geo"])["columns"]["geometry"]["bbox"]
    assert bbox == pytest.approx(list(want.total_bounds), abs=0)
    assert duckdb.sql(f"select count(*), max(index) from '{stores[1] / 'chips.parquet'}'").fetchall() == [(n, n - 1)]
    for name in ("chip_x", "chip_y"):
        np.testing.assert_array_equal(zarr.open_group(str(stores[1]), mode="r")[name][:],
                                      zarr.open_group(str(reference), mode="r")[name][:])
    # the rows against the grid itself (not only another build of this code): ids, edges, row order
    from sarflow.data.ingest import ingest

    g = ingest(load_catalog(tiny_scene), checksum=False).grid
    ix, iy = got["ix"].to_numpy(), got["iy"].to_numpy()
    assert got["chip_id"].tolist() == [g.chip_id(x, y) for x, y in zip(ix.tolist(), iy.tolist())]
    assert got["index"].tolist() == list(range(n)) and not got["chip_id"].duplicated().any()
    for col, edge in zip(("minx", "miny", "maxx", "maxy"), g.chip_bounds(ix, iy)):
        np.testing.assert_array_equal(got[col].to_numpy(), edge)
    x = zarr.open_group(str(stores[1]), mode="r")["chip_x"][:]
    np.testing.assert_allclose(x[:, 0], got["minx"].to_numpy() + g.resolution / 2)  # pixel centres from the edges


def test_train_statistics_merged_by_unit_equal_merged_chip_by_chip():
    """Units report their train chips' sums; finalize accumulates them in store order: the float64
    totals of adding chip by chip (values of very different sizes, bands without valid pixels), min,
    max and counts, and class counts, however the chips are cut into units."""
    from types import SimpleNamespace

    from sarflow.data.tile import Stats, unit_statistics

    rng = np.random.default_rng(11)
    sources = [SimpleNamespace(name="c", spec=SimpleNamespace(kind="continuous", bands=["a", "b"])),
               SimpleNamespace(name="k", spec=SimpleNamespace(kind="categorical", bands=["class"]))]
    chips = []
    for i in range(300):
        c = [None if rng.random() < 0.1 else [int(rng.integers(1, 99)), float(rng.normal() * 10.0 ** rng.integers(-8, 12)),
                                              float(rng.random() * 1e20), float(rng.normal()), float(rng.normal() + 5)]
             for _ in range(2)]
        k = [[[str(code), int(rng.integers(1, 50))] for code in sorted(rng.choice([1, 5, 7, 200], 2, replace=False))]]
        chips.append({"c": c, "k": k})
    # the reference: every chip added in store order, Python floats one at a time
    ref_c = {"count": [0, 0], "sum": [0.0, 0.0], "sumsq": [0.0, 0.0], "min": [None, None], "max": [None, None]}
    ref_k = {"classes": [{}]}
    for chip in chips:
        for b, c in enumerate(chip["c"]):
            if c is not None:
                ref_c["count"][b] += c[0]
                ref_c["sum"][b] += c[1]
                ref_c["sumsq"][b] += c[2]
                ref_c["min"][b] = c[3] if ref_c["min"][b] is None else min(ref_c["min"][b], c[3])
                ref_c["max"][b] = c[4] if ref_c["max"][b] is None else max(ref_c["max"][b], c[4])
        for code, n in chip["k"][0]:
            ref_k["classes"][0][code] = ref_k["classes"][0].get(code, 0) + n
    assert ref_c["count"][0] > 0 and ref_c["min"][1] is not None
    for cut in ([0, 300], [0, 1, 150, 151, 300], sorted({0, 300, *rng.integers(1, 300, 20).tolist()})):
        merged = Stats(sources)
        for lo, hi in zip(cut, cut[1:]):
            part, sums, squares = unit_statistics("continuous", [chip["c"] for chip in chips[lo:hi]], 2)
            merged.merge_unit("c", json.loads(json.dumps(part)), sums, squares)  # as reported
            part, none, _ = unit_statistics("categorical", [chip["k"] for chip in chips[lo:hi]], 1)
            assert none is None
            merged.merge_unit("k", json.loads(json.dumps(part)))
        assert merged.acc == {"c": ref_c, "k": ref_k}, cut
    # a unit without train chips adds nothing
    part, sums, squares = unit_statistics("continuous", [], 2)
    assert part == {"count": [0, 0], "min": [None, None], "max": [None, None]} and sums.shape == (0, 2)
    merged.merge_unit("c", part, sums, squares)
    assert merged.acc["c"] == ref_c


def test_finalize_refuses_a_unit_report_of_an_older_version_naming_the_unit(tiny_scene, tmp_path):
    out = tmp_path / "old.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    for u in range(len(p.units)):
        write_unit(out, u)
    report = Path(str(out) + ".partial", BUILD, "units", "000001.json")
    old = json.loads(report.read_text())
    older = {"unit": 1, "chips": old["chips"], "records": [], "train_stats": [], "shards": {}}  # format 1
    old_geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": old["outlines"]}}
    for layout in (older, {**{k: v for k, v in old.items() if k != "outlines"}, "geo": old_geo}):  # 1, 2
        report.write_text(json.dumps(layout))
        with pytest.raises(Exception, match=r"unit 1 was written by an older sarflow.*--unit 1 --force"):
            finalize(out)
        assert not out.exists()
    write_unit(out, 1, force=True)
    assert Path(finalize(out)) == out


def test_a_missing_unit_file_is_named_and_a_build_of_another_format_is_made_again(reference, tiny_scene, tmp_path,
                                                                                   monkeypatch):
    from sarflow.data import tile as tile_module

    out = tmp_path / "named.zarr"
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    for u in range(len(p.units)):
        write_unit(out, u)
    Path(str(out) + ".partial", BUILD, "units", "000002.npz").unlink()
    with pytest.raises(Exception, match=r"000002\.npz.*unit 2's npz cannot be read.*--unit 2 --force"):
        finalize(out)
    write_unit(out, 2, force=True)
    assert Path(finalize(out)) == out and folder_bytes(out) == folder_bytes(reference)
    # a build left by another build format (the unit reports' layout) is planned again, not resumed
    other = tmp_path / "other.zarr"
    current = tile_module.BUILD_FORMAT
    monkeypatch.setattr(tile_module, "BUILD_FORMAT", current - 1)
    p = plan(load_catalog(tiny_scene), other, TileOptions(**OPTIONS))
    write_unit(other, 0)
    monkeypatch.setattr(tile_module, "BUILD_FORMAT", current)
    assert tile(load_catalog(tiny_scene), other, TileOptions(**OPTIONS), show_progress=False) == other
    assert folder_bytes(other) == folder_bytes(reference)


def test_a_unit_runner_does_not_import_pandas_pystac_or_rich(tiny_scene, tmp_path):
    """A unit process on a cluster pays its imports at every start: its rows of chips.parquet are built
    from Arrow buffers (pa.array would import pandas, 0.2-0.3 CPU s a process); STAC items and
    progress bars are not its business (pystac and rich, about 0.07 CPU s)."""
    out = tmp_path / "lean.zarr"
    plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    code = (f"import sys; from sarflow.data.tile_units import write_unit; write_unit({str(out)!r}, 0); "
            "print(sorted(m for m in ('pandas', 'geopandas', 'pystac', 'rich') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    assert unit_done(str(out), 0)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_finalize_finds_the_units_not_written_from_one_listing(reference, tiny_scene, tmp_path, where, request,
                                                               monkeypatch):
    """A continental build has hundreds of thousands of units: finalize lists their folder once (no
    request per unit) and reads their files ahead in threads (on S3 each costs a request's latency),
    giving the same store."""
    from sarflow.data import tile_units

    out = str(tmp_path / "listed.zarr") if where == "local" else (request.getfixturevalue("s3env"),
                                                                 "s3://chips/listed.zarr")[1]
    p = plan(load_catalog(tiny_scene), out, TileOptions(**OPTIONS))
    n = len(p.units)
    for u in set(range(n)) - {1, 3}:
        write_unit(out, u)
    asked = []
    real = tile_units.Location.exists
    monkeypatch.setattr(tile_units.Location, "exists",
                        lambda self, *parts: asked.append(parts) or real(self, *parts))
    with pytest.raises(Exception, match=rf"2 of {n} units are not written yet \(first: 1\).*tile-unit"):
        finalize(out)
    assert not [parts for parts in asked if "units" in parts]
    monkeypatch.setattr(tile_units, "UNIT_READ_AHEAD", 3)
    for u in (3, 1):
        write_unit(out, u)
    assert finalize(out) == out
    got = folder_bytes(out) if where == "local" else _s3_files(out)
    assert got == folder_bytes(reference)


def test_the_units_not_written_are_read_from_the_file_names_a_unit_writes(tmp_path):
    """Only `NNNNNN.json` (six digits or more) counts as a written unit: not a writer's temporary
    file, a unit's rows or sums without its report, nor a number past the plan."""
    from sarflow.data.tile_units import Location, _units_without_report, units_not_done

    folder = Path(str(tmp_path / "names.zarr") + ".partial", BUILD, "units")
    folder.mkdir(parents=True)
    for name in ("000000.json", "000001.json.12.140.tmp", "000002.parquet", "000002.npz", "1.json", "000003.json",
                 "1000000.json", "000004.json.bak", "\u00b2\u00b2\u00b2\u00b2\u00b2\u00b2.json", "000009.json"):
        (folder / name).write_text("{}")
    assert _units_without_report(Location(tmp_path / "names.zarr"), 6) == [1, 2, 4, 5]
    assert units_not_done(tmp_path / "names.zarr", 1_000_002)[:3] == [1, 2, 4]
    assert 1_000_000 not in units_not_done(tmp_path / "names.zarr", 1_000_002)
    assert units_not_done(tmp_path / "none.zarr", 2) == [0, 1]  # no build yet: every unit


def test_a_units_listing_that_fails_names_the_folder_and_the_cause(s3env):
    from sarflow.data.tile_units import Location
    from sarflow.errors import SarflowError

    with pytest.raises(SarflowError, match=r"s3://no-such-bucket/x\.zarr/_build/units/.*bucket 'no-such-bucket' "
                                           r"does not exist"):
        list(Location("s3://no-such-bucket/x.zarr").names(BUILD, "units"))


def test_finalize_reads_ahead_about_a_row_group_of_chips_at_most_16_units():
    from types import SimpleNamespace

    from sarflow.data.tile_units import CHIPS_ROW_GROUP, UNIT_READ_AHEAD, _read_ahead

    assert UNIT_READ_AHEAD == 16 and CHIPS_ROW_GROUP == 16_384
    assert _read_ahead(SimpleNamespace(total=10_000_000, units=[None] * 500_000)) == 16  # M3LEO: 20 chips a unit
    assert _read_ahead(SimpleNamespace(total=65_416, units=[None] * 16)) == 4  # 4,088 small chips a unit
    assert _read_ahead(SimpleNamespace(total=100_000, units=[None] * 2)) == 1  # larger than a row group
    assert _read_ahead(SimpleNamespace(total=0, units=[])) == 16
