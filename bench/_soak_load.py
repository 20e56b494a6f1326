"""The soak's three loads: closed-loop clients that a :class:`Gate` pauses and stops.

- :func:`predict_client`: one row per request to ``/v1/models/fraud:predict``, from
  :class:`Rows` (a hot set that repeats, so the prediction cache hits, and fresh rows);
- :func:`llm_client`: ``/llm/v1/chat/completions``, a quarter streamed (a fresh prompt),
  a third a repeated prompt (the gateway's cache hits), the rest fresh prompts;
- :class:`Events`: prediction requests published to the worker's topic, at most
  ``window`` unanswered, and their completions read back from the reply topic.

Each counts what it got in a :class:`Load`: answers, errors by kind (with the first of
each), notes (the gateway's ``x-interlock-cache``), and a sample of latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from interlock.bus import open_bus

HOT_ROWS = 64
HOT_PROMPTS = 16
EVENT_BATCH = 32
LOST_AFTER_S = 60.0  # an event unanswered this long is counted lost


class Reservoir:
    """A uniform sample of at most ``size`` values (Vitter's algorithm R)."""

    def __init__(self, size: int = 50_000) -> None:
        self.size, self.seen, self.values = size, 0, list[float]()
        self._rng = random.Random(3)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        elif (i := self._rng.randrange(self.seen)) < self.size:
            self.values[i] = value


@dataclass
class Load:
    """What one kind of load did."""

    name: str
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)  # first of each error kind
    notes: Counter[str] = field(default_factory=Counter)  # e.g. x-interlock-cache values
    latency: Reservoir = field(default_factory=Reservoir)

    @property
    def done(self) -> int:
        return self.ok + sum(self.errors.values())

    def fail(self, kind: str, example: str) -> None:
        self.errors[kind] += 1
        self.examples.setdefault(kind, example[:300])


class Gate:
    """Lets the clients run, pauses them (in-flight work finishes) and stops them."""

    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.running.set()
        self.stopped = False
        self.in_flight = 0
        self.paused_s = 0.0

    async def pass_(self) -> bool:
        """Wait while paused; False once stopped."""
        await self.running.wait()
        return not self.stopped

    async def pause(self, outstanding: Callable[[], int], limit_s: float = 60.0) -> bool:
        """Stop new work and wait for what is in flight; False if it did not finish."""
        self.running.clear()
        deadline = time.monotonic() + limit_s
        while self.in_flight or outstanding():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def resume(self) -> None:
        self.running.set()

    def stop(self) -> None:
        self.stopped = True
        self.running.set()


class Rows:
    """Request rows: a hot set that repeats (cache hits) and fresh ones (misses)."""

    def __init__(self, sample: list[dict[str, Any]], repeat_share: float, seed: int) -> None:
        self.rng = random.Random(seed)
        self.sample, self.repeat_share = sample, repeat_share
        self.hot = [self.fresh() for _ in range(HOT_ROWS)]

    def fresh(self) -> dict[str, Any]:
        row = dict(self.rng.choice(self.sample))
        row["amount"] = round(self.rng.uniform(1, 2000), 2)
        row["hour"] = self.rng.randrange(24)
        row["km_from_home"] = round(self.rng.uniform(0, 500), 1)
        return row

    def pick(self) -> dict[str, Any]:
        return self.rng.choice(self.hot) if self.rng.random() < self.repeat_share else self.fresh()


async def predict_client(
    session: aiohttp.ClientSession, url: str, rows: Rows, load: Load, gate: Gate
) -> None:
    while await gate.pass_():
        body = orjson.dumps({"instances": [rows.pick()]})
        gate.in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(30), session.post(url, data=body) as response:
                answer = await response.read()
            if response.status != 200:
                load.fail(f"HTTP {response.status}", answer.decode(errors="replace"))
                continue
            predictions = orjson.loads(answer)["predictions"]
            if len(predictions) != 1 or not 0.0 <= float(predictions[0]) <= 1.0:
                load.fail("wrong answer", answer.decode(errors="replace"))
                continue
            load.ok += 1
            load.latency.add((time.perf_counter() - started) * 1000)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            load.fail(type(exc).__name__, repr(exc))
        finally:
            gate.in_flight -= 1


def chat_body(model: str, text: str, *, stream: bool) -> bytes:
    data: dict[str, Any] = {
        "model": model,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        data["stream"] = True
    return orjson.dumps(data)


async def llm_client(
    session: aiohttp.ClientSession, url: str, tag: str, number: int, load: Load, gate: Gate
) -> None:
    rng = random.Random(number)
    count = 0
    while await gate.pass_():
        count += 1
        roll = rng.random()
        stream = roll < 0.25
        if 0.25 <= roll < 0.6:
            text = f"soak {tag} hot prompt {rng.randrange(HOT_PROMPTS)}: name the seas"
        else:
            text = f"soak {tag} client {number} request {count}: summarise the report in brief"
        body = chat_body("stream" if stream else "chat", text, stream=stream)
        gate.in_flight += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(60), session.post(url, data=body) as response:
                if response.status != 200:
                    answer = await response.read()
                    load.fail(f"HTTP {response.status}", answer.decode(errors="replace"))
                    continue
                load.notes[f"cache {response.headers.get('x-interlock-cache', '-')}"] += 1
                if stream:
                    done, content = False, False
                    async for line in response.content:
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif line.startswith(b"data: ") and b'"content"' in line:
                            content = True
                    if not (done and content):
                        load.fail("stream cut", f"[DONE] {done}, content {content}")
                        continue
                    load.notes["streamed"] += 1
                else:
                    answer = await response.read()
                    if b'"choices"' not in answer:
                        load.fail("wrong answer", answer.decode(errors="replace"))
                        continue
            load.ok += 1
            load.latency.add((time.perf_counter() - started) * 1000)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            load.fail(type(exc).__name__, repr(exc))
        finally:
            gate.in_flight -= 1


class Events:
    """Publishes prediction requests (at most ``window`` unanswered) and reads replies."""

    def __init__(self, bus_url: str, topics: dict[str, str], rows: Rows, window: int) -> None:
        self.bus_url, self.topics, self.rows, self.window = bus_url, topics, rows, window
        self.load = Load("events")
        self.outstanding: dict[str, float] = {}
        self.room = asyncio.Event()
        self.sent = 0

    async def run(self, gate: Gate, ready: asyncio.Event) -> None:
        async with open_bus(self.bus_url) as bus:
            sub = await bus.subscribe(self.topics["reply"], group="soak", consumer="soak")
            reader = asyncio.create_task(self._read(sub))
            ready.set()
            try:
                while await gate.pass_():
                    self._expire()
                    room = self.window - len(self.outstanding)
                    if room < EVENT_BATCH:
                        self.room.clear()
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(1.0):
                                await self.room.wait()
                        continue
                    await self._publish(bus, EVENT_BATCH)
                # Stopped: what is out comes back (or is counted lost) before the reader stops.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(30):
                        while self.outstanding:
                            self.room.clear()
                            await self.room.wait()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                await sub.aclose()

    async def _publish(self, bus: Any, count: int) -> None:
        items = []
        now = time.perf_counter()
        for _ in range(count):
            self.sent += 1
            request_id = f"{self.topics['tag']}-{self.sent}"
            event = {
                "requestId": request_id,
                "model": "fraud",
                "inputs": self.rows.pick(),
                "replyTo": self.topics["reply"],
            }
            items.append((None, orjson.dumps(event)))
            self.outstanding[request_id] = now
        try:
            await bus.publish_many(self.topics["requests"], items)
        except Exception as exc:  # counted, and the soak goes on
            for _ in items:
                self.load.fail(f"publish: {type(exc).__name__}", repr(exc))
            for _, value in items:
                self.outstanding.pop(orjson.loads(value)["requestId"], None)

    async def _read(self, sub: Any) -> None:
        load = self.load
        while True:
            try:
                messages = await sub.fetch(500, 0.1)
            except Exception as exc:  # counted; the reader goes on
                load.fail(f"fetch: {type(exc).__name__}", repr(exc))
                await asyncio.sleep(0.5)
                continue
            if not messages:
                continue
            now = time.perf_counter()
            for message in messages:
                doc = orjson.loads(message.value)
                sent = self.outstanding.pop(doc.get("requestId"), None)
                if sent is None:
                    load.notes["late or repeated"] += 1
                elif "result" in doc:
                    load.ok += 1
                    load.latency.add((now - sent) * 1000)
                else:
                    load.fail("no result", message.value.decode(errors="replace"))
            await sub.ack(messages)
            self.room.set()

    def _expire(self) -> None:
        limit = time.perf_counter() - LOST_AFTER_S
        for request_id in [r for r, at in self.outstanding.items() if at < limit]:
            del self.outstanding[request_id]
            self.load.fail("lost", f"{request_id}: no completion within {LOST_AFTER_S:g} s")
