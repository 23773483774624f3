"""The probes themselves: linear / kNN / small-MLP estimators for a task's kind, fitted and
scored (accuracy + macro-F1, mAP, or RMSE + R²). `task` is a `tasks.Task` or its kind
("multiclass", "multilabel", "regression").
"""

from __future__ import annotations

import warnings

import numpy as np

from sarflow.downstream.tasks import Task

PROBES = ("linear", "knn", "mlp")
DETERMINISTIC = ("linear", "knn")  # same data, same fit: at n = all their draws are not refit
KINDS = ("multiclass", "multilabel", "regression")


def task_kind(task: Task | str) -> str:
    kind = task.kind if isinstance(task, Task) else task
    if kind not in KINDS:
        raise ValueError(f"unknown task kind {kind!r}: one of {KINDS}")
    return kind


def fittable(task: Task | str, y: np.ndarray) -> bool:
    """Whether a training draw can teach anything: two classes (multiclass), a class present in
    some chips and absent in others (multilabel), a target that varies (regression)."""
    kind = task_kind(task)
    if len(y) < 2:
        return False
    if kind == "multiclass":
        return len(np.unique(y)) > 1
    if kind == "multilabel":
        present = np.asarray(y).sum(axis=0)
        return bool(((present > 0) & (present < len(y))).any())
    return bool(np.nanstd(np.asarray(y, np.float64)) > 0)


def make_probe(name: str, kind: str, n_train: int, seed: int = 0, impute: bool = False):
    """A sklearn Pipeline: [imputer,] scaler, estimator. `kind`: multiclass, multilabel, regression."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier, KNeighborsRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = max(1, min(5, n_train))
    mlp = dict(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=100, random_state=seed, solver="lbfgs")
    if kind == "multiclass":
        est = {"linear": lambda: LogisticRegression(max_iter=300, C=1.0),
               "knn": lambda: KNeighborsClassifier(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPClassifier(**mlp)}[name]()
    elif kind == "multilabel":
        # native multi-label estimators (a class constant in a draw is no special case)
        est = {"linear": lambda: RidgeClassifier(alpha=1.0),
               "knn": lambda: KNeighborsClassifier(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPClassifier(**mlp)}[name]()
    else:
        est = {"linear": lambda: Ridge(alpha=1.0),
               "knn": lambda: KNeighborsRegressor(n_neighbors=k, weights="distance"),
               "mlp": lambda: MLPRegressor(**mlp)}[name]()
    steps = ([SimpleImputer(add_indicator=True, keep_empty_features=True)] if impute else []) + [StandardScaler(), est]
    return make_pipeline(*steps)


def fit_probe(name: str, task: Task | str, x: np.ndarray, y: np.ndarray, seed: int = 0, impute: bool = False):
    """Fits a probe. A draw that cannot teach anything (`fittable`: one class, a constant target)
    is refused: callers skip such points instead of scoring a constant predictor."""
    kind = task_kind(task)
    if not fittable(kind, y):
        raise ValueError(f"a {kind} probe needs a training draw with two classes or a varying target "
                         f"({len(y)} chips given)")
    model = make_probe(name, kind, len(y), seed, impute)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence of tiny probes, constant labels in a draw
        model.fit(x, y)
    return model


def label_scores(model, x: np.ndarray, n_labels: int) -> np.ndarray:
    """(chips, labels) scores of a multi-label model: probabilities, or decision values."""
    if not hasattr(model, "predict_proba"):
        p = model.decision_function(x)
    else:
        p = model.predict_proba(x)
        if isinstance(p, list):  # one (chips, classes) array per label, classes as seen in training
            est = model[-1] if hasattr(model, "steps") else model
            cols = []
            for q, classes in zip(p, est.classes_):
                hit = np.flatnonzero(np.asarray(classes) == 1)
                cols.append(q[:, hit[0]] if hit.size else np.zeros(len(q)))
            p = np.stack(cols, axis=1)
    p = np.asarray(p, np.float64).reshape(len(x), -1)
    if p.shape[1] != n_labels:
        raise ValueError(f"expected {n_labels} label scores, got {p.shape[1]}")
    return p


def score(task: Task | str, model, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of a fitted model on (x, y): accuracy + macro_f1, map, or rmse + r2."""
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, mean_squared_error, r2_score

    if len(y) == 0:
        return {}
    kind = task_kind(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "multiclass":
            pred = model.predict(x)
            return {"accuracy": float(accuracy_score(y, pred)), "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0))}
        if kind == "multilabel":
            p = label_scores(model, x, y.shape[1])
            cols = y.sum(axis=0) > 0
            ap = float(average_precision_score(y[:, cols], p[:, cols], average="macro")) if cols.any() else float("nan")
            return {"map": ap}
        pred = model.predict(x)
        r2 = float(r2_score(y, pred)) if len(y) > 1 and np.var(y) > 0 else float("nan")
        return {"rmse": float(np.sqrt(mean_squared_error(y, pred))), "r2": r2}
