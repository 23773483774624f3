"""The LLP experiment on a chip store, logged to MLflow, the model chosen on validation bags
registered (`run_llp`).

Honest numbers: the test chips (held-out bags, or the store's test split) must be able to measure
the task (`tasks.not_evaluable`: enough labelled chips with input data, two classes with chips of
their own); otherwise the run is refused with an InputError
that names the store and the reason, before anything is trained, written or registered. The
number of steps and the model are chosen on training bags held out for validation (their bag
proportions only); where none can be held out, the defaults are taken (`steps`, the first model
listed) and the run says so. The test chips are never used to choose: every model and the bag-size
curve are reported on them, for comparison only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from sarflow.downstream.llp.config import MODELS, LLPConfig
from sarflow.downstream.llp.data import prepare_store_data, test_bag_count, train_test
from sarflow.downstream.llp.figures import write_outputs
from sarflow.downstream.llp.metrics import model_metrics, results_table
from sarflow.downstream.llp.models import ProportionModel
from sarflow.downstream.llp.train import bag_size_curve, fit_and_evaluate
from sarflow.errors import InputError

log = logging.getLogger(__name__)


PRIMARY_METRIC = ("test_proportion_mae", False)  # (metric, higher is better)
MIN_VAL_BAGS = 2  # held-out training bags: fewer than this cannot choose the model


def _out_dir(cfg_out: str | None, features_root: str | None) -> Path:
    if cfg_out:
        out = Path(cfg_out)
    elif features_root and not str(features_root).startswith("s3://"):
        out = Path(features_root) / "llp"
    else:
        out = Path(tempfile.mkdtemp(prefix="sarflow-llp-"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def llp_task(data, task_name: str):
    """The LLP task as a `tasks.Task`: the chips' majority class of the label, scored by proportion MAE."""
    from sarflow.downstream.tasks import Task

    return Task(task_name, data.label, "multiclass", "proportion_mae", False, tuple(data.classes),
                tuple(data.class_names or [str(c) for c in data.classes]), "class")


def test_reason(data, task, test_rows: np.ndarray, split: str) -> str | None:
    """Why the test chips cannot measure the task, or None."""
    from sarflow.downstream.tasks import not_evaluable

    y = np.asarray(data.classes)[data.truth[test_rows].argmax(axis=1)] if len(test_rows) else np.zeros(0, int)
    return not_evaluable(task, y, "test" if split == "store" else "test (held-out bags)")


def choose_model(results: dict, names: list[str], val_fraction: float) -> tuple[str, str]:
    """(model, how it was chosen): the lowest held-out bag proportion MAE, or the first model
    listed where validation cannot choose."""
    val = {m: results[m]["metrics"].get("val_bag_mae", float("nan")) for m in names}
    held = min(int(results[m]["metrics"].get("val_bags", 0)) for m in names)
    if val_fraction <= 0:
        why = "val_fraction is 0"
    elif held < MIN_VAL_BAGS:
        why = f"{held} training bag(s) held out (at least {MIN_VAL_BAGS} needed)"
    elif not all(np.isfinite(v) for v in val.values()):
        why = "no held-out bag score"
    else:
        best = min(names, key=lambda m: val[m])
        return best, f"lowest proportion MAE on {held} held-out training bags"
    return names[0], f"default (the first model listed): validation cannot choose, {why}"


def prediction_maps(store: str, data, pred: np.ndarray, model: str, out: Path) -> list[Path]:
    """The chosen model's predictions for every chip as COGs at chip resolution (GDAL, QGIS and
    rasterio open them): `llp_proportions.tif` (one float band per class) and `llp_majority.tif`
    (the majority class code, with the label's palette). A store on s3:// gets none (logged)."""
    from sarflow.data.chipstore import open_store
    from sarflow.data.export import export_chip_values

    if str(store).startswith("s3://"):
        log.info("%s: prediction maps are written for local stores only", store)
        return []
    st = open_store(store)
    declared = {int(c["code"]): c for lab in st.labels if lab.name == data.label for c in lab.classes}
    classes = [declared.get(int(c), {"code": int(c), "name": str(c)}) for c in data.classes]
    names = [f"{c['code']} {c.get('name', '')}".strip() for c in classes]
    ids, tags = data.chips["chip_id"].astype(str), {"model": f"llp-{model}", "label": data.label}
    return [export_chip_values(st, ids, pred, [f"proportion {n}" for n in names], out / "llp_proportions.tif", tags),
            export_chip_values(st, ids, np.asarray(data.classes)[np.asarray(pred).argmax(1)], ["majority class"],
                               out / "llp_majority.tif", tags, classes=classes)]


def run_llp(cfg: LLPConfig) -> dict:
    """The whole LLP experiment on a chip store; see the package docstring (sarflow.downstream.llp)."""
    import mlflow

    from sarflow.downstream.models import dataset_id, evaluation_set, log_downstream_model
    from sarflow.downstream.tasks import registered_task_name
    from sarflow.features.bags import write_chip_bags
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import loggable_params, setup_mlflow

    t0 = time.perf_counter()
    unknown = [m for m in cfg.models if m not in MODELS]
    if unknown or not cfg.models:
        raise InputError("models", f"unknown LLP model(s) {unknown}: choose from {list(MODELS)}")
    if not 0 <= cfg.val_fraction < 1:
        raise InputError("val_fraction", f"{cfg.val_fraction} is not a fraction of the training bags in [0, 1)")
    data, extra = prepare_store_data(cfg)
    task_name = cfg.task or f"llp-{data.label}"
    task = llp_task(data, task_name)
    train_bags, test_rows = train_test(data, cfg.split, cfg.test_fraction, cfg.seed)
    reason = test_reason(data, task, test_rows, cfg.split)
    if reason:
        log.warning("%s: task %s is not evaluable, not trained nor registered: %s", cfg.store, task_name, reason)
        raise InputError(cfg.store, f"no task is evaluable on this store: {task_name}: {reason}")
    out = _out_dir(cfg.out_dir, cfg.features_root)
    bags_path = write_chip_bags(data.bags, extra["chips_table"], cfg.features_root or out, crs=extra["grid_crs"])
    kw = dict(loss=cfg.loss, steps=cfg.steps, lr=cfg.lr, hidden=cfg.hidden, prototypes=cfg.prototypes,
              stride=cfg.conv_stride, seed=cfg.seed, val_fraction=cfg.val_fraction)
    results = fit_and_evaluate(data, tuple(cfg.models), train_bags, test_rows, **kw)
    names = list(cfg.models)
    best, selection = choose_model(results, names, cfg.val_fraction)
    log.info("LLP model %s: %s", best, selection)
    table = results_table(results)
    curve = None
    if cfg.bag_sizes and cfg.curve_model in MODELS:
        curve = bag_size_curve(data, train_bags, test_rows, cfg.bag_sizes, cfg.curve_model, done=results, **kw)
    table_path, plots = write_outputs(out, table, curve, data, results, best, test_rows)
    maps = prediction_maps(cfg.store, data, results[best]["pred"], best, out)
    if cfg.label_raster:  # the bag proportions as aggregated from the raster
        extra["stats"].to_csv(out / "bag_statistics.csv", index=False, float_format="%.6f")

    setup_mlflow(cfg.tracking_uri, cfg.experiment)
    mlflow.set_experiment(cfg.experiment)
    lineage = dataset_lineage(cfg.store)
    eval_set = evaluation_set(dataset_id(lineage), "test", task_name)
    best_metrics = results[best]["metrics"]
    metrics = {"baseline_mae": best_metrics["baseline_mae"], "baseline_f1_macro": best_metrics["baseline_f1_macro"]}
    metrics.update(model_metrics(results, names))
    metrics.update({"test_proportion_mae": best_metrics["proportion_mae"], "test_f1_macro": best_metrics["f1_macro"],
                    "test_iou_macro": best_metrics["iou_macro"]})
    if "val_bag_mae" in best_metrics:
        metrics["val_bag_mae"] = best_metrics["val_bag_mae"]
    if curve is not None:
        for row in curve.itertuples():
            metrics[f"curve_mae_x{row.merge_factor}"] = row.proportion_mae
    n_bags = data.bags.members.bag_id.nunique()
    params = {"polygons": cfg.polygons, "id_column": cfg.id_column, "proportions_source": extra["stats_source"],
              "proportions_from": "stats" if cfg.stats else "label_raster", "features": data.feature_source,
              "label": data.label, "label_nodata": extra["label_nodata"],
              "models": ",".join(names), "loss": cfg.loss, "steps": cfg.steps, "val_fraction": cfg.val_fraction, "lr": cfg.lr,
              "classes": ",".join(map(str, data.classes)), "split": cfg.split, "test_fraction": cfg.test_fraction,
              "seed": cfg.seed, "bags": n_bags, "train_bags": len(train_bags), "test_chips": len(test_rows),
              "test_bags": test_bag_count(data, test_rows), "chips": len(data.chips),
              "outside_chips": len(data.bags.outside), "best_model": best, "selection": selection,
              "undeclared_pixels": sum(extra["undeclared_pixels"].values()),
              "bag_sizes": ",".join(map(str, cfg.bag_sizes)), "hidden": cfg.hidden, "prototypes": cfg.prototypes,
              "conv_stride": cfg.conv_stride, "pixel_modalities": ",".join(extra["pixel_modalities"])}
    registered = {"name": None, "version": None}
    models: dict[str, dict] = {}
    classes_tag = json.dumps(data.classes)
    with mlflow.start_run(run_name=task_name if task_name.startswith("llp-") else f"llp-{task_name}") as run:
        mlflow.set_tags({**lineage, "sarflow.task": task_name, "sarflow.llp.best_model": best,
                         "sarflow.llp.selection": selection, "sarflow.llp.label": data.label,
                         "sarflow.llp.classes": classes_tag})
        mlflow.log_params(loggable_params(params))
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if np.isfinite(v)})
        mlflow.log_artifact(str(table_path), "llp")
        mlflow.log_artifact(str(out / "llp_results.json"), "llp")
        if curve is not None:
            mlflow.log_artifact(str(out / "bag_size_curve.csv"), "llp")
        for p in plots:
            mlflow.log_artifact(str(p), "llp")
        for p in maps:
            mlflow.log_artifact(str(p), "llp/maps")
        if cfg.label_raster:
            mlflow.log_artifact(str(out / "bag_statistics.csv"), "llp")
        if data.bags.outside:
            mlflow.log_text("\n".join(data.bags.outside), "llp/outside_chips.txt")
        if cfg.register:
            with mlflow.start_run(experiment_id=run.info.experiment_id, run_name=f"register-{best}", nested=True):
                mlflow.set_tags({**lineage, "sarflow.task": task_name, "sarflow.llp.model": best,
                                 "sarflow.llp.classes": classes_tag})
                rows = test_rows[:4]
                if best == "conv":
                    wrapped = ProportionModel(results[best]["model"], *data.pixel_norm, data.classes, "conv")
                    raw = extra["raw_pixels"][rows]
                    example = np.where(np.isfinite(raw), raw, data.pixel_norm[0][None, :, None, None])
                else:
                    wrapped = ProportionModel(results[best]["model"], *extra["feature_norm"], data.classes, best)
                    example = extra["raw_features"][rows]
                info = log_downstream_model(
                    wrapped, registered_task_name(task_name), example, lineage=lineage, eval_set=eval_set,
                    metrics={"test_proportion_mae": metrics["test_proportion_mae"],
                             "test_f1_macro": metrics["test_f1_macro"]})
                registered = {"name": info["name"], "version": info["version"]}
                models[info["name"]] = {"version": info["version"], "metric": PRIMARY_METRIC[0],
                                        "higher_is_better": PRIMARY_METRIC[1]}
                client = mlflow.MlflowClient()
                client.set_model_version_tag(info["name"], info["version"], "sarflow.llp.classes", classes_tag)
                client.set_model_version_tag(info["name"], info["version"], "sarflow.llp.label", data.label)
                client.set_model_version_tag(info["name"], info["version"], "sarflow.llp.input",
                                             "pixels" if best == "conv" else data.feature_source)
    log.info("LLP done in %.1fs: %s (%s), test MAE %.4f vs baseline %.4f", time.perf_counter() - t0, best, selection,
             metrics["test_proportion_mae"], metrics["baseline_mae"])
    return {"run_id": run.info.run_id, "task": task_name, "label": data.label, "classes": data.classes,
            "models": models, "not_evaluable": {}, "registered": registered, "metrics": metrics,
            "table": str(table_path), "plots": [str(p) for p in plots], "maps": [str(p) for p in maps],
            "bags": str(bags_path),
            "outside": len(data.bags.outside), "outside_chips": list(data.bags.outside), "best_model": best,
            "selection": selection, "features": data.feature_source, "eval_set": eval_set,
            "curve": str(out / "bag_size_curve.csv") if curve is not None else None, "rows": table.to_dict(orient="records"),
            "seconds": time.perf_counter() - t0}
