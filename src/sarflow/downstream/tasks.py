"""The downstream tasks: their names, kinds and primary metrics, and their targets from the
`chip_labels` view.

- landcover: the chip's majority WorldCover class; accuracy, macro-F1.
- landcover_presence: multi-label presence of each class (fraction > 0.05); mAP over the
  classes present in the test split.
- tree_cover (tree_cover_mean / 100), builtup (builtup_percent_mean / 100), water
  (water_fraction): RMSE, R².
"""

from __future__ import annotations

import tempfile

import numpy as np
import pandas as pd

from sarflow.errors import InputError

TASKS = ("landcover", "landcover_presence", "tree_cover", "builtup", "water")
PRIMARY_METRIC = {"landcover": ("test_macro_f1", True), "landcover_presence": ("test_map", True),
                  "tree_cover": ("test_rmse", False), "builtup": ("test_rmse", False), "water": ("test_rmse", False)}
KIND = {"landcover": "multiclass", "landcover_presence": "multilabel", "tree_cover": "regression",
        "builtup": "regression", "water": "regression"}
PRESENCE_THRESHOLD = 0.05
WORLDCOVER = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
LABEL_COLUMNS = tuple(f"frac_{c}" for c in WORLDCOVER) + ("water_fraction", "tree_cover_mean", "builtup_percent_mean")


def registered_task_name(task: str) -> str:
    """`landcover_presence` -> `sarflow-landcover-presence` (the registered model's name)."""
    return "sarflow-" + task.replace("_", "-")


def primary(task: str) -> tuple[str, bool]:
    name, higher = PRIMARY_METRIC[task]
    return name.removeprefix("test_"), higher


def task_target(task: str, labels: pd.DataFrame, where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(target, valid rows) of a task; rows whose target is NaN are not valid."""
    if task not in TASKS:
        raise InputError(task, f"unknown task: choose from {list(TASKS)}")
    if task in ("landcover", "landcover_presence"):
        cols = [f"frac_{c}" for c in WORLDCOVER]
        missing = [c for c in cols if c not in labels]
        if missing:
            raise InputError(where, f"the labels have no class fractions {missing} for task {task}")
        f = labels[cols].to_numpy(np.float64)
        valid = np.isfinite(f).all(axis=1) & (np.nan_to_num(f).sum(axis=1) > 0)
        if task == "landcover":
            return np.asarray(WORLDCOVER)[np.nan_to_num(f, nan=-1).argmax(axis=1)], valid
        return (np.nan_to_num(f) > PRESENCE_THRESHOLD).astype(np.int64), valid
    col, scale = {"tree_cover": ("tree_cover_mean", 100.0), "builtup": ("builtup_percent_mean", 100.0),
                  "water": ("water_fraction", 1.0)}[task]
    if col not in labels:
        raise InputError(where, f"the labels have no column {col!r} for task {task} (does the store have that layer?)")
    y = labels[col].to_numpy(np.float64) / scale
    return y, np.isfinite(y)


def store_labels(store: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Labels (`chip_labels`) and split of every chip of the store, in store order."""
    from sarflow.features.labels import chip_labels
    from sarflow.data.chipstore import read_chip_table

    with tempfile.TemporaryDirectory() as tmp:
        labels = pd.read_parquet(chip_labels(store, tmp))
    chips = read_chip_table(store).sort_values("index").reset_index(drop=True)
    labels = labels.set_index("chip_id").reindex(chips.chip_id).reset_index(drop=True)
    return labels, chips["split"].to_numpy()
