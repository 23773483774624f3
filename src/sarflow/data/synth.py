"""Synthetic scenes that look and behave like the real products, deterministic from a seed.

One latent land-cover map (ESA WorldCover codes, UTM 10 m) drives every product:
- `worldcover.tif`: the land cover itself (uint8, nodata 0), UTM 10 m;
- `s1grd_<season>_{west,east}.tif`: Sentinel-1 GRD VV/VH sigma0 in dB, EPSG:4326 ~10 m,
  class- and season-dependent means, a class-specific spatial texture (`TEXTURES`, `_texture`:
  canopy gaps, field stripes, a street grid with point scatterers, ...; shrubland and cropland
  share every per-pixel statistic and differ only in arrangement), multiplicative gamma speckle
  (ENL 4.4) in linear power, split in two overlapping files that the catalog mosaics;
- `s1coh.tif`: interferometric coherence for 12/24/36/48-day baselines, UTM 90 m on an
  origin offset by 30 m, exponential decorrelation per class;
- `s1ifg.tif`: unwrapped interferometric phase (radians), UTM 90 m: a subsidence bowl,
  smooth atmosphere and noise growing with decorrelation;
- `s2rgb.tif`: Sentinel-2 RGB reflectance, UTM 10 m shifted by half a pixel, with clouds
  (and `s2cloudmask.tif`, the truth);
- `vegetation.tif`: tree cover percent, EPSG:3035 250 m (uint8, nodata 255);
- `builtup.tif`: built-up percent, UTM 100 m (float32, NaN nodata);
- `dem.tif`: elevation in m, EPSG:4326 1 arc-second (float32, nodata -9999);
- `municipalities.geojson` + `municipality_stats.csv`: Voronoi municipalities over the AOI
  and each one's class proportions (the input of learning from label proportions);
- `catalog.yaml` tying it together, and `scene.json` describing the truth.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, field
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform_bounds
from pydantic.dataclasses import dataclass
from scipy import ndimage

from sarflow.data.grid import utm_epsg
from sarflow.params import STAGE_CONFIG

# class code -> (prior weight, VV dB, VH dB, seasonal dB swing)
CLASSES: dict[int, tuple[float, float, float, float]] = {
    10: (0.30, -7.5, -13.5, 0.5),   # tree cover
    20: (0.06, -11.5, -18.5, 3.0),  # shrubland: cropland's backscatter, arranged in blobs, not stripes (TEXTURES)
    30: (0.18, -11.0, -18.0, 1.5),  # grassland
    40: (0.22, -11.5, -18.5, 3.0),  # cropland
    50: (0.09, -4.0, -11.0, 0.0),   # built-up
    60: (0.04, -15.0, -24.0, 0.5),  # bare
    80: (0.08, -21.0, -27.0, 0.5),  # permanent water
    90: (0.03, -13.0, -20.0, 1.5),  # herbaceous wetland
}
# class code -> (coherence at 0 days, long-term coherence, decorrelation time in days)
COHERENCE = {10: (0.5, 0.15, 8.0), 20: (0.55, 0.2, 12.0), 30: (0.6, 0.2, 15.0), 40: (0.6, 0.15, 10.0),
             50: (0.85, 0.7, 200.0), 60: (0.8, 0.5, 60.0), 80: (0.1, 0.05, 1.0), 90: (0.4, 0.1, 6.0)}
# class code -> surface reflectance R, G, B
REFLECTANCE = {10: (0.03, 0.05, 0.03), 20: (0.07, 0.08, 0.05), 30: (0.06, 0.09, 0.05), 40: (0.08, 0.10, 0.06),
               50: (0.16, 0.15, 0.14), 60: (0.22, 0.19, 0.15), 80: (0.02, 0.03, 0.05), 90: (0.05, 0.07, 0.06)}
# class code -> how its backscatter is arranged in space (`_texture`): a multiplicative pattern in
# linear power with mean 1 over the scene, so the class mean stays the CLASSES value.
TEXTURES = {10: "canopy", 20: "blobs", 40: "stripes", 50: "grid", 90: "pools"}
TEXTURE_DB = 3.0  # the two levels of "stripes" and "blobs": +-3 dB
GRID_PERIOD = 8  # px between the streets of "grid"
STRIPE_PERIOD = 6  # px between the furrows of "stripes"
SEASONS = {"summer": ("2023-07-15", 1.0), "winter": ("2023-01-15", -1.0)}
BASELINES = (12, 24, 36, 48)
ENL = 4.4
WAVELENGTH = 0.05546576  # m, Sentinel-1 C band
GTIFF = dict(driver="GTiff", tiled=True, blockxsize=256, blockysize=256, compress="zstd", zstd_level=1)
STRIP = 1024


@dataclass(config=STAGE_CONFIG)
class SynthConfig:
    """params.yaml's `synth:` section."""

    size_px: int = 512
    seed: int = 0
    center_lon: float = 8.95
    center_lat: float = 45.55
    chip_size: int = 64
    cloud_fraction: float = 0.3
    seasons: list[str] = field(default_factory=lambda: ["summer", "winter"])
    municipality_km2: float = 4.0
    class_prior_scale: dict[int, float] | None = None  # class code -> factor on its prior (a shifted class mix)


def _rng(cfg: SynthConfig, *tags) -> np.random.Generator:
    """An independent, reproducible stream per product (and per strip)."""
    words = [cfg.seed] + [int.from_bytes(str(t).encode(), "little") % (2**32) for t in tags]
    return np.random.default_rng(np.random.SeedSequence(words))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field with features about `scale` pixels wide."""
    coarse = max(1.0, scale / 4.0)
    small = (max(4, int(math.ceil(shape[0] / coarse)) + 2), max(4, int(math.ceil(shape[1] / coarse)) + 2))
    field_ = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma=2.0, mode="wrap")
    field_ = ndimage.zoom(field_, (shape[0] / (small[0] - 2), shape[1] / (small[1] - 2)), order=1, grid_mode=True,
                          mode="grid-constant")[: shape[0], : shape[1]] if coarse > 1 else field_[: shape[0], : shape[1]]
    if field_.shape != shape:
        field_ = np.pad(field_, [(0, shape[0] - field_.shape[0]), (0, shape[1] - field_.shape[1])], mode="edge")
    std = float(field_.std()) or 1.0
    return ((field_ - float(field_.mean())) / std).astype(np.float32)


def _write(path: Path, data: np.ndarray, crs: CRS, transform: Affine, nodata, descriptions=None, tags=None) -> None:
    data = data if data.ndim == 3 else data[None]
    profile = dict(GTIFF, width=data.shape[2], height=data.shape[1], count=data.shape[0], dtype=data.dtype,
                   crs=crs, transform=transform, nodata=nodata)
    with rasterio.open(path, "w", **profile) as dst:
        for r in range(0, data.shape[1], STRIP):
            dst.write(data[:, r:r + STRIP], window=((r, min(r + STRIP, data.shape[1])), (0, data.shape[2])))
        if descriptions:
            dst.descriptions = tuple(descriptions)
        if tags:
            dst.update_tags(**tags)


def _landcover(cfg: SynthConfig) -> np.ndarray:
    """Spatially coherent regions: per-class smooth fields, biased by the class prior (times
    `cfg.class_prior_scale`), argmax."""
    n = cfg.size_px
    factor = cfg.class_prior_scale or {}
    rng = _rng(cfg, "landcover")
    best = np.full((n, n), -np.inf, dtype=np.float32)
    label = np.zeros((n, n), dtype=np.uint8)
    scales = {50: 25.0, 80: 60.0, 60: 30.0}
    for code, (prior, *_rest) in CLASSES.items():
        f = _smooth_noise(rng, (n, n), scales.get(code, 45.0)) + 0.35 * _smooth_noise(rng, (n, n), 8.0)
        f += 0.9 * math.log(prior * factor.get(code, 1.0))
        better = f > best
        best[better] = f[better]
        label[better] = code
    # a nodata corner, as at the edge of a real tile (0 is nodata, never a class)
    k = max(2, n // 16)
    yy, xx = np.mgrid[0:k, 0:k]
    label[:k, :k][(yy + xx) < k] = 0
    return label


def _utm_grid(cfg: SynthConfig):
    epsg = utm_epsg(cfg.center_lon, cfg.center_lat)
    crs = CRS.from_epsg(epsg)
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(cfg.center_lon, cfg.center_lat)
    half = cfg.size_px * 10 / 2
    x0, y0 = math.floor((x - half) / 640) * 640, math.ceil((y + half) / 640) * 640
    return crs, Affine(10.0, 0, x0, 0, -10.0, y0)


def _geographic_grid(utm_crs: CRS, utm_tr: Affine, n: int, res_m: float):
    west, south, east, north = transform_bounds(utm_crs, 4326, utm_tr.c, utm_tr.f - n * 10, utm_tr.c + n * 10, utm_tr.f)
    lat = (south + north) / 2
    dlat = res_m / 111_320.0
    dlon = res_m / (111_320.0 * math.cos(math.radians(lat)))
    width, height = int(math.ceil((east - west) / dlon)), int(math.ceil((north - south) / dlat))
    return Affine(dlon, 0, west, 0, -dlat, north), width, height


def _warp_labels(label, utm_crs, utm_tr, dst_tr, width, height, dst_crs=4326) -> np.ndarray:
    out = np.zeros((height, width), dtype=np.uint8)
    reproject(label, out, src_transform=utm_tr, src_crs=utm_crs, dst_transform=dst_tr, dst_crs=CRS.from_epsg(dst_crs),
              src_nodata=0, dst_nodata=0, resampling=Resampling.nearest)
    return out


def _lut(values: dict[int, float], fill=np.nan) -> np.ndarray:
    lut = np.full(256, fill, dtype=np.float32)
    for code, v in values.items():
        lut[code] = v
    return lut


def _unit_mean(db: np.ndarray) -> np.ndarray:
    """dB offsets -> a multiplier in linear power with mean exactly 1 over the array."""
    lin = 10.0 ** (db.astype(np.float64) / 10.0)
    return (lin / lin.mean()).astype(np.float32)


def _texture(cfg: SynthConfig, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """The spatial pattern of a class's backscatter (a multiplier, mean 1): what tells classes
    apart beyond their mean, as in real land cover.
    - canopy: high-variance crown texture (+-2.5 dB at ~3 px) with dark gaps (-7 dB, ~8 % of the area);
    - blobs / stripes: the same two levels (+-TEXTURE_DB, half the area each), as random blobs
      (~4 px) or as parallel furrows (STRIPE_PERIOD px) whose direction changes from field to field;
      the two have identical per-pixel distributions, only the arrangement differs;
    - grid: a regular street grid (GRID_PERIOD px, streets -4 dB) of blocks with a bright point
      scatterer (+10 dB) at each block corner, on a scene-dependent offset;
    - pools: open-water pools (-8 dB, ~20 % of the area) in the vegetation."""
    rng = _rng(cfg, "s1pattern", kind)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "canopy":
        crowns = 2.5 * _smooth_noise(rng, shape, 3.0)
        gaps = _smooth_noise(rng, shape, 8.0) > 1.4
        return _unit_mean(np.where(gaps, -7.0, crowns))
    if kind == "blobs":
        return _unit_mean(np.where(_smooth_noise(rng, shape, 4.0) > 0, TEXTURE_DB, -TEXTURE_DB))
    if kind == "stripes":
        angle = np.floor((_smooth_noise(rng, shape, 60.0) + 3.0) * 2.0) * (math.pi / 5.0)  # piecewise constant per field
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * math.pi / STRIPE_PERIOD)
        return _unit_mean(np.where(np.sin(phase) > 0, TEXTURE_DB, -TEXTURE_DB))
    if kind == "grid":
        oy, ox = (int(v) for v in rng.integers(0, GRID_PERIOD, 2))
        ry, rx = (yy.astype(np.int64) + oy) % GRID_PERIOD, (xx.astype(np.int64) + ox) % GRID_PERIOD
        db = np.where((ry < 2) | (rx < 2), -4.0, 1.0)
        db[(ry == 2) & (rx == 2)] = 10.0
        return _unit_mean(db)
    if kind == "pools":
        return _unit_mean(np.where(_smooth_noise(rng, shape, 5.0) > 0.85, -8.0, 0.0))
    raise ValueError(f"unknown texture {kind!r}")


def _s1(cfg: SynthConfig, out: Path, label_geo: np.ndarray, geo_tr: Affine) -> dict[str, list[str]]:
    """VV/VH dB with gamma speckle per season, written as two overlapping halves."""
    h, w = label_geo.shape
    files = {}
    split = w // 2
    pad = max(4, w // 10)
    patterns = {kind: _texture(cfg, kind, (h, w)) for kind in sorted(set(TEXTURES.values()))}  # the same in every season
    for season in cfg.seasons:
        _date, swing = SEASONS[season]
        vv_lut = _lut({c: v[1] + swing * v[3] for c, v in CLASSES.items()})
        vh_lut = _lut({c: v[2] + swing * v[3] * 1.2 for c, v in CLASSES.items()})
        texture = _smooth_noise(_rng(cfg, "s1texture", season), (h, w), 40.0)
        db = np.empty((2, h, w), dtype=np.float32)
        for r in range(0, h, STRIP):
            rng = _rng(cfg, "s1speckle", season, r)
            lab = label_geo[r:r + STRIP]
            pattern = np.ones(lab.shape, dtype=np.float32)
            for code, kind in TEXTURES.items():
                sel = lab == code
                if sel.any():
                    pattern[sel] = patterns[kind][r:r + STRIP][sel]
            for b, lut in enumerate((vv_lut, vh_lut)):
                mean_db = lut[lab] + 0.8 * texture[r:r + STRIP]
                speckle = rng.gamma(ENL, 1.0 / ENL, size=lab.shape).astype(np.float32)
                db[b, r:r + STRIP] = 10.0 * np.log10(10.0 ** (mean_db / 10.0) * pattern * speckle)
        names = []
        for part, (c0, c1) in (("west", (0, split + pad)), ("east", (split - pad, w))):
            path = out / f"s1grd_{season}_{part}.tif"
            _write(path, db[:, :, c0:c1], CRS.from_epsg(4326), geo_tr * Affine.translation(c0, 0), np.nan,
                   ["VV", "VH"], {"units": "dB", "date": SEASONS[season][0]})
            names.append(path.name)
        files[season] = names
    return files


def _coherence_and_phase(cfg, out: Path, label: np.ndarray, utm_crs, utm_tr: Affine):
    """Coherence at 90 m from class fractions in 9x9 blocks (origin offset by 30 m), and phase."""
    off, k = 3, 9
    n = label.shape[0]
    rows = (n + off + k - 1) // k
    padded = np.zeros((rows * k, rows * k), dtype=np.uint8)
    padded[off:off + n, off:off + n] = label
    blocks = padded.reshape(rows, k, rows, k)
    frac = {c: (blocks == c).mean(axis=(1, 3), dtype=np.float32) for c in CLASSES}
    valid_frac = sum(frac.values())
    tr90 = Affine(90.0, 0, utm_tr.c - off * 10, 0, -90.0, utm_tr.f + off * 10)
    rng = _rng(cfg, "coherence")
    coh = np.zeros((len(BASELINES), rows, rows), dtype=np.float32)
    for b, t in enumerate(BASELINES):
        for c, (g0, ginf, tau) in COHERENCE.items():
            coh[b] += frac[c] * (ginf + (g0 - ginf) * math.exp(-t / tau))
        with np.errstate(invalid="ignore", divide="ignore"):
            coh[b] = coh[b] / valid_frac
        coh[b] = np.clip(coh[b] + rng.normal(0, 0.03, coh[b].shape).astype(np.float32), 0.0, 1.0)
    coh[:, valid_frac < 0.5] = np.nan
    _write(out / "s1coh.tif", coh, utm_crs, tr90, np.nan, [f"coh{t}" for t in BASELINES],
           {"units": "coherence", "baselines_days": ",".join(map(str, BASELINES))})

    yy, xx = np.mgrid[0:rows, 0:rows].astype(np.float32)
    cy, cx, sig = rows * 0.6, rows * 0.4, max(3.0, rows / 6)
    subsidence_m = 0.03 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sig**2))
    phase = (-4 * math.pi / WAVELENGTH) * subsidence_m
    phase += 1.0 * _smooth_noise(_rng(cfg, "atmosphere"), (rows, rows), max(4.0, rows / 3))
    noise_std = np.sqrt(np.clip(1 - coh[0] ** 2, 0, 1)) / np.maximum(coh[0], 0.05) * 0.3
    phase += rng.standard_normal(phase.shape).astype(np.float32) * np.nan_to_num(noise_std, nan=1.0)
    phase = phase.astype(np.float32)
    phase[np.isnan(coh[0]) | (frac[80] > 0.5)] = np.nan  # water decorrelates: no phase
    _write(out / "s1ifg.tif", phase, utm_crs, tr90, np.nan, ["phase_12d"], {"units": "radians"})
    return {"subsidence_max_m": 0.03}


def _s2(cfg: SynthConfig, out: Path, label: np.ndarray, utm_crs, utm_tr: Affine) -> dict:
    n = label.shape[0]
    rgb_lut = [_lut({c: v[i] for c, v in REFLECTANCE.items()}) for i in range(3)]
    cloud_field = _smooth_noise(_rng(cfg, "clouds"), (n, n), 30.0)
    alpha = np.zeros((n, n), dtype=np.float32)
    if cfg.cloud_fraction > 0:
        thr = float(np.quantile(cloud_field, 1 - cfg.cloud_fraction))
        alpha = np.clip((cloud_field - thr) / 0.3 + 0.5, 0, 1).astype(np.float32)
    rgb = np.empty((3, n, n), dtype=np.float32)
    brightness = 1 + 0.1 * _smooth_noise(_rng(cfg, "s2texture"), (n, n), 20.0)
    for r in range(0, n, STRIP):
        rng = _rng(cfg, "s2noise", r)
        lab = label[r:r + STRIP]
        a = alpha[r:r + STRIP]
        for b in range(3):
            surface = rgb_lut[b][lab] * brightness[r:r + STRIP] + rng.normal(0, 0.005, lab.shape).astype(np.float32)
            cloud = 0.65 + 0.02 * b + rng.normal(0, 0.02, lab.shape).astype(np.float32)
            rgb[b, r:r + STRIP] = np.clip((1 - a) * surface + a * cloud, 0.0, 1.0)
    rgb[:, label == 0] = np.nan
    shifted = utm_tr * Affine.translation(0.5, 0.5)  # half a pixel off the label grid
    _write(out / "s2rgb.tif", rgb, utm_crs, shifted, np.nan, ["B04", "B03", "B02"], {"units": "reflectance"})
    mask = (alpha > 0.5).astype(np.uint8)
    _write(out / "s2cloudmask.tif", mask, utm_crs, shifted, 255, ["cloud"], {"units": "class"})
    return {"cloud_fraction_measured": float(mask[label > 0].mean()) if (label > 0).any() else 0.0}


def _fractions_to(label: np.ndarray, code: int, k: int) -> np.ndarray:
    n = label.shape[0]
    m = (n + k - 1) // k
    padded = np.zeros((m * k, m * k), dtype=np.uint8)
    padded[:n, :n] = label
    blocks = padded.reshape(m, k, m, k)
    valid = (blocks > 0).sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid > 0, (blocks == code).sum(axis=(1, 3)) / np.maximum(valid, 1), np.nan).astype(np.float32)


def _vegetation(cfg, out: Path, label, utm_crs, utm_tr):
    """Tree cover percent: 50 m block fractions, averaged onto EPSG:3035 at 250 m."""
    frac50 = _fractions_to(label, 10, 5)
    tr50 = Affine(50.0, 0, utm_tr.c, 0, -50.0, utm_tr.f)
    n = label.shape[0]
    laea = CRS.from_epsg(3035)
    west, south, east, north = transform_bounds(utm_crs, laea, utm_tr.c, utm_tr.f - n * 10, utm_tr.c + n * 10, utm_tr.f)
    x0, y1 = math.floor(west / 250) * 250, math.ceil(north / 250) * 250
    w, h = int(math.ceil((east - x0) / 250)), int(math.ceil((y1 - south) / 250))
    tr = Affine(250.0, 0, x0, 0, -250.0, y1)
    dst = np.full((h, w), np.nan, dtype=np.float32)
    reproject(frac50, dst, src_transform=tr50, src_crs=utm_crs, dst_transform=tr, dst_crs=laea,
              src_nodata=np.nan, dst_nodata=np.nan, resampling=Resampling.average)
    pct = np.where(np.isnan(dst), 255, np.clip(np.round(dst * 100), 0, 100)).astype(np.uint8)
    _write(out / "vegetation.tif", pct, laea, tr, 255, ["tree_cover"], {"units": "percent"})


def _builtup(cfg, out: Path, label, utm_crs, utm_tr):
    pct = _fractions_to(label, 50, 10) * 100
    _write(out / "builtup.tif", pct.astype(np.float32), utm_crs, Affine(100.0, 0, utm_tr.c, 0, -100.0, utm_tr.f),
           np.nan, ["built_up"], {"units": "percent"})


def _dem(cfg, out: Path, utm_crs, utm_tr, n):
    tr, w, h = _geographic_grid(utm_crs, utm_tr, n, 30.0)
    rng = _rng(cfg, "dem")
    z = 250 + 180 * _smooth_noise(rng, (h, w), max(8.0, w / 4)) + 25 * _smooth_noise(rng, (h, w), 6.0)
    z = z.astype(np.float32)
    k = max(1, h // 40)
    z[-k:, -k:] = -9999.0  # a void, as DEMs have
    _write(out / "dem.tif", z, CRS.from_epsg(4326), tr, -9999.0, ["elevation"], {"units": "m"})


def _municipalities(cfg, out: Path, label, utm_crs, utm_tr) -> int:
    import geopandas as gpd
    import pandas as pd
    from rasterio.features import rasterize

    n = label.shape[0]
    extent = shapely.box(utm_tr.c, utm_tr.f - n * 10, utm_tr.c + n * 10, utm_tr.f)
    area_km2 = (n * 10 / 1000) ** 2
    count = max(4, int(round(area_km2 / cfg.municipality_km2)))
    rng = _rng(cfg, "municipalities")
    pts = shapely.points(rng.uniform(extent.bounds[0], extent.bounds[2], count),
                         rng.uniform(extent.bounds[1], extent.bounds[3], count))
    cells = shapely.voronoi_polygons(shapely.multipoints(pts), extend_to=extent)
    polys = [shapely.intersection(c, extent) for c in shapely.get_parts(cells)]
    polys = [p for p in polys if not p.is_empty]
    polys.sort(key=lambda p: (-round(p.centroid.y, 3), round(p.centroid.x, 3)))
    ids = [f"M{i + 1:04d}" for i in range(len(polys))]
    zones = rasterize([(p, i + 1) for i, p in enumerate(polys)], out_shape=(n, n), transform=utm_tr, dtype="int32")
    codes = sorted(CLASSES)
    code_index = np.zeros(256, dtype=np.int64)
    for j, c in enumerate(codes):
        code_index[c] = j + 1
    flat = zones.astype(np.int64) * (len(codes) + 1) + code_index[label]
    counts = np.bincount(flat.ravel(), minlength=(len(polys) + 1) * (len(codes) + 1)).reshape(len(polys) + 1, -1)
    rows = []
    for i, mid in enumerate(ids):
        c = counts[i + 1, 1:]
        total = int(c.sum())
        rows.append({"muni_id": mid, "valid_pixels": total,
                     **{f"frac_{code}": (float(c[j]) / total if total else float("nan")) for j, code in enumerate(codes)}})
    pd.DataFrame(rows).to_csv(out / "municipality_stats.csv", index=False, float_format="%.6f")
    gdf = gpd.GeoDataFrame({"muni_id": ids, "name": [f"Synthetic municipality {i}" for i in ids]},
                           geometry=polys, crs=utm_crs).to_crs(4326)
    path = out / "municipalities.geojson"
    path.unlink(missing_ok=True)
    gdf.to_file(path, driver="GeoJSON")
    return len(polys)


def shifted_priors(shift: float) -> dict[int, float]:
    """`SynthConfig.class_prior_scale` of a region whose class mix is shifted: built-up and water x (1 + shift), trees / (1 + shift)."""
    if not shift >= 0:
        raise ValueError(f"shift {shift} must be at least 0")
    return {50: 1 + shift, 80: 1 + shift, 10: 1 / (1 + shift)}


def catalog_dict(cfg: SynthConfig, s1_files: dict[str, list[str]]) -> dict:
    sources = []
    for season in cfg.seasons:
        name = "s1grd" if season == cfg.seasons[0] else f"s1grd_{season}"
        sources.append({"name": name, "uris": s1_files[season], "bands": ["VV", "VH"], "units": "dB",
                        "kind": "continuous", "date": SEASONS[season][0]})
    sources += [
        {"name": "s1coh", "uris": ["s1coh.tif"], "bands": [f"coh{t}" for t in BASELINES], "units": "coherence",
         "kind": "continuous", "required": False},
        {"name": "s1ifg", "uris": ["s1ifg.tif"], "bands": ["phase_12d"], "units": "radians", "kind": "continuous",
         "required": False},
        {"name": "s2rgb", "uris": ["s2rgb.tif"], "bands": ["B04", "B03", "B02"], "units": "reflectance",
         "kind": "continuous", "date": "2023-07-18"},
        {"name": "worldcover", "uris": ["worldcover.tif"], "bands": ["class"], "units": "class",
         "kind": "categorical", "nodata": 0, "legend": "worldcover"},
        {"name": "vegetation", "uris": ["vegetation.tif"], "bands": ["tree_cover"], "units": "percent",
         "kind": "continuous", "nodata": 255, "required": False, "role": "label", "range": [0, 100]},
        {"name": "builtup", "uris": ["builtup.tif"], "bands": ["built_up"], "units": "percent",
         "kind": "continuous", "required": False, "role": "label", "range": [0, 100]},
        {"name": "dem", "uris": ["dem.tif"], "bands": ["elevation"], "units": "m", "kind": "continuous",
         "nodata": -9999, "required": False},
    ]
    return {"grid": {"crs": "utm", "resolution": 10, "chip_size": cfg.chip_size, "aoi": "intersection"},
            "sources": sources}


def synthesize(out_dir: str | Path, cfg: SynthConfig = SynthConfig()) -> Path:
    """Writes a complete synthetic scene into `out_dir`; returns the catalog path."""
    import yaml

    unknown = set(cfg.seasons) - set(SEASONS)
    if unknown:
        raise ValueError(f"unknown season(s) {sorted(unknown)}: choose from {sorted(SEASONS)}")
    if cfg.size_px < 64:
        raise ValueError(f"size_px={cfg.size_px} is too small: at least 64 pixels")
    bad = {c: v for c, v in (cfg.class_prior_scale or {}).items() if c not in CLASSES or not v > 0}
    if bad:
        raise ValueError(f"class_prior_scale {bad}: keys must be class codes {sorted(CLASSES)}, factors positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    utm_crs, utm_tr = _utm_grid(cfg)
    label = _landcover(cfg)
    _write(out / "worldcover.tif", label, utm_crs, utm_tr, 0, ["class"], {"units": "class"})
    geo_tr, w, h = _geographic_grid(utm_crs, utm_tr, cfg.size_px, 10.0)
    label_geo = _warp_labels(label, utm_crs, utm_tr, geo_tr, w, h)
    s1_files = _s1(cfg, out, label_geo, geo_tr)
    del label_geo
    phase_info = _coherence_and_phase(cfg, out, label, utm_crs, utm_tr)
    s2_info = _s2(cfg, out, label, utm_crs, utm_tr)
    _vegetation(cfg, out, label, utm_crs, utm_tr)
    _builtup(cfg, out, label, utm_crs, utm_tr)
    _dem(cfg, out, utm_crs, utm_tr, cfg.size_px)
    n_muni = _municipalities(cfg, out, label, utm_crs, utm_tr)
    codes, counts = np.unique(label[label > 0], return_counts=True)
    catalog_path = out / "catalog.yaml"
    catalog_path.write_text(yaml.safe_dump(catalog_dict(cfg, s1_files), sort_keys=False))
    config = asdict(cfg)
    if cfg.class_prior_scale is None:  # scenes without a shift keep their description unchanged
        del config["class_prior_scale"]
    scene = {
        "config": config,
        "utm_epsg": utm_crs.to_epsg(),
        "class_fractions": {str(int(c)): float(n) / counts.sum() for c, n in zip(codes, counts)},
        "s1_class_means_db": {str(c): {"VV": v[1], "VH": v[2], "seasonal_swing": v[3]} for c, v in CLASSES.items()},
        "s1_enl": ENL,
        "s1_textures": {str(c): TEXTURES.get(c, "none") for c in CLASSES},
        "coherence_model": {str(c): v for c, v in COHERENCE.items()},
        "municipalities": n_muni,
        **s2_info,
        **phase_info,
    }
    (out / "scene.json").write_text(json.dumps(scene, indent=1, sort_keys=True))
    return catalog_path
