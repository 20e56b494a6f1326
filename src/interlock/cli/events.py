"""``interlock worker`` and ``interlock events publish|tail``.

The bus URL comes from ``--bus``, else ``bus.url`` in the settings (``INTERLOCK_BUS_URL``,
``INTERLOCK_BUS__URL``, ``interlock.toml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import random
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer

from interlock._core.logs import configure_logging
from interlock.bus import EventBus, Message
from interlock.bus.retry import describe
from interlock.cli._context import ConfigOption, settings_from, share_the_gil
from interlock.errors import BusError, ConfigError, InterlockError
from interlock.settings import Settings

__all__ = ["app", "publish", "tail", "worker"]

T = TypeVar("T")

app = typer.Typer(help="Publish to and read from the event bus.", no_args_is_help=True)

BusOption = Annotated[
    str | None,
    typer.Option(
        "--bus", help="memory://, redis://host:port/db, kafka://host:port, nats://host:port"
    ),
]


def _settings(
    ctx: typer.Context, config: Path | None, bus: str | None, **bus_fields: Any
) -> Settings:
    fields = {k: v for k, v in bus_fields.items() if v is not None}
    if bus:
        fields["url"] = bus
    return settings_from(ctx, config, bus=fields) if fields else settings_from(ctx, config)


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
    config: ConfigOption = None,
) -> None:
    """Answer prediction requests from the bus until SIGTERM (then drain and leave)."""
    settings = _settings(ctx, config, bus, concurrency=concurrency, group=group)
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
    from interlock.app import build_worker, close_worker, start_components

    process = build_worker(settings, consumer=consumer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(
            metrics_port, addr=settings.server.host, registry=process.metrics.registry
        )
    await start_components(process.components)
    # Everything loaded so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stalled the loop for 150-200 ms.
    gc.collect()
    gc.freeze()
    share_the_gil(settings)
    try:
        # Not ``async with bus``: that connects at once, and a broker down at start is
        # for the worker to wait out (it joins with backoff), not a reason to exit.
        await process.worker.run(stop)
    finally:
        await close_worker(process)


TimeoutOption = Annotated[
    float,
    typer.Option(
        "--timeout-s",
        min=0.1,
        help="Give up (exit 1, saying why) when the bus cannot be reached or does not "
        "answer for this long.",
    ),
]
DEFAULT_TIMEOUT_S = 10.0


@app.command("publish")
def publish(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic, e.g. ai.prediction.requested.")],
    payload: Annotated[str, typer.Argument(help="The JSON to publish ('-': one per stdin line).")],
    key: Annotated[str | None, typer.Option(help="The message key.")] = None,
    bus: BusOption = None,
    timeout_s: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Publish one JSON message (or one per line of stdin with '-')."""
    settings = _settings(ctx, config, bus)
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
    _quiet_logs()
    asyncio.run(_publish(settings, topic, key, values, timeout_s))
    typer.echo(f"published {len(values)} message(s) to {topic}")


async def _publish(
    settings: Settings, topic: str, key: str | None, values: list[bytes], timeout_s: float
) -> None:
    from interlock.app import open_event_bus

    bus = open_event_bus(settings)
    items = [(key.encode() if key else None, v) for v in values]
    try:
        await _retrying(lambda: bus.publish_many(topic, items), timeout_s, f"publish to {topic}")
    finally:
        await _close(bus)


@app.command("tail")
def tail(
    ctx: typer.Context,
    topic: Annotated[str, typer.Argument(help="The topic to read.")],
    bus: BusOption = None,
    count: Annotated[
        int | None,
        typer.Option(
            "--count",
            "-n",
            min=0,
            help="Print the newest N messages, oldest first (default 10); with --group, "
            "stop after N messages.",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Then print new messages as they come.")
    ] = False,
    group: Annotated[
        str | None,
        typer.Option(
            help="Consume as a member of this group instead (acknowledging what it prints, "
            "from the group's position; the group stays)."
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="With --follow or --group: stop after this many seconds without a message."
        ),
    ] = None,
    timeout_s: TimeoutOption = DEFAULT_TIMEOUT_S,
    config: ConfigOption = None,
) -> None:
    """Print a topic's newest messages, one JSON per line; nothing is left on the bus."""
    settings = _settings(ctx, config, bus)
    _quiet_logs()
    if group is not None:
        asyncio.run(_consume(settings, topic, group, count, timeout, timeout_s))
    else:
        last = DEFAULT_TAIL if count is None else count
        asyncio.run(_tail(settings, topic, last, follow, timeout, timeout_s))


DEFAULT_TAIL = 10


async def _tail(
    settings: Settings,
    topic: str,
    last: int,
    follow: bool,
    idle_s: float | None,
    timeout_s: float,
) -> None:
    """The newest ``last`` messages, then (``follow``) the new ones; no group is made."""
    from interlock.app import open_event_bus

    bus = open_event_bus(settings)
    try:
        reader = await _retrying(lambda: bus.tail(topic, last=last), timeout_s, f"read {topic}")
        try:
            _print(reader.backlog)
            idle = 0.0
            while follow:
                messages = await _retrying(
                    lambda: reader.fetch(100, 0.5), timeout_s, f"read {topic}"
                )
                if messages:
                    idle = 0.0
                    _print(messages)
                    continue
                idle += 0.5
                if idle_s is not None and idle >= idle_s:
                    return
        finally:
            await reader.aclose()
    finally:
        await _close(bus)


async def _consume(
    settings: Settings,
    topic: str,
    group: str,
    count: int | None,
    idle_s: float | None,
    timeout_s: float,
) -> None:
    """Read as a member of ``group``, acknowledging what is printed."""
    from interlock.app import open_event_bus

    seen = 0
    idle = 0.0
    bus = open_event_bus(settings)
    try:
        sub = await _retrying(
            lambda: bus.subscribe(topic, group=group, consumer="tail"), timeout_s, f"join {group}"
        )
        try:
            while count is None or seen < count:
                left = count - seen if count else 100
                messages = await _retrying(
                    functools.partial(sub.fetch, left, 0.5), timeout_s, f"read {topic}"
                )
                if not messages:
                    idle += 0.5
                    if idle_s is not None and idle >= idle_s:
                        return
                    continue
                idle = 0.0
                _print(messages)
                await _retrying(
                    functools.partial(sub.ack, messages), timeout_s, f"acknowledge in {group}"
                )
                seen += len(messages)
        finally:
            await sub.aclose()
    finally:
        await _close(bus)


def _print(messages: list[Message]) -> None:
    for message in messages:
        with contextlib.suppress(UnicodeDecodeError):
            sys.stdout.write(message.value.decode() + "\n")
    sys.stdout.flush()


async def _retrying(call: Callable[[], Awaitable[T]], timeout_s: float, what: str) -> T:
    """``await call()``, retrying what is transient with backoff for ``timeout_s`` at most.

    Raises:
        BusError: the bus failed (or did not answer) for ``timeout_s``; the message names
            the last cause.
        ConfigError: what retrying cannot fix (a bad URL, refused credentials).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.1
    last: BaseException | None = None
    while True:
        left = deadline - loop.time()
        if left <= 0:
            break
        try:
            async with asyncio.timeout(left):
                return await call()
        except InterlockError as exc:
            if not exc.retryable:
                raise
            last = exc
        except TimeoutError:
            break  # the deadline passed during the call
        left = deadline - loop.time()
        await asyncio.sleep(max(0.0, min(left, random.uniform(delay / 2, delay))))  # noqa: S311
        delay = min(delay * 2, 2.0)
    cause = describe(last) if last is not None else "no answer from the bus"
    raise BusError(f"could not {what} within {timeout_s:g} s (--timeout-s): {cause}")


async def _close(bus: EventBus) -> None:
    """Close ``bus``; a failure to close after the work is done (or failed) is not news."""
    try:
        async with asyncio.timeout(5):
            await bus.aclose()
    except (InterlockError, TimeoutError, OSError):
        pass


def _quiet_logs() -> None:
    """A one-shot command says what went wrong in one line: libraries' logs stay quiet."""
    logging.getLogger().addHandler(logging.NullHandler())
