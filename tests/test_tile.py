"""The chip store contract, determinism, crash safety and bad inputs of `sarflow tile`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import yaml
import zarr

from helpers import write_catalog
from sarflow.data.catalog import load_catalog
from sarflow.errors import InputError
from sarflow.data.chipstore import open_store
from sarflow.data.tile import TileOptions, tile

SARFLOW = str(Path(sys.executable).with_name("sarflow"))


def _arrays_equal(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert sorted(ga.array_keys()) == sorted(gb.array_keys())
    for name in ga.array_keys():
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)  # [...]: spatial_ref is 0-d


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in ("chips.parquet", "manifest.json")}


# ---------------------------------------------------------------- the contract

def test_store_layout_matches_the_contract(tiny_store):
    g = zarr.open_group(str(tiny_store), mode="r")
    for key in ("crs", "resolution", "chip_size", "catalog_hash", "sarflow_version", "modalities", "chips"):
        assert key in g.attrs
    n, size = g.attrs["chips"], g.attrs["chip_size"]
    for name in g.attrs["modalities"]:
        a = g[name]
        nb = len(a.attrs["bands"])
        assert a.shape == (n, nb, size, size)
        assert a.chunks == (1, nb, size, size)  # one chip per chunk
        assert a.shards == (16, nb, size, size)  # many chips per shard
        for key in ("bands", "units", "kind", "nodata", "resampling", "resampling_domain", "sources", "stats"):
            assert key in a.attrs, (name, key)
        assert all(len(s["sha256"]) == 64 for s in a.attrs["sources"])
        shard_files = [p for p in (tiny_store / name / "c").rglob("*") if p.is_file()]
        assert len(shard_files) == math.ceil(n / 16)
    assert g["s1grd"].dtype == np.float32 and g["s1grd"].attrs["units"] == "dB"
    assert g["worldcover"].dtype == np.uint8 and g["worldcover"].attrs["nodata"] == 0


def test_chip_table_is_geoparquet_with_stable_ids_and_valid_fractions(tiny_store):
    t = gpd.read_parquet(tiny_store / "chips.parquet")
    g = zarr.open_group(str(tiny_store), mode="r")
    assert t.crs.to_epsg() == 4326
    assert list(t["index"]) == list(range(len(t)))
    assert t["chip_id"].is_unique
    assert set(t["split"]) == {"train", "val", "test", "buffer"}  # buffer: train chips next to a test block
    key = g.attrs["grid_key"]
    for row in t.head(5).itertuples():
        assert row.chip_id == f"{key}_x{row.ix}_y{row.iy}"
        assert math.isclose(row.maxx - row.minx, g.attrs["chip_size"] * g.attrs["resolution"])
    # valid fractions agree with the pixels, and no chip lacks a required modality
    for name in g.attrs["modalities"]:
        a = g[name][:]
        valid = ~np.isnan(a) if a.dtype.kind == "f" else a != g[name].attrs["nodata"]
        np.testing.assert_allclose(valid.all(axis=1).mean(axis=(1, 2)), t[f"valid_{name}"], atol=1e-6)
        if g[name].attrs["required"]:
            assert (t[f"valid_{name}"] > 0).all()
    # split blocks are spatial: cells of the recorded block side never mix splits
    side = g.attrs["split"]["block_chips"]
    cells = t.assign(cx=t.ix // side, cy=t.iy // side).groupby(["cx", "cy"])["split"].nunique()
    assert (cells == 1).all()
    assert g.attrs["split"]["chips"] == t["split"].value_counts().reindex(["train", "val", "test", "buffer"], fill_value=0).to_dict()


def test_normalisation_statistics_come_from_the_train_split_only(tiny_store):
    g = zarr.open_group(str(tiny_store), mode="r")
    t = gpd.read_parquet(tiny_store / "chips.parquet")
    train = t.loc[t.split == "train", "index"].to_numpy()
    vv = g["s1grd"][:][train, 0].astype(np.float64)
    stats = g["s1grd"].attrs["stats"]["bands"]["VV"]
    assert stats["count"] == np.isfinite(vv).sum()
    assert math.isclose(stats["mean"], np.nanmean(vv), rel_tol=1e-9)
    assert math.isclose(stats["std"], np.nanstd(vv), rel_tol=1e-6)
    assert (stats["min"], stats["max"]) == (np.nanmin(vv), np.nanmax(vv))
    whole = np.isfinite(vv).all(axis=(1, 2))
    assert whole.any() and not whole.all()  # chips with every pixel valid (summed unmasked) and chips with holes
    everything = np.nanmean(g["s1grd"][:][:, 0].astype(np.float64))
    assert not math.isclose(stats["mean"], everything, rel_tol=1e-9)
    wc = g["worldcover"].attrs["stats"]["bands"]["class"]["class_fractions"]
    assert "0" not in wc and math.isclose(sum(wc.values()), 1.0)


def test_store_opens_with_plain_zarr_xarray_and_geopandas(tiny_store):
    import xarray as xr

    ds = xr.open_zarr(tiny_store)
    assert ds["s1grd"].dims == ("chip", "s1grd_band", "y", "x")
    np.testing.assert_array_equal(ds["worldcover"].values, zarr.open_array(str(tiny_store / "worldcover"), mode="r")[:])
    assert open_store(tiny_store).summary()["chips"] == ds.sizes["chip"]


def test_default_resampling_follows_kind_and_scale(tiny_store):
    g = zarr.open_group(str(tiny_store), mode="r")
    one = lambda name: set(g[name].attrs["resampling"].values())  # noqa: E731
    assert one("worldcover") == {"nearest"}  # categorical, same 10 m grid
    assert one("vegetation") == {"bilinear"}  # continuous 250 m onto 10 m: upsampling
    assert one("s1coh") == {"bilinear"}


def test_coarse_grid_averages_continuous_and_takes_mode_of_classes(tiny_scene, tmp_path):
    data = yaml.safe_load(tiny_scene.read_text())
    data["grid"].update(resolution=40, chip_size=8)
    data["sources"] = [s for s in data["sources"] if s["name"] in ("s2rgb", "worldcover")]
    for s in data["sources"]:
        s["uris"] = [str(tiny_scene.parent / u) for u in s["uris"]]
    cat = write_catalog(tmp_path / "c.yaml", data["grid"], data["sources"])
    store = tile(load_catalog(cat), tmp_path / "coarse.zarr", TileOptions(), show_progress=False)
    g = zarr.open_group(str(store), mode="r")
    assert set(g["s2rgb"].attrs["resampling"].values()) == {"average"}
    assert set(g["worldcover"].attrs["resampling"].values()) == {"mode"}
    codes = set(np.unique(g["worldcover"][:]).tolist())
    assert codes <= {0, 10, 20, 30, 40, 50, 60, 80, 90}  # never an interpolated class code


# ---------------------------------------------------------------- determinism and crashes

def test_same_inputs_give_byte_identical_arrays(tiny_scene, tiny_store, tmp_path):
    again = tile(load_catalog(tiny_scene), tmp_path / "again.zarr", TileOptions(shard_chips=16, workers=1),
                 show_progress=False)
    assert _files(tiny_store) == _files(again)
    pd_a, pd_b = gpd.read_parquet(tiny_store / "chips.parquet"), gpd.read_parquet(again / "chips.parquet")
    assert pd_a.equals(pd_b)


@pytest.mark.slow
def test_kill_9_mid_tiling_then_rerun_equals_an_uninterrupted_run(tmp_path):
    from sarflow.data.synth import SynthConfig, synthesize

    catalog = synthesize(tmp_path / "scene", SynthConfig(size_px=768, seed=11, chip_size=32))
    out = tmp_path / "killed.zarr"
    partial = out.with_name(out.name + ".partial")
    reports = partial / "_build" / "units"  # one report per unit of one shard, written after its shard
    cmd = [SARFLOW, "tile", str(catalog), "--out", str(out), "--shard-chips", "16", "--block-chips", "2",
           "--unit-shards", "1", "--workers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if reports.is_dir() and len(list(reports.glob("*.json"))) >= 3:
            break
        assert proc.poll() is None, "tiling finished before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave anything that looks like a finished store"
    assert partial.is_dir()
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    reference = tile(load_catalog(catalog), tmp_path / "clean.zarr",
                     TileOptions(shard_chips=16, block_chips=2), show_progress=False)
    assert _files(out) == _files(reference)
    assert gpd.read_parquet(out / "chips.parquet").equals(gpd.read_parquet(reference / "chips.parquet"))


def test_a_stale_partial_build_from_other_inputs_is_discarded(tiny_scene, tmp_path):
    out = tmp_path / "s.zarr"
    partial = out.with_name("s.zarr.partial")
    (partial / "_build").mkdir(parents=True)
    (partial / "_build" / "plan.json").write_text(json.dumps({"fingerprint": "other", "units": [[0, 9]]}))
    (partial / "junk").write_text("x")
    tile(load_catalog(tiny_scene), out, TileOptions(shard_chips=16), show_progress=False)
    assert not (out / "junk").exists() and not partial.exists()


@pytest.mark.parametrize("point", [pytest.param("before-rename", marks=pytest.mark.slow),
                                   pytest.param("replacing", marks=pytest.mark.slow), "after-rename", "mid-cleanup"])
def test_kill_9_in_finalize_then_rerun_finishes_the_same_build(tiny_scene, tiny_store, tmp_path, caplog, point):
    """Issue 16: a kill after finalize removed its checkpoint but before the rename discarded a complete
    build. Now `_build/` goes only after the rename (tile_units._clean_up): `sarflow tile` killed at each
    point of finalize (the test hook $SARFLOW_TEST_KILL_AT), the rerun finishes that build (no unit is
    rewritten), the store equals an uninterrupted run's and nothing but the store is left."""
    out = tmp_path / "s.zarr"
    replacing = point == "replacing"
    if replacing:  # --overwrite of an existing store: killed between moving it aside and the rename
        out.mkdir()
        (out / "old-store").write_text("x")
    cmd = [SARFLOW, "tile", str(tiny_scene), "--out", str(out), "--shard-chips", "16", "--quiet",
           *(["--overwrite"] if replacing else [])]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SARFLOW_TEST_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    build = out if point in ("after-rename", "mid-cleanup") else out.with_name("s.zarr.partial")
    assert (build / "_build" / "plan.json").is_file()
    shards = {str(p.relative_to(build)): p.stat().st_mtime_ns  # the units' shards (not finalize's coordinates)
              for m in zarr.open_group(str(tiny_store), mode="r").attrs["modalities"]
              for p in build.glob(f"{m}/c/**/*") if p.is_file()}
    assert shards
    with caplog.at_level("INFO", logger="sarflow.data.tile"):
        again = tile(load_catalog(tiny_scene), out, TileOptions(shard_chips=16, overwrite=replacing), show_progress=False)
    assert "resuming" in caplog.text and f"planned {out}" not in caplog.text  # the killed build, not a new one
    assert {r: (out / r).stat().st_mtime_ns for r in shards} == shards  # no unit written again
    assert _files(again) == _files(tiny_store)
    assert gpd.read_parquet(out / "chips.parquet").equals(gpd.read_parquet(tiny_store / "chips.parquet"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no .partial, .replaced or lock left
    assert not (out / "_build").exists()


def test_a_store_moved_aside_by_a_killed_overwrite_is_put_back_and_kept_without_overwrite(tiny_scene, tmp_path):
    """Issue 16: `tile --overwrite` killed between moving the old store aside and the rename left no store
    at the output; a later run without --overwrite would have built a new one and deleted the old. The
    old store is put back first: without --overwrite the run is refused and the old store is intact."""
    out = tmp_path / "s.zarr"
    out.mkdir()
    (out / "old-store").write_text("x")
    cmd = [SARFLOW, "tile", str(tiny_scene), "--out", str(out), "--shard-chips", "16", "--quiet", "--overwrite"]
    killed = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SARFLOW_TEST_KILL_AT": "replacing"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and (tmp_path / "s.zarr.replaced" / "old-store").is_file()
    with pytest.raises(InputError, match="already exists"):
        tile(load_catalog(tiny_scene), out, TileOptions(shard_chips=8), show_progress=False)  # other options
    assert (out / "old-store").read_text() == "x" and not (tmp_path / "s.zarr.replaced").exists()


# ---------------------------------------------------------------- other input forms

def test_stac_item_source_equals_the_same_files_by_path(tiny_scene, tiny_store, tmp_path):
    import pystac
    from datetime import datetime

    scene = tiny_scene.parent
    item = pystac.Item(id="s2", geometry=None, bbox=None, datetime=datetime(2023, 7, 18), properties={})
    item.add_asset("visual", pystac.Asset(href=str(scene / "s2rgb.tif")))
    item_path = tmp_path / "item.json"
    item_path.write_text(json.dumps(item.to_dict()))
    data = yaml.safe_load(tiny_scene.read_text())
    for s in data["sources"]:
        s["uris"] = [[str(scene / x) for x in u] if isinstance(u, list) else str(scene / u) for u in s["uris"]]
        if s["name"] == "s2rgb":
            del s["uris"]
            s["stac"] = {"items": [str(item_path)], "assets": ["visual"]}
    cat = write_catalog(tmp_path / "c.yaml", data["grid"], data["sources"])
    store = tile(load_catalog(cat), tmp_path / "stac.zarr", TileOptions(shard_chips=16), show_progress=False)
    _arrays_equal(store, tiny_store)


def test_mosaic_of_two_overlapping_s1_files_matches_gdalwarp(tiny_store, tiny_scene, gdalwarp, tmp_path):
    from test_reference_gdalwarp import compare_with_gdalwarp

    files = [str(tiny_scene.parent / u) for u in yaml.safe_load(tiny_scene.read_text())["sources"][0]["uris"]]
    assert len(files) == 2
    assert compare_with_gdalwarp(tiny_store, "s1grd", files, tmp_path, tiny_scene, src_nodata="nan") > 100_000


# ---------------------------------------------------------------- bad input

def _assert_refused(catalog: Path, out: Path, *needles: str) -> None:
    with pytest.raises(InputError) as e:
        tile(load_catalog(catalog), out, TileOptions(), show_progress=False)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    cli = subprocess.run([SARFLOW, "tile", str(catalog), "--out", str(out), "--quiet"], capture_output=True, text=True)
    assert cli.returncode == 2
    assert all(n in cli.stderr for n in needles), cli.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


def _one_source(tmp_path, path, **over) -> Path:
    src = {"name": "x", "uris": [str(path)], "bands": ["b"], "units": "dB", "kind": "continuous", **over}
    return write_catalog(tmp_path / "c.yaml", {"crs": "utm", "resolution": 10, "chip_size": 32}, [src])


def test_truncated_tiff_is_refused(tiny_scene, tmp_path):
    good = (tiny_scene.parent / "worldcover.tif").read_bytes()
    bad = tmp_path / "truncated.tif"
    bad.write_bytes(good[: len(good) // 2])
    _assert_refused(_one_source(tmp_path, bad, units="class", kind="categorical", nodata=0,
                                    legend="worldcover"), tmp_path / "o.zarr",
                    str(bad), "truncated")


def test_raster_without_crs_is_refused(tmp_path):
    path = tmp_path / "nocrs.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="float32") as ds:
        ds.write(np.ones((1, 8, 8), np.float32))
    _assert_refused(_one_source(tmp_path, path), tmp_path / "o.zarr", str(path), "neither a CRS")


def test_band_count_mismatch_is_refused(tiny_scene, tmp_path):
    path = tiny_scene.parent / "s2rgb.tif"
    _assert_refused(_one_source(tmp_path, path, bands=["B04", "B03"], units="reflectance"), tmp_path / "o.zarr",
                    str(path), "has 3 band(s)", "declares 2")


def test_aoi_that_overlaps_no_source_is_refused(tiny_scene, tmp_path):
    path = tiny_scene.parent / "dem.tif"
    cat = write_catalog(tmp_path / "c.yaml", {"crs": "utm", "resolution": 10, "chip_size": 32,
                                              "aoi": [100.0, 10.0, 100.1, 10.1]},
                        [{"name": "dem", "uris": [str(path)], "bands": ["z"], "units": "m", "kind": "continuous"}])
    _assert_refused(cat, tmp_path / "o.zarr", str(cat), "overlaps none of the sources")  # the AOI's fault


def test_all_nan_source_is_refused(tiny_scene, tmp_path):
    with rasterio.open(tiny_scene.parent / "dem.tif") as ds:
        profile = ds.profile
    path = tmp_path / "allnan.tif"
    profile.update(nodata=np.nan)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(np.full((1, profile["height"], profile["width"]), np.nan, np.float32))
    _assert_refused(_one_source(tmp_path, path), tmp_path / "o.zarr", str(path), "no valid pixel")


def test_real_all_nan_sen1floods11_chip_is_refused(real_data, tmp_path):
    path = real_data / "sen1floods11" / "Paraguay_34417_S1Hand.tif"
    _assert_refused(_one_source(tmp_path, path, bands=["VV", "VH"]), tmp_path / "o.zarr", str(path), "no valid pixel")


def test_raw_s1_in_radar_geometry_is_refused_with_advice(real_data, tmp_path):
    path = next((real_data / "rio-tiler-pds").rglob("*vv*.tif*"))
    _assert_refused(_one_source(tmp_path, path, units="amplitude", nodata=0), tmp_path / "o.zarr",
                    str(path), "radar geometry", "Terrain Correction")


def test_integer_source_without_nodata_is_refused(tmp_path):
    path = tmp_path / "classes.tif"
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8", crs="EPSG:32632",
                       transform=rasterio.transform.from_origin(500000, 5000000, 10, 10)) as ds:
        ds.write(np.full((1, 64, 64), 10, np.uint8))
    _assert_refused(_one_source(tmp_path, path, units="class", kind="categorical",
                                    legend="worldcover"), tmp_path / "o.zarr",
                    str(path), "no nodata value")


def test_bad_catalog_gives_exit_2_and_names_the_catalog(tmp_path):
    cat = tmp_path / "c.yaml"
    cat.write_text(yaml.safe_dump({"grid": {"crs": "utm", "resolution": "ten", "chip_size": 32}, "sources": []}))
    cli = subprocess.run([SARFLOW, "tile", str(cat), "--out", str(tmp_path / "o.zarr")], capture_output=True, text=True)
    assert cli.returncode == 2 and str(cat) in cli.stderr and "resolution" in cli.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_existing_store_is_not_overwritten_without_the_flag(tiny_scene, tiny_store):
    with pytest.raises(InputError, match="already exists"):
        tile(load_catalog(tiny_scene), tiny_store, TileOptions(), show_progress=False)


def test_the_codec_is_chosen_per_store_and_recorded(tiny_scene, tiny_store, tmp_path):
    """tile.codec lz4 (level 5): every array's zarr.json names Blosc/lz4 (read as JSON, not through
    zarr), the group records it, and the values and chip table equal the zstd store's (lossless)."""
    import pandas as pd

    out = tile(load_catalog(tiny_scene), tmp_path / "lz4.zarr", TileOptions(shard_chips=16, codec="lz4", clevel=5),
               show_progress=False)
    g, ref = zarr.open_group(str(out), mode="r"), zarr.open_group(str(tiny_store), mode="r")
    assert g.attrs["compression"] == {"codec": "blosc", "cname": "lz4", "clevel": 5}
    assert ref.attrs["compression"] == {"codec": "blosc", "cname": "zstd", "clevel": 3}
    for name in g.attrs["modalities"]:
        meta = json.loads((out / name / "zarr.json").read_text())
        sharding = next(c for c in meta["codecs"] if c["name"] == "sharding_indexed")
        blosc = next(c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc")
        assert (blosc["configuration"]["cname"], blosc["configuration"]["clevel"]) == ("lz4", 5), name
        np.testing.assert_array_equal(g[name][:], ref[name][:])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "chips.parquet"), pd.read_parquet(tiny_store / "chips.parquet"))
    with pytest.raises(ValueError, match="codec"):
        TileOptions(codec="gzip")


@pytest.mark.parametrize("dtype, fill", [("float32", float("nan")), ("int16", -9999)])
def test_a_chips_statistics_do_not_depend_on_the_batch_it_is_summed_in(dtype, fill):
    """A batch of chips valid everywhere is summed without masking; the same chip summed in a batch
    with a holed chip (masked) must give the same float64 sums, bit for bit (chips over 8192 px, where
    numpy reduces in buffered chunks, and two bands)."""
    from types import SimpleNamespace

    from sarflow.data.tile import chip_contributions

    rng = np.random.default_rng(0)
    chips = (rng.normal(size=(3, 2, 128, 128)) * 300).astype(dtype)
    holed = chips.copy()
    holed[2, :, :5, :7] = fill
    source = SimpleNamespace(spec=SimpleNamespace(kind="continuous"), fill_value=fill)
    whole, mixed = chip_contributions(source, chips[:2]), chip_contributions(source, holed)
    assert whole == mixed[:2]
    assert chip_contributions(source, chips[1:2]) == whole[1:]  # alone, as in a batch
    assert [band[0] for band in mixed[2]] == [128 * 128 - 35] * 2 and whole[0][0][0] == 128 * 128


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "int32", "float32"])
def test_categorical_code_counts_equal_numpy_unique(dtype):
    """Class counts by a histogram (8- and 16-bit codes) or a sort (others): np.unique's answer,
    negative codes and the dtype's extremes included; a chip's categorical contribution from them."""
    from types import SimpleNamespace

    from sarflow.data.tile import chip_contributions, code_counts

    rng = np.random.default_rng(3)
    kind = np.dtype(dtype).kind
    lo, hi = (np.iinfo(dtype).min, np.iinfo(dtype).max) if kind in "ui" else (-5, 5)
    values = rng.integers(lo, hi, 4000, endpoint=True).astype(dtype)
    values[:3] = [lo, hi, lo]
    codes, hits = code_counts(values)
    want_codes, want_hits = np.unique(values, return_counts=True)
    assert codes.tolist() == want_codes.tolist() and hits.tolist() == want_hits.tolist()
    chip = np.full((1, 1, 4, 4), hi, dtype=dtype)
    chip[0, 0, 0, :3] = [lo, 1, 1]
    chip[0, 0, 1, 0] = 2
    source = SimpleNamespace(spec=SimpleNamespace(kind="categorical"), fill_value=hi)  # the top code is nodata
    name = [str(v) for v in np.array([lo, 1, 2], dtype=dtype).tolist()]  # codes as the JSON stores them
    assert chip_contributions(source, chip) == [[[[name[0], 1], [name[1], 2], [name[2], 1]]]]
