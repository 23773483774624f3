"""`sarflow embed`: every chip through a registered encoder into the offline feature source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from sarflow.cli.common import ParamsOpt, fail, tracking_uri_or_default
from sarflow.errors import SarflowError


def embed(
    store: str = typer.Argument(..., help="chip store"),
    model: str = typer.Option(..., "--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or runs:/ID/encoder"),
    root: Path = typer.Option(Path("data/features"), "--root", help="features root (the offline store)"),
    batch_size: int = typer.Option(256),
    overwrite: bool = typer.Option(False, help="replace this model version's embeddings"),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default: params pretrain.tracking_uri)"),
    params: Optional[Path] = ParamsOpt,
) -> None:
    """Embed every chip with a registered encoder into the Parquet offline source (one partition per model version)."""
    import mlflow

    from sarflow.features.embed import embed_store

    try:
        mlflow.set_tracking_uri(tracking_uri_or_default(tracking_uri, params))
        result = embed_store(store, model, root, batch_size=batch_size, overwrite=overwrite)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(result, indent=1))


COMMANDS = [embed]
