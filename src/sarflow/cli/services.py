"""`sarflow services up|down|env|status`: the local "cluster-like" mode (sarflow.local.services)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from sarflow.cli.common import absolute_path, absolute_tracking_uri, fail
from sarflow.errors import SarflowError

services_app = typer.Typer(
    help="Real servers on 127.0.0.1 standing in for the cluster's: S3 (MinIO), MLflow, the Feast feature server.",
    no_args_is_help=True, pretty_exceptions_enable=False)

DirArg = typer.Argument(Path(".sarflow-services"), callback=absolute_path, help="state folder (logs, services.json, the Feast repo)")


@services_app.command("up")
def up_cmd(
    state_dir: Path = DirArg,
    redis: str = typer.Option("127.0.0.1:6379", help="Redis for Feast's online store (host:port)"),
    backend: str = typer.Option("", callback=absolute_tracking_uri,
                                help="MLflow backend store URI (default: PostgreSQL on 127.0.0.1:5432, else SQLite)"),
    feast: bool = typer.Option(True, "--feast/--no-feast", help="also start the Feast feature server"),
) -> None:
    """Start the services; prints their URLs and the environment clients need."""
    from sarflow.local.services import services_up

    try:
        state = services_up(state_dir, redis=redis, backend=backend or None, feast=feast)
    except SarflowError as e:
        fail(e)
    for name in ("s3", "mlflow", "feast"):
        if name in state:
            typer.echo(f"{name:7s} {state[name]['url']}  (pid {state[name]['pid']}, log {state[name]['log']})")
    typer.echo(f"use them: eval \"$(sarflow services env {state_dir})\", or "
               f"`sarflow pipeline run e2e --local --services {state_dir}`")


@services_app.command("down")
def down_cmd(state_dir: Path = DirArg) -> None:
    """Stop the services recorded in the state folder."""
    from sarflow.local.services import services_down

    try:
        stopped = services_down(state_dir)
    except SarflowError as e:
        fail(e)
    typer.echo(json.dumps(stopped))


@services_app.command("env")
def env_cmd(state_dir: Path = DirArg) -> None:
    """Print `export` lines for the services' environment."""
    from sarflow.local.services import client_env, read_state

    try:
        env = client_env(read_state(state_dir))
    except SarflowError as e:
        fail(e)
    for key, value in env.items():
        typer.echo(f"export {key}={value}")


@services_app.command("status")
def status_cmd(state_dir: Path = DirArg) -> None:
    """Print the recorded services as JSON."""
    from sarflow.local.services import read_state

    try:
        typer.echo(json.dumps(read_state(state_dir), indent=1))
    except SarflowError as e:
        fail(e)
