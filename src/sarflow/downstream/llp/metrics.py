"""Scores of LLP predictions: per-chip proportion MAE and majority-class F1/IoU against the fine
labels next to the mean-proportion baseline, pixel scores of a coarse map, and the results table."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sarflow.downstream.llp.data import block_counts


def evaluate_proportions(pred: np.ndarray, truth: np.ndarray, train_bag_mean: np.ndarray) -> dict:
    """Per-chip proportion MAE of the model and of the mean-proportion baseline; chip-level
    macro F1/IoU of the majority class."""
    from sklearn.metrics import f1_score, jaccard_score

    mae = float(np.abs(pred - truth).mean())
    base = float(np.abs(train_bag_mean[None] - truth).mean())
    y, yhat = truth.argmax(1), pred.argmax(1)
    labels = np.unique(y)
    return {"proportion_mae": mae, "baseline_mae": base, "improvement": base - mae,
            "f1_macro": float(f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "iou_macro": float(jaccard_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "baseline_f1_macro": float(f1_score(y, np.full_like(y, train_bag_mean.argmax()), labels=labels,
                                                average="macro", zero_division=0))}


def pixel_scores(coarse: np.ndarray, truth_map: np.ndarray, k: int) -> dict:
    """Macro F1/IoU of the coarse map (n, k, h, w) against the truth map majority per block."""
    from sklearn.metrics import f1_score, jaccard_score

    h, w = coarse.shape[2:]
    sy, sx = truth_map.shape[1] // h, truth_map.shape[2] // w
    counts = block_counts(truth_map, h, w, k)
    valid = counts.sum(axis=1) > 0.5 * sy * sx
    y = counts.argmax(axis=1)[valid]
    yhat = coarse.argmax(axis=1)[valid]
    labels = np.unique(y)
    if y.size == 0:
        return {"pixel_f1_macro": float("nan"), "pixel_iou_macro": float("nan")}
    return {"pixel_f1_macro": float(f1_score(y, yhat, labels=labels, average="macro", zero_division=0)),
            "pixel_iou_macro": float(jaccard_score(y, yhat, labels=labels, average="macro", zero_division=0))}


def model_metrics(results: dict, names) -> dict[str, float]:
    """Every model's test scores, final loss, chosen steps and held-out bag scores, as flat MLflow
    metrics `<model>_<name>`."""
    out = {}
    for m in names:
        r = results[m]["metrics"]
        for key in ("proportion_mae", "f1_macro", "iou_macro", "final_loss", "steps", "val_bag_loss", "val_bag_mae",
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
