"""``interlock worker`` and ``interlock events publish|tail``.

The bus URL comes from ``--bus``, else ``INTERLOCK_BUS_URL``, else ``bus.url`` in the
settings (``INTERLOCK_BUS__URL``, ``interlock.toml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import sys
import uuid
from typing import Annotated, Any

import orjson
import typer

from interlock._core.logs import configure_logging
from interlock.bus import bus_options
from interlock.cli._context import settings_from, share_the_gil
from interlock.errors import ConfigError
from interlock.settings import Settings

__all__ = ["app", "publish", "tail", "worker"]

app = typer.Typer(help="Publish to and read from the event bus.", no_args_is_help=True)

BusOption = Annotated[
    str | None,
    typer.Option(
        "--bus", help="memory://, redis://host:port/db, kafka://host:port, nats://host:port"
    ),
]


def _settings(ctx: typer.Context, bus: str | None, **bus_fields: Any) -> Settings:
    url = bus or os.environ.get("INTERLOCK_BUS_URL")
    fields = {k: v for k, v in bus_fields.items() if v is not None}
    if url:
        fields["url"] = url
    return settings_from(ctx, bus=fields) if fields else settings_from(ctx)


def worker(
    ctx: typer.Context,
    bus: BusOption = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Events in flight at most (back-pressure).")
    ] = None,
    group: Annotated[str | None, typer.Option(help="The consumer group to join.")] = None,
    consumer: Annotated[
        str | None, typer.Option(help="This member's name in the group (default: host-pid).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics on this port (lag for KEDA).")
    ] = None,
) -> None:
    """Answer prediction requests from the bus until SIGTERM (then drain and leave)."""
    settings = _settings(ctx, bus, concurrency=concurrency, group=group)
    if settings.bus.url.startswith("memory:"):
        raise ConfigError(
            "the worker needs a shared bus: pass --bus redis://…, kafka://… or nats://… "
            "(or set INTERLOCK_BUS_URL)"
        )
    configure_logging(settings.log.level, settings.log.json_lines)
    name = consumer or f"{socket.gethostname()}-{os.getpid()}"
    try:
        import uvloop  # the event loop `interlock serve` runs on too
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(_run_worker(settings, name, metrics_port))
    else:
        uvloop.run(_run_worker(settings, name, metrics_port))


async def _run_worker(settings: Settings, consumer: str, metrics_port: int | None) -> None:
    from interlock.app import build_components, start_components, stop_components
    from interlock.bus import open_bus
    from interlock.monitoring.events import WorkerMetrics
    from interlock.serving.dedupe import open_dedupe
    from interlock.serving.worker import PredictionWorker

    parts = build_components(settings)
    bus = open_bus(settings.bus.url, **bus_options(settings.bus))
    dedupe_url = settings.bus.dedupe_url
    if dedupe_url is None and settings.bus.url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        dedupe_url = settings.bus.url
    dedupe = open_dedupe(dedupe_url, settings.bus.dedupe_ttl_s, database=parts.database)
    metrics = WorkerMetrics(parts.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.server.host, registry=metrics.registry)
    await start_components(parts)
    # Everything loaded so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stalled the loop for 150-200 ms.
    gc.collect()
    gc.freeze()
    share_the_gil(settings)
    try:
        async with bus:
            await PredictionWorker(
                bus, parts.pipeline, dedupe, settings.bus, consumer=consumer, metrics=metrics
            ).run(stop)
    finally:
        await dedupe.aclose()
        await stop_components(parts)


@app.command("publish")
def publish(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic, e.g. ai.prediction.requested.")],
    payload: Annotated[str, typer.Argument(help="The JSON to publish ('-': one per stdin line).")],
    key: Annotated[str | None, typer.Option(help="The message key.")] = None,
    bus: BusOption = None,
) -> None:
    """Publish one JSON message (or one per line of stdin with '-')."""
    settings = _settings(ctx, bus)
    lines = sys.stdin.read().splitlines() if payload == "-" else [payload]
    values: list[bytes] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            values.append(orjson.dumps(orjson.loads(line)))
        except orjson.JSONDecodeError as exc:
            where = f"line {number}: " if payload == "-" else ""
            raise ConfigError(f"{where}the message is not valid JSON: {exc}") from None
    asyncio.run(_publish(settings, topic, key, values))
    typer.echo(f"published {len(values)} message(s) to {topic}")


async def _publish(settings: Settings, topic: str, key: str | None, values: list[bytes]) -> None:
    from interlock.bus import open_bus

    async with open_bus(settings.bus.url, **bus_options(settings.bus)) as bus:
        await bus.publish_many(topic, [(key.encode() if key else None, v) for v in values])


@app.command("tail")
def tail(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic to read.")],
    bus: BusOption = None,
    group: Annotated[
        str | None, typer.Option(help="Read as this group (default: a new one, from the start).")
    ] = None,
    count: Annotated[
        int | None, typer.Option("--count", "-n", min=1, help="Stop after this many messages.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds without a message.")
    ] = None,
) -> None:
    """Print the messages of a topic as they come, one JSON per line."""
    settings = _settings(ctx, bus)
    asyncio.run(_tail(settings, topic, group or f"tail-{uuid.uuid4().hex[:8]}", count, timeout))


async def _tail(
    settings: Settings, topic: str, group: str, count: int | None, idle_s: float | None
) -> None:
    from interlock.bus import open_bus

    seen = 0
    idle = 0.0
    async with open_bus(settings.bus.url, **bus_options(settings.bus)) as bus:
        sub = await bus.subscribe(topic, group=group, consumer="tail")
        try:
            while count is None or seen < count:
                messages = await sub.fetch(count - seen if count else 100, 0.5)
                if not messages:
                    idle += 0.5
                    if idle_s is not None and idle >= idle_s:
                        return
                    continue
                idle = 0.0
                for message in messages:
                    with contextlib.suppress(UnicodeDecodeError):
                        sys.stdout.write(message.value.decode() + "\n")
                sys.stdout.flush()
                await sub.ack(messages)
                seen += len(messages)
        finally:
            await sub.aclose()
