"""Spatially blocked splits on small and large AOIs (issue 12, item 5): fractions hold in chips,
a one-block buffer keeps train away from test where the AOI allows, the split is the same on
every run and machine, and a small AOI gets a warning naming what it achieved."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys

import geopandas as gpd
import numpy as np
import pytest
import shapely
import zarr
from pyproj import CRS

from sarflow.data.grid import SPLIT_LABELS, ChipGrid, block_split

STEP = 320.0  # 32 px chips at 10 m
FRACTIONS = (0.8, 0.1, 0.1)


def _grid(aoi, overlap: int = 0) -> ChipGrid:
    return ChipGrid(CRS.from_epsg(32631), 10.0, 32, overlap, (0.0, 0.0), aoi)


def _square(n: int, overlap: int = 0) -> ChipGrid:
    """n x n chips (the AOI's edges sit just inside the chips' edges)."""
    return _grid(shapely.box(1, -STEP * n + 1, STEP * n - 1, -1), overlap)


# 4,025 chips: 70 x 50 with a 25 x 25 bump and a 10 x 10 hole, edges on chip edges
LARGE = shapely.box(0, -STEP * 50, STEP * 70, 0).union(shapely.box(STEP * 20, 0, STEP * 45, STEP * 25)).difference(
    shapely.box(STEP * 30, -STEP * 20, STEP * 40, -STEP * 10))


def _split(grid: ChipGrid, block="auto", fractions=FRACTIONS):
    c = grid.candidates
    return c, block_split(grid, c[:, 1], c[:, 0], block, fractions)


def _counts(split) -> dict:
    return {s: split.counts[s]["chips"] for s in SPLIT_LABELS}


def _pixel_neighbours(labels: np.ndarray, cand: np.ndarray, reach: int, a: str, b: str) -> int:
    """Pairs of chips labelled `a` and `b` at most `reach` chips apart along both axes."""
    where = {(iy, ix): lab for (iy, ix), lab in zip(cand.tolist(), labels.tolist())}
    pairs = 0
    for (iy, ix), lab in where.items():
        if lab != a:
            continue
        for dy in range(-reach, reach + 1):
            for dx in range(-reach, reach + 1):
                pairs += where.get((iy + dy, ix + dx)) == b
    return pairs


def test_fractions_hold_in_chips_on_a_large_aoi_with_a_buffer():
    grid = _grid(LARGE)
    cand, split = _split(grid)
    n = len(cand)
    assert n == 4025
    assert split.block == 2 and split.n_blocks == 1019  # about a thousand blocks
    assert split.buffered
    counts = _counts(split)
    assert counts == {"train": 2973, "val": 400, "test": 404, "buffer": 248}
    assert sum(counts.values()) == n
    # val and test within a block or two of their share of chips; train and its buffer make the rest
    tol = 2 * split.block**2
    assert abs(counts["val"] - 0.1 * n) <= tol and abs(counts["test"] - 0.1 * n) <= tol
    assert counts["buffer"] <= counts["train"] / 3  # the buffer costs a few percent of the chips
    # no train chip touches a test chip (8-neighbourhood)
    assert _pixel_neighbours(split.labels, cand, 1, "test", "train") == 0
    # blocks go whole to one split
    labels = split.labels
    for (by, bx) in {(iy // split.block, ix // split.block) for iy, ix in cand.tolist()}:
        inside = (cand[:, 0] // split.block == by) & (cand[:, 1] // split.block == bx)
        assert len(set(labels[inside])) == 1


def test_an_explicit_block_side_is_kept_and_fractions_still_hold_in_chips():
    grid = _grid(LARGE)
    cand, split = _split(grid, block=4, fractions=(0.6, 0.1, 0.3))
    n = len(cand)
    counts = _counts(split)
    assert split.block == 4
    assert abs(counts["test"] - 0.3 * n) <= 2 * 16 and abs(counts["val"] - 0.1 * n) <= 2 * 16
    assert sum(counts.values()) == n
    cells = {}
    for (iy, ix), lab in zip(cand.tolist(), split.labels.tolist()):
        cells.setdefault((iy // 4, ix // 4), set()).add(lab)
    assert all(len(v) == 1 for v in cells.values())


def test_fractions_hold_on_a_small_aoi():
    cand, split = _split(_square(12))
    assert len(cand) == 144 and split.block == 1 and split.buffered
    counts = _counts(split)
    assert counts == {"train": 94, "val": 15, "test": 14, "buffer": 21}
    assert abs(counts["val"] - 14.4) <= 1 and abs(counts["test"] - 14.4) <= 1
    assert _pixel_neighbours(split.labels, cand, 1, "test", "train") == 0


def test_the_old_block_split_on_a_small_aoi_is_gone():
    """5 x 4 chips straddling 4-chip cells: the cell split gave 16 train / 2 val / 12 test (or
    12 / 2 / 16): test took most of the AOI. Now test and val hold ~10% each in chips."""
    aoi = shapely.box(2 * STEP + 1, -6 * STEP + 1, 7 * STEP - 1, -2 * STEP - 1)
    cand, split = _split(_grid(aoi))
    assert len(cand) == 20
    counts = _counts(split)
    assert counts["test"] == 2 and counts["val"] == 2
    assert counts["train"] + counts["buffer"] == 16


def test_chips_that_share_pixels_are_never_train_and_test():
    """With overlap 24 of 32 px, chips up to 3 apart share pixels: the auto block is 3 chips, so
    the one-block buffer keeps every train chip off every test chip's pixels."""
    cand, split = _split(_grid(shapely.box(0, -STEP * 10, STEP * 10, 0), overlap=24))
    assert split.block == 3 and split.buffered
    assert _pixel_neighbours(split.labels, cand, 3, "test", "train") == 0
    counts = _counts(split)
    assert abs(counts["test"] - 0.1 * len(cand)) <= 2 * 9


def test_the_split_is_deterministic_and_ignores_the_order_of_chips():
    grid = _grid(LARGE)
    cand, split = _split(grid)
    again = block_split(grid, cand[:, 1], cand[:, 0], "auto", FRACTIONS)
    np.testing.assert_array_equal(split.codes, again.codes)
    perm = np.random.default_rng(0).permutation(len(cand))
    shuffled = block_split(grid, cand[perm, 1], cand[perm, 0], "auto", FRACTIONS)
    np.testing.assert_array_equal(shuffled.labels, split.labels[perm])
    # one chip's split by its grid position
    iy, ix = cand[123]
    assert split[(int(iy), int(ix))] == split.labels[123]
    with pytest.raises(KeyError):
        split[(10**6, 10**6)]
    # another process (another hash seed) gives the same split
    digest = hashlib.sha256(split.codes.tobytes()).hexdigest()
    code = ("import hashlib, shapely; from tests.test_splits import _grid, _split, LARGE; "
            "print(hashlib.sha256(_split(_grid(LARGE))[1].codes.tobytes()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.stdout.strip() == digest


def test_a_tiny_aoi_gets_a_warning_naming_the_counts(caplog):
    with caplog.at_level(logging.WARNING, logger="sarflow.data.grid"):
        cand, split = _split(_square(3))
    counts = _counts(split)
    assert counts == {"train": 5, "val": 1, "test": 1, "buffer": 2}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    msg = warned[0]
    assert "too small for the split 0.8/0.1/0.1" in msg
    assert "test has fewer than 10 chips or 2 blocks" in msg
    assert ("9 candidate chips in 9 blocks of 1x1 chips: train 5 chips (5 blocks), val 1 chips (1 blocks), "
            "test 1 chips (1 blocks), buffer 2 chips (2 blocks)") in msg


def test_a_buffer_the_aoi_cannot_afford_is_skipped_with_a_warning(caplog):
    """6 x 5 chips: the test chips' neighbours would take half of train."""
    with caplog.at_level(logging.WARNING, logger="sarflow.data.grid"):
        cand, split = _split(_grid(shapely.box(0, -5 * STEP, 6 * STEP, 0)))
    assert not split.buffered
    assert _counts(split) == {"train": 24, "val": 3, "test": 3, "buffer": 0}
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "no buffer between train and test: it would take 12 of 24 train chips" in msg
    assert f"train {_counts(split)['train']} chips" in msg


def test_a_large_aoi_logs_no_warning(caplog):
    with caplog.at_level(logging.INFO, logger="sarflow.data.grid"):
        _split(_grid(LARGE))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("train 2973 chips" in r.getMessage() for r in caplog.records)


def test_chips_count_by_their_area_inside_the_aoi():
    """Along a round AOI's edge most chips are partly outside; the fractions hold in area."""
    grid = _grid(shapely.Point(0, 0).buffer(STEP * 40))
    cand, split = _split(grid)
    w = grid.chip_weights(cand[:, 1], cand[:, 0])
    assert len(cand) == 5164 and round(w.sum()) == 5018  # a 64-gon of radius 40 chips: 5,018.5
    labels = split.labels
    for name in ("val", "test"):
        assert abs(w[labels == name].sum() - 0.1 * w.sum()) <= 2 * split.block**2, name


def test_fractions_without_test_or_val():
    cand, split = _split(_square(12), fractions=(1.0, 0.0, 0.0))
    assert _counts(split) == {"train": 144, "val": 0, "test": 0, "buffer": 0}
    cand, split = _split(_square(12), fractions=(0.5, 0.5, 0.0))
    assert _counts(split)["test"] == 0 and _counts(split)["buffer"] == 0
    assert _counts(split)["val"] == 72


def test_tile_options_take_auto_zero_or_a_positive_block():
    from pydantic import ValidationError

    from sarflow.data.tile import TileOptions

    assert TileOptions().split_block == 0 and TileOptions().fingerprint_fields()["split_block"] == "auto"
    assert TileOptions(split_block="auto").fingerprint_fields()["split_block"] == "auto"
    assert TileOptions(split_block=0).fingerprint_fields()["split_block"] == "auto"
    assert TileOptions(split_block=3).fingerprint_fields()["split_block"] == 3
    with pytest.raises(ValidationError, match="split_block must be"):
        TileOptions(split_block=-1)
    with pytest.raises(ValidationError, match="split_fractions"):
        TileOptions(split_fractions=(0.0, 0.0, 0.0))


def test_the_store_records_its_split_and_keeps_train_off_test(tiny_store):
    t = gpd.read_parquet(tiny_store / "chips.parquet")
    attrs = zarr.open_group(str(tiny_store), mode="r").attrs["split"]
    assert attrs["block_chips"] == 1 and attrs["buffer"] is True and attrs["fractions"] == [0.8, 0.1, 0.1]
    kept = t["split"].value_counts().to_dict()
    assert attrs["chips"] == {s: kept.get(s, 0) for s in SPLIT_LABELS}
    n = len(t)
    assert abs(kept["test"] - 0.1 * n) <= 2 and abs(kept["val"] - 0.1 * n) <= 2
    cand = t[["iy", "ix"]].to_numpy()
    assert _pixel_neighbours(t["split"].to_numpy(), cand, 1, "test", "train") == 0
