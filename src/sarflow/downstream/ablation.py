"""Modality ablation: SAR-only vs optical-only vs fused features, per cloud condition.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from sarflow.downstream.estimators import PROBES, fit_probe, score
from sarflow.downstream.tasks import store_labels, task_target
from sarflow.errors import InputError

ABLATION_SETS = {"sar": ("s1grd", "s1coh"), "optical": ("s2rgb",), "fused": ("s1grd", "s1coh", "s2rgb")}


def ablation_features(store: str, modalities: tuple[str, ...], encoder_uri: str | None = None) -> np.ndarray:
    """Features of every chip (store order) from only `modalities`: raw-pixel statistics, or,
    with `encoder_uri`, a multimodal ChipEncoder (e.g. CLIP) given NaN for every group whose
    modality is dropped (NaN = missing, as the encoder expects)."""
    from sarflow.downstream.baselines import pixel_statistics

    if encoder_uri is None:
        return pixel_statistics(store, modalities)[0]
    import mlflow
    import torch

    from sarflow.data.chipstore import open_chip_group

    encoder = mlflow.pytorch.load_model(encoder_uri, map_location="cpu").eval()
    group = open_chip_group(store)
    parts = []
    for (_, bands), modality in zip(encoder.groups, encoder.modalities):
        arr = group[modality]
        idx = [list(arr.attrs["bands"]).index(b) for b in bands]
        x = arr[:][:, idx].astype(np.float32)
        if modality not in modalities:
            x[:] = np.nan
        parts.append(x)
    if not any(m in modalities for m in encoder.modalities):
        raise InputError(encoder_uri, f"the encoder has none of the modalities {list(modalities)} (it has {encoder.modalities})")
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
    on the test split: landcover macro-F1 and water RMSE. Table (modality x condition) logged
    to MLflow."""
    import mlflow

    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow

    if not stores:
        raise InputError("stores", "no stores to ablate on")
    if probe not in PROBES:
        raise InputError(probe, f"unknown probe: choose from {list(PROBES)}")
    rows = []
    for cond, store in stores.items():
        labels, split = store_labels(store)
        for mset, mods in ABLATION_SETS.items():
            feats = ablation_features(store, mods, encoder_uri)
            row = {"condition": cond, "modalities": mset}
            for task, metric in (("landcover", "macro_f1"), ("water", "rmse")):
                y, valid = task_target(task, labels, store)
                tr, te = valid & (split == "train"), valid & (split == "test")
                vals = [score(task, fit_probe(probe, task, feats[tr], y[tr], seed=seed + d, impute=True),
                              feats[te], y[te])[metric] for d in range(draws if probe == "mlp" else 1)]
                row[f"{task}_{metric}"] = float(np.mean(vals))
            rows.append(row)
    table = pd.DataFrame(rows)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="sarflow-ablation-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "modality_ablation.csv"
    table.to_csv(path, index=False)
    first = next(iter(stores.values()))
    exp_id = setup_mlflow(tracking_uri, experiment)
    with mlflow.start_run(experiment_id=exp_id, run_name="modality-ablation", tags=dataset_lineage(first)) as run:
        mlflow.log_params({"features": encoder_uri or "pixel_stats", "probe": probe, "draws": draws,
                           **{f"store_{c}": s for c, s in stores.items()}})
        for r in rows:
            mlflow.log_metrics({f"{r['condition']}_{r['modalities']}_landcover_test_macro_f1": r["landcover_macro_f1"],
                                f"{r['condition']}_{r['modalities']}_water_test_rmse": r["water_rmse"]})
        mlflow.log_artifact(str(path), artifact_path="downstream")
        mlflow.log_table(table, artifact_file="downstream/modality_ablation.json")
    result = {"run_id": run.info.run_id, "table": str(path), "rows": rows, "features": encoder_uri or "pixel_stats"}
    (out / "ablation.json").write_text(json.dumps(result, indent=1, default=str))
    result["json"] = str(out / "ablation.json")
    return result
