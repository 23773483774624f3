"""`sarflow verify`: is every shard a chip store wrote still there, whole and unchanged."""

from __future__ import annotations

import typer

from sarflow.cli.common import absolute_path, fail
from sarflow.errors import SarflowError


def verify(
    store: str = typer.Argument(..., callback=absolute_path, help="chip store (a folder or s3://)"),
    full: bool = typer.Option(False, "--full", help="hash every file (default: presence and sizes only)"),
    record: bool = typer.Option(False, "--record", help="write the integrity record of a store that has none "
                                "(or after a repair you trust), then verify it"),
) -> None:
    """Checks a chip store against its integrity record (integrity.json): exits 1 naming every
    missing, truncated or changed shard with the chips it holds."""
    from sarflow.data import integrity

    try:
        if record:
            integrity.record(store)
        problems = integrity.verify(store, full=full)
    except SarflowError as e:
        fail(e)
    if problems is None:
        fail(SarflowError(f"{store}: no integrity record (a store tiled before records existed); "
                          f"`sarflow verify {store} --record` writes one"))
    n = len(integrity.load_record(store)["files"])
    if problems:
        for p in problems:
            typer.echo(f"damaged: {p}")
        typer.secho(f"{store}: {len(problems)} problem(s) among {n} recorded files", fg="red", err=True)
        raise typer.Exit(1)
    typer.echo(f"{store}: intact ({n} files, {'sizes and SHA-256' if full else 'presence and sizes'} checked)")


COMMANDS = [verify]
