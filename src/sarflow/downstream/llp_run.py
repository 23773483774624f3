"""Learning from label proportions end to end: bags from polygons x chips, four LLP models
trained on bag proportions only, evaluation on the fine labels of held-out chips, a bag-size
curve, an LLP map, MLflow logging and registration of the best model.

    run_llp(LLPConfig(store=..., tracking_uri=..., polygons=..., stats=...))

- bag proportions come from a statistics CSV (``<id>, frac_<class>...``: the realistic input,
  e.g. census or agricultural statistics per municipality) or are aggregated from a coarse
  label raster over each polygon (`polygon_class_fractions`, rasterio masking);
- bags are split into train and test bags (``split="bags"``; test chips are the chips in no
  training bag) or by the store's split (``split="store"``);
- models: ``linear`` / ``mlp`` (`InstanceClassifier`) and ``kdm`` (`KDM`) on the chip embeddings
  of the features root (or per-chip band statistics when there are none: logged as
  ``features=band-stats``), ``conv`` (`StridedConvLLP`) on the S1 + S2 pixels normalised with the
  store statistics (NaN -> 0), whose coarse map is also scored pixel-wise;
- the best model (lowest test proportion MAE) is registered as ``sarflow-<task>`` with
  `log_downstream_model` in a nested run; ``models:/sarflow-llp-landcover/<v>`` loaded with
  ``mlflow.pyfunc.load_model`` maps raw embeddings (or raw pixels for ``conv``) to class
  proportions (rows summing to 1, columns in the order of the ``sarflow.llp.classes`` tag).

`run_real_case` runs the same models on a real Sen1Floods11 chip (Kansas, county FIPS 20121):
water vs dry from S1 only, with bags = the county cut into grid cells and bag proportions
aggregated from the hand label raster.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from sarflow.downstream.kdm import KDM
from sarflow.downstream.llp import (Bags, InstanceClassifier, StridedConvLLP, bag_matrix, chip_bags,
                                    evaluate_proportions, select_steps, train_llp)
from sarflow.errors import InputError
from sarflow.data.quicklook import WORLDCOVER_COLORS

log = logging.getLogger(__name__)

PRIMARY_METRIC = ("test_proportion_mae", False)  # (metric, higher is better)
MODELS = ("linear", "mlp", "kdm", "conv")


@dataclass
class LLPConfig:
    store: str
    tracking_uri: str
    polygons: str
    id_column: str = "muni_id"
    stats: str | None = None  # CSV: id_column, frac_<class>... (optionally valid_pixels)
    label_raster: str | None = None  # or: aggregate bag proportions from a coarse label raster
    label_nodata: float | None = None  # nodata of the label raster (default: its own, else 0)
    features_root: str | None = None  # embeddings partitions; the bags are written here
    model: str | None = None  # embeddings partition (default: the newest)
    version: str | None = None
    models: tuple[str, ...] = MODELS
    loss: str = "kl"
    steps: int = 300  # at most: with val_fraction > 0 the steps are chosen on held-out training bags
    lr: float = 0.03
    val_fraction: float = 0.25  # training bags held out to choose the steps (0: train `steps`)
    classes: tuple[int, ...] | None = None  # default: the classes of the statistics
    experiment: str = "sarflow-llp"
    register: bool = True
    task: str = "llp-landcover"
    seed: int = 0
    split: str = "bags"  # "bags": held-out bags; "store": the store's train vs val+test chips
    test_fraction: float = 0.3
    bag_sizes: tuple[int, ...] = (1, 2, 4, 8)  # bags merged per bag for the curve
    curve_model: str = "linear"
    hidden: int = 32
    prototypes: int = 48
    conv_stride: int = 8
    pixel_modalities: tuple[str, ...] = ("s1grd", "s2rgb")
    truth_modality: str = "worldcover"
    out_dir: str | None = None  # table and plots (default <features_root>/llp or a temp folder)


# ------------------------------------------------------------------ inputs

def read_polygons(path: str | Path, id_column: str):
    import geopandas as gpd

    p = Path(path)
    if not p.is_file():
        raise InputError(str(path), "the polygons file does not exist")
    try:
        gdf = gpd.read_file(p)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input
        raise InputError(str(path), f"not a readable vector file ({type(e).__name__}: {e})") from None
    if id_column not in gdf.columns:
        raise InputError(str(path), f"the polygons have no column {id_column!r} (they have "
                                    f"{[c for c in gdf.columns if c != 'geometry']})")
    if gdf.crs is None:
        raise InputError(str(path), "the polygons have no CRS")
    gdf[id_column] = gdf[id_column].astype(str)
    if gdf[id_column].duplicated().any():
        gdf = gdf.dissolve(by=id_column, as_index=False)
    return gdf


def read_stats(path: str | Path, id_column: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise InputError(str(path), "the statistics file does not exist")
    try:
        df = pd.read_csv(p, dtype={id_column: str})
    except Exception as e:  # noqa: BLE001
        raise InputError(str(path), f"not a readable CSV ({type(e).__name__}: {e})") from None
    if id_column not in df.columns:
        raise InputError(str(path), f"no id column {id_column!r} (columns: {list(df.columns)})")
    if not [c for c in df.columns if c.startswith("frac_")]:
        raise InputError(str(path), "no class proportion columns (frac_<class>)")
    return df


def stats_classes(stats: pd.DataFrame) -> list[int]:
    return sorted(int(c[len("frac_"):]) for c in stats.columns if c.startswith("frac_") and c[5:].lstrip("-").isdigit())


def polygon_class_fractions(raster: str | Path, polygons, id_column: str, classes: list[int] | None = None,
                            nodata: float | None = None) -> pd.DataFrame:
    """Per-polygon class fractions of a (coarse) label raster by rasterio masking: the
    "statistics" of each bag. Returns id_column, valid_pixels, frac_<class>..."""
    import rasterio
    from rasterio.mask import mask as rio_mask

    p = Path(raster)
    if not p.is_file():
        raise InputError(str(raster), "the label raster does not exist")
    try:
        src = rasterio.open(p)
    except Exception as e:  # noqa: BLE001
        raise InputError(str(raster), f"not a readable raster ({type(e).__name__}: {e})") from None
    with src:
        nod = nodata if nodata is not None else (src.nodata if src.nodata is not None else 0)
        polys = polygons.to_crs(src.crs)
        if classes is None:
            data = src.read(1)
            classes = sorted(int(v) for v in np.unique(data) if v != nod)
        rows = []
        for pid, geom in zip(polys[id_column], polys.geometry):
            try:
                arr, _ = rio_mask(src, [geom], crop=True, filled=True, nodata=nod, indexes=1)
            except ValueError:  # the polygon misses the raster
                arr = np.full((1, 1), nod)
            valid = arr[arr != nod]
            total = int(valid.size)
            rows.append({id_column: str(pid), "valid_pixels": total,
                         **{f"frac_{c}": (float((valid == c).sum()) / total if total else np.nan) for c in classes}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ data for the models

@dataclass
class LLPData:
    """Everything the models see and are scored on, rows in chip order."""

    chips: pd.DataFrame  # chip_id, index, col, row (grid position for maps), split
    bags: Bags
    bag_pixels: pd.Series  # bag_id -> weight when merging bags (valid pixels or area)
    bag_xy: pd.DataFrame  # bag_id -> x, y centroid (for merging neighbours)
    classes: list[int]
    truth: np.ndarray  # (n, k) chip class fractions from the fine labels
    truth_valid: np.ndarray  # (n,) bool: the chip has fine labels
    features: np.ndarray | None = None  # (n, d) embeddings or band statistics
    pixels: np.ndarray | None = None  # (n, c, H, W) normalised, NaN -> 0
    pixel_norm: tuple[np.ndarray, np.ndarray] | None = None  # mean, std per pixel channel (raw units)
    truth_map: np.ndarray | None = None  # (n, H, W) class position, -1 invalid
    feature_source: str = "embeddings"


class ProportionModel(nn.Module):
    """What is registered: raw inputs (embeddings, or pixels for conv) -> class proportions.
    Normalisation (and NaN -> 0) is part of the model."""

    def __init__(self, model: nn.Module, mean: np.ndarray, std: np.ndarray, classes: list[int], kind: str):
        super().__init__()
        self.model = model
        shape = (1, -1, 1, 1) if kind == "conv" else (1, -1)
        self.register_buffer("mean", torch.tensor(np.asarray(mean, np.float32)).reshape(shape))
        self.register_buffer("std", torch.tensor(np.asarray(std, np.float32)).reshape(shape))
        self.classes = [int(c) for c in classes]
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nan_to_num((x.float() - self.mean) / self.std, nan=0.0, posinf=0.0, neginf=0.0)
        return self.model.instance(x)


def _zscore(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.nanmean(x, axis=0)
    std = np.nanstd(x, axis=0)
    mean = np.nan_to_num(mean)
    std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
    return np.nan_to_num((x - mean) / std).astype(np.float32), mean.astype(np.float32), std.astype(np.float32)


def band_statistics(pixels_raw: np.ndarray) -> np.ndarray:
    """Per-chip mean and std of every band (raw units, NaN ignored): the fallback features."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.concatenate([np.nanmean(pixels_raw, axis=(2, 3)), np.nanstd(pixels_raw, axis=(2, 3))], axis=1)


def _newest_partition(root: str, model: str | None, version: str | None) -> tuple[str, str]:
    """The embeddings partition to use; ("", "") when the root has none and none was named."""
    from sarflow.features.embed import embedding_partitions, select_partition

    if model is None and version is None and not embedding_partitions(root):
        return "", ""
    found = select_partition(root, model, version)
    return found[0], found[1]


def _train_test(data: LLPData, split: str, test_fraction: float, seed: int) -> tuple[list[str], np.ndarray]:
    """Training bags and test rows (chips with fine labels in no training bag)."""
    m = data.bags.members
    bag_ids = sorted(m.bag_id.unique())
    if split == "store":
        row_split = data.chips["split"].to_numpy()
        train_idx = set(data.chips["index"][row_split == "train"].astype(int))
        train_bags = sorted(m[m["index"].astype(int).isin(train_idx)].bag_id.unique())
        test = (row_split != "train") & data.truth_valid
        return train_bags, np.flatnonzero(test)
    if split != "bags":
        raise InputError("split", f"unknown split {split!r}: bags or store")
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * len(bag_ids))))
    if len(bag_ids) < 2:
        raise InputError("bags", f"need at least 2 bags to hold some out, got {len(bag_ids)}")
    test_bags = set(rng.choice(bag_ids, size=min(n_test, len(bag_ids) - 1), replace=False).tolist())
    train_bags = [b for b in bag_ids if b not in test_bags]
    in_train = set(m[m.bag_id.isin(train_bags)]["index"].astype(int))
    in_test = set(m[m.bag_id.isin(test_bags)]["index"].astype(int))
    idx = data.chips["index"].astype(int).to_numpy()
    test = np.array([(i in in_test) and (i not in in_train) for i in idx]) & data.truth_valid
    return train_bags, np.flatnonzero(test)


def _subset_bags(bags: Bags, keep: list[str]) -> Bags:
    m = bags.members[bags.members.bag_id.isin(keep)]
    return Bags(members=m.reset_index(drop=True), outside=bags.outside, proportions=bags.proportions.loc[keep])


def merge_bags(data: LLPData, train_bags: list[str], factor: int, seed: int = 0) -> Bags:
    """Merges neighbouring training bags into ~len/factor bags (k-means on the bag centroids);
    the merged proportions are the pixel-weighted means of the merged bags' proportions."""
    bags = _subset_bags(data.bags, train_bags)
    if factor <= 1:
        return bags
    from sklearn.cluster import KMeans

    k = max(1, len(train_bags) // factor)
    xy = data.bag_xy.loc[train_bags][["x", "y"]].to_numpy()
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(xy) if k > 1 else np.zeros(len(xy), int)
    new_id = {b: f"merged{int(lab):04d}" for b, lab in zip(train_bags, labels)}
    w = data.bag_pixels.loc[train_bags].to_numpy(np.float64)
    props = bags.proportions.loc[train_bags].mul(w, axis=0)
    props["_new"] = [new_id[b] for b in train_bags]
    merged = props.groupby("_new").sum()
    merged = merged.div(merged.sum(axis=1).replace(0, 1), axis=0)
    m = bags.members.assign(bag_id=bags.members.bag_id.map(new_id))
    m = m.groupby(["chip_id", "index", "bag_id"], as_index=False)[["weight", "area_fraction"]].sum()
    return Bags(members=m, outside=bags.outside, proportions=merged)


def _make_model(name: str, x_train: torch.Tensor, k: int, hidden: int, prototypes: int,
                stride: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if name == "linear":
        return InstanceClassifier(x_train.shape[1], k)
    if name == "mlp":
        return InstanceClassifier(x_train.shape[1], k, hidden=hidden)
    if name == "kdm":
        return KDM.from_data(x_train, k, n_prototypes=prototypes, seed=seed)
    if name == "conv":
        return StridedConvLLP(x_train.shape[1], k, stride=stride)
    raise InputError("models", f"unknown LLP model {name!r}: one of {list(MODELS)}")


def _chip_fractions(truth_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) class fractions of each chip of a class-position map (n, H, W; -1 invalid), and
    the (n,) count of its valid pixels."""
    counts = np.stack([(truth_map == i).sum(axis=(1, 2)) for i in range(k)], axis=1).astype(np.float64)
    valid = counts.sum(1)
    return counts / np.maximum(valid, 1)[:, None], valid


def _block_counts(truth_map: np.ndarray, h: int, w: int, k: int) -> np.ndarray:
    """(n, k, h, w) pixel count of each class in each block of the truth map (n, H, W) cut
    into h x w blocks (trailing rows / columns that fill no block are left out)."""
    n, H, W = truth_map.shape
    sy, sx = H // h, W // w
    t = truth_map[:, : h * sy, : w * sx].reshape(n, h, sy, w, sx)
    return np.stack([(t == c).sum(axis=(2, 4)) for c in range(k)], axis=1)


def _pixel_scores(coarse: np.ndarray, truth_map: np.ndarray, k: int) -> dict:
    """Macro F1/IoU of the coarse map (n, k, h, w) against the truth map majority per block."""
    from sklearn.metrics import f1_score, jaccard_score

    h, w = coarse.shape[2:]
    sy, sx = truth_map.shape[1] // h, truth_map.shape[2] // w
    counts = _block_counts(truth_map, h, w, k)
    valid = counts.sum(axis=1) > 0.5 * sy * sx
    y = counts.argmax(axis=1)[valid]
    yhat = coarse.argmax(axis=1)[valid]
    labels = np.unique(y)
    if y.size == 0:
        return {"pixel_f1_macro": float("nan"), "pixel_iou_macro": float("nan")}
    return {"pixel_f1_macro": float(f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "pixel_iou_macro": float(jaccard_score(y, yhat, labels=labels, average="macro", zero_division=0))}


def fit_and_evaluate(data: LLPData, models: tuple[str, ...], train_bags: list[str], test_rows: np.ndarray, *,
                     loss: str = "kl", steps: int = 300, lr: float = 0.03, hidden: int = 32, prototypes: int = 48,
                     stride: int = 8, seed: int = 0, num_threads: int = 1, val_fraction: float = 0.25) -> dict:
    """Trains every model on the training bags' proportions; scores each on the test chips.
    With `val_fraction` > 0 the number of steps (at most `steps`) is chosen on held-out
    training bags first (`select_steps`: bag proportions only), then the model is refit on
    every training bag. Returns {name: {"model", "metrics", "pred" (all rows), "coarse"
    (conv), "seconds"}}."""
    bags = _subset_bags(data.bags, train_bags)
    k = len(data.classes)
    in_bags = data.chips["index"].astype(int).isin(set(bags.members["index"].astype(int))).to_numpy()
    in_bags[test_rows] = False  # test chips never enter a training bag (with split="store" they are dropped from it)
    rows = np.flatnonzero(in_bags)
    row_of = {int(data.chips["index"].iloc[r]): j for j, r in enumerate(rows)}
    a, ids = bag_matrix(bags, len(rows), row_of)
    nonempty = (a.sum(dim=1) > 0).numpy()
    a, ids = a[nonempty], [b for b, keep in zip(ids, nonempty) if keep]
    if not ids:
        raise InputError("bags", "no training bag has a training chip")
    target = torch.tensor(bags.proportions.loc[ids].to_numpy(np.float64), dtype=torch.float32)
    mean_prop = target.mean(dim=0).numpy()
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, num_threads))  # tiny full-batch models: more threads only contend
    try:
        for name in models:
            _fit_one(name, data, out, rows, a, target, mean_prop, test_rows, k, loss, steps, lr, hidden, prototypes,
                     stride, seed, val_fraction)
    finally:
        torch.set_num_threads(threads)
    out["_mean_prop"] = mean_prop
    return out


def _fit_one(name, data, out, rows, a, target, mean_prop, test_rows, k, loss, steps, lr, hidden, prototypes, stride,
             seed, val_fraction) -> None:
    """Trains one model on the bag matrix `a` and scores it on the test rows (into out[name])."""
    t0 = time.perf_counter()
    if name == "conv":
        if data.pixels is None:
            raise InputError("models", "the conv model needs pixels")
        x_all = torch.from_numpy(data.pixels)
    else:
        if data.features is None:
            raise InputError("models", f"the {name} model needs chip features")
        x_all = torch.from_numpy(data.features)
    x_train = x_all[rows]

    def make():
        return _make_model(name, x_train, k, hidden, prototypes, stride, seed)

    chosen, curve = (select_steps(make, x_train, a, target, loss=loss, steps=steps, lr=lr, seed=seed,
                                  val_fraction=val_fraction) if val_fraction > 0 else (steps, []))
    model = make()
    history = train_llp(model, x_train, a, target, loss=loss, steps=chosen, lr=lr, seed=seed)
    model.eval()
    with torch.no_grad():
        pred = model.instance(x_all).numpy()
        coarse = model.coarse_map(x_all).numpy() if name == "conv" else None
    metrics = evaluate_proportions(pred[test_rows], data.truth[test_rows], mean_prop)
    metrics["final_loss"] = history[-1]
    metrics["steps"] = chosen
    if curve:
        metrics["val_bag_loss"] = min(v for _, v in curve)
    if coarse is not None and data.truth_map is not None:
        metrics.update(_pixel_scores(coarse[test_rows], data.truth_map[test_rows], k))
    out[name] = {"model": model, "metrics": metrics, "pred": pred, "coarse": coarse,
                 "seconds": time.perf_counter() - t0}
    log.info("LLP %s: test MAE %.4f (baseline %.4f), %d steps, in %.1fs", name, metrics["proportion_mae"],
             metrics["baseline_mae"], chosen, out[name]["seconds"])


def bag_size_curve(data: LLPData, train_bags: list[str], test_rows: np.ndarray, factors, model: str,
                   done: dict | None = None, **kw) -> pd.DataFrame:
    """Test MAE vs bag size: training bags merged `factor` at a time (`done`: results of
    fit_and_evaluate on the original bags, reused for factor 1)."""
    rows = []
    for f in factors:
        merged = merge_bags(data, train_bags, int(f), seed=kw.get("seed", 0))
        sizes = merged.members.groupby("bag_id")["area_fraction"].sum()
        if int(f) <= 1 and done is not None and model in done:
            res = done[model]["metrics"]
        else:
            sub = LLPData(**{**data.__dict__, "bags": merged})
            res = fit_and_evaluate(sub, (model,), sorted(merged.proportions.index), test_rows, **kw)[model]["metrics"]
        rows.append({"merge_factor": int(f), "bags": int(len(merged.proportions)), "mean_chips_per_bag": float(sizes.mean()),
                     "model": model, "proportion_mae": res["proportion_mae"], "baseline_mae": res["baseline_mae"],
                     "f1_macro": res["f1_macro"]})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ tables and plots

def model_metrics(results: dict, names) -> dict[str, float]:
    """Every model's test scores, final loss and chosen steps, as flat MLflow metrics `<model>_<name>`."""
    out = {}
    for m in names:
        r = results[m]["metrics"]
        for key in ("proportion_mae", "f1_macro", "iou_macro", "final_loss", "steps", "val_bag_loss",
                    "pixel_f1_macro", "pixel_iou_macro"):
            if key in r:
                out[f"{m}_{key}"] = float(r[key])
    return out


def results_table(results: dict) -> pd.DataFrame:
    rows = []
    for name, r in results.items():
        if name.startswith("_"):
            continue
        m = r["metrics"]
        rows.append({"model": name, "proportion_mae": m["proportion_mae"], "f1_macro": m["f1_macro"],
                     "iou_macro": m["iou_macro"], "pixel_f1_macro": m.get("pixel_f1_macro", np.nan),
                     "pixel_iou_macro": m.get("pixel_iou_macro", np.nan), "seconds": r["seconds"]})
    first = next(r for n, r in results.items() if not n.startswith("_"))["metrics"]
    rows.append({"model": "baseline (mean proportions)", "proportion_mae": first["baseline_mae"],
                 "f1_macro": first["baseline_f1_macro"], "iou_macro": np.nan, "pixel_f1_macro": np.nan,
                 "pixel_iou_macro": np.nan, "seconds": 0.0})
    return pd.DataFrame(rows)


def _colors(classes: list[int]):
    from matplotlib.colors import ListedColormap

    if set(classes) <= {0, 1}:
        palette = {0: "#d8c8a0", 1: "#1f5fd0"}
    else:
        palette = WORLDCOVER_COLORS
    return ListedColormap([palette.get(int(c), f"C{i}") for i, c in enumerate(classes)] + ["#ffffff"])


def _grid_image(values: np.ndarray, chips: pd.DataFrame, block: int = 1) -> np.ndarray:
    """Chip values (n,) or blocks (n, b, b) placed at their grid position; -1 where no chip."""
    col = chips["col"].to_numpy(int)
    row = chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    img = np.full(((row.max() + 1) * block, (col.max() + 1) * block), -1, dtype=np.int64)
    for i in range(len(chips)):
        v = values[i]
        img[row[i] * block:(row[i] + 1) * block, col[i] * block:(col[i] + 1) * block] = v
    return img


def plot_llp_map(data: LLPData, results: dict, best: str, path: Path, test_rows: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(data.classes)
    cmap = _colors(data.classes)
    truth = np.where(data.truth_valid, data.truth.argmax(1), -1)
    pred = results[best]["pred"].argmax(1)
    panels = [(f"truth: chip majority class", _grid_image(truth, data.chips)),
              (f"LLP {best}: predicted majority", _grid_image(pred, data.chips))]
    conv = results.get("conv")
    if conv is not None and conv["coarse"] is not None and data.truth_map is not None:
        cm = conv["coarse"].argmax(1)
        b = cm.shape[1]
        counts = _block_counts(data.truth_map, b, b, k)
        tm = np.where(counts.sum(1) > 0, counts.argmax(1), -1)
        panels += [("truth downsampled", _grid_image(tm, data.chips, b)), ("LLP conv: coarse map", _grid_image(cm, data.chips, b))]
    from matplotlib.patches import Rectangle

    col = data.chips["col"].to_numpy(int)
    row = data.chips["row"].to_numpy(int)
    col, row = col - col.min(), row - row.min()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2))
    for ax, (title, img) in zip(np.atleast_1d(axes), panels):
        shown = np.where(img < 0, k, img)
        ax.imshow(shown, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        b = img.shape[0] // (row.max() + 1)
        for r in test_rows:
            ax.add_patch(Rectangle((col[r] * b - 0.5, row[r] * b - 0.5), b, b, fill=False, ec="k", lw=0.7))
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(k)]
    fig.legend(handles, [str(c) for c in data.classes], loc="lower center", ncol=min(k, 10), fontsize=8)
    fig.suptitle("learning from label proportions (black outline: held-out test chips)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curve(curve: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(curve.mean_chips_per_bag, curve.proportion_mae, "o-", label=f"LLP {curve.model.iloc[0]}")
    ax.plot(curve.mean_chips_per_bag, curve.baseline_mae, "--", color="grey", label="mean-proportion baseline")
    ax.set_xscale("log")
    ax.set_xticks(curve.mean_chips_per_bag, [f"{v:.1f}" for v in curve.mean_chips_per_bag])
    ax.minorticks_off()
    ax.set_xlabel("mean chips per bag")
    ax.set_ylabel("per-chip proportion MAE (test)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ------------------------------------------------------------------ the synthetic / store pipeline

def _store_pixels(group, modalities: tuple[str, ...], n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Raw pixels (NaN where invalid), normalised pixels (NaN -> 0), per-channel mean and std."""
    from sarflow.downstream.baselines import band_mean_std, read_float

    raws, means, stds = [], [], []
    for name in modalities:
        if name not in group.attrs["modalities"]:
            continue
        arr = group[name]
        raws.append(read_float(arr, n))
        mean, std = band_mean_std(arr)
        means.append(mean)
        stds.append(std)
    if not raws:
        raise InputError("pixel_modalities", f"the store has none of {list(modalities)}")
    raw = np.concatenate(raws, axis=1)
    mean, std = np.concatenate(means), np.concatenate(stds)
    norm = np.nan_to_num((raw - mean[None, :, None, None]) / std[None, :, None, None], nan=0.0, posinf=0.0, neginf=0.0)
    return raw, norm.astype(np.float32), mean, std


def prepare_store_data(cfg: LLPConfig) -> tuple[LLPData, dict]:
    """Bags, features, pixels and fine labels of a chip store."""
    from sarflow.data.chipstore import open_chip_group, read_chip_table

    polygons = read_polygons(cfg.polygons, cfg.id_column)
    if (cfg.stats is None) == (cfg.label_raster is None):
        raise InputError("llp", "give exactly one of --stats (a CSV) or --label-raster (a raster)")
    try:
        group = open_chip_group(cfg.store)
    except Exception as e:  # noqa: BLE001
        raise InputError(cfg.store, f"not a chip store ({type(e).__name__})") from None
    if "modalities" not in group.attrs:
        raise InputError(cfg.store, "not a sarflow chip store (no 'modalities' attribute)")
    chips = read_chip_table(cfg.store).sort_values("index").reset_index(drop=True)
    n = len(chips)
    if cfg.stats is not None:
        stats = read_stats(cfg.stats, cfg.id_column)
        source = cfg.stats
    else:
        stats = polygon_class_fractions(cfg.label_raster, polygons, cfg.id_column,
                                        list(cfg.classes) if cfg.classes else None, cfg.label_nodata)
        source = cfg.label_raster
    classes = list(cfg.classes) if cfg.classes else stats_classes(stats)
    bags = chip_bags(chips, group.attrs["crs"], polygons, cfg.id_column, stats, classes,
                     polygons_source=cfg.polygons, stats_source=source)
    if bags.members.empty:
        raise InputError(cfg.polygons, f"no chip of {cfg.store} intersects any polygon")
    polys_grid = polygons.to_crs(group.attrs["crs"])
    cent = polys_grid.geometry.centroid
    bag_xy = pd.DataFrame({"x": cent.x.to_numpy(), "y": cent.y.to_numpy()}, index=polys_grid[cfg.id_column].astype(str))
    if "valid_pixels" in stats.columns:
        bag_pixels = stats.set_index(stats[cfg.id_column].astype(str))["valid_pixels"].astype(float)
    else:
        bag_pixels = pd.Series(polys_grid.geometry.area.to_numpy(), index=polys_grid[cfg.id_column].astype(str))
    # fine labels (evaluation only)
    if cfg.truth_modality not in group.attrs["modalities"]:
        raise InputError(cfg.store, f"no {cfg.truth_modality!r} modality to evaluate the chips against")
    wc = group[cfg.truth_modality][:n][:, 0]
    code_pos = {c: i for i, c in enumerate(classes)}
    truth_map = np.full(wc.shape, -1, np.int64)
    for c, i in code_pos.items():
        truth_map[wc == c] = i
    truth, valid = _chip_fractions(truth_map, len(classes))
    raw, pixels, pmean, pstd = _store_pixels(group, cfg.pixel_modalities, n)
    # chip features: embeddings of the features root, or band statistics
    feature_source, emb_model, emb_version = "band-stats", "", ""
    if cfg.features_root:
        emb_model, emb_version = _newest_partition(cfg.features_root, cfg.model, cfg.version)
    if emb_model:
        from sarflow.features.embed import embedding_matrix, read_embeddings

        table = read_embeddings(cfg.features_root, emb_model, emb_version)
        emb = embedding_matrix(table)
        pos = {c: i for i, c in enumerate(table.column("chip_id").to_pylist())}
        missing = [c for c in chips.chip_id if c not in pos]
        if missing:
            raise InputError(str(Path(cfg.features_root) / "embeddings" / f"model={emb_model}" / f"version={emb_version}"),
                             f"no embeddings for {len(missing)} chip(s) of the store, e.g. {missing[0]}")
        raw_feats = emb[[pos[c] for c in chips.chip_id]]
        feature_source = f"{emb_model}/v{emb_version}"
    else:
        if cfg.model or cfg.version:
            raise InputError("features_root", "a --model/--version needs a --features-root with embeddings")
        raw_feats = band_statistics(raw)
        log.warning("no embeddings under %s: using per-chip band statistics as features", cfg.features_root)
    feats, fmean, fstd = _zscore(raw_feats)
    # grid position for the maps: column from x, row from -y (north up)
    side = float((chips.maxx - chips.minx).iloc[0])
    table_chips = pd.DataFrame({"chip_id": chips.chip_id.astype(str), "index": chips["index"].astype(int),
                                "col": np.round((chips.minx - chips.minx.min()) / side).astype(int),
                                "row": np.round((chips.maxy.max() - chips.maxy) / side).astype(int),
                                "split": chips["split"].astype(str) if "split" in chips else "train"})
    data = LLPData(chips=table_chips, bags=bags, bag_pixels=bag_pixels, bag_xy=bag_xy, classes=classes, truth=truth,
                   truth_valid=valid > 0, features=feats, pixels=pixels, pixel_norm=(pmean, pstd), truth_map=truth_map,
                   feature_source=feature_source)
    extra = {"chips_table": chips, "grid_crs": group.attrs["crs"], "feature_norm": (fmean, fstd),
             "raw_features": raw_feats.astype(np.float32), "raw_pixels": raw, "embedding_model": emb_model,
             "embedding_version": emb_version, "stats_source": source}
    return data, extra


def _out_dir(cfg_out: str | None, features_root: str | None) -> Path:
    if cfg_out:
        out = Path(cfg_out)
    elif features_root and not str(features_root).startswith("s3://"):
        out = Path(features_root) / "llp"
    else:
        out = Path(tempfile.mkdtemp(prefix="sarflow-llp-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_outputs(out: Path, table: pd.DataFrame, curve: pd.DataFrame | None, data: LLPData, results: dict,
                   best: str, test_rows: np.ndarray) -> tuple[Path, list[Path]]:
    table_path = out / "llp_results.csv"
    table.to_csv(table_path, index=False, float_format="%.5f")
    (out / "llp_results.json").write_text(json.dumps(table.to_dict(orient="records"), indent=1, default=float))
    plots = [plot_llp_map(data, results, best, out / "llp_map.png", test_rows)]
    if curve is not None and len(curve):
        curve.to_csv(out / "bag_size_curve.csv", index=False, float_format="%.5f")
        plots.append(plot_curve(curve, out / "bag_size_curve.png"))
    return table_path, plots


def run_llp(cfg: LLPConfig) -> dict:
    """The whole LLP experiment on a chip store; see the module docstring."""
    import mlflow

    from sarflow.downstream.models import log_downstream_model
    from sarflow.features.bags import write_chip_bags
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    t0 = time.perf_counter()
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown or not cfg.models:
        raise InputError("models", f"unknown LLP model(s) {unknown}: choose from {list(MODELS)}")
    if not 0 <= cfg.val_fraction < 1:
        raise InputError("val_fraction", f"{cfg.val_fraction} is not a fraction of the training bags in [0, 1)")
    data, extra = prepare_store_data(cfg)
    out = _out_dir(cfg.out_dir, cfg.features_root)
    bags_path = write_chip_bags(data.bags, extra["chips_table"], cfg.features_root or out, crs=extra["grid_crs"])
    train_bags, test_rows = _train_test(data, cfg.split, cfg.test_fraction, cfg.seed)
    if len(test_rows) == 0:
        raise InputError(cfg.polygons, "no test chip: every chip with labels is in a training bag")
    kw = dict(loss=cfg.loss, steps=cfg.steps, lr=cfg.lr, hidden=cfg.hidden, prototypes=cfg.prototypes,
              stride=cfg.conv_stride, seed=cfg.seed, val_fraction=cfg.val_fraction)
    results = fit_and_evaluate(data, tuple(cfg.models), train_bags, test_rows, **kw)
    names = list(cfg.models)
    best = min(names, key=lambda m: results[m]["metrics"]["proportion_mae"])
    table = results_table(results)
    curve = None
    if cfg.bag_sizes and cfg.curve_model in MODELS:
        curve = bag_size_curve(data, train_bags, test_rows, cfg.bag_sizes, cfg.curve_model, done=results, **kw)
    table_path, plots = _write_outputs(out, table, curve, data, results, best, test_rows)

    setup_mlflow(cfg.tracking_uri, cfg.experiment)
    mlflow.set_experiment(cfg.experiment)
    lineage = dataset_lineage(cfg.store)
    dataset_md5 = lineage.get("sarflow.dataset_dvc_md5", "untracked")
    metrics = {"baseline_mae": results[best]["metrics"]["baseline_mae"],
               "baseline_f1_macro": results[best]["metrics"]["baseline_f1_macro"]}
    metrics.update(model_metrics(results, names))
    metrics.update({"test_proportion_mae": results[best]["metrics"]["proportion_mae"],
                    "test_f1_macro": results[best]["metrics"]["f1_macro"],
                    "test_iou_macro": results[best]["metrics"]["iou_macro"]})
    if curve is not None:
        for row in curve.itertuples():
            metrics[f"curve_mae_x{row.merge_factor}"] = row.proportion_mae
    n_bags = data.bags.members.bag_id.nunique()
    params = {"polygons": cfg.polygons, "id_column": cfg.id_column, "proportions_source": extra["stats_source"],
              "proportions_from": "stats" if cfg.stats else "label_raster", "features": data.feature_source,
              "models": ",".join(names), "loss": cfg.loss, "steps": cfg.steps, "val_fraction": cfg.val_fraction, "lr": cfg.lr,
              "classes": ",".join(map(str, data.classes)), "split": cfg.split, "test_fraction": cfg.test_fraction,
              "seed": cfg.seed, "bags": n_bags, "train_bags": len(train_bags), "test_chips": len(test_rows),
              "chips": len(data.chips), "outside_chips": len(data.bags.outside), "best_model": best,
              "bag_sizes": ",".join(map(str, cfg.bag_sizes)), "hidden": cfg.hidden, "prototypes": cfg.prototypes,
              "conv_stride": cfg.conv_stride, "pixel_modalities": ",".join(cfg.pixel_modalities)}
    registered = {"name": None, "version": None}
    with mlflow.start_run(run_name=cfg.task if cfg.task.startswith("llp-") else f"llp-{cfg.task}") as run:
        mlflow.set_tags({**lineage, "sarflow.task": cfg.task, "sarflow.llp.best_model": best,
                         "sarflow.llp.classes": json.dumps(data.classes)})
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_artifact(str(table_path), "llp")
        mlflow.log_artifact(str(out / "llp_results.json"), "llp")
        if curve is not None:
            mlflow.log_artifact(str(out / "bag_size_curve.csv"), "llp")
        for p in plots:
            mlflow.log_artifact(str(p), "llp")
        if data.bags.outside:
            mlflow.log_text("\n".join(data.bags.outside), "llp/outside_chips.txt")
        if cfg.register:
            with mlflow.start_run(run_name=f"register-{best}", nested=True):
                mlflow.set_tags({**lineage, "sarflow.task": cfg.task, "sarflow.llp.model": best,
                                 "sarflow.llp.classes": json.dumps(data.classes)})
                if best == "conv":
                    wrapped = ProportionModel(results[best]["model"], *data.pixel_norm, data.classes, "conv")
                    example = np.nan_to_num(extra["raw_pixels"][test_rows[:4]])
                else:
                    wrapped = ProportionModel(results[best]["model"], *extra["feature_norm"], data.classes, best)
                    example = extra["raw_features"][test_rows[:4]]
                info = log_downstream_model(
                    wrapped, cfg.task, example, lineage=lineage, eval_set=f"{dataset_md5}:llp:test",
                    metrics={"test_proportion_mae": metrics["test_proportion_mae"],
                             "test_f1_macro": metrics["test_f1_macro"]})
                registered = {"name": info["name"], "version": info["version"]}
                mlflow.MlflowClient().set_model_version_tag(info["name"], info["version"], "sarflow.llp.classes",
                                                            json.dumps(data.classes))
                mlflow.MlflowClient().set_model_version_tag(info["name"], info["version"], "sarflow.llp.input",
                                                            "pixels" if best == "conv" else data.feature_source)
    log.info("LLP done in %.1fs: best %s, test MAE %.4f vs baseline %.4f", time.perf_counter() - t0, best,
             metrics["test_proportion_mae"], metrics["baseline_mae"])
    return {"run_id": run.info.run_id, "registered": registered, "metrics": metrics, "table": str(table_path),
            "plots": [str(p) for p in plots], "bags": str(bags_path), "outside": len(data.bags.outside),
            "outside_chips": list(data.bags.outside), "best_model": best, "features": data.feature_source,
            "curve": str(out / "bag_size_curve.csv") if curve is not None else None, "rows": table.to_dict(orient="records"),
            "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------ the real Kansas case

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
    truth, valid = _chip_fractions(truth_map, len(classes))
    mean = np.nan_to_num(np.nanmean(pix_raw, axis=(0, 2, 3)))
    std = np.nan_to_num(np.nanstd(pix_raw, axis=(0, 2, 3)), nan=1.0)
    std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
    pixels = np.nan_to_num((pix_raw - mean[None, :, None, None]) / std[None, :, None, None]).astype(np.float32)
    raw_feats = band_statistics(pix_raw)
    feats, fmean, fstd = _zscore(raw_feats)
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
    train_bags, test_rows = _train_test(data, "bags", test_fraction, seed)
    kw = dict(loss=loss, steps=steps, lr=lr, hidden=16, prototypes=32, stride=8, seed=seed)
    results = fit_and_evaluate(data, tuple(models), train_bags, test_rows, **kw)
    best = min(models, key=lambda m: results[m]["metrics"]["proportion_mae"])
    table = results_table(results)
    curve = bag_size_curve(data, train_bags, test_rows, bag_sizes, "linear", done=results, **kw) if bag_sizes else None
    table_path, plots = _write_outputs(out, table, curve, data, results, best, test_rows)
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
