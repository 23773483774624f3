"""Modality ablation: SAR-only vs optical-only vs fused features, per cloud condition.

The modality sets come from the units the catalog declared for the store's inputs, not from
their names: "sar" = inputs in dB, linear power, amplitude, coherence or radians, "optical" =
inputs in reflectance, "fused" = every input. A set that is empty on a store is skipped with a
line. The tasks are the store's first multiclass task and first regression task, whatever
their labels are called; a split that cannot measure one (`tasks.not_evaluable`) gives no number.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.estimators import PROBES, fit_probe, score
from sarflow.downstream.tasks import Task, not_evaluable, store_labels, store_tasks, task_target
from sarflow.errors import InputError

log = logging.getLogger(__name__)

SAR_UNITS = ("dB", "linear", "amplitude", "coherence", "radians")
OPTICAL_UNITS = ("reflectance",)
SET_NAMES = ("sar", "optical", "fused")


def modality_sets(group, where: str = "store") -> dict[str, list[str]]:
    """{"sar": [...], "optical": [...], "fused": [...]}: the store's inputs by their declared units."""
    from sarflow.data.chipstore import input_modalities

    inputs = input_modalities(group, where=where)
    units = {m: group[m].attrs.get("units") for m in inputs}
    return {"sar": [m for m in inputs if units[m] in SAR_UNITS],
            "optical": [m for m in inputs if units[m] in OPTICAL_UNITS],
            "fused": list(inputs)}


def ablation_tasks(tasks: list[Task]) -> list[Task]:
    """The store's first multiclass task and first regression task (those it has)."""
    out = [next((t for t in tasks if t.kind == kind), None) for kind in ("multiclass", "regression")]
    return [t for t in out if t is not None]


def ablation_columns(tasks: list[Task]) -> list[str]:
    return [f"{t.name}_{t.metric}" for t in tasks]


def ablation_features(store: str, modalities, encoder_uri: str | None = None) -> np.ndarray:
    """Features of every chip (store order) from only `modalities`: raw-pixel statistics, or,
    with `encoder_uri`, a multimodal ChipEncoder (e.g. CLIP) given NaN for every group whose
    modality is dropped (NaN = missing, as the encoder expects)."""
    from sarflow.downstream.baselines import pixel_statistics

    if encoder_uri is None:
        return pixel_statistics(store, tuple(modalities))[0]
    import mlflow
    import torch

    from sarflow.data.chipstore import open_chip_group, read_masked
    from sarflow.features.embed import encoder_arrays, encoder_sources

    encoder = mlflow.pytorch.load_model(encoder_uri, map_location="cpu").eval()
    sources = encoder_sources(encoder)
    if not any(m in modalities for _, m, _ in sources):
        raise InputError(encoder_uri, f"the encoder has none of the modalities {list(modalities)} "
                                      f"(it reads {sorted({m for _, m, _ in sources})})")
    group = open_chip_group(store)
    parts = []
    for (_, modality, _), (arr, idx) in zip(sources, encoder_arrays(group, encoder, store)):
        x = read_masked(arr, bands=idx)
        if modality not in modalities:
            x[:] = np.nan
        parts.append(x)
    x = np.concatenate(parts, axis=1)
    out = []
    with torch.no_grad():
        for s in range(0, len(x), 256):
            out.append(encoder(torch.from_numpy(x[s:s + 256])).numpy())
    return np.concatenate(out).astype(np.float32)


def run_ablation(stores: dict[str, str], tracking_uri: str | None = None, encoder_uri: str | None = None,
                 probe: str = "linear", draws: int = 3, seed: int = 0, experiment: str = "sarflow-downstream",
                 out_dir: str | None = None) -> dict:
    """Modality ablation: SAR-only vs optical-only vs fused features, per cloud condition.

    `stores` maps a condition name (e.g. "clear", "clouded") to a chip store; the labels come
    from each store (`chip_labels`). Features: raw-pixel statistics per modality set by
    default (fast, no training), or a registered multimodal encoder (`encoder_uri`, e.g.
    models:/sarflow-encoder-clip/1) fed NaN for the dropped modality. A `probe` is trained on
    the train split (`draws` seeds for the MLP; linear and kNN are deterministic) and scored
    on the test split on the first store's first multiclass and first regression task
    (columns `<task>_<metric>`; NaN where a split cannot measure it, with the reason in
    `not_evaluable`). Table (condition x modality set) logged to MLflow."""
    import mlflow

    from sarflow.data.chipstore import open_chip_group
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    if not stores:
        raise InputError("stores", "no stores to ablate on")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    first = next(iter(stores.values()))
    tasks = ablation_tasks(store_tasks(first))
    if not tasks:
        raise InputError(first, "the store declares no multiclass or regression task: nothing to ablate on")
    for cond, store in stores.items():
        have = {t.name: t for t in store_tasks(store)}
        if any(have.get(t.name) != t for t in tasks):
            raise InputError(store, f"the {cond} store's labels do not give the tasks {[t.name for t in tasks]} "
                                    f"of {first}: ablate stores of one catalog's labels")
    columns = ablation_columns(tasks)
    rows, skipped_sets, not_eval = [], [], {}
    for cond, store in stores.items():
        labels, split = store_labels(store)
        for mset, mods in modality_sets(open_chip_group(store), store).items():
            if not mods:
                line = f"{cond}: no {mset} inputs in {store} (by their units), set skipped"
                log.warning(line)
                skipped_sets.append(line)
                continue
            feats = ablation_features(store, mods, encoder_uri)
            row = {"condition": cond, "modalities": mset, "inputs": ",".join(mods)}
            for task, col in zip(tasks, columns):
                y, valid = task_target(task, labels, store)
                tr, te = valid & (split == "train"), valid & (split == "test")
                why = not_evaluable(task, y[tr], "train", min_chips=2) or not_evaluable(task, y[te], "test")
                if why:
                    not_eval[f"{cond}:{task.name}"] = why
                    row[col] = float("nan")
                    continue
                vals = [score(task, fit_probe(probe, task, feats[tr], y[tr], seed=seed + d, impute=True),
                              feats[te], y[te])[task.metric] for d in range(draws if probe == "mlp" else 1)]
                row[col] = float(np.mean(vals))
            rows.append(row)
    for k, why in not_eval.items():
        log.warning("ablation: %s is not evaluable: %s", k, why)
    where = ",".join(stores.values())
    if not rows:
        raise InputError(where, "no modality set has inputs on these stores: " + "; ".join(skipped_sets))
    if not any(np.isfinite(r[c]) for r in rows for c in columns):
        raise InputError(where, "no task is evaluable on these stores: " + "; ".join(f"{k}: {v}" for k, v in not_eval.items()))
    table = pd.DataFrame(rows, columns=["condition", "modalities", "inputs", *columns])
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "modality_ablation.csv"
    table.to_csv(path, index=False)
    exp_id = setup_mlflow(tracking_uri, experiment)
    tags = {**dataset_lineage(first), **{f"sarflow.not_evaluable.{k.replace(':', '.')}": v[:4900]
                                         for k, v in not_eval.items()}}
    with mlflow.start_run(experiment_id=exp_id, run_name="modality-ablation", tags=tags) as run:
        mlflow.log_params({"features": encoder_uri or "pixel_stats", "probe": probe, "draws": draws,
                           "tasks": ",".join(t.name for t in tasks), **{f"store_{c}": s for c, s in stores.items()}})
        for r in rows:
            mlflow.log_metrics({f"{r['condition']}_{r['modalities']}_{t.name}_test_{t.metric}": r[c]
                                for t, c in zip(tasks, columns) if np.isfinite(r[c])})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        mlflow.log_table(table, artifact_file="downstream/modality_ablation.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "columns": columns,
              "tasks": {t.name: {"metric": t.metric, "higher_is_better": t.higher_is_better} for t in tasks},
              "skipped_sets": skipped_sets, "not_evaluable": not_eval, "features": encoder_uri or "pixel_stats"}
    from sarflow.downstream.probes import write_json_atomic

    write_json_atomic(out / "ablation.json", result)
    result["json"] = str(out / "ablation.json")
    return result
