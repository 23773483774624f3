"""The plan's screening fanned out: `tile-plan --survey N` cuts the grid's blocks into parts, each
screened by `tile-screen` in any process, and `tile-plan --out STORE` finishes the plan. The store is
the same bytes as the one-process `tile()`."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import folder_bytes
from sarflow.data.catalog import load_catalog
from sarflow.data.tile import TileOptions, plan_blocks, tile
from sarflow.data.tile_units import (BUILD, SCREENED, Location, Survey, commit_plan, finalize, plan, run_units,
                                     screen_cut, screen_part, survey)

SARFLOW = str(Path(sys.executable).with_name("sarflow"))
OPTIONS = dict(shard_chips=16, unit_shards=1, workers=1, block_chips=4)  # the scene's chips in 12 blocks
FLAGS = ["--shard-chips", "16", "--unit-shards", "1", "--workers", "1", "--block-chips", "4"]


def _screened(out: Path) -> list[int]:
    folder = Path(Location(out).work, BUILD, SCREENED)
    return sorted(int(p.stem.rsplit("-", 1)[1]) for p in folder.glob("*.npy")) if folder.is_dir() else []


@pytest.fixture(scope="module")
def reference(tiny_scene, tmp_path_factory) -> Path:
    return tile(load_catalog(tiny_scene), tmp_path_factory.mktemp("ref") / "chips.zarr", TileOptions(**OPTIONS),
                show_progress=False)


def test_screen_cut_gives_consecutive_parts_of_about_as_many_chips():
    assert screen_cut([4, 4, 4, 4], 2) == [[0, 2], [2, 4]]
    assert screen_cut([4, 4, 4, 4], 1) == [[0, 4]]
    assert screen_cut([10, 1, 1, 1, 1, 10], 2) == [[0, 3], [3, 6]]
    assert screen_cut([5, 5], 9) == [[0, 1], [1, 2]]  # never an empty part: at most one a block
    cut = screen_cut([16] * 1000, 64)
    assert cut[0][0] == 0 and cut[-1][1] == 1000 and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
    assert {b - a for a, b in cut} <= {15, 16, 17}
    with pytest.raises(ValueError):
        screen_cut([1], 0)
    # with the blocks' rows and as many rows as parts: parts are whole rows of blocks
    rows = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert screen_cut([2] * 9, 3, rows=rows) == [[0, 3], [3, 6], [6, 9]]
    assert screen_cut([2] * 9, 2, rows=rows) == [[0, 6], [6, 9]]
    assert screen_cut([2] * 9, 4, rows=rows) == screen_cut([2] * 9, 4)  # fewer rows than parts: cut in rows


@pytest.mark.slow
def test_a_plan_screened_by_separate_processes_gives_the_same_store_as_tile(reference, tiny_scene, tmp_path):
    out = tmp_path / "parts.zarr"
    surveyed = subprocess.run([SARFLOW, "tile-plan", str(tiny_scene), "--out", str(out), "--survey", "3", *FLAGS],
                              capture_output=True, text=True)
    assert surveyed.returncode == 0, surveyed.stderr
    assert json.loads(surveyed.stdout)["parts"] == 3
    # part 0 named, part 1 from an Indexed Job's index, both at once; part 2 left to the plan's last step
    env = {**os.environ, "JOB_COMPLETION_INDEX": "1"}
    cmds = [[SARFLOW, "tile-screen", str(out), "--part", "0"], [SARFLOW, "tile-screen", str(out)]]
    screens = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [s.communicate(timeout=300) for s in screens]
    assert [s.returncode for s in screens] == [0, 0], [e for _, e in outs]
    assert [list(json.loads(o)["screened"]) for o, _ in outs] == [["0"], ["1"]]
    assert _screened(out) == [0, 1]
    past = subprocess.run([SARFLOW, "tile-screen", str(out), "--part", "7"], capture_output=True, text=True)
    assert past.returncode == 0 and json.loads(past.stdout)["screened"] == {}  # more tasks than parts: nothing to do
    planned = subprocess.run([SARFLOW, "tile-plan", "--out", str(out)], capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    p = json.loads(planned.stdout)
    assert p["units"] >= 4 and p["chips"] > 0
    run_units(out)
    finalize(out)
    assert folder_bytes(out) == folder_bytes(reference)


def test_the_parts_of_a_survey_cover_the_grid_and_keep_what_one_plan_keeps(tiny_scene, tmp_path):
    cat = load_catalog(tiny_scene)
    whole = tmp_path / "whole.zarr"
    one = plan(cat, whole, TileOptions(**OPTIONS))
    out = tmp_path / "cut.zarr"
    s = survey(cat, out, TileOptions(**OPTIONS), 4)
    blocks = plan_blocks(pickle.loads(Location(out).read(BUILD, "ingested.pkl"))["ing"].grid, s.block_chips)
    assert 2 <= len(s.parts) <= 4 and s.parts[0][0] == 0 and s.parts[-1][1] == len(blocks) == 12
    kept = [screen_part(out, i) for i in range(len(s.parts))]
    assert all(k is not None for k in kept) and sum(kept) == one.total
    assert screen_part(out, 0) is None  # done already: not screened again
    p = commit_plan(out)
    assert (p.total, p.units, p.split) == (one.total, one.units, one.split)
    assert np.array_equal(np.load(Path(Location(out).work, BUILD, "chips.npy")),
                          np.load(Path(Location(whole).work, BUILD, "chips.npy")))
    assert commit_plan(out) == p and screen_part(out, 1) is None  # planned: nothing left to screen


def test_a_resumed_survey_keeps_its_screened_parts_and_other_parts_start_again(tiny_scene, tmp_path):
    cat = load_catalog(tiny_scene)
    out = tmp_path / "again.zarr"
    first = survey(cat, out, TileOptions(**OPTIONS), 3)
    screen_part(out, 0)
    assert survey(cat, out, TileOptions(**OPTIONS), 3) == first and _screened(out) == [0]  # resumed
    assert plan(cat, out, TileOptions(**OPTIONS)).total > 0 and _screened(out) == [0, 1, 2]  # the plan screens the rest
    other = tmp_path / "recut.zarr"
    survey(cat, other, TileOptions(**OPTIONS), 3)
    screen_part(other, 0)
    assert len(survey(cat, other, TileOptions(**OPTIONS), 2).parts) == 2 and _screened(other) == []  # cut again


@pytest.mark.parametrize("args, message", [
    (["tile-screen", "{out}"], "no survey at this store"),
    (["tile-screen", "{out}", "--part", "-1"], "screening part -1 does not exist"),
    (["tile-plan", "--out", "{out}"], "no survey at this store"),
    (["tile-plan", "--out", "{out}", "--shard-chips", "8"], "drop --shard-chips"),
])
def test_screening_and_finishing_a_plan_refuse_what_they_cannot_do(tmp_path, args, message):
    out = tmp_path / "none.zarr"
    done = subprocess.run([SARFLOW, *[a.format(out=out) for a in args]], capture_output=True, text=True)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr
    assert str(out) in " ".join(done.stderr.split()) or "drop" in message
    assert not Path(str(out) + ".partial").exists() and not out.exists()  # nothing written


@pytest.mark.slow
def test_kfp_local_tile_pipeline_fans_out_checksums_screening_and_units_and_gives_the_same_store(reference, tiny_scene,
                                                                                              tmp_path):
    import zarr

    from pipelines.data import tile_pipeline
    from sarflow.mlops.kfp_runner import run_local

    out = tmp_path / "kfp.zarr"
    run = run_local(tile_pipeline, tmp_path / "root", catalog=str(tiny_scene), store_uri=str(out),
                    shard_chips=16, unit_shards=1, workers=1, block_chips=4, checksum_parts=2, screen_parts=3, runs=2)
    n = zarr.open_group(str(reference), mode="r").attrs["chips"]
    assert -(-n // 16) > 2  # more units than runs: a task writes several consecutive units
    loops = {p.name: sorted(p.parent.name for p in run.run_dir.glob(f"for-loop-*/{p.name}"))
             for p in run.run_dir.glob("for-loop-*/*") if p.is_dir()}
    assert len(loops["checksum-inputs"]) == 2  # one task per part of the input files, in the first ParallelFor
    assert len(loops["screen-tiles"]) == 3  # one task per screening part, in the second
    assert len(loops["write-tile-units"]) == 2  # one task per run of units, in the third
    metrics = json.loads(next(run.run_dir.rglob("finalize-tiles/metrics")).read_text())
    assert metrics["runs"] == 2 and metrics["chips"] == n  # finalize got every run (Collected)
    assert not list(run.run_dir.rglob("tile-units-job"))
    assert folder_bytes(out) == folder_bytes(reference)


def test_a_commit_stopped_before_its_plan_is_written_is_done_again(tiny_scene, tmp_path):
    # killed after creating the arrays, before plan.json: the next commit clears them, keeps the build state
    cat = load_catalog(tiny_scene)
    out = tmp_path / "stopped.zarr"
    survey(cat, out, TileOptions(**OPTIONS), 2)
    first = commit_plan(out)
    work = Path(Location(out).work)
    (work / BUILD / "plan.json").unlink()
    (work / "stray.txt").write_text("left by the stopped commit")
    again = commit_plan(out)
    assert again == first and not (work / "stray.txt").exists() and _screened(out) == [0, 1]
    run_units(out)
    finalize(out)
    assert (out / "chips.parquet").is_file() and not work.exists()


def test_a_screened_part_of_another_survey_is_never_taken(tiny_scene, tmp_path):
    cat = load_catalog(tiny_scene)
    out = tmp_path / "late.zarr"
    s = survey(cat, out, TileOptions(**OPTIONS), 2)
    folder = Path(Location(out).work, BUILD, SCREENED)
    folder.mkdir(parents=True, exist_ok=True)
    late = folder / ("0" * 16 + "-00000000-000000.npy")  # a cancelled run's task of other inputs, writing late
    np.save(late, np.zeros(3, dtype=bool))
    assert screen_part(out, 0) is not None  # screened for this survey all the same
    np.save(folder / s.part_file(1), np.ones(2, dtype=bool))  # a part of the right name but not its blocks' chips
    with pytest.raises(Exception, match=f"screened part 1 holds 2 chips, its blocks .*{s.part_file(1)}"):
        commit_plan(out)


def test_a_resumed_survey_takes_the_run_s_unit_size(tiny_scene, tmp_path):
    cat = load_catalog(tiny_scene)
    out = tmp_path / "sized.zarr"
    survey(cat, out, TileOptions(**OPTIONS), 2)
    p = plan(cat, out, TileOptions(**{**OPTIONS, "unit_shards": 2}))  # not in the fingerprint: the run's own
    assert {b - a for a, b in p.units[:-1]} == {32}


@pytest.mark.parametrize("command", ["tile-screen", "tile-unit"])
def test_a_bad_job_completion_index_is_refused_by_name(tiny_scene, tmp_path, command):
    out = tmp_path / "indexed.zarr"
    survey(load_catalog(tiny_scene), out, TileOptions(**OPTIONS), 2)
    if command == "tile-unit":
        commit_plan(out)
    done = subprocess.run([SARFLOW, command, str(out)], env={**os.environ, "JOB_COMPLETION_INDEX": "two"},
                          capture_output=True, text=True)
    assert done.returncode == 2 and "$JOB_COMPLETION_INDEX is 'two', not a completion index" in done.stderr
