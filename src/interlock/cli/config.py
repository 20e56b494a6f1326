"""``interlock config show``: the effective settings, secrets masked."""

from __future__ import annotations

import json

import typer

from interlock.cli._context import ConfigOption, settings_from

__all__ = ["app", "show"]

app = typer.Typer(help="Inspect the settings.", no_args_is_help=True)


@app.command("show")
def show(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Print the effective settings as JSON, with every secret masked."""
    typer.echo(json.dumps(settings_from(ctx, config).masked(), indent=2))
