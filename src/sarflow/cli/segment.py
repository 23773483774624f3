"""`sarflow segment ...`: a segmentation head on a pretrained encoder vs a U-Net from scratch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List, Optional

import typer

from sarflow.cli.common import MODEL_HELP, ParamsOpt, TrackingOpt, absolute_path, fail, registered_model_uri, stage_config
from sarflow.errors import SarflowError

segment_app = typer.Typer(help="Semantic segmentation: ViT head on a registered encoder vs a from-scratch U-Net (mIoU).",
                          no_args_is_help=True)


@segment_app.callback()
def main() -> None:
    """Semantic segmentation: ViT head on a registered encoder vs a from-scratch U-Net (mIoU)."""


def _fmt(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


@segment_app.command()
def train(store: str = typer.Argument(..., callback=absolute_path, help="chip store (local path or s3://)"),
          encoder: Optional[str] = typer.Option(None, "--encoder", help=f"the pretrained encoder, a registered {MODEL_HELP}; "
                                                "e.g. models:/sarflow-encoder-mae/1 (without it only the U-Net is trained)"),
          tracking_uri: Optional[str] = TrackingOpt,
          label: Optional[str] = typer.Option(None, "--label", help="categorical label to segment (default: the "
                                              "store's only one)"),
          modalities: Optional[List[str]] = typer.Option(None, "--modalities", help="U-Net inputs without --encoder "
                                                         "(default: the store's continuous inputs)"),
          steps: Optional[int] = typer.Option(None, "--steps", help="training steps per model"),
          batch_size: Optional[int] = typer.Option(None, "--batch-size", help="chips per training step"),
          lr: Optional[float] = typer.Option(None, "--lr", help="learning rate"),
          freeze: Optional[bool] = typer.Option(None, "--freeze/--finetune", help="head on frozen tokens, or fine-tune the encoder"),
          head: Optional[str] = typer.Option(None, "--head", help="linear (1x1 conv + bilinear) or progressive"),
          no_unet: bool = typer.Option(False, "--no-unet", help="train only the ViT head"),
          label_fraction: Optional[List[float]] = typer.Option(None, "--label-fraction",
                                                               help="extra label-efficiency point (fraction of train chips); repeatable"),
          experiment: Optional[str] = typer.Option(None, "--experiment", help="MLflow experiment"),
          register: Optional[bool] = typer.Option(None, "--register/--no-register", help="register the model with the better "
                                                  "val mIoU as sarflow-segmentation-<label>"),
          seed: Optional[int] = typer.Option(None, "--seed", help="random seed"),
          as_json: bool = typer.Option(False, "--json", help="print the result as JSON instead of a table"),
          params: Optional[Path] = ParamsOpt) -> None:
    """Train both models on the train split, score them on the test split, track and register.
    Defaults: params.yaml's `segment:` section; flags override it."""
    from sarflow.downstream.segmentation.run import run_segmentation

    try:
        cfg = stage_config("segment", params, {
            "tracking_uri": tracking_uri, "encoder_uri": encoder, "label_modality": label, "steps": steps,
            "batch_size": batch_size, "lr": lr, "freeze_encoder": freeze, "head": head,
            "train_unet": False if no_unet else None, "label_fractions": label_fraction or None,
            "experiment": experiment, "register": register, "seed": seed, "modalities": modalities or None}, store=store)
        cfg.encoder_uri = registered_model_uri(cfg.encoder_uri, cfg.tracking_uri)
        out = run_segmentation(cfg)
    except SarflowError as e:
        fail(e)
        return
    kinds = [k for k in ("vit", "unet") if k in out]
    if as_json:
        keep = ("run_id", "model_uri", "test_miou", "test_pixel_accuracy", "iou", "label_efficiency", "trainable_params")
        typer.echo(json.dumps({**{k: {f: out[k][f] for f in keep} for k in kinds},
                               "task": out["task"], "classes": out["classes"], "best": out["best"],
                               "selection": out["selection"], "models": out["models"],
                               "not_evaluable": out["not_evaluable"], "registered": out["registered"],
                               "majority_baseline": out["majority_baseline"]}, indent=1, default=str))
        return
    names = {"vit": "ViT head" + (" (frozen)" if cfg.freeze_encoder else " (fine-tuned)"), "unet": "U-Net (scratch)"}
    fracs = sorted({f for k in kinds for f in out[k]["label_efficiency"]})
    header = f"{'model':<22}{'mIoU':>8}{'pix acc':>9}" + "".join(f"{'mIoU@' + format(f, 'g'):>11}" for f in fracs if f < 1) \
        + f"{'trainable':>11}  run"
    typer.echo(header)
    for k in kinds:
        r = out[k]
        typer.echo(f"{names[k]:<22}{_fmt(r['test_miou']):>8}{_fmt(r['test_pixel_accuracy']):>9}"
                   + "".join(f"{_fmt(r['label_efficiency'].get(f)):>11}" for f in fracs if f < 1)
                   + f"{r['trainable_params']:>11}  {r['run_id']}")
    b = out["majority_baseline"]
    typer.echo(f"{'majority class ' + str(b['class']):<22}{_fmt(b['miou']):>8}{_fmt(b['pixel_accuracy']):>9}")
    typer.echo("per-class IoU: " + "; ".join(
        f"{c}: " + "/".join(_fmt(out[k]["iou"].get(c)) for k in kinds) for c in out["classes"]) + f"  ({'/'.join(kinds)})")
    typer.echo(f"task: {out['task']}  chosen: {out['best']} ({out['selection']})")
    reg = out["registered"]
    typer.echo(f"registered: {reg['name']} v{reg['version']} ({reg['model']})" if reg else "registered: none")
