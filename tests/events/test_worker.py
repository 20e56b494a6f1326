"""The prediction worker in-process, on the memory bus and the real pipeline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from interlock.app import build_components, open_registry, start_components, stop_components
from interlock.bus import EventBus, MemoryBroker, MemoryBus
from interlock.bus.envelope import read_dead_letter
from interlock.serving.dedupe import MemoryDedupe
from interlock.serving.worker import PredictionWorker
from tests.api.support import write_python_model
from tests.api.traffic_support import RAISING

# Times ten; every row predicted is logged (its x, one per line), so tests count them.
COUNTED = """
import pathlib

LOG = pathlib.Path({log!r})


class Model:
    features = ["x"]

    def predict(self, rows):
        if not (rows and rows[0].get("x") == 0.0):  # the warm-up row is not counted
            with LOG.open("a") as f:
                f.write("".join(f"{{r['x']}}\\n" for r in rows))
        return [r["x"] * 10 for r in rows]
"""


def predicted_rows(log: Path) -> int:
    return len(predicted_xs(log))


def predicted_xs(log: Path) -> list[float]:
    """The x of every row the model predicted, in order."""
    return [float(x) for x in log.read_text().split()] if log.exists() else []


class Harness:
    def __init__(self, settings: Any, bus: EventBus, log: Path) -> None:
        self.settings = settings
        self.bus = bus
        self.log = log

    async def send(self, *events: Any) -> None:
        values = [e if isinstance(e, bytes) else orjson.dumps(e) for e in events]
        await self.bus.publish_many(self.settings.bus.requests_topic, [(None, v) for v in values])

    async def read(self, topic: str, n: int) -> list[Any]:
        sub = await self.bus.subscribe(topic, group="reader", consumer="r")
        out: list[Any] = []
        try:
            while len(out) < n:
                messages = await sub.fetch(n - len(out), 5.0)
                assert messages, f"only {len(out)} of {n} messages came to {topic}"
                out.extend(m.value for m in messages)
                await sub.ack(messages)
        finally:
            await sub.aclose()
        return out


@pytest.fixture
async def harness(make_settings: Any, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = make_settings(bus={"url": "memory://", "retry_base_ms": 1, "max_attempts": 2})
    log = tmp_path / "calls.log"
    async with open_registry(settings) as registry:
        counted = write_python_model(tmp_path / "m", COUNTED.format(log=str(log)))
        await registry.register("m", counted, "python", alias="champion")
        broken = write_python_model(tmp_path / "b", RAISING)
        await registry.register("broken", broken, "python", alias="champion")
    parts = build_components(settings)
    await start_components(parts)
    bus = MemoryBus(broker=MemoryBroker())
    stop = asyncio.Event()
    worker = PredictionWorker(bus, parts.pipeline, MemoryDedupe(60), settings.bus, consumer="w1")
    task = asyncio.ensure_future(worker.run(stop))
    try:
        yield Harness(settings, bus, log)
    finally:
        stop.set()
        await task
        await stop_components(parts)


async def test_every_request_gets_one_completion_with_the_model_result(harness: Harness) -> None:
    await harness.send(
        *({"requestId": f"r{i}", "model": "m", "inputs": {"x": i + 1}} for i in range(300))
    )
    completions = [orjson.loads(v) for v in await harness.read("ai.prediction.completed", 300)]
    assert sorted(c["requestId"] for c in completions) == sorted(f"r{i}" for i in range(300))
    for c in completions:
        assert c["result"] == (int(c["requestId"][1:]) + 1) * 10
        assert c["model"] == "m" and c["version"] == 1
        assert c["latencyMs"] >= 0 and c["timestamp"]
    assert predicted_rows(harness.log) == 300


async def test_a_list_of_inputs_gets_a_list_and_reply_to_is_honoured(harness: Harness) -> None:
    await harness.send(
        {"requestId": "many", "model": "m", "inputs": [{"x": 1}, {"x": 2}], "replyTo": "mine"}
    )
    (answer,) = [orjson.loads(v) for v in await harness.read("mine", 1)]
    assert answer["result"] == [10, 20]


async def test_a_duplicate_is_answered_from_its_record(harness: Harness) -> None:
    event = {"requestId": "same", "model": "m", "inputs": {"x": 3}}
    await harness.send(event)
    await harness.read("ai.prediction.completed", 1)
    await harness.send(event)
    (again,) = [orjson.loads(v) for v in await harness.read("ai.prediction.completed", 1)]
    assert again["result"] == 30
    assert predicted_rows(harness.log) == 1  # predicted once


async def test_bad_events_go_to_the_dead_letter_topic_with_the_reason(harness: Harness) -> None:
    raw = b"{not json"
    await harness.send(
        raw,
        {"requestId": "u", "model": "nope", "inputs": {"x": 1}},
        {"requestId": "f", "model": "m", "inputs": {"y": 1}},
        {"model": "m", "inputs": {"x": 1}},
    )
    letters = [read_dead_letter(v) for v in await harness.read("ai.prediction.dead-letter", 4)]
    by_value = {letter.value: letter for letter in letters}
    assert "not JSON" in by_value[raw].reason
    assert all(letter.source_topic == "ai.prediction.requested" for letter in letters)
    reasons = " | ".join(letter.reason for letter in letters)
    assert "nope" in reasons  # unknown model
    assert "x" in reasons  # the missing feature
    assert "requestId" in reasons
    assert predicted_rows(harness.log) == 0


async def test_a_transient_failure_is_retried_then_dead_lettered(harness: Harness) -> None:
    await harness.send({"requestId": "b", "model": "broken", "inputs": {"x": 1}})
    (letter,) = [read_dead_letter(v) for v in await harness.read("ai.prediction.dead-letter", 1)]
    assert "gave up after 2 attempts" in letter.reason


async def test_one_bad_event_in_a_batch_costs_only_itself(harness: Harness) -> None:
    good = [{"requestId": f"g{i}", "model": "m", "inputs": {"x": i + 1}} for i in range(10)]
    await harness.send(*good[:5], {"requestId": "bad", "model": "m", "inputs": {"y": 1}}, *good[5:])
    completions = [orjson.loads(v) for v in await harness.read("ai.prediction.completed", 10)]
    assert sorted(c["requestId"] for c in completions) == sorted(e["requestId"] for e in good)
    assert all(c["result"] == (int(c["requestId"][1:]) + 1) * 10 for c in completions)
    (letter,) = [read_dead_letter(v) for v in await harness.read("ai.prediction.dead-letter", 1)]
    assert b'"bad"' in letter.value


async def test_a_model_reference_no_version_can_have_is_dead_lettered(harness: Harness) -> None:
    good = {"requestId": "ok", "model": "m", "inputs": {"x": 1}}
    odd = [
        {"requestId": "sup", "model": "m:³", "inputs": {"x": 1}},  # a digit, but not 0-9
        {"requestId": "big", "model": f"m:{10**20}", "inputs": {"x": 1}},
    ]
    await harness.send(*odd, good)
    letters = [read_dead_letter(v) for v in await harness.read("ai.prediction.dead-letter", 2)]
    assert sorted(orjson.loads(letter.value)["requestId"] for letter in letters) == ["big", "sup"]
    assert all(letter.reason for letter in letters)
    (done,) = [orjson.loads(v) for v in await harness.read("ai.prediction.completed", 1)]
    assert done["requestId"] == "ok"
