"""The segmentation run: trains the ViT head and the U-Net, one MLflow run each, registers the one
with the better val mIoU.

Honest numbers: a test split that cannot measure the segmentation (too few chips, fewer than two
classes with chips of their own: `data.not_evaluable`) refuses the run with an InputError naming the
store, before anything is trained or registered. The model to register is chosen on the val split;
where val cannot measure it, the default (the ViT head when an encoder is given, else the U-Net) is
taken and the run says so. The test split is never used to choose: each model and its label-fraction
points are reported on it, for comparison only.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sarflow.downstream.segmentation.config import SegmentConfig, check_config
from sarflow.downstream.segmentation.data import load_data, load_encoder, not_evaluable, resolve_inputs
from sarflow.downstream.segmentation.figures import loss_figure, prediction_figure
from sarflow.downstream.segmentation.models import encoder_patch
from sarflow.downstream.segmentation.train import _build, evaluate, majority_baseline, subset, train_model
from sarflow.errors import InputError

log = logging.getLogger(__name__)


PRIMARY_METRIC = ("test_miou", True)  # (metric, higher is better)


def prediction_map(store: str, data, pred, path: Path, model: str) -> Path | None:
    """Per-pixel class predictions of the test chips (`pred`: class positions, (chips, H, W)) as one COG mosaic on
    the store's grid (`export.export_chip_pixels`): the declared class codes in the label's dtype, the label's
    nodata where a pixel has no input data and where no test chip lies, the classes' palette. A store on s3://
    gets none (logged)."""
    from sarflow.data.chipstore import open_store
    from sarflow.data.export import export_chip_pixels

    if str(store).startswith("s3://"):
        log.info("%s: prediction maps are written for local stores only", store)
        return None
    st = open_store(store)
    arr = st.array(data.label)
    dtype, nodata = np.dtype(arr.dtype), arr.attrs.get("nodata_in_store")
    codes = np.asarray(data.classes, dtype=np.int64)
    if dtype.kind not in "iu" or nodata in (None, "NaN") or int(nodata) in codes.tolist() \
            or not all(np.can_cast(np.min_scalar_type(int(c)), dtype) for c in codes):
        dtype, nodata = np.dtype("uint16"), 65535  # the label has no integer nodata of its own: as the LLP maps
    values = codes[np.asarray(pred)].astype(dtype)
    values[~np.isfinite(np.asarray(data.x_test)).any(axis=1)] = nodata  # no input: no prediction
    declared = {int(c["code"]): c for lab in st.labels if lab.name == data.label for c in lab.classes}
    classes = [declared.get(int(c), {"code": int(c), "name": str(c)}) for c in data.classes]
    return export_chip_pixels(st, data.test_chip_ids, values, [f"{data.label} class"], path, int(nodata),
                              tags={"model": f"segmentation-{model}", "label": data.label}, classes=classes)


def run_segmentation(cfg: SegmentConfig) -> dict:
    """Trains the ViT head (when `encoder_uri` is given) and the U-Net, chooses on the val split,
    scores both on the test split, tracks one MLflow run per model and registers the chosen one as
    ``sarflow-segmentation-<label>``."""
    check_config(cfg)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: SegmentConfig) -> dict:
    import mlflow

    from sarflow.downstream.models import dataset_id, evaluation_set, log_downstream_model
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import loggable_params, setup_mlflow
    from sarflow.data.chipstore import open_chip_group

    t0 = time.perf_counter()
    try:  # a missing store fails here, before the encoder is loaded
        size = int(open_chip_group(cfg.store).attrs.get("chip_size", 0))
    except (FileNotFoundError, OSError, ValueError) as e:
        raise InputError(cfg.store, f"cannot open the chip store: {e}") from None
    encoder = None
    if cfg.encoder_uri:
        setup_mlflow(cfg.tracking_uri, cfg.experiment)
        encoder = load_encoder(cfg.encoder_uri)
        patch = encoder_patch(encoder)
        if size < patch or size % patch:
            raise InputError(cfg.store, f"chips of {size} px cannot be cut into the {patch} px patches of the encoder "
                                        f"{cfg.encoder_uri} (the chip side must be a multiple of the patch size)")
    from sarflow.downstream.tasks import registered_task_name

    groups, mean, std = resolve_inputs(cfg, encoder)
    data = load_data(cfg, groups, mean, std)
    task = f"segmentation-{data.label}"
    k = len(data.classes)
    reason = not_evaluable(data.y_test.numpy(), k, cfg.test_split)
    if reason:
        log.warning("%s: task %s is not evaluable, not trained nor registered: %s", cfg.store, task, reason)
        raise InputError(cfg.store, f"no task is evaluable on this store: {task}: {reason}")
    kinds = (["vit"] if encoder is not None else []) + (["unet"] if cfg.train_unet else [])
    val_reason = not_evaluable(data.y_val.numpy(), k, cfg.val_split)
    baseline = majority_baseline(data)
    results, models, curves = {}, {}, {}
    for kind in kinds:
        t = time.perf_counter()
        model, enc_params = _build(kind, cfg, data, encoder)
        losses = train_model(model, data.x_train, data.y_train, cfg, enc_params)
        val = evaluate(model, data, "val") if val_reason is None else None
        ev = evaluate(model, data)
        label_eff = {}
        for frac in cfg.label_fractions:
            if frac >= 1:
                continue
            sub, enc_sub = _build(kind, cfg, data, encoder)
            xs, ys = subset(data, frac, cfg.seed)
            train_model(sub, xs, ys, cfg, enc_sub)
            label_eff[frac] = evaluate(sub, data)["miou"]
        models[kind], curves[kind] = model, losses
        results[kind] = {"val_miou": val["miou"] if val else float("nan"),
                         "test_miou": ev["miou"], "test_pixel_accuracy": ev["pixel_accuracy"], "iou": ev["iou"],
                         "confusion": ev["confusion"], "pred": ev["pred"], "losses": losses,
                         "label_efficiency": {**label_eff, 1.0: ev["miou"]},
                         "params": sum(p.numel() for p in model.parameters()),
                         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "train_seconds": time.perf_counter() - t}
        log.info("%s: val mIoU %.3f, test mIoU %.3f in %.1fs", kind, results[kind]["val_miou"], ev["miou"],
                 results[kind]["train_seconds"])

    lineage = dataset_lineage(cfg.store)
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment)
    eval_set = evaluation_set(dataset_id(lineage), cfg.test_split, task)
    if val_reason is None:
        best = max(kinds, key=lambda k: (np.nan_to_num(results[k]["val_miou"], nan=-1.0), k == "vit"))
        selection = f"best mIoU on the {cfg.val_split} split"
    else:
        best = kinds[0]
        selection = f"default ({best}): the {cfg.val_split} split cannot choose, {val_reason}"
        log.warning("%s: %s: %s", cfg.store, task, selection)
    example = data.x_test[:2].numpy()
    common = {"store": cfg.store, "label_modality": data.label, "classes": data.classes,
              "channels": data.channel_names, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
              "augment": cfg.augment, "seed": cfg.seed, "train_chips": len(data.x_train),
              "val_chips": len(data.x_val), "test_chips": len(data.x_test), "val_split": cfg.val_split,
              "test_split": cfg.test_split, "chip_size": size, "selection": selection}
    out = {"task": task, "label": data.label, "classes": data.classes, "class_names": data.class_names, "plots": [],
           "registered": None, "best": best, "selection": selection, "models": {}, "not_evaluable": {},
           "majority_baseline": baseline, "unknown_test_fraction": data.unknown_test_fraction}
    with tempfile.TemporaryDirectory() as tmp:
        fig = prediction_figure(data, {k: results[k]["pred"] for k in kinds}, Path(tmp) / "predictions.png",
                                cfg.plot_chips)
        lfig = loss_figure(curves, Path(tmp) / "loss_curves.png")
        for kind in kinds:
            r, model = results[kind], models[kind]
            params = dict(common, model=kind)
            if kind == "vit":
                params.update(encoder_uri=cfg.encoder_uri, freeze_encoder=cfg.freeze_encoder, head=cfg.head,
                              head_dim=cfg.head_dim, encoder_lr_scale=cfg.encoder_lr_scale, patch=model.patch)
            else:
                params.update(unet_widths=list(cfg.unet_widths))
            params.update(trainable_params=r["trainable_params"], params=r["params"])
            metrics = {"test_miou": r["test_miou"], "test_pixel_accuracy": r["test_pixel_accuracy"],
                       **{f"test_iou_{c}": v for c, v in r["iou"].items() if np.isfinite(v)}}
            tags = {**lineage, "sarflow.task": task, "sarflow.segmentation.model": kind,
                    "sarflow.segmentation.selection": selection, "sarflow.segmentation.label": data.label,
                    "sarflow.classes": ",".join(map(str, data.classes))}
            if kind == "vit":
                tags["sarflow.encoder_uri"] = cfg.encoder_uri
            with mlflow.start_run(experiment_id=exp_id, run_name=f"segmentation-{kind}", tags=tags) as run:
                mlflow.log_params(loggable_params(params))
                client = mlflow.MlflowClient()
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                extra = [Metric("train_loss", v, now, i) for i, v in enumerate(r["losses"])]
                extra += [Metric(f"test_miou_labels_{int(round(f * 100))}pct", v, now, 0)
                          for f, v in r["label_efficiency"].items()]
                extra += [Metric("baseline_majority_miou", baseline["miou"], now, 0),
                          Metric("train_seconds", r["train_seconds"], now, 0)]
                if np.isfinite(r["val_miou"]):
                    extra.append(Metric("val_miou", r["val_miou"], now, 0))
                extra = [m for m in extra if np.isfinite(m.value)]  # a value its split cannot measure is no metric
                for i in range(0, len(extra), 900):
                    client.log_batch(run.info.run_id, metrics=extra[i:i + 900])
                mlflow.log_dict({"classes": data.classes, "rows_truth_cols_pred": r["confusion"]},
                                "confusion_matrix.json")
                mlflow.log_artifact(str(fig), artifact_path="figures")
                mlflow.log_artifact(str(lfig), artifact_path="figures")
                seg_map = prediction_map(cfg.store, data, r["pred"], Path(tmp) / f"segmentation_{kind}.tif", kind)
                if seg_map is not None:
                    mlflow.log_artifact(str(seg_map), artifact_path="maps")
                    out.setdefault("maps", {})[kind] = f"maps/{seg_map.name}"
                register = cfg.register and kind == best
                info = log_downstream_model(model, registered_task_name(task), example, lineage=lineage,
                                            eval_set=eval_set, metrics=metrics, register=register)
                if register:
                    out["models"][info["name"]] = {"version": info["version"], "metric": PRIMARY_METRIC[0],
                                                   "higher_is_better": PRIMARY_METRIC[1]}
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.classes",
                                                 ",".join(map(str, data.classes)))
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.segmentation.model", kind)
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.channels",
                                                 ",".join(data.channel_names))
                    out["registered"] = dict(info, model=kind)
            out[kind] = {"run_id": run.info.run_id, "model_uri": info["model_uri"],
                         **{k: r[k] for k in ("val_miou", "test_miou", "test_pixel_accuracy", "iou", "confusion", "losses",
                                              "label_efficiency", "params", "trainable_params", "train_seconds")}}
        out["plots"] = [f"figures/{fig.name}", f"figures/{lfig.name}"]
    out["seconds"] = time.perf_counter() - t0
    return out
