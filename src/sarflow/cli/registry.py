"""`sarflow promote`: the registry's gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import ParamsOpt, TrackingOpt, fail, stage_config
from sarflow.errors import SarflowError


def promote(
    name: str = typer.Argument(..., help="registered model, e.g. sarflow-worldcover"),
    metric: str = typer.Option(..., help="the evaluation metric logged on each version's run"),
    lower_is_better: bool = typer.Option(False, help="for losses and errors"),
    margin: Optional[float] = typer.Option(None, help="the challenger must beat the champion by more than this "
                                           "(default params promote.margin)"),
    version: Optional[str] = typer.Option(None, help="the version to judge (default: the newest)"),
    lock_uri: Optional[str] = typer.Option(None, help="where the gates' lock lives: postgresql://... spans pods, or a "
                                           "folder (default params promote.lock_uri, else $SARFLOW_PROMOTION_LOCK, "
                                           "else beside the registry)"),
    tracking_uri: Optional[str] = TrackingOpt,
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Gate: move @champion to a version (default the newest) only if it is better on the same evaluation set and data."""
    import mlflow

    from sarflow.mlops.registry import promote as run_promote

    try:
        cfg = stage_config("promote", params, {"margin": margin, "tracking_uri": tracking_uri, "lock_uri": lock_uri})
        mlflow.set_tracking_uri(cfg.tracking_uri)
        d = run_promote(name, metric, higher_is_better=not lower_is_better, margin=cfg.margin, version=version,
                        lock_uri=cfg.lock_uri)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(d.__dict__, indent=1))
    if d.outcome == "incomparable":  # nothing moved, and nobody should read this as a rejection
        fail(SarflowError(f"{name}: {d.reasons[0]}"))


COMMANDS = [promote]
