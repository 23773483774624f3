"""The LLP experiment on a chip store, logged to MLflow, the best model registered (`run_llp`)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from sarflow.downstream.llp.config import MODELS, LLPConfig
from sarflow.downstream.llp.data import prepare_store_data, train_test
from sarflow.downstream.llp.figures import write_outputs
from sarflow.downstream.llp.metrics import model_metrics, results_table
from sarflow.downstream.llp.models import ProportionModel
from sarflow.downstream.llp.train import bag_size_curve, fit_and_evaluate
from sarflow.errors import InputError

log = logging.getLogger(__name__)


PRIMARY_METRIC = ("test_proportion_mae", False)  # (metric, higher is better)


def _out_dir(cfg_out: str | None, features_root: str | None) -> Path:
    if cfg_out:
        out = Path(cfg_out)
    elif features_root and not str(features_root).startswith("s3://"):
        out = Path(features_root) / "llp"
    else:
        out = Path(tempfile.mkdtemp(prefix="sarflow-llp-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_llp(cfg: LLPConfig) -> dict:
    """The whole LLP experiment on a chip store; see the package docstring (sarflow.downstream.llp)."""
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
    train_bags, test_rows = train_test(data, cfg.split, cfg.test_fraction, cfg.seed)
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
    table_path, plots = write_outputs(out, table, curve, data, results, best, test_rows)

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
