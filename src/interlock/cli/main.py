"""The ``interlock`` command.

Options feed the same settings fields as ``interlock.toml`` and ``INTERLOCK_*``
variables, with the highest precedence. Errors print one line saying what to fix and
exit non-zero.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from interlock import __version__
from interlock.cli import config as config_cmd
from interlock.cli import events as events_cmd
from interlock.cli import llm as llm_cmd
from interlock.cli import models as models_cmd
from interlock.cli import serve as serve_cmd
from interlock.cli import traffic as traffic_cmd
from interlock.cli._context import CliState, ConfigOption
from interlock.errors import InterlockError

__all__ = ["app", "main"]

app = typer.Typer(
    name="interlock",
    help="Put machine-learning models and LLM calls into production.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models_cmd.app, name="models")
app.add_typer(config_cmd.app, name="config")
app.add_typer(traffic_cmd.app, name="traffic")
app.add_typer(llm_cmd.app, name="llm")
app.add_typer(events_cmd.app, name="events")
app.command("serve")(serve_cmd.serve)
app.command("worker")(events_cmd.worker)
app.command("demo")(serve_cmd.demo)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"interlock {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    config: ConfigOption = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    ctx.obj = CliState(config=config)


def main() -> None:
    """Run the CLI; every error is one line on stderr and a non-zero exit code."""
    try:
        result = app(standalone_mode=False)
    except InterlockError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except typer.TyperException as exc:  # usage errors: a bad option, a missing file
        format_message = getattr(exc, "format_message", None)
        message = format_message() if callable(format_message) else str(exc)
        if message:  # empty after `--help`-style output, which said it all
            typer.echo(f"error: {message} (see --help)", err=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(result if isinstance(result, int) else 0)
