"""Segmentation scores: IoU per class = TP / (TP + FP + FN) over non-ignored pixels; mIoU is the
mean over classes present in truth or prediction; pixel accuracy over non-ignored pixels."""

from __future__ import annotations

import numpy as np

IGNORE = -100  # torch's cross-entropy default ignore_index


def confusion_matrix(truth, pred, n_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = truth, columns = prediction; pixels whose truth is
    `ignore_index` (or outside 0..n_classes-1) are left out."""
    t = np.asarray(truth).ravel().astype(np.int64)
    p = np.asarray(pred).ravel().astype(np.int64)
    if t.shape != p.shape:
        raise ValueError(f"truth and prediction differ in size: {t.shape} vs {p.shape}")
    keep = (t != ignore_index) & (t >= 0) & (t < n_classes) & (p >= 0) & (p < n_classes)
    return np.bincount(t[keep] * n_classes + p[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def segmentation_scores(cm: np.ndarray) -> dict:
    """mIoU (over classes present in truth or prediction), per-class IoU (NaN where absent from
    both) and pixel accuracy from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    total = cm.sum()
    return {"miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "pixels": int(total)}


def miou(truth, pred, n_classes: int, ignore_index: int = IGNORE) -> float:
    return segmentation_scores(confusion_matrix(truth, pred, n_classes, ignore_index))["miou"]
