"""Ingest: resolve every catalog source to readable rasters, validate them before any work,
build the grid and AOI, and record provenance in a manifest.

Rasters in radar geometry (no CRS, only GCPs, like raw Sentinel-1 GRD) are refused with a
message saying how to prepare them: a polynomial through a few hundred GCPs is no terrain
correction, and raw DN are not calibrated backscatter, so silently "geocoding" them would put
wrong numbers in an ML-ready store. A raster with neither a CRS nor GCPs is refused too.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from pyproj import CRS
from rasterio.errors import RasterioError

from sarflow.data.catalog import LoadedCatalog, SourceSpec
from sarflow.errors import InputError
from sarflow.data.grid import ChipGrid, parse_crs, transform_geometry, utm_epsg, utm_zone
from sarflow.data.storage import file_stamp, gdal_path, is_s3, listed_s3_stamps, read_bytes, s3_settings, sha256_of

log = logging.getLogger("sarflow.data.ingest")

WGS84 = CRS.from_epsg(4326)
_VALIDITY_SAMPLE = 32  # blocks read per file to find a valid pixel before any full scan


@dataclass
class RasterFile:
    """One input file and what we learned from it."""

    uri: str
    path: str  # what GDAL opens
    crs: str  # WKT
    width: int
    height: int
    count: int
    dtype: str
    nodata: float | None
    resolution: tuple[float, float]  # in source CRS units
    bounds_wgs84: tuple[float, float, float, float]
    size: int
    sha256: str = ""
    stamp: str = ""  # storage.file_stamp: what a recorded checksum of this file is valid for (not in the manifest)
    footprint: shapely.Geometry | None = field(default=None, repr=False)  # WGS84


@dataclass
class Source:
    """A catalog source resolved to files: `items` are mosaicked in order; an item lists, per
    file, which output bands it fills (a multi-band file fills all, a single-band file one)."""

    spec: SourceSpec
    items: list[list[tuple[str, list[int]]]]  # [(uri, [output band indexes 0-based]), ...]
    files: dict[str, RasterFile]
    nodata: float | None  # effective input nodata
    dtype: str  # dtype in the store

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fill_value(self) -> float:
        return float("nan") if np.issubdtype(np.dtype(self.dtype), np.floating) else self.nodata

    def footprint(self) -> shapely.Geometry:
        return shapely.union_all([f.footprint for f in self.files.values()])


@dataclass
class Ingested:
    catalog: LoadedCatalog
    sources: list[Source]
    grid: ChipGrid

    def manifest(self) -> dict:
        return {
            "catalog": self.catalog.path.name,
            "catalog_hash": self.catalog.catalog.hash(),
            "grid": {
                "crs": self.grid.crs.to_string(),
                "resolution": self.grid.resolution,
                "chip_size": self.grid.chip_size,
                "overlap": self.grid.overlap,
                "origin": list(self.grid.origin),
                "aoi_bounds": list(self.grid.aoi.bounds),
            },
            "sources": [
                {
                    "name": s.name,
                    "date": s.spec.date.isoformat() if s.spec.date else None,
                    "files": [
                        {**{k: v for k, v in asdict(f).items() if k not in ("footprint", "path", "stamp")},
                         "uri": self.catalog.relative(f.uri)}
                        for f in s.files.values()
                    ],
                }
                for s in self.sources
            ],
        }


# GDAL's block cache while the inputs are read. Its default, 5% of the machine's RAM (not a pod's memory
# limit: 6.4 GB on a 128 GB node), would dominate the peak memory. rasterio hands GDAL_CACHEMAX to GDAL's
# cache setter as bytes: a bare 64 is 64 bytes, no cache at all (every source tile decoded again for each
# window that touches it).
GDAL_CACHE_BYTES = 64 << 20


def gdal_env(uris, **options) -> rasterio.Env:
    """A rasterio environment for reading the inputs (what s3:// inputs need when there are any), with
    GDAL's block cache capped at `GDAL_CACHE_BYTES` for the whole process. The cap is set, not given to
    the Env: a rasterio Env sets GDAL's one process-wide cache limit on entry and restores the old one
    on exit, so threads entering and leaving their own Envs out of order would undo each other's cap."""
    from rasterio.env import get_gdal_config, set_gdal_config

    if get_gdal_config("GDAL_CACHEMAX") != GDAL_CACHE_BYTES:
        set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_BYTES)
    opts = s3_settings().gdal_options() if any(is_s3(u) for u in uris) else {}
    return rasterio.Env(**opts, **options)


def _stac_items(loaded: LoadedCatalog, spec: SourceSpec) -> list[list[str]]:
    """Each STAC item becomes one mosaic item: its assets' hrefs in band order."""
    import pystac  # here, not at the top: a unit runner, which never reads STAC items, does not pay its import

    out = []
    for item_uri in spec.stac.items:
        loc = loaded.resolve(item_uri)
        try:
            item = pystac.Item.from_dict(json.loads(read_bytes(loc)))
        except InputError:
            raise
        except FileNotFoundError:
            raise InputError(loc, "STAC item file does not exist") from None
        except Exception as e:  # noqa: BLE001
            raise InputError(loc, f"not a valid STAC item: {e}") from None
        hrefs = []
        for key in spec.stac.assets:
            if key not in item.assets:
                raise InputError(loc, f"STAC item has no asset {key!r} (it has {sorted(item.assets)})")
            href = item.assets[key].href
            if "://" not in href and not href.startswith("/"):
                href = loc.rsplit("/", 1)[0] + "/" + href if is_s3(loc) else str((Path(loc).parent / href).resolve())
            hrefs.append(href)
        out.append(hrefs if len(hrefs) > 1 else hrefs[0])
    return out


def _items(loaded: LoadedCatalog, spec: SourceSpec) -> list[list[tuple[str, list[int]]]]:
    raw = spec.uris if spec.uris is not None else _stac_items(loaded, spec)
    items = []
    for entry in raw:
        if isinstance(entry, list):
            if len(entry) != len(spec.bands):
                raise InputError(
                    str(loaded.path), f"source {spec.name!r}: {len(entry)} stacked files for {len(spec.bands)} bands"
                )
            items.append([(loaded.resolve(u), [b]) for b, u in enumerate(entry)])
        else:
            items.append([(loaded.resolve(entry), list(range(len(spec.bands))))])
    return items


def catalog_files(loaded: LoadedCatalog) -> list[str]:
    """Every input file of the catalog (STAC items resolved to their assets), sorted, without opening one."""
    return sorted({uri for spec in loaded.catalog.sources for item in _items(loaded, spec) for uri, _ in item})


def input_stamp(uri: str) -> tuple[int, str]:
    """An input file's size and stamp (`storage.file_stamp`); a file that is not there, a folder or one
    that cannot be read is an InputError naming it."""
    if not is_s3(uri):
        if Path(uri).is_dir():
            raise InputError(uri, "is a directory, not a raster file")
        if not Path(uri).is_file():
            raise InputError(uri, "file does not exist")
    try:
        return file_stamp(uri)
    except OSError as e:
        raise InputError(uri, f"cannot be read ({e.strerror or e})") from None


def input_stamps(uris: list[str]) -> dict[str, tuple[int, str]]:
    """Every input file's size and stamp (`input_stamp`) without reading one: local files stat'ed, S3
    objects from their folders' listings (`storage.listed_s3_stamps`), asked for alone where a listing
    does not show them; a missing or unreadable file is an InputError naming it."""
    listed = listed_s3_stamps([u for u in uris if is_s3(u)])
    return {u: listed[u] if u in listed else input_stamp(u) for u in uris}


def input_sizes(uris: list[str]) -> dict[str, int]:
    """Every input file's size in bytes (`input_stamps`)."""
    return {uri: size for uri, (size, _) in input_stamps(uris).items()}


def inspect_file(uri: str, expected_bands: int, spec: SourceSpec) -> RasterFile:
    """Opens and validates one raster; errors name the file and the cause."""
    size, stamp = input_stamp(uri)
    try:
        ds_ctx = rasterio.open(gdal_path(uri))
    except RasterioError as e:
        raise InputError(uri, f"not a readable raster ({e})") from None
    with ds_ctx as ds:
        gcps, gcp_crs = ds.gcps
        if ds.crs is None or ds.transform.is_identity:
            if gcps:
                raise InputError(uri, (
                    f"raster is in radar geometry ({len(gcps)} GCPs, no CRS): sarflow needs geocoded, calibrated "
                    "data. Calibrate and terrain-correct it first (e.g. ESA SNAP: Calibration + Range-Doppler "
                    "Terrain Correction to sigma0 dB), or at least geocode it: gdalwarp -order 2 -t_srs EPSG:4326 "
                    "IN OUT.tif"))
            raise InputError(uri, "raster has neither a CRS with a geotransform nor GCPs: it cannot be placed on the grid")
        crs, res = ds.crs, (abs(ds.transform.a), abs(ds.transform.e))
        corners = shapely.box(*ds.bounds)
        if ds.count != expected_bands:
            raise InputError(uri, f"has {ds.count} band(s) but source {spec.name!r} declares {expected_bands}")
        dtype = np.dtype(ds.dtypes[0])
        if dtype.kind == "c":
            raise InputError(uri, f"complex data ({dtype}) is not supported: give amplitude/intensity or phase")
        if spec.kind == "categorical" and dtype.kind == "f":
            raise InputError(uri, f"categorical source {spec.name!r} stored as {dtype}: class codes must be integers")
        nodata = spec.nodata if spec.nodata is not None else ds.nodata
        _check_has_valid_pixels(uri, ds, nodata)
        footprint = transform_geometry(corners, CRS.from_user_input(crs), WGS84)
    return RasterFile(
        uri=uri,
        path=gdal_path(uri),
        crs=crs.to_wkt(),
        width=ds.width,
        height=ds.height,
        count=ds.count,
        dtype=str(dtype),
        nodata=None if nodata is None else float(nodata),
        resolution=(float(res[0]), float(res[1])),
        bounds_wgs84=tuple(float(v) for v in footprint.bounds),
        size=int(size),
        stamp=stamp,
        sha256="",  # checksum_files: every file of the catalog hashed in parallel, once all are valid
        footprint=footprint,
    )


def valid_mask(data: np.ndarray, nodata: float | None) -> np.ndarray:
    """True where a pixel holds data: not NaN and not the nodata value (all bands for a stack)."""
    by_value = nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata))
    if not np.issubdtype(data.dtype, np.floating):
        return data != nodata if by_value else np.ones(data.shape, bool)
    valid = ~np.isnan(data)
    if by_value:
        valid &= data != nodata
    return valid


def _check_has_valid_pixels(uri: str, ds, nodata) -> None:
    """Reads a spread of blocks (always the first and the last, which catches truncated files)
    until one holds a valid pixel; only a source that looks empty gets a full scan before it is
    refused. Whole-file decimated reads would decompress everything (slow, and GDAL's cache
    would hold it)."""
    windows = [w for _, w in ds.block_windows(1)]
    step = max(1, len(windows) // _VALIDITY_SAMPLE)
    sample = sorted(set(range(0, len(windows), step)) | {len(windows) - 1})
    try:
        for i in sample:
            if valid_mask(ds.read(window=windows[i]), nodata).any():
                return
        for w in windows:
            if valid_mask(ds.read(window=w), nodata).any():
                return
    except RasterioError as e:
        raise InputError(uri, f"cannot read pixels, the file is truncated or corrupt ({e})") from None
    raise InputError(uri, f"holds no valid pixel (every value is NaN or nodata={nodata})")


def resolve_source(loaded: LoadedCatalog, spec: SourceSpec) -> Source:
    items = _items(loaded, spec)
    files: dict[str, RasterFile] = {}
    for item in items:
        for uri, bands in item:
            if uri not in files:
                files[uri] = inspect_file(uri, len(bands), spec)
    dtypes = {np.dtype(f.dtype) for f in files.values()}
    if all(d.kind == "f" for d in dtypes):
        dtype = "float32"
    elif any(d.kind == "f" for d in dtypes):
        raise InputError(str(loaded.path), f"source {spec.name!r} mixes integer and float files")
    else:
        dtype = str(np.result_type(*dtypes))
    nodatas = {f.nodata for f in files.values()}
    nodata = spec.nodata if spec.nodata is not None else (nodatas.pop() if len(nodatas) == 1 else None)
    if np.dtype(dtype).kind != "f" and nodata is None:
        first = next(iter(files))
        raise InputError(first, f"integer source {spec.name!r} has no nodata value: declare 'nodata' in the catalog")
    return Source(spec=spec, items=items, files=files, nodata=nodata, dtype=dtype)


def _aoi_wgs84(loaded: LoadedCatalog, sources: list[Source]) -> shapely.Geometry:
    aoi = loaded.catalog.grid.aoi
    if isinstance(aoi, list):
        return shapely.box(*aoi)
    if aoi in ("intersection", "union"):
        feet = [s.footprint() for s in sources if s.spec.required] or [s.footprint() for s in sources]
        geom = shapely.intersection_all(feet) if aoi == "intersection" else shapely.union_all(feet)
        if geom.is_empty:
            raise InputError(str(loaded.path), "the sources do not overlap: their intersection (the AOI) is empty")
        return geom
    import geopandas as gpd

    path = loaded.resolve(aoi)
    try:
        gdf = gpd.read_file(path)
    except Exception as e:  # noqa: BLE001
        raise InputError(path, f"cannot read the AOI file: {e}") from None
    if gdf.empty:
        raise InputError(path, "the AOI file has no features")
    if gdf.crs is None:
        raise InputError(path, "the AOI file has no CRS (a .prj, or a GeoPackage/GeoJSON with one); cannot place it "
                               "on the map")
    return shapely.union_all(gdf.to_crs(4326).geometry.values)


def _aoi_crs_hint(loaded: LoadedCatalog, sources: list[Source]) -> str:
    """Which CRS an AOI off every source seems to be in (grid.aoi_crs_hint); "" when it cannot tell."""
    from sarflow.data.grid import aoi_crs_hint

    try:
        aoi = loaded.catalog.grid.aoi
        if isinstance(aoi, list):
            native, declared = tuple(aoi), CRS.from_epsg(4326)
        else:
            import geopandas as gpd

            gdf = gpd.read_file(loaded.resolve(aoi))
            native, declared = tuple(float(v) for v in gdf.total_bounds), CRS.from_user_input(gdf.crs)
        crss = list(dict.fromkeys(CRS.from_wkt(f.crs) for s in sources for f in s.files.values()))
        return aoi_crs_hint(native, declared, [s.footprint() for s in sources], crss)
    except Exception:  # noqa: BLE001 - only a refinement of the error being reported
        return ""


def _check_overlap(loaded: LoadedCatalog, sources: list[Source], aoi84: shapely.Geometry) -> None:
    """A source off the AOI is that source's problem; an AOI off every source is the AOI's (most
    often lon/lat swapped, or its coordinates in another CRS than the one it declares)."""
    bounds = lambda g: tuple(round(v, 5) for v in g.bounds)  # noqa: E731
    off = [s for s in sources if not s.footprint().intersects(aoi84)]
    if off and len(off) == len(sources):
        aoi = loaded.catalog.grid.aoi
        where = str(loaded.path) if isinstance(aoi, list) else loaded.resolve(aoi)
        feet = shapely.union_all([s.footprint() for s in sources])
        hint = _aoi_crs_hint(loaded, sources)
        raise InputError(where, f"the AOI {bounds(aoi84)} (lon/lat) overlaps none of the sources, which cover "
                                f"{bounds(feet)}: check the AOI's CRS (a bbox is [west, south, east, north] in "
                                "degrees; a file needs its true CRS) and the order of its coordinates"
                                + (f"; {hint}" if hint else ""))
    if off:
        first = next(iter(off[0].files))
        raise InputError(first, f"source {off[0].name!r} does not overlap the AOI {bounds(aoi84)} (lon/lat), which "
                                f"the other sources cover; its footprint is {bounds(off[0].footprint())}")


def _parts(geom: shapely.Geometry) -> list:
    return list(getattr(geom, "geoms", [geom]))


def utm_for_aoi(aoi84: shapely.Geometry, where: str) -> CRS:
    """`crs: utm`: the zone of the AOI's centroid. An AOI that reaches beyond two neighbouring
    zones (or parts of it lying in zones two or more apart) has no one UTM zone: refused, naming
    the zones and the remedy, before anything is planned."""
    zones = sorted({z for p in _parts(aoi84) for z in range(utm_zone(p.bounds[0]), utm_zone(p.bounds[2]) + 1)})
    c = aoi84.centroid
    if zones[-1] - zones[0] > 1:
        hemi = 32600 if c.y >= 0 else 32700
        named = ", ".join(f"{z} (EPSG:{hemi + z})" for z in zones)
        raise InputError(where, (
            f"grid.crs 'utm' needs an AOI in one UTM zone (or straddling two neighbouring ones), but the AOI "
            f"({len(_parts(aoi84))} part(s), longitudes {aoi84.bounds[0]:.4f}..{aoi84.bounds[2]:.4f}) spans UTM zones "
            f"{named}: set grid.crs to one EPSG code that covers them all (e.g. 3035, the European LAEA grid, or "
            "an equal-area CRS of your region), or split the catalog into one catalog per zone"))
    return CRS.from_epsg(utm_epsg(c.x, c.y))


def coverage(sources: list[Source], crs: CRS) -> shapely.Geometry | None:
    """Where a chip can hold data of every required source, in the grid CRS: the intersection
    of their files' footprints (None when no source is required). The grid plans chips within
    one chip of it, and weighs them by their area inside it when it splits."""
    feet = [s.footprint() for s in sources if s.spec.required]
    if not feet:
        return None
    return transform_geometry(shapely.intersection_all(feet), WGS84, crs)


def checksum_files(sources: list[Source], workers: int | None = None, known: dict | None = None) -> int:
    """Every source file's SHA-256 (`RasterFile.sha256`), hashed in parallel threads (hashlib and
    the reads release the GIL: a catalog of many files, or of files on S3, hashes at the disk's or
    the network's pace, not one file after another); a file in several sources is hashed once.
    `known`: checksums recorded earlier, (uri, size, stamp) -> sha256; a file whose size and stamp are
    still the recorded ones is not read again. Returns how many files were hashed."""
    stamps = {uri: (f.size, f.stamp) for src in sources for uri, f in src.files.items()}
    digests, hashed = recorded_or_hashed(stamps, known or {}, workers)
    for src in sources:
        for uri, f in src.files.items():
            f.sha256 = digests[uri]
    return hashed


def recorded_or_hashed(stamps: dict[str, tuple[int, str]], known: dict, workers: int | None = None
                       ) -> tuple[dict[str, str], int]:
    """uri -> SHA-256 of the files of `stamps` (uri -> (size, stamp)): the recorded one (`known`:
    (uri, size, stamp) -> sha256) while the file keeps its size and stamp, else hashed now (`hash_files`);
    and how many were hashed."""
    digests = {u: known[(u, *st)] for u, st in stamps.items() if (u, *st) in known}
    todo = sorted(set(stamps) - set(digests))
    restamped = {u for u, _, _ in known} & set(todo)
    if restamped:
        log.warning("%d input files were recorded with another size or stamp and are hashed again: changed since, "
                    "or on a mount whose inodes differ between machines (e.g. %s)", len(restamped), min(restamped))
    digests.update(hash_files(todo, workers))
    return digests, len(todo)


def hash_files(uris: list[str], workers: int | None = None) -> dict[str, str]:
    """uri -> SHA-256 of each file, in parallel threads; a local file that cannot be read is an
    InputError naming it."""
    from concurrent.futures import ThreadPoolExecutor

    if not uris:
        return {}
    workers = workers or min(8, 2 * (os.cpu_count() or 1), len(uris))
    with ThreadPoolExecutor(workers) as pool:
        try:
            return dict(zip(uris, pool.map(sha256_of, uris)))
        except OSError as e:
            raise InputError(str(e.filename or uris[0]), f"cannot be read ({e.strerror or e})") from None


def ingest(loaded: LoadedCatalog, checksum: bool = True, known: dict | None = None) -> Ingested:
    """Validates every source and builds the grid; raises InputError on the first bad input. `known`:
    checksums recorded earlier (`checksum_files`)."""
    cat = loaded.catalog
    every_uri = [u for s in cat.sources for u in (s.uris or s.stac.items) for u in (u if isinstance(u, list) else [u])]
    with gdal_env([loaded.resolve(u) for u in every_uri]):
        sources = [resolve_source(loaded, spec) for spec in cat.sources]
    if checksum:
        hashed = checksum_files(sources, known=known)
        if known:
            files = len({u for s in sources for u in s.files})
            log.info("checksums: %d of %d input files hashed, the others recorded earlier", hashed, files)
    aoi84 = _aoi_wgs84(loaded, sources)
    if cat.grid.crs == "utm":
        crs = utm_for_aoi(aoi84, str(loaded.path))
    else:
        crs = parse_crs(cat.grid.crs)
    aoi = transform_geometry(aoi84, WGS84, crs)
    _check_overlap(loaded, sources, aoi84)
    grid = ChipGrid(
        crs=crs,
        resolution=cat.grid.resolution,
        chip_size=cat.grid.chip_size,
        overlap=cat.grid.overlap,
        origin=tuple(cat.grid.origin),
        aoi=aoi,
        coverage=coverage(sources, crs),
    )
    problem = grid.size_problem()
    if problem:
        raise InputError(str(loaded.path), problem)
    if len(grid.candidates) == 0:
        raise InputError(str(loaded.path), "the AOI covers no chip of the grid where every required source has data")
    return Ingested(catalog=loaded, sources=sources, grid=grid)
