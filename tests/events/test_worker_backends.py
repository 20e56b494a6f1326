"""``interlock worker`` processes on the real buses: Redis Streams, Kafka (a tansu broker
the tests start) and NATS JetStream.

For each backend: two workers in one group answer thousands of requests; one is
SIGKILLed mid-run and restarted; every request gets a completion with the model's own
result, both workers did work, redelivered duplicates are answered from their records
without a prediction, and bad events land in the dead-letter topic with their reasons.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from interlock.bus import open_bus
from interlock.bus.envelope import read_dead_letter
from tests.api.support import register, write_python_model
from tests.bus.conftest import kafka_url
from tests.conftest import NATS_URL, REDIS_URL, _free_port, require_service
from tests.events.test_worker import COUNTED, predicted_xs

__all__ = ["kafka_url"]  # a fixture

N = 2000


@pytest.fixture(params=["redis", "kafka", "nats"])
def bus_url(request: pytest.FixtureRequest) -> str:
    require_service("Redis", REDIS_URL)  # the dedupe records live there for every bus
    if request.param == "redis":
        return REDIS_URL
    if request.param == "nats":
        require_service("NATS", NATS_URL)
        return NATS_URL
    url: str = request.getfixturevalue("kafka_url")
    return url


class Worker:
    """An ``interlock worker`` process; its stderr goes to ``log`` when one is given."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path | None = None) -> None:
        self.port = _free_port()
        self.log = log
        with open(log, "ab") if log is not None else open(os.devnull, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "interlock", "worker", "--metrics-port", str(self.port)],
                env=env,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    def output(self) -> str:
        """What the worker wrote to stderr so far (its log lines)."""
        return self.log.read_text(errors="replace") if self.log is not None else ""

    def completed(self) -> float:
        """What this worker has published (predicted or recorded), from its metrics."""
        total = 0.0
        for line in httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text.split("\n"):
            if line.startswith("interlock_worker_completed_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_metrics(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the worker exited"
            try:
                self.completed()
                return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError("the worker did not start")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=60)


@pytest.fixture
def setup(bus_url: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, str]]:
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    env.update(
        {
            "INTERLOCK_HOME": str(tmp_path / "home"),
            "INTERLOCK_LOG__LEVEL": "warning",
            "INTERLOCK_BUS_URL": bus_url,
            "INTERLOCK_BUS__GROUP": f"workers-{tag}",
            "INTERLOCK_BUS__REQUESTS_TOPIC": f"req-{tag}",
            "INTERLOCK_BUS__COMPLETED_TOPIC": f"done-{tag}",
            "INTERLOCK_BUS__DEAD_LETTER_TOPIC": f"dlq-{tag}",
            "INTERLOCK_BUS__DEDUPE_URL": REDIS_URL,
            "INTERLOCK_BUS__REDELIVERY_S": "3",
            # Small batches and little in flight, so that both members of the group get work.
            "INTERLOCK_BUS__BATCH": "16",
            "INTERLOCK_BUS__CONCURRENCY": "64",
            "INTERLOCK_CACHE__ENABLED": "false",  # every request reaches the model
        }
    )
    log = tmp_path / "calls.log"
    from interlock.settings import load_settings

    settings = load_settings(None, home=tmp_path / "home")
    register(
        settings,
        "m",
        write_python_model(tmp_path / "m", COUNTED.format(log=str(log))),
        "python",
        alias="champion",
    )
    yield env, log, bus_url


def _request(tag: str, i: int, reply: str | None = None) -> bytes:
    event: dict[str, Any] = {"requestId": f"{tag}-{i}", "model": "m", "inputs": {"x": i + 1}}
    if reply is not None:
        event["replyTo"] = reply
    return orjson.dumps(event)


async def _collect(url: str, topic: str, n: int, limit_s: float = 120.0) -> list[bytes]:
    """``n`` messages of ``topic`` (as a group of its own), or fail after ``limit_s``."""
    out: list[bytes] = []
    async with open_bus(url) as bus:
        sub = await bus.subscribe(topic, group=f"reader-{uuid.uuid4().hex[:6]}", consumer="r")
        deadline = time.monotonic() + limit_s
        try:
            while len(out) < n:
                assert time.monotonic() < deadline, f"{len(out)} of {n} messages on {topic}"
                messages = await sub.fetch(min(n - len(out), 500), 1.0)
                out.extend(m.value for m in messages)
                if messages:
                    await sub.ack(messages)
        finally:
            await sub.aclose()
    return out


async def _answers(url: str, topic: str, ids: set[str], limit_s: float = 120.0) -> dict[str, Any]:
    """The completions of ``topic`` until every id in ``ids`` has one (duplicates may come:
    delivery is at least once), or fail after ``limit_s``."""
    answers: dict[str, Any] = {}
    async with open_bus(url) as bus:
        sub = await bus.subscribe(topic, group=f"reader-{uuid.uuid4().hex[:6]}", consumer="r")
        deadline = time.monotonic() + limit_s
        try:
            while not ids <= answers.keys():
                missing = len(ids - answers.keys())
                assert time.monotonic() < deadline, f"{missing} requests were never answered"
                messages = await sub.fetch(500, 1.0)
                for message in messages:
                    answer = orjson.loads(message.value)
                    answers[answer["requestId"]] = answer
                if messages:
                    await sub.ack(messages)
        finally:
            await sub.aclose()
    return answers


async def _publish(url: str, topic: str, values: list[bytes]) -> None:
    async with open_bus(url) as bus:
        await bus.publish_many(topic, [(None, v) for v in values])


def test_workers_lose_nothing_and_predict_nothing_twice(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path
) -> None:
    env, log, url = setup
    topics = {name: env[f"INTERLOCK_BUS__{name}_TOPIC"] for name in ("REQUESTS", "COMPLETED")}
    tag = uuid.uuid4().hex[:6]
    first, second = Worker(env, tmp_path), Worker(env, tmp_path)
    workers = [first, second]
    try:
        first.wait_metrics()
        second.wait_metrics()
        # Both members of the group take work (once both have joined it).
        deadline = time.monotonic() + 90
        round_ = 0
        while first.completed() == 0 or second.completed() == 0:
            assert time.monotonic() < deadline, "both workers never got work"
            warm = [_request(f"{tag}w{round_}", i, reply=f"{tag}-warm") for i in range(32)]
            asyncio.run(_publish(url, topics["REQUESTS"], warm))
            ids = {f"{tag}w{round_}-{i}" for i in range(32)}
            asyncio.run(_answers(url, f"{tag}-warm", ids))
            round_ += 1
        asyncio.run(_publish(url, topics["REQUESTS"], [_request(tag, i) for i in range(N)]))
        # Kill the first worker once work is under way, and start it again.
        deadline = time.monotonic() + 120
        while first.completed() + second.completed() < N // 4:
            assert time.monotonic() < deadline, "the workers did not start working"
            time.sleep(0.05)
        first.kill()
        again = Worker(env, tmp_path)
        workers.append(again)
        expected = {f"{tag}-{i}" for i in range(N)}
        answers = asyncio.run(_answers(url, topics["COMPLETED"], expected))  # none lost
        for i in range(N):
            assert answers[f"{tag}-{i}"]["result"] == (i + 1) * 10

        # Duplicates of answered requests: answered from their records, not predicted.
        fresh = [_request(tag, 100_000 + i, reply=f"{tag}-a") for i in range(50)]
        asyncio.run(_publish(url, topics["REQUESTS"], fresh))
        asyncio.run(_answers(url, f"{tag}-a", {f"{tag}-{100_000 + i}" for i in range(50)}))
        again_fresh = [_request(tag, 100_000 + i, reply=f"{tag}-b") for i in range(50)]
        asyncio.run(_publish(url, topics["REQUESTS"], again_fresh))
        ids = {f"{tag}-{100_000 + i}" for i in range(50)}
        repeats = asyncio.run(_answers(url, f"{tag}-b", ids))
        assert set(repeats) == ids
        assert all(r["result"] == (int(k.rsplit("-", 1)[1]) + 1) * 10 for k, r in repeats.items())
        xs = [x for x in predicted_xs(log) if x > 100_000]
        assert sorted(xs) == [100_001.0 + i for i in range(50)]  # each predicted once
    finally:
        for worker in workers:
            worker.stop()


def test_bad_events_are_dead_lettered_with_reasons(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path
) -> None:
    env, _log, url = setup
    worker = Worker(env, tmp_path)
    try:
        worker.wait_metrics()
        bad = [
            b"not json at all",
            orjson.dumps({"requestId": "u1", "model": "missing-model", "inputs": {"x": 1}}),
            orjson.dumps({"requestId": "f1", "model": "m", "inputs": {"wrong": 1}}),
        ]
        asyncio.run(_publish(url, env["INTERLOCK_BUS__REQUESTS_TOPIC"], bad))
        letters = [
            read_dead_letter(v)
            for v in asyncio.run(_collect(url, env["INTERLOCK_BUS__DEAD_LETTER_TOPIC"], 3))
        ]
        by_value: dict[bytes, Any] = {letter.value: letter for letter in letters}
        assert set(by_value) == set(bad)  # the original bytes, exactly
        assert "not JSON" in by_value[bad[0]].reason
        assert "missing-model" in by_value[bad[1]].reason
        assert "wrong" in by_value[bad[2]].reason or "x" in by_value[bad[2]].reason
        assert {letter.source_topic for letter in letters} == {env["INTERLOCK_BUS__REQUESTS_TOPIC"]}
    finally:
        worker.stop()


@pytest.mark.parametrize("bus_url", ["redis"], indirect=True)  # the shutdown path is the worker's
def test_sigterm_finishes_what_the_worker_holds(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path
) -> None:
    env, _log, url = setup
    tag = uuid.uuid4().hex[:6]
    worker = Worker(env, tmp_path)
    try:
        worker.wait_metrics()
        asyncio.run(
            _publish(
                url, env["INTERLOCK_BUS__REQUESTS_TOPIC"], [_request(tag, i) for i in range(500)]
            )
        )
        deadline = time.monotonic() + 60
        while worker.completed() < 50:
            assert time.monotonic() < deadline, "the worker did not start working"
            time.sleep(0.02)
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=60) == 0  # drained and left the group cleanly
        successor = Worker(env, tmp_path)
        try:
            answers = asyncio.run(
                _answers(
                    url, env["INTERLOCK_BUS__COMPLETED_TOPIC"], {f"{tag}-{i}" for i in range(500)}
                )
            )
            assert all(answers[f"{tag}-{i}"]["result"] == (i + 1) * 10 for i in range(500))
        finally:
            successor.stop()
    finally:
        worker.stop()
