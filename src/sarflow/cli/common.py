"""What every `sarflow` command shares: how an error ends it, the --params option, the tracking URI."""

from __future__ import annotations

from pathlib import Path

import typer

ParamsOpt = typer.Option(None, "--params", help="params.yaml to read (default: ./params.yaml when present)")


def fail(e: Exception) -> None:
    """Prints `error: <e>` on stderr and exits with status 2."""
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


def tracking_uri_or_default(explicit: str | None, params: Path | None) -> str:
    """--tracking-uri, else params.yaml pretrain.tracking_uri, else the embedded default."""
    from sarflow.params import load_params, section

    return explicit or section(load_params(params), "pretrain", {}).get("tracking_uri", "sqlite:///mlflow.db")
