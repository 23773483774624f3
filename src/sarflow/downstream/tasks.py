"""Downstream tasks, derived from the label sources a store's catalog declared (no task or class
is known by name in the code). For a label source `L`:

- categorical: `L` the chip's majority class (multiclass; macro-F1); with three classes or more,
  `L_presence` the presence of each class (share > 0.05; multilabel; mAP over the classes present
  in the test split); with exactly two classes, `L_fraction` the share of the second declared class
  (regression; RMSE), e.g. a chip's water fraction from a 0 dry / 1 water label;
- continuous: `L` the chip's mean value in its units (regression; RMSE).

Targets come from the `chip_labels` columns (features.labels). `evaluable` is the one rule that
decides whether a split can measure a task (enough chips, more than one class, non-zero variance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sarflow.errors import InputError
from sarflow.data.chip_labels import class_column, mean_column

PRESENCE_THRESHOLD = 0.05
MIN_EVAL_CHIPS = 10  # fewer labelled chips than this in a split: its metric is not evaluable
MIN_CLASS_CHIPS = 2  # a classification split needs two classes with at least this many chips each


@dataclass(frozen=True)
class Task:
    name: str
    source: str
    kind: str  # multiclass | multilabel | regression
    metric: str  # primary metric, without the split prefix
    higher_is_better: bool
    codes: tuple[int, ...] = ()
    class_names: tuple[str, ...] = ()
    units: str = ""

    @property
    def columns(self) -> list[str]:
        if self.kind == "regression" and not self.codes:
            return [mean_column(self.source)]
        return [class_column(self.source, c) for c in self.codes]

    @property
    def registered_name(self) -> str:
        return registered_task_name(self.name)


def registered_task_name(task: str) -> str:
    """`worldcover_presence` -> `sarflow-worldcover-presence` (the registered model's name)."""
    return "sarflow-" + task.replace("_", "-")


def tasks_for(labels) -> list[Task]:
    """Every task of a list of `LabelSource`s (chipstore.label_sources), in catalog order."""
    tasks: list[Task] = []
    for lab in labels:
        if lab.kind == "categorical":
            codes, names = tuple(lab.codes), tuple(c["name"] for c in lab.classes)
            tasks.append(Task(lab.name, lab.name, "multiclass", "macro_f1", True, codes, names, lab.units))
            if len(codes) >= 3:
                tasks.append(Task(f"{lab.name}_presence", lab.name, "multilabel", "map", True, codes, names, lab.units))
            elif len(codes) == 2:
                tasks.append(Task(f"{lab.name}_fraction", lab.name, "regression", "rmse", False, codes, names, "fraction"))
        else:
            tasks.append(Task(lab.name, lab.name, "regression", "rmse", False, units=lab.units))
    names = [t.name for t in tasks]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise InputError(",".join(clash), "two label sources give tasks of the same name: rename one source")
    return tasks


def store_tasks(store: str) -> list[Task]:
    from sarflow.data.chipstore import label_sources, open_chip_group

    return tasks_for(label_sources(open_chip_group(store), store))


def select_tasks(tasks: list[Task], names=None, where: str = "store") -> list[Task]:
    """The tasks named (all when `names` is empty), refusing names the store does not declare."""
    if not names:
        return list(tasks)
    known = {t.name: t for t in tasks}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(where, f"unknown task(s) {unknown}: this store's labels give {list(known)}")
    return [known[n] for n in names]


def task_target(task: Task, labels: pd.DataFrame, where: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """(target, valid rows) of a task; rows whose target cannot be computed are not valid.

    multiclass: the majority class code; multilabel: (n, classes) 0/1; regression: a float."""
    missing = [c for c in task.columns if c not in labels]
    if missing:
        raise InputError(where, f"the labels have no columns {missing} for task {task.name!r} (rerun `sarflow labels`)")
    f = labels[task.columns].to_numpy(np.float64)
    if task.kind == "regression" and not task.codes:
        y = f[:, 0]
        return y, np.isfinite(y)
    valid = np.isfinite(f).all(axis=1) & (np.nan_to_num(f).sum(axis=1) > 0)
    if task.kind == "multiclass":
        return np.asarray(task.codes)[np.nan_to_num(f, nan=-1).argmax(axis=1)], valid
    if task.kind == "multilabel":
        return (np.nan_to_num(f) > PRESENCE_THRESHOLD).astype(np.int64), valid
    return np.nan_to_num(f[:, -1]), valid  # two classes: the share of the second one


def not_evaluable(task: Task, y: np.ndarray, split: str = "test", min_chips: int = MIN_EVAL_CHIPS) -> str | None:
    """Why `y` (the valid targets of one split) cannot measure the task, or None when it can."""
    n = len(y)
    if n < min_chips:
        return f"{split} split has {n} labelled chips (at least {min_chips} needed)"
    if task.kind == "multiclass":
        codes, counts = np.unique(y, return_counts=True)
        if (counts >= MIN_CLASS_CHIPS).sum() < 2:
            seen = ", ".join(f"{c}: {k}" for c, k in zip(codes.tolist(), counts.tolist()))
            return f"{split} split has fewer than two classes with {MIN_CLASS_CHIPS}+ chips ({seen})"
    elif task.kind == "multilabel":
        present = y.sum(axis=0)
        if ((present > 0) & (present < n)).sum() == 0:
            return f"{split} split has no class that is present in some chips and absent in others"
    elif not np.nanstd(np.asarray(y, np.float64)) > 0:
        return f"{split} split's target has zero variance (every chip {float(np.nanmean(y)):g})"
    return None


def store_labels(store: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Label columns (as `chip_labels` writes them) and split of every chip of the store, in store order."""
    from sarflow.data.chipstore import read_chip_table
    from sarflow.data.chip_labels import label_features

    chips = read_chip_table(store).sort_values("index").reset_index(drop=True)
    return pd.DataFrame(label_features(store)), chips["split"].to_numpy()
