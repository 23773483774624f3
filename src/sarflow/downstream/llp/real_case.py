"""The real Kansas case: LLP on a Sen1Floods11 chip (water vs dry from S1 only), bags = the county
(FIPS 20121) cut into grid cells, bag proportions aggregated from the hand label raster."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.llp.bags import chip_bags
from sarflow.downstream.llp.config import MODELS
from sarflow.downstream.llp.data import (LLPData, band_statistics, chip_fractions, polygon_class_fractions, train_test,
                                         zscore)
from sarflow.downstream.llp.figures import write_outputs
from sarflow.downstream.llp.metrics import model_metrics, results_table
from sarflow.downstream.llp.train import bag_size_curve, fit_and_evaluate
from sarflow.errors import InputError

KANSAS = "USA_905409"
KANSAS_FIPS = "20121"


def prepare_real_data(real_dir: str | Path, chip: int = 32, grid: int = 4, scene: str = KANSAS,
                      fips: str = KANSAS_FIPS) -> tuple[LLPData, dict]:
    """Chips of the Sen1Floods11 S1 raster and water label; bags = county FIPS `fips` cut into
    grid x grid cells over the scene; bag proportions aggregated from the label raster."""
    import geopandas as gpd
    import rasterio
    import shapely

    real = Path(real_dir)
    s1_path = real / "sen1floods11" / f"{scene}_S1Hand.tif"
    label_path = real / "sen1floods11" / f"{scene}_LabelHand.tif"
    counties = real / "admin" / "geojson-counties-fips.json"
    for p in (s1_path, label_path, counties):
        if not p.is_file():
            raise InputError(str(p), "missing real-data file")
    with rasterio.open(s1_path) as src:
        s1 = src.read().astype(np.float32)
        tr, crs, bounds = src.transform, src.crs, src.bounds
        if src.nodata is not None and not np.isnan(src.nodata):
            s1[s1 == src.nodata] = np.nan
    with rasterio.open(label_path) as src:
        label = src.read(1)
    h, w = label.shape
    ny, nx = h // chip, w // chip
    rows_, cols_ = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    rows_, cols_ = rows_.ravel(), cols_.ravel()
    minx = tr.c + cols_ * chip * tr.a
    maxx = minx + chip * tr.a
    maxy = tr.f + rows_ * chip * tr.e
    miny = maxy + chip * tr.e
    n = len(rows_)
    chips = pd.DataFrame({"chip_id": [f"{scene}_r{r:02d}_c{c:02d}" for r, c in zip(rows_, cols_)], "index": np.arange(n),
                          "minx": minx, "miny": miny, "maxx": maxx, "maxy": maxy, "col": cols_, "row": rows_,
                          "split": "train"})
    chips["geometry"] = shapely.to_wkb(shapely.box(minx, miny, maxx, maxy))
    pix_raw = np.stack([s1[:, r * chip:(r + 1) * chip, c * chip:(c + 1) * chip] for r, c in zip(rows_, cols_)])
    lab = np.stack([label[r * chip:(r + 1) * chip, c * chip:(c + 1) * chip] for r, c in zip(rows_, cols_)])
    county = gpd.read_file(counties)
    county = county[county["id"].astype(str) == fips]
    if county.empty:
        raise InputError(str(counties), f"no county with FIPS {fips}")
    county_geom = county.to_crs(crs).geometry.iloc[0]
    xs = np.linspace(bounds.left, bounds.right, grid + 1)
    ys = np.linspace(bounds.top, bounds.bottom, grid + 1)
    polys, ids = [], []
    for i in range(grid):
        for j in range(grid):
            cell = shapely.box(xs[j], ys[i + 1], xs[j + 1], ys[i])
            part = shapely.intersection(county_geom, cell)
            if not part.is_empty and part.area > 0:
                polys.append(part)
                ids.append(f"{fips}-g{i}{j}")
    polygons = gpd.GeoDataFrame({"bag_id": ids}, geometry=polys, crs=crs)
    classes = [0, 1]
    stats = polygon_class_fractions(label_path, polygons, "bag_id", classes, nodata=-1)
    bags = chip_bags(chips, str(crs), polygons, "bag_id", stats, classes, polygons_source=str(counties),
                     stats_source=str(label_path))
    truth_map = np.where(lab < 0, -1, lab).astype(np.int64)
    truth, valid = chip_fractions(truth_map, len(classes))
    mean = np.nan_to_num(np.nanmean(pix_raw, axis=(0, 2, 3)))
    std = np.nan_to_num(np.nanstd(pix_raw, axis=(0, 2, 3)), nan=1.0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    pixels = np.nan_to_num((pix_raw - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    raw_feats = band_statistics(pix_raw)
    feats, fmean, fstd = zscore(raw_feats)
    cent = gpd.GeoSeries(shapely.centroid(polygons.geometry.values), crs=crs)  # centroids for merging only
    data = LLPData(chips=chips[["chip_id", "index", "col", "row", "split"]], bags=bags,
                   bag_pixels=stats.set_index("bag_id")["valid_pixels"].astype(float),
                   bag_xy=pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=ids), classes=classes,
                   truth=truth, truth_valid=valid > 0, features=feats, pixels=pixels,
                   pixel_norm=(mean.astype(np.float32), std), truth_map=truth_map, feature_source="s1-band-stats")
    return data, {"chips_table": chips, "polygons": polygons, "stats": stats, "grid_crs": str(crs),
                  "sources": [str(s1_path), str(label_path), str(counties)]}


def run_real_case(real_dir: str | Path, tracking_uri: str, out_dir: str | Path, *, chip: int = 32, grid: int = 4,
                  models: tuple[str, ...] = MODELS, steps: int = 300, lr: float = 0.03, loss: str = "kl",
                  test_fraction: float = 0.25, seed: int = 0, bag_sizes: tuple[int, ...] = (1, 2, 4),
                  experiment: str = "sarflow-llp-real") -> dict:
    """LLP on the real Kansas Sen1Floods11 chip (water vs dry from S1), logged to MLflow."""
    import hashlib

    import mlflow

    from sarflow.features.bags import write_chip_bags
    from sarflow.mlops.lineage import code_commit
    from sarflow.mlops.tracking import setup_mlflow

    t0 = time.perf_counter()
    data, extra = prepare_real_data(real_dir, chip=chip, grid=grid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bags_path = write_chip_bags(data.bags, extra["chips_table"], out, crs=extra["grid_crs"])
    extra["stats"].to_csv(out / "bag_statistics.csv", index=False, float_format="%.6f")
    extra["polygons"].to_file(out / "bags.geojson", driver="GeoJSON")
    train_bags, test_rows = train_test(data, "bags", test_fraction, seed)
    kw = dict(loss=loss, steps=steps, lr=lr, hidden=16, prototypes=32, stride=8, seed=seed)
    results = fit_and_evaluate(data, tuple(models), train_bags, test_rows, **kw)
    best = min(models, key=lambda m: results[m]["metrics"]["proportion_mae"])
    table = results_table(results)
    curve = bag_size_curve(data, train_bags, test_rows, bag_sizes, "linear", done=results, **kw) if bag_sizes else None
    table_path, plots = write_outputs(out, table, curve, data, results, best, test_rows)
    setup_mlflow(tracking_uri, experiment)
    mlflow.set_experiment(experiment)
    digest = hashlib.sha256()
    for s in extra["sources"]:
        digest.update(Path(s).read_bytes())
    metrics = {"baseline_mae": results[best]["metrics"]["baseline_mae"],
               "test_proportion_mae": results[best]["metrics"]["proportion_mae"],
               "test_f1_macro": results[best]["metrics"]["f1_macro"]}
    metrics.update(model_metrics(results, models))
    with mlflow.start_run(run_name=f"llp-real-{KANSAS}") as run:
        mlflow.set_tags({"sarflow.dataset": f"sen1floods11/{KANSAS} + admin/geojson-counties-fips.json ({KANSAS_FIPS})",
                         "sarflow.dataset_sha256": digest.hexdigest(), "sarflow.code_commit": code_commit(),
                         "sarflow.llp.classes": "[0, 1]", "sarflow.llp.best_model": best})
        mlflow.log_params({"chip": chip, "grid": grid, "bags": len(data.bags.proportions), "train_bags": len(train_bags),
                           "test_chips": len(test_rows), "outside_chips": len(data.bags.outside), "models": ",".join(models),
                           "steps": steps, "lr": lr, "loss": loss, "seed": seed, "features": data.feature_source})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        for p in [table_path, out / "llp_results.json", out / "bag_statistics.csv", *plots]:
            mlflow.log_artifact(str(p), "llp")
    return {"run_id": run.info.run_id, "metrics": metrics, "table": str(table_path), "plots": [str(p) for p in plots],
            "bags": str(bags_path), "outside": len(data.bags.outside), "best_model": best,
            "rows": table.to_dict(orient="records"), "curve": curve.to_dict(orient="records") if curve is not None else [],
            "seconds": time.perf_counter() - t0}
