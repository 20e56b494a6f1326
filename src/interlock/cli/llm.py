"""``interlock llm``: the LLM gateway's usage, read from the metadata database.

``interlock llm usage`` prints the totals and the per-tenant, per-model and
per-deployment breakdowns of the calls the gateway recorded (tokens, cost, cache hits
and what they saved) as tables, or as the JSON that ``GET /llm/v1/usage`` returns.
Records still buffered in a running gateway (at most ``llm.usage_flush_s`` old) are
not included.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from interlock._core.clock import SystemClock
from interlock.cli._context import ConfigOption, settings_from
from interlock.llm.usage import OPEN_TENANT, parse_time, usage_summary
from interlock.settings import Settings

__all__ = ["app", "usage"]

app = typer.Typer(help="Inspect the LLM gateway.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Inspect the LLM gateway."""  # a callback keeps `llm` a group of subcommands


_WHEN_HELP = "a date (2026-11-01), an ISO time (UTC unless it has an offset) or an age (24h, 7d)"


def _when(option: str, text: str | None, now: datetime) -> datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text, now=now)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from None


async def _summary(settings: Settings, **filters: Any) -> dict[str, Any]:
    from interlock.app import open_database

    async with open_database(settings) as database:
        return await usage_summary(database, **filters)


def _money(value: float) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if value else "0"


def _row(name: str, part: dict[str, Any]) -> list[str]:
    return [
        escape(name),
        f"{part['requests']:,}",
        f"{part['prompt_tokens']:,}",
        f"{part['completion_tokens']:,}",
        _money(part["total_cost_usd"]),
        f"{part['cache_hits']:,}",
        _money(part["saved_cost_usd"]),
        f"{part['errors']:,}",
    ]


def _table(title: str, header: str, rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(header)
    for column in ("requests", "prompt", "completion", "cost $", "cache hits", "saved $"):
        table.add_column(column, justify="right")
    table.add_column("errors", justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _print(summary: dict[str, Any]) -> None:
    console = Console()
    window = f"{summary['since'] or 'the start'} to {summary['until'] or 'now'}"
    console.print(f"[bold]LLM usage[/bold] from {escape(window)}")
    console.print(_table("totals", "", [_row("all", summary)]))
    for header in ("tenant", "model", "deployment"):
        parts: dict[str, dict[str, Any]] = summary[f"by_{header}"]
        if parts:  # the costliest first
            ordered = sorted(parts.items(), key=lambda kv: (-kv[1]["total_cost_usd"], kv[0]))
            rows = [_row(name, part) for name, part in ordered]
            console.print(_table(f"by {header}", header, rows))


@app.command("usage")
def usage(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option(help=f"From {_WHEN_HELP}.")] = None,
    until: Annotated[str | None, typer.Option(help=f"Before {_WHEN_HELP}.")] = None,
    tenant: Annotated[
        str | None, typer.Option(help=f"Only this tenant ({OPEN_TENANT}: calls without one).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Only this model name.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Tokens, cost and cache savings of LLM calls: totals and per tenant, model, deployment."""
    now = SystemClock().now()
    start, end = _when("--since", since, now), _when("--until", until, now)
    settings = settings_from(ctx, config)
    summary = asyncio.run(_summary(settings, since=start, until=end, tenant=tenant, model=model))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    _print(summary)
