"""``interlock events publish|tail`` and ``interlock worker``'s one-line errors."""

from __future__ import annotations

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
