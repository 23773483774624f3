"""Chips of a store as Cloud-Optimized GeoTIFFs that GDAL, QGIS and rasterio open in place: one file per chip,
or one mosaic of many chips on the store's grid.

Values come through the store's one nodata rule (`chipstore.masked`, the rule of `read_masked`): float arrays
are written as float32 with NaN at nodata; integer arrays (labels) keep their dtype, with the declared nodata
value wherever the rule masks a pixel. Every file is written under a temporary name in the output folder and
renamed when complete, so an interrupted export leaves no half-written GeoTIFF under a final name.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sarflow.data.chipstore import (ChipStore, chip_record, chip_shape, chip_transform, masked, open_store, store_crs,
                                    store_factor, upsample)
from sarflow.errors import InputError

log = logging.getLogger(__name__)

READ_BATCH = 64  # chips read from the store at a time


@dataclass(frozen=True)
class _Encoding:
    """How one modality is written: dtype, nodata, band names, overview resampling."""

    dtype: str
    nodata: float | int
    as_int: bool
    bands: list[str]
    units: str | None
    kind: str | None
    resampling: str


def _encoding(st: ChipStore, modality: str) -> _Encoding:
    arr = st.array(modality)
    dt = np.dtype(arr.dtype)
    nodata = arr.attrs.get("nodata_in_store")
    kind = arr.attrs.get("kind")
    bands = [str(b) for b in (arr.attrs.get("bands") or range(arr.shape[1]))]
    resampling = "NEAREST" if kind == "categorical" else "AVERAGE"
    if dt.kind in "iub" and nodata not in (None, "NaN"):
        return _Encoding(dt.name, dt.type(nodata).item(), True, bands, arr.attrs.get("units"), kind, resampling)
    # floats, and integers without a declared nodata (the rule may still mask them, by range): float32 + NaN
    return _Encoding("float32", float("nan"), False, bands, arr.attrs.get("units"), kind, resampling)


def _encode(arr, raw: np.ndarray, enc: _Encoding) -> tuple[np.ndarray, np.ndarray]:
    """Raw store values -> (values to write, valid mask): the masked values, nodata where the rule masks a pixel."""
    m = masked(arr, raw)
    valid = ~np.isnan(m)
    if not enc.as_int:
        return m, valid
    out = raw.astype(enc.dtype, copy=True)
    out[~valid] = enc.nodata
    return out, valid


def _read(arr, rows: list[int]) -> dict[int, np.ndarray]:
    """Raw chips of `rows` (any order, repeats allowed), read in sorted batches, on the chip grid (an array
    stored coarser is upsampled as `read_masked` does: `chipstore.upsample`)."""
    got: dict[int, np.ndarray] = {}
    uniq = sorted(set(rows))
    for i in range(0, len(uniq), READ_BATCH):
        batch = uniq[i:i + READ_BATCH]
        raw = upsample(arr.oindex[batch], store_factor(arr))
        got.update({r: raw[k] for k, r in enumerate(batch)})
    return got


def select_chips(st: ChipStore, chips=None, split: str | None = None, all_chips: bool = False):
    """Rows of the chip table to export, in the order given (chip ids), or in table order (a split, all)."""
    table = st.chips
    where = str(st.path)
    chosen = [chips is not None and len(chips) > 0, split is not None, bool(all_chips)]
    if sum(chosen) != 1:
        raise InputError(where, "choose exactly one of: chip ids, a split, all chips")
    if chosen[0]:
        return table.loc[[chip_record(table, c, where).name for c in chips]]
    if split is not None:
        sel = table[table["split"] == split]
        if sel.empty:
            raise InputError(where, f"no chips in split {split!r} (splits: {sorted(table['split'].unique())})")
        return sel
    return table


def _profile(enc: _Encoding, width: int, height: int, count: int, transform, crs_wkt: str) -> dict:
    return {"driver": "GTiff", "dtype": enc.dtype, "width": width, "height": height, "count": count,
            "crs": crs_wkt, "transform": transform, "nodata": enc.nodata,
            "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate"}


def _colormap(st: ChipStore, modality: str, enc: _Encoding) -> dict | None:
    """A palette for a one-band uint8/uint16 categorical label with class colours (QGIS shows it as classes)."""
    classes = st.array(modality).attrs.get("classes") or []
    if not (enc.as_int and enc.dtype in ("uint8", "uint16") and len(enc.bands) == 1 and classes):
        return None
    return _palette(classes)


def _write_cog(path: Path, fill, enc: _Encoding, tags: dict, profile: dict, colormap: dict | None) -> Path:
    """Build a tiled GTiff beside `path` with `fill(dataset)`, copy it as a COG under a temporary name, rename."""
    import rasterio
    from rasterio.shutil import copy as rio_copy

    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.with_name(f".{path.name}.{os.getpid()}.build.tif")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.tif")
    try:
        with rasterio.open(stage, "w+", **profile) as dst:
            if colormap:  # before any pixel: libtiff cannot change the photometric tag once writing started
                dst.write_colormap(1, colormap)
            dst.descriptions = tuple(enc.bands)
            if enc.units:
                dst.units = tuple([str(enc.units)] * len(enc.bands))
            dst.update_tags(**{k: str(v) for k, v in tags.items() if v is not None})
            fill(dst)
        rio_copy(stage, tmp, driver="COG", compress="DEFLATE", predictor="YES",
                 overview_resampling=enc.resampling, blocksize=256)
        os.replace(tmp, path)
    finally:
        for p in (stage, tmp):
            if p.exists():
                p.unlink()
    return path


def export_chips(store, modality: str, out_dir, chips=None, split: str | None = None, all_chips: bool = False,
                 mosaic: bool = False) -> list[Path]:
    """Export chips of `modality` as COGs under `out_dir`: one `<modality>_<chip_id>.tif` per chip, or with
    `mosaic` one `<modality>_mosaic.tif` covering the selected chips on the store's grid (chips placed by their
    bounds; where chips overlap, a later chip's valid pixels win; pixels no chip covers are nodata).

    Choose the chips by `chips` (ids or row indices), `split`, or `all_chips`. Returns the files written."""
    st = store if isinstance(store, ChipStore) else open_store(store)
    where = str(st.path)
    arr = st.array(modality)
    sel = select_chips(st, chips, split, all_chips)
    enc = _encoding(st, modality)
    res = float(st.attrs["resolution"])
    crs_wkt = _crs_wkt(st)
    cmap = _colormap(st, modality, enc)
    out_dir = Path(out_dir)
    count, h, w = (int(s) for s in chip_shape(arr)[1:])
    base_tags = {"sarflow_store": where, "sarflow_modality": modality, "units": enc.units, "kind": enc.kind,
                 "catalog_hash": st.attrs.get("catalog_hash")}
    rows = [int(r) for r in sel["index"]]
    if mosaic:
        return [_mosaic(st, arr, sel, rows, enc, res, crs_wkt, cmap, out_dir / f"{modality}_mosaic.tif", base_tags)]
    written = []
    for start in range(0, len(rows), READ_BATCH):
        part = sel.iloc[start:start + READ_BATCH]
        raws = _read(arr, rows[start:start + READ_BATCH])
        for _, rec in part.iterrows():
            data, _ = _encode(arr, raws[int(rec["index"])], enc)
            profile = _profile(enc, w, h, count, chip_transform(rec, res), crs_wkt)
            path = out_dir / f"{modality}_{rec['chip_id']}.tif"
            written.append(_write_cog(path, lambda dst, d=data: dst.write(d), enc,
                                      base_tags | {"chip_id": rec["chip_id"], "split": rec.get("split")},
                                      profile, cmap))
    log.info("%s: %d chip(s) of %s exported to %s", where, len(written), modality, out_dir)
    return written


def _mosaic(st, arr, sel, rows, enc, res, crs_wkt, cmap, path, tags) -> Path:
    def chips():
        for start in range(0, len(rows), READ_BATCH):
            part = sel.iloc[start:start + READ_BATCH]
            raws = _read(arr, rows[start:start + READ_BATCH])
            for _, rec in part.iterrows():
                yield (rec, *_encode(arr, raws[int(rec["index"])], enc))

    count, h, w = (int(s) for s in chip_shape(arr)[1:])
    out = _write_mosaic(path, sel, chips, (count, h, w), enc, res, crs_wkt, cmap, tags | {"chips": len(rows)})
    log.info("%s: mosaic of %d chip(s) of %s written to %s", tags["sarflow_store"], len(rows), tags["sarflow_modality"], out)
    return out


def _write_mosaic(path, sel, chips, shape, enc, res, crs_wkt, cmap, tags) -> Path:
    """A COG covering the chips of `sel` (their bounds) on the store's grid; `chips()` yields (record, values,
    valid) per chip, placed by the record's minx/maxy; a later chip's valid pixels win; uncovered pixels are nodata."""
    from affine import Affine
    from rasterio.windows import Window

    count, h, w = shape
    minx, maxy = float(sel["minx"].min()), float(sel["maxy"].max())
    width = int(round((float(sel["maxx"].max()) - minx) / res))
    height = int(round((maxy - float(sel["miny"].min())) / res))
    profile = _profile(enc, width, height, count, Affine(res, 0.0, minx, 0.0, -res, maxy), crs_wkt)

    def fill(dst):
        blank = np.full((count, 256, 256), enc.nodata, dtype=enc.dtype)
        for r0 in range(0, height, 256):  # every pixel starts as nodata
            for c0 in range(0, width, 256):
                win = Window(c0, r0, min(256, width - c0), min(256, height - r0))
                dst.write(blank[:, :win.height, :win.width], window=win)
        for rec, data, valid in chips():
            col = int(round((float(rec["minx"]) - minx) / res))
            row = int(round((maxy - float(rec["maxy"])) / res))
            win = Window(col, row, w, h)
            if valid.all():
                dst.write(data, window=win)
            elif valid.any():  # a later chip's valid pixels win; its nodata leaves what is there
                dst.write(np.where(valid, data, dst.read(window=win)), window=win)

    return _write_cog(path, fill, enc, tags, profile, cmap)


def _palette(classes) -> dict | None:
    """{code: (r, g, b, 255)} of declared classes with a '#rrggbb' colour (QGIS shows the raster as classes)."""
    cmap = {}
    for c in classes or ():
        colour = str(c.get("color") or "")
        if len(colour) == 7 and colour.startswith("#"):
            cmap[int(c["code"])] = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) + (255,)
    return cmap or None


def _chip_records(st: ChipStore, chip_ids, where) -> tuple[list[str], object]:
    """The chip table's rows of `chip_ids` (in that order); an id not in the table is refused."""
    table = st.chips.set_index("chip_id")
    ids = [str(c) for c in chip_ids]
    missing = [c for c in ids if c not in table.index]
    if missing:
        raise InputError(str(st.path), f"{len(missing)} chip id(s) are not in the store's chip table (first: {missing[0]})")
    return ids, table.loc[ids]


def _crs_wkt(st: ChipStore) -> str:
    from rasterio.crs import CRS

    return CRS.from_user_input(store_crs(st.attrs).to_wkt()).to_wkt()


def export_chip_pixels(store, chip_ids, values: np.ndarray, band_names: list[str], path, nodata, tags: dict | None = None,
                       classes: list[dict] | None = None, units: str | None = None) -> Path:
    """Per-pixel values of chips (a model's per-pixel predictions: class codes of a segmentation) as one COG mosaic on
    the store's grid at the store's resolution: `values` (chips, bands, H, W) or (chips, H, W) of the chip ids
    `chip_ids`, each placed by its bounds (overlaps: a later chip's valid pixels win); `nodata` marks pixels without
    a value and fills the pixels no chip covers. Integer values keep their dtype; with `classes` ({code, name,
    color}) they are categorical, with the classes' palette and names in the tags (overviews: nearest). Floats are
    written as float32 with NaN as nodata."""
    st = store if isinstance(store, ChipStore) else open_store(store)
    values = np.asarray(values)
    values = values[:, None] if values.ndim == 3 else values
    size = int(st.attrs["chip_size"])
    ids, recs = _chip_records(st, chip_ids, path)
    if values.ndim != 4 or len(ids) != len(values) or values.shape[1] != len(band_names) \
            or values.shape[2:] != (size, size):
        raise InputError(str(path), f"{len(ids)} chips of {size}x{size} px, values of shape {values.shape} and "
                                    f"{len(band_names)} band names do not match")
    as_int = values.dtype.kind in "iub"
    if not as_int:
        values, nodata = values.astype(np.float32), float("nan")
    elif not np.can_cast(np.min_scalar_type(nodata), values.dtype):
        raise InputError(str(path), f"nodata {nodata} does not fit the values' dtype {values.dtype}")
    categorical = classes is not None
    enc = _Encoding(dtype=np.dtype(values.dtype).name, nodata=values.dtype.type(nodata).item(), as_int=as_int,
                    bands=list(band_names), units=units, kind="categorical" if categorical else "continuous",
                    resampling="NEAREST" if categorical or as_int else "AVERAGE")

    # a palette where GeoTIFF takes one: a single uint8/uint16 band
    cmap = _palette(classes) if categorical and enc.dtype in ("uint8", "uint16") and len(band_names) == 1 else None

    def chips():
        for k, (_, rec) in enumerate(recs.iterrows()):
            v = values[k]
            yield rec, v, (v != enc.nodata) if as_int else ~np.isnan(v)

    tags = {"sarflow_store": str(st.path), "catalog_hash": st.attrs.get("catalog_hash"), "chips": len(ids),
            **(tags or {})}
    if categorical:
        tags["classes"] = "; ".join(f"{c['code']}={c.get('name', c['code'])}" for c in classes)
    out = _write_mosaic(Path(path), recs, chips, values.shape[1:], enc, float(st.attrs["resolution"]), _crs_wkt(st),
                        cmap, tags)
    log.info("%s: per-pixel values of %d chip(s) written to %s", st.path, len(ids), out)
    return out


def export_chip_values(store, chip_ids, values: np.ndarray, band_names: list[str], path, tags: dict | None = None,
                       classes: list[dict] | None = None) -> Path:
    """One value per chip and band (a model's per-chip predictions: class proportions, a majority
    class) as a COG at chip resolution: each pixel is one chip's cell of the store's grid (the
    chip stride, `chip_size - overlap` pixels a side), placed by the chip's bounds; cells without
    a chip are nodata. With `classes` ({code, name, color}), `values` are class codes written as
    uint16 with the classes' palette; otherwise float32 with NaN as nodata."""
    from affine import Affine

    st = store if isinstance(store, ChipStore) else open_store(store)
    values = np.asarray(values)
    values = values[:, None] if values.ndim == 1 else values
    ids, recs = _chip_records(st, chip_ids, path)
    if len(ids) != len(values) or values.shape[1] != len(band_names):
        raise InputError(str(path), f"{len(ids)} chips, {values.shape} values and {len(band_names)} band names do not match")
    res = float(st.attrs["resolution"])
    cell = (int(st.attrs["chip_size"]) - int(st.attrs.get("overlap", 0))) * res
    minx, maxy = float(recs["minx"].min()), float(recs["maxy"].max())
    cols = np.round((recs["minx"].to_numpy(float) - minx) / cell).astype(int)
    rows = np.round((maxy - recs["maxy"].to_numpy(float)) / cell).astype(int)
    width, height = int(cols.max()) + 1, int(rows.max()) + 1
    categorical = classes is not None
    enc = _Encoding(dtype="uint16" if categorical else "float32", nodata=65535 if categorical else float("nan"),
                    as_int=categorical, bands=list(band_names), units=None,
                    kind="categorical" if categorical else "continuous",
                    resampling="nearest" if categorical else "average")
    grid = np.full((len(band_names), height, width), enc.nodata, dtype=enc.dtype)
    grid[:, rows, cols] = values.T.astype(enc.dtype)
    crs_wkt = _crs_wkt(st)
    profile = _profile(enc, width, height, len(band_names), Affine(cell, 0.0, minx, 0.0, -cell, maxy), crs_wkt)
    cmap = None
    if categorical:
        cmap = _palette(classes)
        tags = {**(tags or {}), "classes": "; ".join(f"{c['code']}={c.get('name', c['code'])}" for c in classes)}
    out = _write_cog(Path(path), lambda dst: dst.write(grid), enc,
                     {"sarflow_store": str(st.path), "catalog_hash": st.attrs.get("catalog_hash"), "chips": len(ids),
                      **(tags or {})}, profile, cmap)
    log.info("%s: %d chip value(s) written to %s", st.path, len(ids), out)
    return out
