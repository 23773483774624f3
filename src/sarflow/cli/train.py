"""`sarflow pretrain`: a self-supervised encoder, tracked and registered in MLflow."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import ParamsOpt, TrackingOpt, absolute_path, fail, stage_config
from sarflow.errors import SarflowError

def pretrain(
    store: str = typer.Argument(..., callback=absolute_path, help="chip store (folder or s3://)"),
    method: Optional[str] = typer.Option(None, help="mae | dino | clip"),
    modalities: Optional[str] = typer.Option(None, help="input sources to train on, comma-separated (default: every "
                                                         "input source of the store; params pretrain.modalities)"),
    max_steps: Optional[int] = typer.Option(None, help="optimisation steps"),
    batch_size: Optional[int] = typer.Option(None, help="chips per training step (per device)"),
    vit_size: Optional[str] = typer.Option(None, help="tiny | small | base"),
    patch: Optional[int] = typer.Option(None, help="patch size (8 or 16)"),
    depth: Optional[int] = typer.Option(None, help="override the ViT depth (tiny CPU configs)"),
    dim: Optional[int] = typer.Option(None, help="override the ViT width"),
    output_size: Optional[int] = typer.Option(None, help="resize chips to this side (e.g. 224)"),
    workers: Optional[int] = typer.Option(None, help="DataLoader workers"),
    devices: Optional[str] = typer.Option(None, help="'auto', a GPU count, or -1 for all GPUs (DDP)"),
    tracking_uri: Optional[str] = TrackingOpt,
    experiment: Optional[str] = typer.Option(None, help="MLflow experiment"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Pretrain a self-supervised encoder (MAE, DINO or CLIP-multimodal), track it in MLflow and
    register it as sarflow-encoder-<method>."""
    from sarflow.params import Params
    from sarflow.training.distributed import PRETRAIN_SECTION_ENV, pretrain_section
    from sarflow.training.pretrain import pretrain as run_pretrain

    try:
        # a TrainJob's pod gets params.yaml's pretrain section in its environment (distributed.train_job)
        section = pretrain_section() if params is None else None
        source = Params({"pretrain": section}, f"${PRETRAIN_SECTION_ENV}") if section is not None else params
        cfg = stage_config("pretrain", source, {
            "method": method, "batch_size": batch_size, "output_size": output_size, "workers": workers,
            "modalities": [m.strip() for m in modalities.split(",") if m.strip()] if modalities else None,
            "tracking_uri": tracking_uri, "experiment": experiment,
            "devices": int(devices) if devices and devices.lstrip("-").isdigit() else devices,
            "vit": {"size": vit_size, "patch": patch, "depth": depth, "dim": dim}, "optim": {"max_steps": max_steps}}, store=store)
        result = run_pretrain(cfg, show_progress=sys.stderr.isatty())
    except SarflowError as e:
        fail(e)
    except (ValueError, TypeError) as e:
        fail(SarflowError(str(e)))
    if not result:  # a torchrun rank other than 0: rank 0 tracks, registers and reports
        return
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "losses"} |
                          {"first_loss": result["losses"][0], "last_loss": result["losses"][-1]}, indent=1))


COMMANDS = [pretrain]
