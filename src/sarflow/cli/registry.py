"""`sarflow promote`: the registry's gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import ParamsOpt, fail, tracking_uri_or_default
from sarflow.errors import SarflowError


def promote(
    name: str = typer.Argument(..., help="registered model, e.g. sarflow-landcover"),
    metric: str = typer.Option(..., help="the evaluation metric logged on each version's run"),
    lower_is_better: bool = typer.Option(False, help="for losses and errors"),
    margin: float = typer.Option(0.0, help="the challenger must beat the champion by more than this"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: params pretrain.tracking_uri)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Gate: move @champion to the newest version only if it is better on the same evaluation set and data."""
    import mlflow

    from sarflow.mlops.registry import promote as run_promote

    try:
        mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri, params))
        d = run_promote(name, metric, higher_is_better=not lower_is_better, margin=margin)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(d.__dict__, indent=1))


COMMANDS = [promote]
