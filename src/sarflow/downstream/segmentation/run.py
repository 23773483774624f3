"""The segmentation run: trains the ViT head and the U-Net, one MLflow run each, registers the better."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sarflow.downstream.segmentation.config import SegmentConfig, check_config
from sarflow.downstream.segmentation.data import load_data, load_encoder, resolve_inputs
from sarflow.downstream.segmentation.figures import loss_figure, prediction_figure
from sarflow.downstream.segmentation.models import encoder_patch
from sarflow.downstream.segmentation.train import _build, evaluate, majority_baseline, subset, train_model
from sarflow.errors import InputError

log = logging.getLogger(__name__)


TASK = "segmentation"


def run_segmentation(cfg: SegmentConfig) -> dict:
    """Trains the ViT head (when `encoder_uri` is given) and the U-Net, evaluates both on the
    test split, tracks one MLflow run per model and registers the better one."""
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

    from sarflow.downstream.models import log_downstream_model
    from sarflow.mlops.lineage import dataset_lineage
    from sarflow.mlops.tracking import setup_mlflow
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
    groups, mean, std = resolve_inputs(cfg, encoder)
    data = load_data(cfg, groups, mean, std)
    kinds = (["vit"] if encoder is not None else []) + (["unet"] if cfg.train_unet else [])
    baseline = majority_baseline(data)
    results, models, curves = {}, {}, {}
    for kind in kinds:
        t = time.perf_counter()
        model, enc_params = _build(kind, cfg, data, encoder)
        losses = train_model(model, data.x_train, data.y_train, cfg, enc_params)
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
        results[kind] = {"test_miou": ev["miou"], "test_pixel_accuracy": ev["pixel_accuracy"], "iou": ev["iou"],
                         "confusion": ev["confusion"], "pred": ev["pred"], "losses": losses,
                         "label_efficiency": {**label_eff, 1.0: ev["miou"]},
                         "params": sum(p.numel() for p in model.parameters()),
                         "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "train_seconds": time.perf_counter() - t}
        log.info("%s: test mIoU %.3f in %.1fs", kind, ev["miou"], results[kind]["train_seconds"])

    lineage = dataset_lineage(cfg.store)
    exp_id = setup_mlflow(cfg.tracking_uri, cfg.experiment)
    eval_set = f"{lineage.get('sarflow.dataset_dvc_md5', 'untracked')}:{cfg.test_split}"
    best = max(kinds, key=lambda k: (np.nan_to_num(results[k]["test_miou"], nan=-1.0), k == "vit"))
    example = data.x_test[:2].numpy()
    common = {"store": cfg.store, "label_modality": cfg.label_modality, "classes": data.classes,
              "channels": data.channel_names, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
              "augment": cfg.augment, "seed": cfg.seed, "train_chips": len(data.x_train),
              "test_chips": len(data.x_test), "test_split": cfg.test_split, "chip_size": size}
    out = {"classes": data.classes, "plots": [], "registered": None, "best": best,
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
            tags = {**lineage, "sarflow.task": TASK, "sarflow.segmentation.model": kind,
                    "sarflow.classes": ",".join(map(str, data.classes))}
            if kind == "vit":
                tags["sarflow.encoder_uri"] = cfg.encoder_uri
            with mlflow.start_run(experiment_id=exp_id, run_name=f"segmentation-{kind}", tags=tags) as run:
                mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
                client = mlflow.MlflowClient()
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                extra = [Metric("train_loss", v, now, i) for i, v in enumerate(r["losses"])]
                extra += [Metric(f"test_miou_labels_{int(round(f * 100))}pct", v, now, 0)
                          for f, v in r["label_efficiency"].items()]
                extra += [Metric("baseline_majority_miou", baseline["miou"], now, 0),
                          Metric("train_seconds", r["train_seconds"], now, 0)]
                for i in range(0, len(extra), 900):
                    client.log_batch(run.info.run_id, metrics=extra[i:i + 900])
                mlflow.log_dict({"classes": data.classes, "rows_truth_cols_pred": r["confusion"]},
                                "confusion_matrix.json")
                mlflow.log_artifact(str(fig), artifact_path="figures")
                mlflow.log_artifact(str(lfig), artifact_path="figures")
                register = cfg.register and kind == best
                info = log_downstream_model(model, TASK, example, lineage=lineage, eval_set=eval_set, metrics=metrics,
                                            register=register)
                if register:
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.classes",
                                                 ",".join(map(str, data.classes)))
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.segmentation.model", kind)
                    client.set_model_version_tag(info["name"], info["version"], "sarflow.channels",
                                                 ",".join(data.channel_names))
                    out["registered"] = dict(info, model=kind)
            out[kind] = {"run_id": run.info.run_id, "model_uri": info["model_uri"],
                         **{k: r[k] for k in ("test_miou", "test_pixel_accuracy", "iou", "confusion", "losses",
                                              "label_efficiency", "params", "trainable_params", "train_seconds")}}
        out["plots"] = [f"figures/{fig.name}", f"figures/{lfig.name}"]
    out["seconds"] = time.perf_counter() - t0
    return out
