"""``interlock config show``: the effective settings, secrets masked."""

from __future__ import annotations

import json

import typer

from interlock.cli._context import settings_from

__all__ = ["app", "show"]

app = typer.Typer(help="Inspect the settings.", no_args_is_help=True)


@app.command("show")
def show(ctx: typer.Context) -> None:
    """Print the effective settings as JSON, with every secret masked."""
    typer.echo(json.dumps(settings_from(ctx).masked(), indent=2))
