"""Region generalization: a probe trained in one region, tested in-region and in another, next
to the shift in features between the two (unbiased MMD² with a permutation p-value).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.ablation import ABLATION_SETS, ablation_features
from sarflow.downstream.estimators import PROBES, fit_probe, score
from sarflow.downstream.probes import ProbeData, _select_partition, load_probe_data
from sarflow.downstream.tasks import TASKS, primary, store_labels, task_target
from sarflow.errors import InputError


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

REGION_TASKS = ("landcover", "water", "tree_cover")
SYNTH_REGION_PAIRS = (("A", "B_same"), ("A", "B_shifted"), ("B_same", "A"), ("B_shifted", "A"))


@dataclass
class Region:
    """One region's chips: features (chips, dim; NaN = missing), labels (LABEL_COLUMNS), and
    boolean masks of the chips a probe trains on and of the held-out chips it is tested on."""
    name: str
    x: np.ndarray
    labels: pd.DataFrame
    train: np.ndarray
    test: np.ndarray


def _check_region_args(tasks: tuple[str, ...], probe: str, axis: str = "x") -> None:
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise InputError(",".join(bad), f"unknown task(s): choose from {list(TASKS)}")
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


def region_transfer(regions: dict[str, Region], pairs, tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear",
                    seed: int = 0, tracking_uri: str | None = None, experiment: str = "sarflow-downstream",
                    out_dir: str | None = None, lineage_store: str | None = None, params: dict | None = None,
                    tags: dict | None = None, extra: dict | None = None) -> dict:
    """For each (a, b) of `pairs`: a probe trained on a's train chips, tested on a's held-out
    chips (in-region) and on b's (out-of-region); the error gap next to the shift from a to b:
    unbiased MMD² (RBF, median heuristic) with a permutation p-value, and the distance between
    the mean features in units of a's train std (`_shift`).

    Error = 1 - macro-F1 for landcover, 1 - mAP for presence, RMSE for regressions. Writes
    region_generalization.csv and region.json into `out_dir`, logs a MLflow run
    "region-generalization" (lineage of `lineage_store`, `params`, `tags`, the table as
    artifact downstream/region_generalization.csv) and returns {"rows", "shift", "table",
    "json", "run_id", **extra}."""
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
    rows, shift, fits = [], {}, {}
    for a, b in pairs:
        ra, rb = regions[a], regions[b]
        shift[f"{a}->{b}"] = _shift(ra, rb, seed)
        for task in tasks:
            ya, va = task_target(task, ra.labels, a)
            yb, vb = task_target(task, rb.labels, b)
            tr, ia, ib = ra.train & va, ra.test & va, rb.test & vb
            if tr.sum() < 2 or not ia.any() or not ib.any():
                continue
            if (a, task) not in fits:  # one probe per training region and task, whatever it is tested on
                fits[a, task] = fit_probe(probe, task, ra.x[tr], ya[tr], seed=seed, impute=impute)
            m = fits[a, task]
            metric, higher = primary(task)
            s_in, s_out = score(task, m, ra.x[ia], ya[ia])[metric], score(task, m, rb.x[ib], yb[ib])[metric]
            err_in, err_out = (1 - s_in, 1 - s_out) if higher else (s_in, s_out)
            rows.append({"train": a, "test_out": b, "task": task, "probe": probe, "metric": metric,
                         "in_region": s_in, "out_region": s_out, "error_in": err_in, "error_out": err_out,
                         "error_gap": err_out - err_in, "n_train": int(tr.sum()), "n_in": int(ia.sum()),
                         "n_out": int(ib.sum()), **shift[f"{a}->{b}"]})
    table = pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-region-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "region_generalization.csv"
    table.to_csv(path, index=False)
    lineage = dataset_lineage(lineage_store) if lineage_store else {}
    exp_id = setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name="region-generalization", tags={**lineage, **(tags or {})}) as run:
        mlflow.log_params({"probe": probe, "seed": seed, "tasks": ",".join(tasks), **(params or {})})
        for r in rows:
            key = f"{r['task']}_{r['train']}_to_{r['test_out']}"
            mlflow.log_metrics({f"{key}_error_in": r["error_in"], f"{key}_error_out": r["error_out"],
                                f"{key}_error_gap": r["error_gap"]})
        for k, v in shift.items():
            mlflow.log_metrics({f"{k.replace('->', '_to_')}_{m}": float(x) for m, x in v.items()})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        if len(table):
            mlflow.log_table(table, artifact_file="downstream/region_generalization.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "shift": shift, **(extra or {})}
    (out / "region.json").write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(out / "region.json")
    return result


def _probe_region(name: str, data: ProbeData) -> Region:
    return Region(name, data.x, data.labels, data.split == "train", data.split == "test")


def run_region_generalization(store: str, features_root: str, tracking_uri: str | None = None,
                              model: str | None = None, version: str | None = None,
                              tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear",
                              axis: str = "x", holdout: float = 0.3, seed: int = 0,
                              experiment: str = "sarflow-downstream", out_dir: str | None = None,
                              other: str | None = None, other_features_root: str | None = None) -> dict:
    """Region transfer (`region_transfer`) on embeddings and labels read through Feast, as in
    `run_probes`, both ways between two regions:

    - without `other`: the two halves of the store's scene, west/east along `axis` x (or
      south/north for y), chips assigned by their centre; a `holdout` fraction of each half,
      drawn with `seed`, is held out, the rest trains;
    - with `other`: `store` (region A, embeddings under `features_root`) and `other` (region
      B, under `other_features_root`, default `features_root`); each store's train split
      trains and its test split is held out. Both must have embeddings of one model and
      version (`model`/`version`, default the newest in each root), else an InputError."""
    _check_region_args(tasks, probe, axis)
    if other is None:
        data = load_probe_data(store, features_root, model, version)
        coord = data.centroid[:, 0 if axis == "x" else 1]
        cut = float(np.median(coord))
        names = ("west", "east") if axis == "x" else ("south", "north")
        in_a = coord <= cut
        rng = np.random.default_rng(seed)
        held = np.zeros(len(coord), bool)
        for mask in (in_a, ~in_a):
            idx = np.flatnonzero(mask)
            held[rng.choice(idx, size=max(2, int(round(holdout * len(idx)))), replace=False)] = True
        regions = {n: Region(n, data.x, data.labels, mask & ~held, mask & held) for n, mask in zip(names, (in_a, ~in_a))}
        params = {"regions": "halves", "axis": axis, "holdout": holdout, "cut": cut}
        embeddings = {"model": data.model, "version": data.version}
    else:
        other_root = other_features_root or features_root
        pa, pb = _select_partition(features_root, model, version), _select_partition(other_root, model, version)
        if pa != pb:
            raise InputError(f"{features_root} | {other_root}",
                             f"the regions' embeddings differ: {store} has {pa[0]} v{pa[1]} (under {features_root}), "
                             f"{other} has {pb[0]} v{pb[1]} (under {other_root}); embed both with one model and "
                             "version, or choose one with --model/--version")
        regions = {"A": _probe_region("A", load_probe_data(store, features_root, *pa)),
                   "B": _probe_region("B", load_probe_data(other, other_root, *pb))}
        names = ("A", "B")
        params = {"regions": "stores", "store_A": store, "store_B": other, "features_root_A": features_root,
                  "features_root_B": other_root}
        embeddings = {"model": pa[0], "version": pa[1]}
    return region_transfer(regions, (names, names[::-1]), tasks, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=store, params=params,
                           tags={"sarflow.embeddings_model": embeddings["model"],
                                 "sarflow.embeddings_version": embeddings["version"]},
                           extra={"embeddings": embeddings})


def run_region_stores(stores: dict[str, str], pairs=SYNTH_REGION_PAIRS, encoder_uri: str | None = None,
                      tasks: tuple[str, ...] = REGION_TASKS, probe: str = "linear", seed: int = 0,
                      tracking_uri: str | None = None, experiment: str = "sarflow-downstream",
                      out_dir: str | None = None) -> dict:
    """Region transfer between whole stores (region name -> store; e.g. `synth_region_stores`)
    on features computed from the chips, no Feast needed: `ablation_features` of every
    modality (raw-pixel statistics, or the encoder `encoder_uri`), labels from `chip_labels`;
    each store's train split trains and its test split is held out."""
    _check_region_args(tasks, probe)
    regions = {}
    for name, store in stores.items():
        labels, split = store_labels(store)
        regions[name] = Region(name, ablation_features(store, ABLATION_SETS["fused"], encoder_uri), labels,
                               split == "train", split == "test")
    features = encoder_uri or "pixel_stats"
    return region_transfer(regions, pairs, tasks, probe, seed, tracking_uri, experiment, out_dir,
                           lineage_store=next(iter(stores.values())),
                           params={"regions": "stores", "features": features, **{f"store_{k}": v for k, v in stores.items()}},
                           tags={"sarflow.features": features}, extra={"features": features, "stores": dict(stores)})
