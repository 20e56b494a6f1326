"""``interlock events publish|tail`` and ``interlock worker``'s one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from interlock.cli._context import share_the_gil
from interlock.settings import load_settings
from tests.cli.test_cli import run
from tests.conftest import REDIS_URL, require_service


def test_publish_then_tail_round_trips_json(tmp_path: Path) -> None:
    require_service("Redis", REDIS_URL)
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    published = run(tmp_path, "events", "publish", topic, '{"a": 1}', "--bus", REDIS_URL)
    assert published.returncode == 0, published.stderr
    assert f"published 1 message(s) to {topic}" in published.stdout
    tailed = run(tmp_path, "events", "tail", topic, "-n", "1", env={"INTERLOCK_BUS_URL": REDIS_URL})
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout.strip() == '{"a":1}'


def test_publishing_bad_json_is_one_line_and_a_failure(tmp_path: Path) -> None:
    result = run(tmp_path, "events", "publish", "t", "{nope", "--bus", "memory://")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid JSON" in lines[0]


def test_the_worker_refuses_a_bus_it_cannot_share(tmp_path: Path) -> None:
    result = run(tmp_path, "worker")  # the embedded default, memory://
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--bus" in lines[0]


def test_the_gil_switch_interval_is_the_configured_one() -> None:
    before = sys.getswitchinterval()
    try:
        share_the_gil(load_settings(None, serving={"gil_switch_interval_ms": 0.5}))
        assert sys.getswitchinterval() == pytest.approx(0.0005)
        share_the_gil(load_settings(None))
        assert sys.getswitchinterval() == pytest.approx(0.001)  # the default, not CPython's 5
    finally:
        sys.setswitchinterval(before)


def test_a_zero_gil_switch_interval_is_refused_in_one_line(tmp_path: Path) -> None:
    result = run(tmp_path, "worker", env={"INTERLOCK_SERVING__GIL_SWITCH_INTERVAL_MS": "0"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "gil_switch_interval_ms" in lines[0]


NATS_URL = os.environ.get("INTERLOCK_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _one_line_failure(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and len(lines[0]) > len("error: ") + 10
    return lines[0]


def test_publishing_to_a_bus_that_is_down_gives_up_at_the_deadline(tmp_path: Path) -> None:
    result = run(
        tmp_path, "events", "publish", "t", '{"a": 1}', "--bus", "nats://127.0.0.1:1",
        "--timeout-s", "2",
    )  # fmt: skip
    line = _one_line_failure(result)
    assert "127.0.0.1:1" in line and "2" in line


def test_tailing_a_bus_that_is_down_gives_up_at_the_deadline(tmp_path: Path) -> None:
    result = run(tmp_path, "events", "tail", "t", "--bus", "redis://127.0.0.1:1/0",
                 "--timeout-s", "2")  # fmt: skip
    line = _one_line_failure(result)
    assert "127.0.0.1:1" in line


def _published(home: Path, url: str, topic: str, *payloads: str) -> None:
    for payload in payloads:
        result = run(home, "events", "publish", topic, payload, "--bus", url)
        assert result.returncode == 0, result.stderr


@pytest.fixture(params=["redis", "nats"])
def tail_bus(request: pytest.FixtureRequest) -> str:
    if request.param == "redis":
        require_service("Redis", REDIS_URL)
        return REDIS_URL
    require_service("NATS", NATS_URL.replace("nats://", "http://"))
    return NATS_URL


def test_tail_n_prints_the_newest(tmp_path: Path, tail_bus: str) -> None:
    topic = f"cli-tail-{uuid.uuid4().hex[:8]}"
    _published(tmp_path, tail_bus, topic, '{"n": 1}', '{"n": 2}')
    newest = run(tmp_path, "events", "tail", topic, "-n", "1", "--bus", tail_bus)
    assert newest.returncode == 0, newest.stderr
    assert newest.stdout.splitlines() == ['{"n":2}']


def test_tail_n_prints_what_there_is_and_exits(tmp_path: Path, tail_bus: str) -> None:
    topic = f"cli-tail-{uuid.uuid4().hex[:8]}"
    _published(tmp_path, tail_bus, topic, '{"n": 1}', '{"n": 2}')
    everything = run(tmp_path, "events", "tail", topic, "-n", "3", "--bus", tail_bus)
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout.splitlines() == ['{"n":1}', '{"n":2}']  # oldest first, as tail


def test_tail_leaves_no_group_on_redis(tmp_path: Path) -> None:
    require_service("Redis", REDIS_URL)
    import redis

    topic = f"cli-tail-{uuid.uuid4().hex[:8]}"
    _published(tmp_path, REDIS_URL, topic, '{"n": 1}')
    result = run(tmp_path, "events", "tail", topic, "-n", "1", "--bus", REDIS_URL)
    assert result.returncode == 0, result.stderr
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.xinfo_groups(topic) == []
    finally:
        client.delete(topic)
        client.close()


def test_tail_leaves_no_consumer_on_nats(tmp_path: Path) -> None:
    require_service("NATS", NATS_URL.replace("nats://", "http://"))
    import asyncio

    import nats

    topic = f"cli-tail-{uuid.uuid4().hex[:8]}"
    _published(tmp_path, NATS_URL, topic, '{"n": 1}')
    result = run(tmp_path, "events", "tail", topic, "-n", "1", "--bus", NATS_URL)
    assert result.returncode == 0, result.stderr

    async def consumers() -> list[str]:
        nc = await nats.connect(NATS_URL)
        try:
            js = nc.jetstream()
            stream = topic.replace(".", "_")
            names = [c.name for c in await js.consumers_info(stream)]
            await js.delete_stream(stream)
            return names
        finally:
            await nc.close()

    assert asyncio.run(consumers()) == []
