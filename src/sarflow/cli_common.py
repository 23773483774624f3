"""What every `sarflow` command shares: how an error ends it."""

from __future__ import annotations

import typer


def fail(e: Exception) -> None:
    """Prints `error: <e>` on stderr and exits with status 2."""
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)
