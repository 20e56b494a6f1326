"""``interlock traffic``: split, shadow, canary and fallback per model.

Changes go to the metadata database; running servers pick them up within a second.
``set`` and ``canary`` first load and warm, in this process, each version they send
requests to, and refuse the change when one cannot load. ``show`` lists the serving
nodes seen recently with the policy revision each applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from interlock.cli._context import ConfigOption, settings_from
from interlock.errors import TrafficError
from interlock.serving.nodes import LIVE_S
from interlock.serving.policies import KEEP, Keep, PolicyStore
from interlock.serving.traffic import Fallback, TrafficPolicy
from interlock.settings import Settings

__all__ = ["app", "canary", "clear", "open_policies", "parse_duration", "set_weights", "show"]

app = typer.Typer(help="Route a model's traffic between its versions.", no_args_is_help=True)

T = TypeVar("T")

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def open_policies(settings: Settings) -> contextlib.AbstractAsyncContextManager[PolicyStore]:
    """A migrated policy store for one-off work, closed on exit (as ``open_registry``)."""
    from interlock.app import open_traffic_admin

    return open_traffic_admin(settings)


def _run(ctx: typer.Context, config: Path | None, work: Callable[[PolicyStore], Awaitable[T]]) -> T:
    settings = settings_from(ctx, config)

    async def main() -> T:
        async with open_policies(settings) as store:
            return await work(store)

    return asyncio.run(main())


def parse_duration(text: str) -> float:
    """Seconds in ``500ms``, ``60s``, ``5m``, ``1h`` or a bare number of seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise TrafficError(f"{text!r} is not a duration: use e.g. 500ms, 60s, 5m or 1h")
    return float(match[1]) * _UNIT_S[match[2] or "s"]


def _parse_weights(pairs: list[str]) -> dict[int, int]:
    weights: dict[int, int] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        if not sep or not version.strip().isdigit() or not weight.strip().lstrip("-").isdigit():
            raise TrafficError(f"{pair!r} is not VERSION=WEIGHT (e.g. 1=80)")
        if int(version) in weights:
            raise TrafficError(f"version {int(version)} is given twice")
        weights[int(version)] = int(weight)
    return weights


def _summary(policy: TrafficPolicy) -> str:
    shares = " ".join(f"{v}={p:g}%" for v, p in policy.effective_weights().items())
    shadow = f", shadow {policy.shadow}" if policy.shadow is not None else ""
    fallback = ", static fallback" if policy.fallback is not None else ""
    return f"{policy.model}: {shares}{shadow}{fallback} (revision {policy.revision})"


@app.command("set")
def set_weights(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    weights: Annotated[
        list[str], typer.Argument(metavar="VERSION=WEIGHT...", help="e.g. 1=80 2=20.")
    ],
    shadow: Annotated[
        int | None,
        typer.Option(min=1, help="A version that gets a copy of each request (replaces one)."),
    ] = None,
    no_shadow: Annotated[
        bool, typer.Option("--no-shadow", help="Remove the shadow the policy has.")
    ] = False,
    fallback_static: Annotated[
        str | None,
        typer.Option("--fallback-static", help="JSON answer per row when no version can answer."),
    ] = None,
    no_fallback: Annotated[
        bool, typer.Option("--no-fallback", help="Remove the static fallback the policy has.")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Split NAME's traffic by weight; cancels a running canary.

    The shadow and static fallback already set are kept unless replaced (--shadow,
    --fallback-static) or removed (--no-shadow, --no-fallback). Each version that will
    get requests is loaded and warmed first; one that cannot load refuses the change.
    """
    parsed = _parse_weights(weights)
    if shadow is not None and no_shadow:
        raise TrafficError("give either --shadow or --no-shadow, not both")
    if fallback_static is not None and no_fallback:
        raise TrafficError("give either --fallback-static or --no-fallback, not both")
    copies: int | Keep | None = None if no_shadow else KEEP if shadow is None else shadow
    fallback: Fallback | Keep | None = None if no_fallback else KEEP
    if fallback_static is not None:
        try:
            fallback = Fallback(json.loads(fallback_static))
        except json.JSONDecodeError as exc:
            raise TrafficError(f"--fallback-static is not valid JSON: {exc}") from None
    policy = _run(
        ctx, config, lambda s: s.set_weights(name, parsed, shadow=copies, fallback=fallback)
    )
    typer.echo(_summary(policy))


@app.command("canary")
def canary(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[int, typer.Argument(min=1, help="The version to roll out.")],
    weight: Annotated[
        int | None, typer.Option(min=1, max=100, help="First step, in percent of traffic.")
    ] = None,
    steps: Annotated[
        str | None, typer.Option(help="Percents in turn, e.g. 5,25,50,100 (the default).")
    ] = None,
    interval: Annotated[str, typer.Option(help="Time at each step: 500ms, 60s, 5m…")] = "60s",
    max_error_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="Roll back above this error rate.")
    ] = None,
    max_p99_ms: Annotated[
        float | None, typer.Option(min=0, help="Roll back above this p99 latency.")
    ] = None,
    min_requests: Annotated[
        int, typer.Option(min=1, help="Canary requests before any decision.")
    ] = 100,
    unguarded: Annotated[
        bool,
        typer.Option("--unguarded", help="Allow no guard: the canary promotes on time alone."),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Roll VERSION out in steps, guarded by error rate and p99; rolls back on a breach.

    A guard (--max-error-rate or --max-p99-ms) is required unless --unguarded. VERSION
    is loaded and warmed first; a version that cannot load is refused.
    """
    if max_error_rate is None and max_p99_ms is None and not unguarded:
        raise TrafficError(
            f"{name}: a canary needs a guard: give --max-error-rate or --max-p99-ms,"
            " or --unguarded to let it promote on time alone"
        )
    ladder = None
    if steps is not None:
        parts = [p.strip() for p in steps.split(",")]
        if not all(p.isdigit() for p in parts):
            raise TrafficError(f"--steps {steps!r} is not a list of percents like 5,25,50,100")
        ladder = [int(p) for p in parts]
    interval_s = parse_duration(interval)
    policy = _run(
        ctx,
        config,
        lambda s: s.start_canary(
            name,
            version,
            weight=weight,
            steps=ladder,
            interval_s=interval_s,
            max_error_rate=max_error_rate,
            max_p99_ms=max_p99_ms,
            min_requests=min_requests,
            unguarded=unguarded,
        ),
    )
    typer.echo(_summary(policy))


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(min=1, help="Recent events to list.")] = 10,
    config: ConfigOption = None,
) -> None:
    """Show NAME's weights, shadow, fallback, canary, the nodes applying it, recent events."""
    info = _run(ctx, config, lambda s: s.describe(name, limit))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    _print(info)


@app.command("clear")
def clear(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    config: ConfigOption = None,
) -> None:
    """Remove NAME's policy: its requests follow its aliases again."""
    cleared = _run(ctx, config, lambda s: s.clear(name))
    typer.echo(f"{name}: policy cleared" if cleared else f"{name}: had no traffic policy")


def _print(info: dict[str, Any]) -> None:
    console = Console(highlight=False)
    name, policy = info["model"], info["policy"]
    if policy is None:
        console.print(f"[bold]{escape(name)}[/bold]: no traffic policy; requests follow aliases")
    else:
        console.print(f"[bold]{escape(name)}[/bold]  revision {policy['revision']}")
        if info["pending"] is not None:
            console.print(
                f"[bold]pending: {escape(info['pending'])}[/bold]"
                " (the split below is stored, not yet applied)"
            )
        plan = policy["canary"] or {}
        table = Table("version", "weight", "share", "role")
        for version, share in info["effective_weights"].items():
            role = "canary" if plan.get("version") == int(version) else ""
            role = "stable" if plan.get("stable") == int(version) else role
            weight = policy["weights"].get(version, "")
            table.add_row(version, str(weight), f"{share:g}%", role)
        console.print(table)
        console.print(f"shadow: {policy['shadow'] if policy['shadow'] is not None else 'none'}")
        fallback = policy["fallback"]
        text = json.dumps(fallback["static"]) if fallback is not None else "none"
        console.print(f"fallback: {escape(text)}")
        if plan:
            _print_canary(console, plan)
    _print_nodes(console, info)
    rollback = info["last_rollback"]
    if rollback is not None:
        console.print(f"last rollback ({rollback['at']}): {escape(rollback['message'])}")
    if info["events"]:
        table = Table("at", "kind", "revision", "message")
        for event in info["events"]:
            at, kind, revision, message = (event[k] for k in ("at", "kind", "revision", "message"))
            table.add_row(at[:19].replace("T", " "), kind, str(revision), escape(message))
        console.print(table)


def _print_nodes(console: Console, info: dict[str, Any]) -> None:
    nodes, policy = info["nodes"], info["policy"]
    if not nodes:
        console.print(f"nodes: none seen in the last {LIVE_S:g} s")
        return
    stored = policy["revision"] if policy is not None else None
    table = Table("node", "host", "pid", "last seen", "applies")
    for node in nodes:
        revision = node["revision"]
        applies = "no policy" if revision is None else f"revision {revision}"
        if revision != stored:
            applies += " (stale)"
        last_seen = node["last_seen"][:19].replace("T", " ")
        table.add_row(node["node"], escape(node["host"]), str(node["pid"]), last_seen, applies)
    console.print(f"nodes seen in the last {LIVE_S:g} s:")
    console.print(table)


def _print_canary(console: Console, plan: dict[str, Any]) -> None:
    steps = plan["steps"]
    status, step = plan["status"], plan["step"]
    weight = steps[step] if status == "running" else (100 if status == "promoted" else 0)
    console.print(
        f"canary: version {plan['version']} against {plan['stable']}, {status},"
        f" step {step + 1}/{len(steps)} at {weight}%"
        f" (steps {'/'.join(map(str, steps))}%, every {plan['interval_s']:g} s)"
    )
    limits = [
        f"error rate ≤ {plan['max_error_rate']:g}" if plan["max_error_rate"] is not None else "",
        f"p99 ≤ {plan['max_p99_ms']:g} ms" if plan["max_p99_ms"] is not None else "",
    ]
    guard = ", ".join(x for x in limits if x) or "none"
    console.print(f"guard: {guard}, after {plan['min_requests']} canary requests")
    if plan["reason"]:
        console.print(f"reason: {escape(plan['reason'])}")
