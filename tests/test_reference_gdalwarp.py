"""Alignment correctness on real files against an independent reference: GDAL's own gdalwarp
(Debian's gdal-bin, a different GDAL build from rasterio's) on the same grid and resampling, over
the same windows: sarflow warps each block of chips (the store's `warp_block_chips`) on its own,
and GDAL's approximate transformer makes a pixel's value depend on its window by up to its error
(0.125 source pixels), so each chip is compared with gdalwarp of its block's window.

Values are compared where both have data: categorical exactly, continuous to 1e-4 relative.
Sources in dB are resampled in linear power (the store records `resampling_domain`), so their
reference is gdalwarp run on a linear-power copy of the input, converted back to dB.
Whether a pixel on the very edge of a source's footprint is nodata differs between GDAL
versions for averaging/mode kernels (partial coverage), so validity may differ there and only
there: every such pixel must touch the reference's footprint boundary.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import zarr
from scipy import ndimage

from helpers import chip_windows, gdalwarp_reference, write_catalog
from sarflow.data.catalog import load_catalog
from sarflow.data.tile import TileOptions, tile

pytestmark = pytest.mark.real_data


def _valid(a, nodata):
    return ~np.isnan(a) if a.dtype.kind == "f" else a != nodata


def _warp_windows(catalog, store):
    """The windows sarflow warps in: its blocks (the store's `warp_block_chips` chips a side, aligned
    on the grid, spanning the candidate chips in them), as planning lays them out."""
    from sarflow.data.ingest import ingest
    from sarflow.data.tile import plan_blocks

    grid = ingest(load_catalog(catalog), checksum=False).grid
    return grid, plan_blocks(grid, zarr.open_group(str(store), mode="r").attrs["warp_block_chips"])


def compare_with_gdalwarp(store, modality, srcs, tmp_path, catalog, src_nodata=None, band_files=False):
    """Every chip of `modality` against gdalwarp of its source(s) over the window sarflow warped it in
    (its block); returns the number of pixels compared."""
    g = zarr.open_group(str(store), mode="r")
    arr = g[modality]
    table = gpd.read_parquet(store / "chips.parquet")
    grid, blocks = _warp_windows(catalog, store)
    res = g.attrs["resolution"]
    ours = arr[:]
    store_nodata = arr.attrs["nodata_in_store"]
    dst_nodata = "nan" if ours.dtype.kind == "f" else store_nodata
    methods = {Path(k).name: v for k, v in arr.attrs["resampling"].items()}  # recorded relative to the catalog
    linear = arr.attrs["resampling_domain"] == "linear_power"
    assert linear == (arr.attrs["units"].lower() == "db")
    warp_srcs, warp_src_nodata, warp_dst_nodata = srcs, src_nodata, dst_nodata
    if linear:  # gdalwarp on linear-power copies (their names stay, so `methods` still applies)
        warp_srcs = [_linear_power_copy(s, src_nodata, tmp_path / "linear") for s in srcs]
        warp_src_nodata = warp_dst_nodata = "nan"
    if not band_files:
        assert len({methods[Path(s).name] for s in srcs}) == 1

    def reference(extent):
        if band_files:  # one single-band file per band
            ref = np.concatenate([
                gdalwarp_reference(s, tmp_path / f"{modality}_{b}.tif", g.attrs["crs_wkt"], res, extent,
                                   _cli(methods[Path(s).name]), dst_nodata=warp_dst_nodata, src_nodata=warp_src_nodata)
                for b, s in enumerate(warp_srcs)])
        else:
            ref = gdalwarp_reference(warp_srcs, tmp_path / f"{modality}.tif", g.attrs["crs_wkt"], res, extent,
                                     _cli(methods[Path(srcs[0]).name]), dst_nodata=warp_dst_nodata,
                                     src_nodata=warp_src_nodata)
        if linear:  # back to dB, nodata as the store keeps it
            with np.errstate(divide="ignore", invalid="ignore"):
                ref = 10 * np.log10(ref)
            if ours.dtype.kind != "f":
                ref = np.where(np.isnan(ref), store_nodata, np.rint(ref))
        ref = ref.astype(ours.dtype)
        ref_valid_full = _valid(ref, store_nodata)
        # outside the extent counts as nodata: a footprint can end on the extent's border
        edge = ndimage.binary_dilation(ref_valid_full, np.ones((1, 3, 3))) & ndimage.binary_dilation(
            ~ref_valid_full, np.ones((1, 3, 3)), border_value=1)
        if not band_files:
            edge |= _partially_nodata(srcs[0], src_nodata, g.attrs["crs_wkt"], res, extent, tmp_path / "mask")
        return ref, edge

    size = g.attrs["chip_size"]
    compared, seen = 0, 0
    for block in blocks:
        minx, _, _, maxy = grid.chip_bounds(block.ix0, block.iy0)
        width, height = grid.window_pixels(block.cols) * res, grid.window_pixels(block.rows) * res
        inside = table[(table["iy"] >= block.iy0) & (table["iy"] < block.iy0 + block.rows)
                       & (table["ix"] >= block.ix0) & (table["ix"] < block.ix0 + block.cols)]
        if inside.empty:
            continue
        ref, edge = reference((float(minx), float(maxy - height), float(minx + width), float(maxy)))
        for i, iy, ix in zip(inside["index"], inside["iy"], inside["ix"]):
            r, c = (iy - block.iy0) * grid.stride, (ix - block.ix0) * grid.stride
            mine = ours[int(i)]
            theirs = ref[:, r:r + size, c:c + size]
            v_mine, v_theirs = _valid(mine, store_nodata), _valid(theirs, store_nodata)
            disagree = v_mine != v_theirs
            assert not (disagree & ~edge[:, r:r + size, c:c + size]).any(), \
                f"{modality} chip {i}: nodata differs off the footprint edge"
            both = v_mine & v_theirs
            if arr.attrs["kind"] == "categorical":
                np.testing.assert_array_equal(mine[both], theirs[both], err_msg=f"{modality} chip {i}")
            else:
                np.testing.assert_allclose(mine[both].astype(float), theirs[both].astype(float), rtol=1e-4, atol=1e-4,
                                           err_msg=f"{modality} chip {i}")
            compared += int(both.sum())
            seen += 1
    assert seen == len(table), f"{len(table) - seen} chips in no warp window"
    return compared


def _linear_power_copy(src, nodata, folder: Path) -> str:
    """The dB raster `src` as linear power 10**(dB/10) in float64, nodata as NaN, same name."""
    import rasterio

    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float64)
        profile = ds.profile
    invalid = np.isnan(data)
    if nodata not in (None, "nan"):
        invalid |= data == float(nodata)
    power = np.where(invalid, np.nan, 10 ** (data / 10))
    profile.update(dtype="float64", nodata=float("nan"), driver="GTiff")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / Path(src).name
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(power)
    return str(out)


def _partially_nodata(src, nodata, crs, res, extent, stem):
    """Pixels whose footprint holds both nodata and valid source pixels (by gdalwarp average of
    the source's nodata mask): the only place where GDAL versions may disagree on validity."""
    import rasterio

    with rasterio.open(src) as ds:
        data = ds.read()
        profile = ds.profile
    invalid = (np.isnan(data) if data.dtype.kind == "f" else np.zeros(data.shape, bool))
    if nodata not in (None, "nan"):
        invalid |= data == float(nodata)
    profile.update(dtype="float32", nodata=None, driver="GTiff")
    mask_path = stem.with_suffix(".src.tif")
    with rasterio.open(mask_path, "w", **profile) as dst:
        dst.write(invalid.astype("float32"))
    frac = gdalwarp_reference(str(mask_path), stem.with_suffix(".tif"), crs, res, extent, "average", dst_nodata=-1)
    return (frac > 0) & (frac < 1)


def _cli(method: str) -> str:
    return {"nearest": "near"}.get(method, method)


@pytest.fixture(scope="module")
def spain(real_data, tmp_path_factory):
    d = real_data / "sen1floods11"
    tmp = tmp_path_factory.mktemp("spain")
    cat = write_catalog(tmp / "catalog.yaml", {"crs": "utm", "resolution": 10, "chip_size": 64}, [
        {"name": "s1grd", "uris": [str(d / "Spain_7370579_S1Hand.tif")], "bands": ["VV", "VH"], "units": "dB",
         "kind": "continuous"},
        {"name": "s2", "uris": [str(d / "Spain_7370579_S2Hand.tif")], "bands": [f"B{i}" for i in range(1, 14)],
         "units": "reflectance", "kind": "continuous", "nodata": 0},
        {"name": "water", "uris": [str(d / "Spain_7370579_LabelHand.tif")], "bands": ["water"], "units": "class",
         "kind": "categorical", "nodata": -1, "classes": {0: "dry", 1: "water"}},
    ])
    return tile(load_catalog(cat), tmp / "spain.zarr", TileOptions(shard_chips=16), show_progress=False), d, cat


def test_sen1floods11_spain_epsg4326_onto_utm(spain, gdalwarp, tmp_path):
    store, d, catalog = spain
    g = zarr.open_group(str(store), mode="r")
    assert g.attrs["crs"] == "EPSG:32630"  # the 'utm' zone of the AOI centroid (0.76 W, 38.1 N)
    # ~8.9 m pixels (geometric mean) onto 10 m: downsampling, so average / mode
    assert set(g["s1grd"].attrs["resampling"].values()) == {"average"}
    assert set(g["water"].attrs["resampling"].values()) == {"mode"}
    for name, src, nd in (("s1grd", "Spain_7370579_S1Hand.tif", "nan"), ("s2", "Spain_7370579_S2Hand.tif", 0),
                          ("water", "Spain_7370579_LabelHand.tif", -1)):
        n = compare_with_gdalwarp(store, name, [str(d / src)], tmp_path, catalog, src_nodata=nd)
        assert n > 200_000


def test_bigearthnet_s2_10_20_60m_bands_onto_10m(real_data, gdalwarp, tmp_path):
    d = real_data / "bigearthnet" / "S2A_MSIL2A_20170617T113321_36_85"
    bands = ["B02", "B05", "B01"]  # 10 m, 20 m, 60 m
    files = [str(d / f"S2A_MSIL2A_20170617T113321_36_85_{b}.tif") for b in bands]
    cat = write_catalog(tmp_path / "catalog.yaml", {"crs": 32629, "resolution": 10, "chip_size": 40}, [
        {"name": "s2", "uris": [files], "bands": bands, "units": "reflectance", "kind": "continuous", "nodata": 0},
    ])
    store = tile(load_catalog(cat), tmp_path / "ben.zarr", TileOptions(), show_progress=False)
    methods = {Path(k).name: v for k, v in zarr.open_group(str(store), mode="r")["s2"].attrs["resampling"].items()}
    assert [methods[Path(f).name] for f in files] == ["bilinear"] * 3  # same size and upsampling
    assert compare_with_gdalwarp(store, "s2", files, tmp_path, cat, src_nodata=0, band_files=True) == 3 * 120 * 120
    # the 10 m band lands on the same pixel grid: values are the source's, untouched
    import rasterio

    with rasterio.open(files[0]) as ds:
        b02 = ds.read(1)
        origin = ds.transform
    s2 = zarr.open_group(str(store), mode="r")["s2"]
    table = gpd.read_parquet(store / "chips.parquet")
    (x0, y0, x1, y1), rows, cols = chip_windows(table, 10)
    mosaic = np.zeros((int(round((y1 - y0) / 10)), int(round((x1 - x0) / 10))), dtype=s2.dtype)
    for i, r, c in zip(table["index"], rows, cols):
        mosaic[r:r + 40, c:c + 40] = s2[int(i), 0]
    r0, c0 = int(round((y1 - origin.f) / 10)), int(round((origin.c - x0) / 10))
    np.testing.assert_array_equal(mosaic[r0:r0 + 120, c0:c0 + 120], b02)


def test_corine_2006_onto_offset_2012_grid(real_data, gdalwarp, tmp_path):
    import rasterio

    d = real_data / "corine-lausanne"
    with rasterio.open(d / "ls100_12.tif") as ref12:
        t = ref12.transform
    cat = write_catalog(tmp_path / "catalog.yaml", {
        "crs": 2056, "resolution": t.a, "chip_size": 32, "origin": [t.c, t.f],
        "aoi": "intersection"}, [
        {"name": "clc2006", "uris": [str(d / "ls100_06.tif")], "bands": ["clc"], "units": "class",
         "kind": "categorical", "legend": "corine"},
    ])
    store = tile(load_catalog(cat), tmp_path / "clc.zarr", TileOptions(), show_progress=False)
    g = zarr.open_group(str(store), mode="r")
    assert set(g["clc2006"].attrs["resampling"].values()) == {"nearest"}  # 100.005 m onto 99.992 m
    table = gpd.read_parquet(store / "chips.parquet")
    # chips sit exactly on the 2012 raster's pixel grid
    steps = (table["minx"] - t.c) / t.a
    assert np.allclose(steps, np.round(steps), atol=1e-6)
    assert compare_with_gdalwarp(store, "clc2006", [str(d / "ls100_06.tif")], tmp_path, cat, src_nodata=255) > 50_000
    assert g["clc2006"].dtype == np.uint8 and g["clc2006"].attrs["nodata_in_store"] == 255
