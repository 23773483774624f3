"""The chip store read in place by xarray's geospatial stack: `xr.open_zarr` on the store gives one variable per
modality with per-chip coordinates and the CF grid mapping `spatial_ref`; one chip, with its coordinates assigned,
is georeferenced for rioxarray (and odc-geo) exactly as chips.parquet places it. The georeference arrays are never
taken for modalities, and the integrity record covers them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import zarr
from rasterio.transform import from_origin

from helpers import write_catalog
from sarflow.data.chipstore import GEO_ARRAYS, chip, chip_transform, open_store, open_store_xarray, read_masked
from sarflow.errors import InputError

xr = pytest.importorskip("xarray")
rioxarray = pytest.importorskip("rioxarray")


@pytest.fixture(scope="module")
def store(tiny_store):
    return open_store(tiny_store)


@pytest.fixture(scope="module")
def ds(tiny_store):
    return open_store_xarray(tiny_store)


def test_the_store_carries_what_xarray_reads(tiny_store, store):
    g = zarr.open_group(str(tiny_store), mode="r")
    n, size = store.n_chips, int(store.attrs["chip_size"])
    assert g["spatial_ref"].shape == () and g["spatial_ref"].metadata.dimension_names in ((), None)
    assert g["spatial_ref"].attrs["crs_wkt"] and g["spatial_ref"].attrs["grid_mapping_name"] == "transverse_mercator"
    for name, axis in (("chip_x", "x"), ("chip_y", "y")):
        a = g[name]
        assert a.shape == (n, size) and a.dtype == np.float64
        assert a.metadata.dimension_names == ("chip", axis)
    for m in store.modalities:
        assert g[m].metadata.dimension_names == ("chip", f"{m}_band", "y", "x")
        assert g[m].attrs["grid_mapping"] == "spatial_ref"


def test_plain_open_zarr_and_one_call_georeference_a_chip(tiny_store, store):
    """What a user does without sarflow: xr.open_zarr, select a chip, assign its coordinates; rioxarray reads the
    CRS from spatial_ref and the chip's transform from its coordinates."""
    from rasterio.crs import CRS

    ds = xr.open_zarr(str(tiny_store))
    assert set(ds.data_vars) == set(store.modalities)  # the georeference arrays are coordinates, not variables
    assert {"chip_x", "chip_y", "spatial_ref"} <= set(ds.coords)
    assert ds["s1grd"].rio.crs == CRS.from_user_input(store.attrs["crs"])
    rec = store.chips.iloc[11]
    one = ds.isel(chip=int(rec["index"]))
    one = one.assign_coords(x=one.chip_x, y=one.chip_y)
    assert one["dem"].rio.crs == CRS.from_user_input(store.attrs["crs"])
    assert tuple(one["dem"].rio.transform())[:6] == pytest.approx(tuple(chip_transform(rec, store.attrs["resolution"]))[:6])
    np.testing.assert_array_equal(one["dem"].values, store.group["dem"][int(rec["index"])])


def test_open_store_xarray_holds_the_modalities_only(ds, store):
    assert list(ds.data_vars) == store.modalities
    assert not set(GEO_ARRAYS) & set(ds.data_vars)
    assert ds.sizes["chip"] == store.n_chips
    for m in store.modalities:
        assert ds[m].dims == ("chip", f"{m}_band", "y", "x")


@pytest.mark.parametrize("row", [0, 37, -1])
def test_chip_is_georeferenced_as_the_chip_table_says(ds, store, row):
    from rasterio.crs import CRS

    rec = store.chips.iloc[row]
    i = int(rec["index"])
    c = chip(ds, i)
    want = tuple(chip_transform(rec, store.attrs["resolution"]))[:6]
    for m in store.modalities:
        da = c[m]
        assert da.dims == (f"{m}_band", "y", "x")
        assert list(da[f"{m}_band"].values) == list(store.array(m).attrs["bands"])
        assert da.rio.crs == CRS.from_user_input(store.attrs["crs_wkt"])
        assert tuple(da.rio.transform())[:6] == pytest.approx(want)
        assert da.rio.bounds() == pytest.approx((rec["minx"], rec["miny"], rec["maxx"], rec["maxy"]))
        np.testing.assert_array_equal(da.values, read_masked(store.array(m), i))  # the one nodata rule
    raw = chip(ds, i, masked=False)["worldcover"].values
    np.testing.assert_array_equal(raw, store.group["worldcover"][i])


def test_chip_reads_with_odc_geo(ds, store):
    pytest.importorskip("odc.geo.xr")
    rec = store.chips.iloc[3]
    gbox = chip(ds, int(rec["index"]))["s1grd"].odc.geobox
    assert tuple(gbox.affine)[:6] == pytest.approx(tuple(chip_transform(rec, store.attrs["resolution"]))[:6])


def test_chip_refuses_a_row_out_of_range(ds, store):
    with pytest.raises(InputError, match=f"rows 0..{store.n_chips - 1}"):
        chip(ds, store.n_chips)


def test_georeference_arrays_are_recorded_and_verified(tiny_store, tmp_path):
    import shutil

    from sarflow.data.integrity import verify

    doc = json.loads((tiny_store / "integrity.json").read_text())
    assert any(k.startswith("chip_x/") for k in doc["files"]) and any(k.startswith("chip_y/") for k in doc["files"])
    assert verify(tiny_store, full=True) == []
    copy = tmp_path / "chips.zarr"
    shutil.copytree(tiny_store, copy)
    shard = next(p for p in sorted((copy / "chip_x").rglob("*")) if p.is_file() and p.name != "zarr.json")
    shard.write_bytes(shard.read_bytes()[:-3])
    problems = verify(copy)
    assert [p.array for p in problems] == ["chip_x"] and "truncated" in problems[0].cause
    with pytest.raises(InputError, match="chip_x"):
        open_store_xarray(copy)


def test_readers_do_not_take_georeference_arrays_for_modalities(store):
    assert not set(GEO_ARRAYS) & set(store.modalities)
    assert not set(GEO_ARRAYS) & set(store.inputs)
    assert not set(GEO_ARRAYS) & set(store.summary()["modalities"])


def test_a_source_named_like_a_georeference_array_is_refused(tmp_path):
    from sarflow.data.catalog import load_catalog
    from sarflow.data.tile import TileOptions, tile

    path = tmp_path / "a.tif"
    with rasterio.open(path, "w", driver="GTiff", width=32, height=32, count=1, dtype="float32", crs="EPSG:32630",
                       transform=from_origin(500000.0, 4000000.0, 10, 10)) as dst:
        dst.write(np.ones((1, 32, 32), np.float32))
    src = {"uris": [str(path)], "bands": ["v"], "units": "m", "kind": "continuous", "resampling": "nearest"}
    cat = write_catalog(tmp_path / "catalog.yaml", {"crs": 32630, "resolution": 10, "chip_size": 16},
                        [{"name": "chip_x", **src}, {"name": "ok", **src}])
    with pytest.raises(InputError, match=r"\['chip_x'\] are reserved") as e:
        tile(load_catalog(cat), tmp_path / "chips.zarr", TileOptions(shard_chips=4), show_progress=False)
    assert "catalog.yaml" in str(e.value)
    assert not (tmp_path / "chips.zarr").exists() and not (tmp_path / "chips.zarr.partial").exists()
