"""Region generalization: a probe trained in one region, tested in-region and in another, next
to the shift in features between the two (unbiased MMD² with a permutation p-value).

Tasks are the store's (`tasks.store_tasks`, or the ones named). The held-out chips of a region
are whole spatial blocks of grid cells (`block_holdout`), never random chips, so a held-out
chip's neighbours do not train the probe. A transfer whose train chips cannot teach a task or
whose held-out chips cannot measure it (`tasks.not_evaluable`) is reported as not evaluable,
not scored.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.ablation import ablation_features
from sarflow.downstream.estimators import PROBES, fit_probe, score
from sarflow.downstream.probes import (MIN_TRAIN_CHIPS, ProbeData, _select_partition, load_probe_data,
                                       write_json_atomic)
from sarflow.downstream.tasks import Task, not_evaluable, select_tasks, store_labels, store_tasks, task_target
from sarflow.errors import InputError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ MMD

def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.maximum(d, 0.0)


def median_gamma(x: np.ndarray, y: np.ndarray) -> float:
    """RBF gamma = 1 / median squared distance of the pooled sample (the median heuristic)."""
    z = np.concatenate([x, y]).astype(np.float64)
    d = _sqdist(z, z)[np.triu_indices(len(z), k=1)]
    med = float(np.median(d)) if d.size else 1.0
    return 1.0 / med if med > 0 else 1.0


def mmd2_rbf(x: np.ndarray, y: np.ndarray, gamma: float | None = None) -> float:
    """Unbiased squared MMD between samples x and y with k(a, b) = exp(-gamma |a - b|²);
    ~0 (it can be slightly negative) when both come from one distribution."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise InputError(f"{len(x)} and {len(y)} samples", "MMD needs at least two samples on each side")
    g = median_gamma(x, y) if gamma is None else gamma
    kxx, kyy, kxy = np.exp(-g * _sqdist(x, x)), np.exp(-g * _sqdist(y, y)), np.exp(-g * _sqdist(x, y))
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def mmd_permutation_pvalue(x: np.ndarray, y: np.ndarray, permutations: int = 200, seed: int = 0) -> float:
    """p-value of MMD² under the null of one distribution (pooled sample, shuffled labels)."""
    g = median_gamma(x, y)
    observed = mmd2_rbf(x, y, g)
    z = np.concatenate([x, y])
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(len(z))
        hits += mmd2_rbf(z[p[:len(x)]], z[p[len(x):]], g) >= observed
    return (hits + 1) / (permutations + 1)


# ------------------------------------------------------------------------- region transfer

TABLE_COLUMNS = ["train", "test_out", "task", "probe", "metric", "in_region", "out_region", "error_in", "error_out",
                 "error_gap", "n_train", "n_in", "n_out", "mmd2", "mmd2_in_region", "mmd_pvalue", "mean_distance",
                 "mean_distance_in_region"]
SYNTH_REGION_PAIRS = (("A", "B_same"), ("A", "B_shifted"), ("B_same", "A"), ("B_shifted", "A"))
REGION_BLOCK = 2  # held-out blocks of REGION_BLOCK x REGION_BLOCK grid cells


@dataclass
class Region:
    """One region's chips: features (chips, dim; NaN = missing), labels (the tasks' columns), and
    boolean masks of the chips a probe trains on and of the held-out chips it is tested on."""
    name: str
    x: np.ndarray
    labels: pd.DataFrame
    train: np.ndarray
    test: np.ndarray


def region_tasks(store: str, names=None) -> list[Task]:
    """The store's tasks (all, or the ones named, checked)."""
    tasks = select_tasks(store_tasks(store), names, store)
    if not tasks:
        raise InputError(store, "the store declares no label source: no task to transfer")
    return tasks


def block_holdout(cells: np.ndarray, mask: np.ndarray, holdout: float, block: int, seed: int) -> np.ndarray:
    """Held-out chips of the region `mask`: a `holdout` fraction of its spatial blocks (cells
    grouped by floor(ix / block), floor(iy / block)), drawn with `seed`; at least one block is
    held out and one trains."""
    if block < 1:
        raise InputError(str(block), "the hold-out block must be at least one grid cell")
    if not 0 < holdout < 1:
        raise InputError(str(holdout), "holdout must be a fraction between 0 and 1")
    keys = np.floor_divide(cells, block)
    idx = np.flatnonzero(mask)
    blocks, inverse = np.unique(keys[idx], axis=0, return_inverse=True)
    held = np.zeros(len(cells), bool)
    if len(blocks) < 2:
        return held
    k = min(len(blocks) - 1, max(1, int(round(holdout * len(blocks)))))
    chosen = np.random.default_rng(seed).choice(len(blocks), size=k, replace=False)
    held[idx[np.isin(inverse.ravel(), chosen)]] = True
    return held


def _check_region_args(tasks, probe: str, axis: str = "x") -> None:
    bad = [t for t in tasks if not isinstance(t, Task)]
    if bad:
        raise TypeError(f"tasks must be Task objects (tasks.store_tasks), got {bad}")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    if axis not in ("x", "y"):
        raise InputError(axis, "axis must be x (west/east) or y (south/north)")


def _shift(a: Region, b: Region, seed: int) -> dict[str, float]:
    """Shift from a's train chips to all of b's chips (and, for reference, to a's held-out chips),
    in features standardized by a's train mean and std (a missing value counts as the mean)."""
    xa = a.x[a.train].astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features
        mu, sd = np.nanmean(xa, 0), np.nanstd(xa, 0) + 1e-8

    def z(x: np.ndarray) -> np.ndarray:
        return np.nan_to_num((x - mu) / sd, nan=0.0, posinf=0.0, neginf=0.0)

    za, zb, zin = z(xa), z(b.x), z(a.x[a.test])
    return {"mmd2": mmd2_rbf(za, zb), "mmd2_in_region": mmd2_rbf(za, zin),
            "mmd_pvalue": mmd_permutation_pvalue(za, zb, permutations=100, seed=seed),
            "mean_distance": float(np.linalg.norm(zb.mean(0))), "mean_distance_in_region": float(np.linalg.norm(zin.mean(0)))}


def region_transfer(regions: dict[str, Region], pairs, tasks: list[Task], probe: str = "linear",
                    seed: int = 0, tracking_uri: str | None = None, experiment: str = "sarflow-downstream",
                    out_dir: str | None = None, lineage_store: str | None = None, params: dict | None = None,
                    tags: dict | None = None, extra: dict | None = None) -> dict:
    """For each (a, b) of `pairs`: a probe trained on a's train chips, tested on a's held-out
    chips (in-region) and on b's (out-of-region); the error gap next to the shift from a to b:
    unbiased MMD² (RBF, median heuristic) with a permutation p-value, and the distance between
    the mean features in units of a's train std (`_shift`).

    Error = 1 - score for a metric where higher is better (macro-F1, mAP), the score itself
    otherwise (RMSE). A (pair, task) whose train chips cannot teach the task, or whose held-out
    chips in either region cannot measure it, is left out of the table and listed in
    "not_evaluable". Writes region_generalization.csv and region.json into `out_dir`, logs a
    MLflow run "region-generalization" (lineage of `lineage_store`, `params`, `tags`, the table
    as artifact downstream/region_generalization.csv) and returns {"rows", "shift",
    "not_evaluable", "table", "json", "run_id", **extra}."""
    import mlflow

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    _check_region_args(tasks, probe)
    unknown = {r for pair in pairs for r in pair} - set(regions)
    if unknown:
        raise InputError(",".join(sorted(unknown)), f"unknown region(s): have {sorted(regions)}")
    for r in regions.values():
        if r.train.sum() < 2 or r.test.sum() < 2:
            raise InputError(r.name, f"region {r.name} has {int(r.train.sum())} train and {int(r.test.sum())} held-out "
                                     "chips: at least 2 of each are needed")
    impute = any(np.isnan(r.x).any() for r in regions.values())
    rows, shift, fits, skipped = [], {}, {}, {}
    for a, b in pairs:
        ra, rb = regions[a], regions[b]
        shift[f"{a}->{b}"] = _shift(ra, rb, seed)
        for task in tasks:
            ya, va = task_target(task, ra.labels, a)
            yb, vb = task_target(task, rb.labels, b)
            tr, ia, ib = ra.train & va, ra.test & va, rb.test & vb
            why = (not_evaluable(task, ya[tr], f"region {a}'s train", min_chips=MIN_TRAIN_CHIPS)
                   or not_evaluable(task, ya[ia], f"region {a}'s held-out")
                   or not_evaluable(task, yb[ib], f"region {b}'s held-out"))
            if why:
                skipped[f"{task.name}:{a}->{b}"] = why
                log.warning("region transfer %s -> %s, task %s: not evaluable: %s", a, b, task.name, why)
                continue
            if (a, task.name) not in fits:  # one probe per training region and task, whatever it is tested on
                fits[a, task.name] = fit_probe(probe, task, ra.x[tr], ya[tr], seed=seed, impute=impute)
            m = fits[a, task.name]
            metric, higher = task.metric, task.higher_is_better
            s_in, s_out = score(task, m, ra.x[ia], ya[ia])[metric], score(task, m, rb.x[ib], yb[ib])[metric]
            err_in, err_out = (1 - s_in, 1 - s_out) if higher else (s_in, s_out)
            rows.append({"train": a, "test_out": b, "task": task.name, "probe": probe, "metric": metric,
                         "in_region": s_in, "out_region": s_out, "error_in": err_in, "error_out": err_out,
                         "error_gap": err_out - err_in, "n_train": int(tr.sum()), "n_in": int(ia.sum()),
                         "n_out": int(ib.sum()), **shift[f"{a}->{b}"]})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS) if not rows else pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-region-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "region_generalization.csv"
    table.to_csv(path, index=False)
    lineage = dataset_lineage(lineage_store) if lineage_store else {}
    exp_id = setup_mlflow(tracking_uri, experiment)
    run_tags = {**lineage, **(tags or {}), **{f"sarflow.not_evaluable.{k.replace(':', '.').replace('->', '_to_')}":
                                               v[:4900] for k, v in skipped.items()}}
    with mlflow.start_run(experiment_id=exp_id, run_name="region-generalization", tags=run_tags) as run:
        mlflow.log_params({"probe": probe, "seed": seed, "tasks": ",".join(t.name for t in tasks), **(params or {})})
        for r in rows:
            key = f"{r['task']}_{r['train']}_to_{r['test_out']}"
            mlflow.log_metrics({f"{key}_error_in": r["error_in"], f"{key}_error_out": r["error_out"],
                                f"{key}_error_gap": r["error_gap"]})
        for k, v in shift.items():
            mlflow.log_metrics({f"{k.replace('->', '_to_')}_{m}": float(x) for m, x in v.items()})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        if len(table):
            mlflow.log_table(table, artifact_file="downstream/region_generalization.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "shift": shift, "not_evaluable": skipped,
              **(extra or {})}
    write_json_atomic(out / "region.json", result)
    result["json"] = str(out / "region.json")
    return result


def _probe_region(name: str, data: ProbeData) -> Region:
    return Region(name, data.x, data.labels, data.split == "train", data.split == "test")


def run_region_generalization(store: str, features_root: str, tracking_uri: str | None = None,
                              model: str | None = None, version: str | None = None,
                              tasks: tuple[str, ...] = (), probe: str = "linear",
                              axis: str = "x", holdout: float = 0.3, seed: int = 0,
                              experiment: str = "sarflow-downstream", out_dir: str | None = None,
                              other: str | None = None, other_features_root: str | None = None,
                              block: int = REGION_BLOCK) -> dict:
    """Region transfer (`region_transfer`) on embeddings and labels read through Feast, as in
    `run_probes`, both ways between two regions:

    `tasks`: task names (default every task of `store`).

    - without `other`: the two halves of the store's scene, west/east along `axis` x (or
      south/north for y), chips assigned by their centre; a `holdout` fraction of each half's
      spatial blocks (`block` x `block` grid cells), drawn with `seed`, is held out, the rest
      trains;
    - with `other`: `store` (region A, embeddings under `features_root`) and `other` (region
      B, under `other_features_root`, default `features_root`); each store's train split
      trains and its test split is held out. Both must have embeddings of one model and
      version (`model`/`version`, default the newest in each root), else an InputError."""
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    if axis not in ("x", "y"):
        raise InputError(axis, "axis must be x (west/east) or y (south/north)")
    chosen = region_tasks(store, tasks)
    if other is None:
        data = load_probe_data(store, features_root, model, version, chosen)
        coord = data.centroid[:, 0 if axis == "x" else 1]
        cut = float(np.median(coord))
        names = ("west", "east") if axis == "x" else ("south", "north")
        in_a = coord <= cut
        held = np.zeros(len(coord), bool)
        for i, mask in enumerate((in_a, ~in_a)):
            held |= block_holdout(data.cells, mask, holdout, block, seed + i)
        regions = {n: Region(n, data.x, data.labels, mask & ~held, mask & held) for n, mask in zip(names, (in_a, ~in_a))}
        params = {"regions": "halves", "axis": axis, "holdout": holdout, "cut": cut, "block": block}
        embeddings = {"model": data.model, "version": data.version}
    else:
        other_root = other_features_root or features_root
        pa, pb = _select_partition(features_root, model, version), _select_partition(other_root, model, version)
        if pa != pb:
            raise InputError(f"{features_root} | {other_root}",
                             f"the regions' embeddings differ: {store} has {pa[0]} v{pa[1]} (under {features_root}), "
                             f"{other} has {pb[0]} v{pb[1]} (under {other_root}); embed both with one model and "
                             "version, or choose one with --model models:/NAME/VERSION")
        other_tasks = {t.name: t for t in store_tasks(other)}
        if any(other_tasks.get(t.name) != t for t in chosen):
            raise InputError(other, f"its labels do not give the tasks {[t.name for t in chosen]} of {store}: "
                                    "choose common ones with --task")
        regions = {"A": _probe_region("A", load_probe_data(store, features_root, *pa, chosen)),
                   "B": _probe_region("B", load_probe_data(other, other_root, *pb, chosen))}
        names = ("A", "B")
        params = {"regions": "stores", "store_A": store, "store_B": other, "features_root_A": features_root,
                  "features_root_B": other_root}
        embeddings = {"model": pa[0], "version": pa[1]}
    return region_transfer(regions, (names, names[::-1]), chosen, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=store, params=params,
                           tags={"sarflow.embeddings_model": embeddings["model"],
                                 "sarflow.embeddings_version": embeddings["version"]},
                           extra={"embeddings": embeddings})


def run_region_stores(stores: dict[str, str], pairs=SYNTH_REGION_PAIRS, encoder_uri: str | None = None,
                      tasks: tuple[str, ...] = (), probe: str = "linear", seed: int = 0,
                      tracking_uri: str | None = None, experiment: str = "sarflow-downstream",
                      out_dir: str | None = None) -> dict:
    """Region transfer between whole stores (region name -> store; e.g. `synth_region_stores`)
    on features computed from the chips, no Feast needed: `ablation_features` of every
    input (raw-pixel statistics, or the encoder `encoder_uri`), labels from `chip_labels`;
    each store's train split trains and its test split is held out (the store's split is
    spatially blocked). `tasks`: names (default every task of the first store; every store must
    give them)."""
    from sarflow.data.chipstore import input_modalities, open_chip_group

    if not stores:
        raise InputError("stores", "no stores to compare")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    first = next(iter(stores.values()))
    chosen = region_tasks(first, tasks)
    regions = {}
    for name, store in stores.items():
        have = {t.name: t for t in store_tasks(store)}
        if any(have.get(t.name) != t for t in chosen):
            raise InputError(store, f"region {name}'s labels do not give the tasks {[t.name for t in chosen]} of {first}")
        labels, split = store_labels(store)
        inputs = input_modalities(open_chip_group(store), where=store)
        regions[name] = Region(name, ablation_features(store, inputs, encoder_uri), labels,
                               split == "train", split == "test")
    features = encoder_uri or "pixel_stats"
    return region_transfer(regions, pairs, chosen, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=first,
                           params={"regions": "stores", "features": features, **{f"store_{k}": v for k, v in stores.items()}},
                           tags={"sarflow.features": features}, extra={"features": features, "stores": dict(stores)})
