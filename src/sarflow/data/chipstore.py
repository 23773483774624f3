"""The chip store and its reader (for every later stage and users' scripts): arrays, chip table,
attributes, on a local path or s3://.

One reader, one nodata rule: `read_masked` gives chips as float32 with NaN wherever the store
holds nodata (NaN in float arrays, the declared value in integer arrays) or, for a label with a
declared range, a value outside it. Every stage reads chips through it. The store says which
sources are inputs and which are labels (`input_modalities`, `label_sources`), as its catalog declared.

A source declared with `store_resolution` is stored at k times the grid's pixel size (array
attributes `store_factor` k and `store_resolution`; shape (chips, bands, chip/k, chip/k)); the
reader upsamples it to the chip grid by nearest (each stored pixel repeated k x k, its nodata
mask with it), so every stage sees chip-sized arrays with the stored values unchanged
(`chip_shape` gives the shape the reader returns).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import zarr

from sarflow.errors import InputError

CHIPS_TABLE = "chips.parquet"
log = logging.getLogger(__name__)


def open_chip_group(uri: str) -> zarr.Group:
    """The store's Zarr group, from a local path or s3:// (endpoint and keys from the AWS env). A
    store whose integrity record (`data.integrity`) names a missing or truncated file is refused."""
    from sarflow.data.integrity import check_store

    uri = str(uri)
    if uri.startswith("s3://"):
        from sarflow.data.storage import s3_storage_options

        group = _open_group(uri, s3_storage_options())
    else:
        check_local_store(uri)
        group = _open_group(uri)
    check_store(uri)
    return group


def _open_group(uri: str, storage_options: dict | None = None) -> zarr.Group:
    try:
        return zarr.open_group(uri, mode="r", zarr_format=3, storage_options=storage_options)
    except (ValueError, KeyError, TypeError) as e:  # a damaged zarr.json (JSON or schema)
        raise InputError(uri, f"the store's metadata cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                              f"`sarflow verify {uri}` checks the rest; rebuild or restore the store") from None


def check_local_store(path: str | Path) -> None:
    """Refuses a local path that is not a finished chip store, naming it and the fix: missing, a
    file, an unfinished build (a `.partial` beside it) or a folder without `zarr.json`."""
    path = Path(path)
    if (path / "zarr.json").is_file():
        return
    if path.with_name(path.name + ".partial").exists():
        raise InputError(str(path), "the store is unfinished (a .partial build exists): rerun `sarflow tile "
                                    f"CATALOG --out {path}` to resume it")
    if not path.exists():
        raise InputError(str(path), "no chip store here (the path does not exist): build one with "
                                    f"`sarflow tile CATALOG --out {path}`")
    raise InputError(str(path), "not a chip store (no zarr.json): give the folder `sarflow tile --out` wrote")


def read_chip_table(uri: str):
    import pandas as pd

    path = uri.rstrip("/") + "/" + CHIPS_TABLE
    if uri.startswith("s3://"):
        from sarflow.data.storage import read_bytes
        import io

        return pd.read_parquet(io.BytesIO(read_bytes(path)))
    if not Path(path).is_file():
        raise InputError(path, "the store's chip table is missing: rebuild or restore the store")
    return pd.read_parquet(path)


@dataclass(frozen=True)
class LabelSource:
    """A label source as its catalog declared it: categorical with classes, or continuous (units, range)."""

    name: str
    kind: str  # "categorical" | "continuous"
    units: str
    classes: tuple[dict, ...] = ()  # ({code, name, color}, ...) in code order
    range: tuple[float, float] | None = None
    legend: str | None = None

    @property
    def codes(self) -> list[int]:
        return [int(c["code"]) for c in self.classes]

    def class_name(self, code: int) -> str:
        return next((c["name"] for c in self.classes if int(c["code"]) == int(code)), str(code))


def _roles(group: zarr.Group, where: str) -> tuple[list[str], list[str]]:
    attrs = group.attrs
    if "inputs" not in attrs or "labels" not in attrs:
        raise InputError(where, "the store does not record which sources are inputs and labels (built by an older "
                                "sarflow): rerun `sarflow tile` on its catalog")
    return list(attrs["inputs"]), list(attrs["labels"])


def input_modalities(group: zarr.Group, chosen=None, where: str = "store") -> list[str]:
    """The input sources a model reads: every non-label source of the store, or `chosen` (checked)."""
    inputs, labels = _roles(group, where)
    if not chosen:
        if not inputs:
            raise InputError(where, f"the store has no input source (only labels {labels})")
        return inputs
    chosen = list(chosen)
    unknown = [m for m in chosen if m not in inputs]
    if unknown:
        why = "are labels" if all(m in labels for m in unknown) else "are not in the store"
        raise InputError(where, f"modalities {unknown} {why}: choose from the store's inputs {inputs}")
    return chosen


def continuous_inputs(group: zarr.Group, chosen=None, where: str = "store", reader: str = "the model") -> list[str]:
    """The input sources a model of continuous values reads: the chosen ones (a categorical one is
    refused), else the store's continuous inputs (categorical inputs are left out, with a log line)."""
    mods = input_modalities(group, chosen, where)
    categorical = [m for m in mods if group[m].attrs["kind"] != "continuous"]
    if chosen and categorical:
        raise InputError(where, f"modalities {categorical} are categorical: continuous inputs only for {reader}")
    if categorical:
        log.info("%s: categorical inputs %s are left out (continuous inputs only for %s)", where, categorical, reader)
    mods = [m for m in mods if m not in categorical]
    if not mods:
        raise InputError(where, f"the store's inputs {categorical} are all categorical: continuous inputs only for {reader}")
    return mods


def label_sources(group: zarr.Group, where: str = "store") -> list[LabelSource]:
    """The store's label sources with their declared classes or range, in catalog order."""
    _, labels = _roles(group, where)
    out = []
    for name in labels:
        a = group[name].attrs
        rng = a.get("range")
        out.append(LabelSource(name=name, kind=a["kind"], units=a["units"], classes=tuple(a.get("classes") or ()),
                               range=tuple(rng) if rng else None, legend=a.get("legend")))
    return out


def label_source(group: zarr.Group, name: str, where: str = "store") -> LabelSource:
    labels = label_sources(group, where)
    for lab in labels:
        if lab.name == name:
            return lab
    raise InputError(where, f"the store has no label source {name!r} (its labels: {[x.name for x in labels]})")


def masked(arr: zarr.Array, raw: np.ndarray) -> np.ndarray:
    """Raw values of `arr` as float32 with NaN at nodata (and, for a declared range, outside it)."""
    x = raw.astype(np.float32, copy=True)
    nodata = arr.attrs.get("nodata_in_store")
    if nodata not in (None, "NaN"):
        x[raw == nodata] = np.nan
    rng = arr.attrs.get("range")
    if rng:
        with np.errstate(invalid="ignore"):
            x[(x < rng[0]) | (x > rng[1])] = np.nan
    return x


def store_factor(arr) -> int:
    """k: the array holds its source at k times the grid's pixel size (1: full resolution)."""
    return int(arr.attrs.get("store_factor") or 1)


def chip_shape(arr: zarr.Array) -> tuple[int, ...]:
    """(chips, bands, H, W) as `read_masked` returns the array: chip-sized, whatever it is stored at."""
    k = store_factor(arr)
    n, b, h, w = arr.shape
    return (n, b, h * k, w * k)


def upsample(x: np.ndarray, k: int) -> np.ndarray:
    """(..., h, w) -> (..., h*k, w*k), nearest: each pixel repeated k x k (NaN with it)."""
    if k == 1:
        return x
    return np.repeat(np.repeat(x, k, axis=-2), k, axis=-1)


def read_masked(arr: zarr.Array, rows=slice(None), bands=None) -> np.ndarray:
    """Chips `rows` (a slice, sorted row indices, or one row) of a store array, (n, bands, H, W) float32 with NaN
    for nodata; `bands` picks band indices. The one reader of chips for every stage. An array stored coarser
    (`store_factor` k) is upsampled to the chip grid, nearest (`upsample`)."""
    if isinstance(rows, (int, np.integer)):
        return read_masked(arr, slice(int(rows), int(rows) + 1), bands)[0]
    if isinstance(rows, slice):
        raw = arr[rows]
    else:
        rows = np.asarray(rows, dtype=np.int64)
        raw = arr.oindex[rows.tolist()] if len(rows) else np.zeros((0,) + arr.shape[1:], arr.dtype)
    if bands is not None:
        raw = raw[:, list(bands)]
    return upsample(masked(arr, raw), store_factor(arr))


def iter_masked(arr: zarr.Array, n: int | None = None, bands=None):
    """(start, chips) over the first `n` rows of `arr` (default all), one shard at a time, masked."""
    n = arr.shape[0] if n is None else n
    step = int(arr.shards[0]) if arr.shards else int(arr.chunks[0])
    for start in range(0, n, step):
        yield start, read_masked(arr, slice(start, min(start + step, n)), bands)


@dataclass
class ChipStore:
    path: Path
    group: zarr.Group

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def modalities(self) -> list[str]:
        return list(self.attrs["modalities"])

    @property
    def n_chips(self) -> int:
        return int(self.attrs["chips"])

    @property
    def inputs(self) -> list[str]:
        return input_modalities(self.group, where=str(self.path))

    @property
    def labels(self) -> list[LabelSource]:
        return label_sources(self.group, where=str(self.path))

    def array(self, modality: str) -> zarr.Array:
        if modality not in self.modalities:
            raise InputError(str(self.path), f"the store has no modality {modality!r} (it has {self.modalities})")
        return self.group[modality]

    def read(self, modality: str, rows=slice(None)) -> np.ndarray:
        """Chips of a modality, masked (float32, NaN at nodata): `read_masked`."""
        return read_masked(self.array(modality), rows)

    @cached_property
    def chips(self):
        import geopandas as gpd

        path = self.path / CHIPS_TABLE
        if not path.is_file():
            raise InputError(str(path), "the store's chip table is missing: rebuild or restore the store")
        return gpd.read_parquet(path)

    def summary(self) -> dict:
        from sarflow.data.integrity import load_record

        splits = self.chips["split"].value_counts().to_dict()
        record = load_record(self.path)
        return {
            "path": str(self.path),
            "crs": self.attrs["crs"],
            "resolution": self.attrs["resolution"],
            "chip_size": self.attrs["chip_size"],
            "chips": self.n_chips,
            "splits": {k: int(v) for k, v in sorted(splits.items())},
            "catalog_hash": self.attrs["catalog_hash"],
            # the store opened, so every recorded file is present with its size (`sarflow verify --full`: hashes)
            "integrity": (f"recorded files present with their sizes ({len(record['files'])} files)" if record
                          else "no integrity record (`sarflow verify STORE --record` writes one)"),
            "modalities": {
                m: {k: self.group[m].attrs[k] for k in ("bands", "units", "kind")} | {"shape": list(self.group[m].shape)}
                | ({"store_resolution": self.group[m].attrs["store_resolution"]} if store_factor(self.group[m]) > 1 else {})
                for m in self.modalities
            },
        }


def open_store(path: str | Path) -> ChipStore:
    path = Path(path)
    group = open_chip_group(str(path))
    if "modalities" not in group.attrs:
        raise InputError(str(path), "a Zarr group but not a sarflow chip store (no 'modalities' attribute)")
    return ChipStore(path=path, group=group)


# --- chips on a map: the grid of one chip, the CF grid mapping, one chip as a georeferenced DataArray ---


def store_crs(attrs: dict):
    """The store's grid CRS (pyproj), from its `crs_wkt` (or `crs`) group attribute."""
    from pyproj import CRS

    return CRS.from_user_input(attrs.get("crs_wkt") or attrs["crs"])


def cf_grid_mapping(crs) -> dict:
    """CF grid-mapping attributes of `crs` as rioxarray's `rio.write_crs` writes them on the `spatial_ref`
    coordinate: pyproj's CF attributes plus `crs_wkt` and GDAL's `spatial_ref` (both GDAL's WKT, as rasterio
    writes it, which GDAL's netCDF/Zarr drivers and older readers parse)."""
    from pyproj import CRS
    from rasterio.crs import CRS as RioCRS

    wkt = RioCRS.from_user_input(crs.to_wkt() if isinstance(crs, CRS) else crs).to_wkt()
    attrs = CRS.from_wkt(wkt).to_cf()
    attrs["crs_wkt"] = wkt
    attrs["spatial_ref"] = wkt
    return attrs


def chip_record(chips, chip, where: str = "store"):
    """The row of the chip table for `chip`: a chip id (str) or a row index of the arrays (int)."""
    if isinstance(chip, (int, np.integer)) and not isinstance(chip, bool):
        hit = chips[chips["index"] == int(chip)]
        what = f"row {int(chip)}"
    else:
        hit = chips[chips["chip_id"] == str(chip)]
        what = f"chip id {str(chip)!r}"
    if len(hit) != 1:
        raise InputError(where, f"the chip table has no {what} (ids look like {chips['chip_id'].iloc[0]!r})"
                         if len(hit) == 0 else f"the chip table holds {what} {len(hit)} times")
    return hit.iloc[0]


def chip_transform(record, resolution: float):
    """Affine of a chip (north up): its top-left corner (minx, maxy) from the chip table, pixels of `resolution`."""
    from affine import Affine

    res = float(resolution)
    return Affine(res, 0.0, float(record["minx"]), 0.0, -res, float(record["maxy"]))


def open_chip_xarray(store, modality: str, chip):
    """One chip of `modality` as an xarray.DataArray (band, y, x), georeferenced the CF way, readable by rioxarray
    and odc-geo as it is.

    `store`: a ChipStore or its path; `chip`: a chip id or a row index. Values through `read_masked` (float32,
    NaN at nodata); `band` holds the band names; `x`/`y` are pixel centres in the grid CRS (from the chip table's
    minx/maxy and the store's resolution); a scalar `spatial_ref` coordinate carries the CRS (`crs_wkt`,
    `spatial_ref`, CF grid-mapping attributes, GDAL `GeoTransform`) and the array names it as its `grid_mapping`
    (in `encoding`, as rioxarray writes it). Attributes: modality, chip_id, units, kind, nodata."""
    import xarray as xr

    st = store if isinstance(store, ChipStore) else open_store(store)
    arr = st.array(modality)
    rec = chip_record(st.chips, chip, where=str(st.path))
    res = float(st.attrs["resolution"])
    data = read_masked(arr, int(rec["index"]))
    _, h, w = data.shape
    transform = chip_transform(rec, res)
    x = transform.c + (np.arange(w) + 0.5) * res
    y = transform.f - (np.arange(h) + 0.5) * res
    crs = store_crs(st.attrs)
    gm = cf_grid_mapping(crs)
    gm["GeoTransform"] = " ".join(repr(float(v)) for v in transform.to_gdal())
    bands = list(arr.attrs.get("bands") or range(data.shape[0]))
    da = xr.DataArray(
        data, dims=("band", "y", "x"),
        coords={"band": bands, "y": y, "x": x, "spatial_ref": xr.Variable((), 0, attrs=gm)},
        name=modality,
        # _FillValue: the masked value (NaN), as rioxarray's write_nodata(encoded=False) records it
        attrs={"modality": modality, "chip_id": str(rec["chip_id"]), "units": arr.attrs.get("units"),
               "kind": arr.attrs.get("kind"), "_FillValue": np.float32(np.nan)},
    )
    if crs.is_geographic:
        da.x.attrs.update(axis="X", standard_name="longitude", units="degrees_east")
        da.y.attrs.update(axis="Y", standard_name="latitude", units="degrees_north")
    else:
        unit = crs.axis_info[0].unit_name if crs.axis_info else "metre"
        da.x.attrs.update(axis="X", standard_name="projection_x_coordinate", units=unit)
        da.y.attrs.update(axis="Y", standard_name="projection_y_coordinate", units=unit)
    da.encoding["grid_mapping"] = "spatial_ref"
    return da


# --- the store read in place by xarray: the georeference arrays finalize writes beside the modalities ---

CHIP_DIM, Y_DIM, X_DIM = "chip", "y", "x"
GRID_MAPPING = "spatial_ref"  # scalar: the CRS as CF grid-mapping attributes (what rioxarray writes)
CHIP_X, CHIP_Y = "chip_x", "chip_y"  # (chip, x) / (chip, y) float64: each chip's pixel-centre coordinates
GEO_ARRAYS = (GRID_MAPPING, CHIP_X, CHIP_Y)  # never modalities: readers take modalities from the group's attributes
COORD_CHUNK_CHIPS = 256
COORD_WRITE_CHIPS = 64 * COORD_CHUNK_CHIPS  # coordinate rows computed and written at once


def coarse_dims(k: int) -> tuple[str, str]:
    """The (y, x) dimensions of an array stored at k times the pixel size: `y`/`x` at k = 1, else `y_k<k>`/`x_k<k>`
    (arrays of one k share them, with coordinates `chip_y_k<k>`/`chip_x_k<k>`)."""
    return (Y_DIM, X_DIM) if k == 1 else (f"{Y_DIM}_k{k}", f"{X_DIM}_k{k}")


def _coords_of(k: int) -> tuple[str, str]:
    """The (x, y) coordinate arrays of the dimensions `coarse_dims(k)`."""
    return (CHIP_X, CHIP_Y) if k == 1 else (f"{CHIP_X}_k{k}", f"{CHIP_Y}_k{k}")


def band_dim(modality: str) -> str:
    """The band dimension of a modality's array (modalities differ in their band count)."""
    return f"{modality}_band"


def check_source_names(names, where: str) -> None:
    """Refuses source names that would clash with the store's dimensions or georeference arrays in xarray
    (a variable named like a dimension must be that 1-D dimension)."""
    import re

    names = [str(n) for n in names]
    taken = set(GEO_ARRAYS) | {CHIP_DIM, Y_DIM, X_DIM} | {band_dim(n) for n in names}
    coarse = re.compile(r"^(chip_)?[xy]_k\d+$")  # a coarse array's dimensions and coordinates
    bad = sorted(n for n in names if n in taken or coarse.match(n))
    if bad:
        raise InputError(where, f"source name(s) {bad} are reserved in the chip store (its dimensions and "
                                f"georeference arrays: {sorted(set(GEO_ARRAYS) | {CHIP_DIM, Y_DIM, X_DIM})}, "
                                "'<source>_band', 'x_k<k>', 'y_k<k>', 'chip_x_k<k>', 'chip_y_k<k>'): rename the "
                                "source(s) in the catalog")


def _axis_attrs(crs, axis: str) -> dict:
    if crs.is_geographic:
        return ({"axis": "X", "standard_name": "longitude", "units": "degrees_east"} if axis == "x" else
                {"axis": "Y", "standard_name": "latitude", "units": "degrees_north"})
    unit = crs.axis_info[0].unit_name if crs.axis_info else "metre"
    return {"axis": axis.upper(), "standard_name": f"projection_{axis}_coordinate", "units": unit}


def write_georeference(root: zarr.Group, minx: np.ndarray, maxy: np.ndarray, crs, resolution: float, chip_size: int,
                       modalities) -> None:
    """Writes what xarray and rioxarray read from the store in place (finalize calls it before the integrity
    record, which covers these arrays too): a scalar `spatial_ref` with the CF grid mapping of `crs`, per-chip
    pixel-centre coordinates `chip_x` (chip, x) and `chip_y` (chip, y) from each chip's west and north edges
    (`minx`, `maxy`, in the arrays' row order), and on every modality array `grid_mapping` and `coordinates`
    attributes naming them. The modality arrays already carry `dimension_names` (chip, <modality>_band, y, x).
    Arrays stored at k times the pixel size have their own dimensions and coordinates (`coarse_dims`:
    `chip_x_k<k>` (chip, x_k<k>), `chip_y_k<k>`), their pixel centres. Written COORD_WRITE_CHIPS rows at a
    time: 10M chips of 448 px would be 36 GB of float64 per array at once."""
    n = len(minx)
    root.create_array(GRID_MAPPING, shape=(), dtype="int64", fill_value=0, dimension_names=(),
                      attributes=cf_grid_mapping(crs), overwrite=True)
    rows = max(1, min(n, COORD_CHUNK_CHIPS))
    held = {m: root[m] for m in modalities}  # one read of each array's metadata (a request each on S3)
    factors = {m: store_factor(a) for m, a in held.items()}
    for k in sorted(set(factors.values()) | {1}):
        res, size = float(resolution) * k, int(chip_size) // k
        centres = (np.arange(size, dtype=np.float64) + 0.5) * res
        x_name, y_name = _coords_of(k)
        arrays = {}
        for name, axis, dim in zip((x_name, y_name), (X_DIM, Y_DIM), coarse_dims(k)[::-1]):
            arrays[name] = root.create_array(name, shape=(n, size), chunks=(rows, size), dtype="float64",
                                             fill_value=np.nan, dimension_names=(CHIP_DIM, dim), overwrite=True,
                                             attributes={**_axis_attrs(crs, axis),
                                                         "long_name": f"pixel-centre {axis} of each chip",
                                                         "resolution": res})
        for lo in range(0, n, COORD_WRITE_CHIPS):
            hi = min(n, lo + COORD_WRITE_CHIPS)
            arrays[x_name][lo:hi] = np.asarray(minx[lo:hi], np.float64)[:, None] + centres[None, :]
            arrays[y_name][lo:hi] = np.asarray(maxy[lo:hi], np.float64)[:, None] - centres[None, :]
    for m in modalities:
        x, y = _coords_of(factors[m])
        held[m].update_attributes({"grid_mapping": GRID_MAPPING, "coordinates": f"{x} {y} {GRID_MAPPING}"})


def open_store_xarray(path):
    """The whole store as an xarray.Dataset, read in place (`xr.open_zarr`, consolidated metadata, lazy dask
    arrays): one variable per modality (chip, <modality>_band, y, x) with the store's raw values (nodata as
    stored: `nodata_in_store`), coordinates `chip_x` (chip, x), `chip_y` (chip, y) and `spatial_ref` (the CRS,
    CF grid mapping); a modality stored at k times the pixel size is there as stored, on its own dimensions
    (chip, <modality>_band, y_k<k>, x_k<k>) with coordinates `chip_x_k<k>`/`chip_y_k<k>` (its pixel centres).
    One chip, georeferenced, every modality on the chip grid: `chip(ds, i)`. Local paths and s3:// (keys from
    the AWS env)."""
    import xarray as xr

    uri = str(path)
    group = open_chip_group(uri)  # the integrity check and a one-line error for a missing or damaged store
    missing = [a for a in GEO_ARRAYS if a not in group]
    if missing:
        raise InputError(uri, f"the store has no georeference arrays {missing} (built by an older sarflow): "
                              "rerun `sarflow tile` on its catalog")
    opts = {}
    if uri.startswith("s3://"):
        from sarflow.data.storage import s3_storage_options

        opts["storage_options"] = s3_storage_options()
    ds = xr.open_zarr(uri, zarr_format=3, consolidated=True, mask_and_scale=False, decode_coords="all", **opts)
    return ds[list(group.attrs["modalities"])]  # the modalities with their coordinates, nothing else


def chip(ds, i: int, masked: bool = True):
    """Chip `i` (a row of the arrays) of `open_store_xarray`'s Dataset, georeferenced: dims (band, y, x) per
    modality with `x`/`y` the chip's pixel centres as dimension coordinates, band names on `<modality>_band`,
    and the `spatial_ref` grid mapping, so rioxarray's `rio.crs` / `rio.transform()` and odc-geo read the chip's
    grid. The one documented call behind it: ``ds.isel(chip=i).assign_coords(x=..chip_x.., y=..chip_y..)``.
    With `masked` (default) values follow the store's one nodata rule (`read_masked`: float32, NaN at nodata and
    outside a declared range); otherwise the raw values. A modality stored coarser is upsampled to the chip grid
    as `read_masked` does (nearest), so every modality of the chip shares `x`/`y`."""
    import xarray as xr

    n = int(ds.sizes[CHIP_DIM])
    if not 0 <= int(i) < n:
        raise InputError("chip", f"row {i} is not in the store (rows 0..{n - 1})")
    one = ds.isel({CHIP_DIM: int(i)})
    one = one.assign_coords({X_DIM: (X_DIM, one[CHIP_X].values, dict(one[CHIP_X].attrs)),
                             Y_DIM: (Y_DIM, one[CHIP_Y].values, dict(one[CHIP_Y].attrs))})
    one = one.drop_vars([c for c in one.coords
                         if c in (CHIP_X, CHIP_Y) or str(c).startswith((f"{CHIP_X}_k", f"{CHIP_Y}_k"))])
    out = {}
    for name, var in one.data_vars.items():
        bands = list(var.attrs.get("bands") or range(var.shape[0]))
        k = store_factor(var)
        values = np.asarray(var.values)
        values = upsample(_masked_attrs(var.attrs, values) if masked else values, k)
        v = (xr.DataArray(values, dims=(var.dims[0], Y_DIM, X_DIM), attrs=dict(var.attrs)) if k > 1
             else var.copy(data=values))
        v = v.assign_coords({var.dims[0]: bands})
        v.encoding["grid_mapping"] = GRID_MAPPING
        out[name] = v
    return one.drop_vars(list(out)).assign(out)


def _masked_attrs(attrs: dict, raw: np.ndarray) -> np.ndarray:
    """`masked` on values whose array attributes are `attrs` (nodata_in_store, range)."""
    from types import SimpleNamespace

    return masked(SimpleNamespace(attrs=attrs), raw)
