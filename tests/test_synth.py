"""The synthetic scene generator: deterministic, and statistically what it claims to be."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.warp import reproject
from scipy.optimize import brentq
from scipy.special import polygamma

from sarflow.data.synth import CLASSES, ENL, GRID_PERIOD, STRIPE_PERIOD, TEXTURES, SynthConfig, synthesize

WORLDCOVER_CODES = {10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100}


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return synthesize(tmp_path_factory.mktemp("synth"), SynthConfig(size_px=512, seed=5, cloud_fraction=0.25)).parent


def _read(path, band=None):
    with rasterio.open(path) as ds:
        return (ds.read() if band is None else ds.read(band)), ds.profile


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synthesize(tmp_path / "a", SynthConfig(size_px=128, seed=1)).parent
    b = synthesize(tmp_path / "b", SynthConfig(size_px=128, seed=1)).parent
    c = synthesize(tmp_path / "c", SynthConfig(size_px=128, seed=2)).parent
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert (a / "worldcover.tif").read_bytes() != (c / "worldcover.tif").read_bytes()


def test_each_product_has_its_own_crs_and_resolution(scene):
    expect = {"worldcover.tif": (32632, 10.0), "s2rgb.tif": (32632, 10.0), "s1coh.tif": (32632, 90.0),
              "s1ifg.tif": (32632, 90.0), "builtup.tif": (32632, 100.0), "vegetation.tif": (3035, 250.0),
              "s1grd_summer_west.tif": (4326, None), "dem.tif": (4326, None)}
    for name, (epsg, res) in expect.items():
        with rasterio.open(scene / name) as ds:
            assert ds.crs.to_epsg() == epsg, name
            if res:
                assert math.isclose(ds.res[0], res), name
            assert ds.nodata is not None or ds.dtypes[0].startswith("float"), name
    with rasterio.open(scene / "s2rgb.tif") as s2, rasterio.open(scene / "worldcover.tif") as wc:
        assert math.isclose((s2.transform.c - wc.transform.c) % 10, 5.0)  # S2 sits half a pixel off


def test_land_cover_uses_worldcover_codes_in_coherent_regions(scene):
    lab, prof = _read(scene / "worldcover.tif", 1)
    assert prof["nodata"] == 0
    codes = set(np.unique(lab).tolist())
    assert codes - {0} <= WORLDCOVER_CODES and len(codes - {0}) >= 5
    assert 0 < (lab == 0).mean() < 0.01  # a small nodata corner, never a class
    same = np.mean(lab[:, 1:] == lab[:, :-1])
    assert same > 0.9  # spatially coherent, not salt-and-pepper


def _labels_on(scene, target):
    lab, lp = _read(scene / "worldcover.tif", 1)
    with rasterio.open(target) as ds:
        out = np.zeros((ds.height, ds.width), np.uint8)
        reproject(lab, out, src_transform=lp["transform"], src_crs=lp["crs"], dst_transform=ds.transform,
                  dst_crs=ds.crs, resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)
        return out, ds.read()


def test_s1_backscatter_has_class_means_and_gamma_speckle(scene):
    lab, db = _labels_on(scene, scene / "s1grd_summer_west.tif")
    for code in (10, 40, 50, 80):
        sel = (lab == code) & np.isfinite(db[0])
        if sel.sum() < 2000:
            continue
        lin = 10 ** (db[0][sel] / 10)
        mean_db = 10 * np.log10(lin.mean())
        expected = CLASSES[code][1] + CLASSES[code][3]  # summer swing
        assert abs(mean_db - expected) < 1.0, (code, mean_db, expected)
    assert np.nanmean(db[0]) > np.nanmean(db[1]) + 4  # VV brighter than VH
    # ENL from the log-ratio of horizontal neighbours inside one untextured class: var = 2 * trigamma(L)
    plain = np.isin(lab, [c for c in CLASSES if c not in TEXTURES])
    same = (lab[:, 1:] == lab[:, :-1]) & plain[:, 1:] & np.isfinite(db[0][:, 1:]) & np.isfinite(db[0][:, :-1])
    d = (db[0][:, 1:] - db[0][:, :-1])[same] * math.log(10) / 10
    enl = brentq(lambda L: 2 * polygamma(1, L) - d.var(), 0.5, 50)
    assert abs(enl - ENL) / ENL < 0.15, enl


def _corr(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def _pure_windows(lab, db, code, k=12):
    return [db[i:i + k, j:j + k] for i in range(0, lab.shape[0] - k, k) for j in range(0, lab.shape[1] - k, k)
            if (lab[i:i + k, j:j + k] == code).all() and np.isfinite(db[i:i + k, j:j + k]).all()]


def _anisotropy(w, lag=STRIPE_PERIOD // 3):
    """Spread of the lag-2 correlation over four directions: ~0 for isotropic texture."""
    c = [_corr(w[:, :-lag], w[:, lag:]), _corr(w[:-lag], w[lag:]), _corr(w[:-lag, :-lag], w[lag:, lag:]),
         _corr(w[:-lag, lag:], w[lag:, :-lag])]
    return max(c) - min(c)


def test_classes_differ_in_texture_not_only_in_mean(scene):
    """Shrubland and cropland have the same per-pixel backscatter distribution (so no per-chip
    statistic tells them apart) but cropland is striped (anisotropic) and shrubland is not;
    built-up repeats with the street-grid period."""
    lab, db = _labels_on(scene, scene / "s1grd_summer_west.tif")
    vv = db[0]
    shrub, crop = vv[(lab == 20) & np.isfinite(vv)], vv[(lab == 40) & np.isfinite(vv)]
    assert len(shrub) > 2000 and len(crop) > 2000
    q = [5, 25, 50, 75, 95]
    np.testing.assert_allclose(np.percentile(shrub, q), np.percentile(crop, q), atol=0.4)
    assert abs(shrub.std() - crop.std()) < 0.3
    crop_w, shrub_w = _pure_windows(lab, vv, 40), _pure_windows(lab, vv, 20)
    assert len(crop_w) >= 10 and len(shrub_w) >= 5
    assert np.mean([_anisotropy(w) for w in crop_w]) > 2 * np.mean([_anisotropy(w) for w in shrub_w])
    built = _pure_windows(lab, vv, 50)
    assert built
    p = GRID_PERIOD
    lag_full = np.mean([_corr(w[:, :-p], w[:, p:]) for w in built])
    lag_half = np.mean([_corr(w[:, :-(p // 2)], w[:, p // 2:]) for w in built])
    assert lag_full > lag_half + 0.2  # a regular grid: correlated at its period, not at half of it
    # forest is rougher than grassland at the same scale (canopy and gaps vs plain speckle)
    assert vv[(lab == 10) & np.isfinite(vv)].std() > vv[(lab == 30) & np.isfinite(vv)].std() + 0.8


def test_coherence_decays_with_baseline_and_is_highest_on_built_up(scene):
    coh, _ = _read(scene / "s1coh.tif")
    means = [np.nanmean(coh[b]) for b in range(4)]
    assert all(a > b for a, b in zip(means, means[1:]))
    assert np.nanmin(coh) >= 0 and np.nanmax(coh) <= 1
    bu, _ = _read(scene / "builtup.tif", 1)
    assert bu.shape[0] > 0
    phase, _ = _read(scene / "s1ifg.tif", 1)
    assert np.nanmin(phase) < -3  # the subsidence bowl: several radians


def test_clouds_cover_the_requested_fraction_and_hide_the_surface(scene):
    mask, _ = _read(scene / "s2cloudmask.tif", 1)
    rgb, _ = _read(scene / "s2rgb.tif")
    lab, _ = _read(scene / "worldcover.tif", 1)
    valid = lab > 0
    assert abs(mask[valid].mean() - 0.25) < 0.05
    cloudy, clear = mask.astype(bool) & valid, ~mask.astype(bool) & valid
    assert np.nanmean(rgb[0][cloudy]) > 0.5 > np.nanmean(rgb[0][clear])
    # under cloud, reflectance no longer tells tree from crop
    t, c = (lab == 10), (lab == 40)
    assert abs(np.nanmean(rgb[1][cloudy & t]) - np.nanmean(rgb[1][cloudy & c])) < 0.02


def test_municipalities_cover_the_aoi_with_consistent_proportions(scene):
    import geopandas as gpd

    munis = gpd.read_file(scene / "municipalities.geojson")
    stats = pd.read_csv(scene / "municipality_stats.csv")
    assert list(stats.muni_id) == list(munis.muni_id)
    frac_cols = [c for c in stats if c.startswith("frac_")]
    np.testing.assert_allclose(stats[frac_cols].sum(axis=1), 1.0, atol=1e-5)
    lab, prof = _read(scene / "worldcover.tif", 1)
    # the pixel-weighted mean of municipality proportions is the scene's class distribution
    w = stats.valid_pixels.to_numpy()
    for code in (10, 40):
        assert abs((stats[f"frac_{code}"] * w).sum() / w.sum() - (lab == code).sum() / (lab > 0).sum()) < 1e-4
    utm = munis.to_crs(prof["crs"])
    assert abs(utm.area.sum() - lab.size * 100) / (lab.size * 100) < 0.01  # they tile the AOI


def test_bad_synth_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="season"):
        synthesize(tmp_path, SynthConfig(size_px=128, seasons=["monsoon"]))
    with pytest.raises(ValueError, match="too small"):
        synthesize(tmp_path, SynthConfig(size_px=16))
