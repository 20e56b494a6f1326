"""``interlock serve`` with a bus: HTTP predictions and canary rollbacks are published."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from interlock.bus import open_bus
from tests.api.traffic_support import CONSTANT, RAISING, add_versions, predict, put_traffic
from tests.conftest import REDIS_URL, require_service


async def _read(topic: str, want: Any, limit_s: float = 30.0) -> list[dict[str, Any]]:
    """Messages of ``topic`` (from its start) until ``want(messages)`` holds."""
    seen: list[dict[str, Any]] = []
    async with open_bus(REDIS_URL) as bus:
        sub = await bus.subscribe(topic, group=f"t-{uuid.uuid4().hex[:6]}", consumer="t")
        deadline = time.monotonic() + limit_s
        try:
            while not want(seen):
                assert time.monotonic() < deadline, f"got only {seen}"
                messages = await sub.fetch(100, 0.5)
                seen.extend(orjson.loads(m.value) for m in messages)
                if messages:
                    await sub.ack(messages)
        finally:
            await sub.aclose()
    return seen


def test_http_predictions_are_published_when_asked(
    make_settings: Any, server_factory: Any, tmp_path: Path
) -> None:
    require_service("Redis", REDIS_URL)
    topic = f"done-{uuid.uuid4().hex[:8]}"
    settings = make_settings(bus={"url": REDIS_URL, "publish_http": True, "completed_topic": topic})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=7))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        ids = [predict(http, "m").headers["x-request-id"] for _ in range(5)]
    events = asyncio.run(_read(topic, lambda seen: len(seen) >= 5))
    assert {e["requestId"] for e in events} == set(ids)
    assert all(e["result"] == [7] and e["version"] == 1 and e["source"] == "http" for e in events)


def test_a_canary_rollback_is_published_with_its_reason(
    make_settings: Any, server_factory: Any, tmp_path: Path
) -> None:
    require_service("Redis", REDIS_URL)
    settings = make_settings(
        bus={"url": REDIS_URL},
        cache={"enabled": False},
        serving={"alias_refresh_s": 0.05},
    )
    model = f"m{uuid.uuid4().hex[:6]}"  # its events are told apart on the shared topic
    add_versions(settings, tmp_path, model, CONSTANT.format(value=1), RAISING)
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, model, weights={"1": 100})
        started = http.post(
            f"/admin/models/{model}/traffic/canary",
            json={"version": 2, "weight": 50, "max_error_rate": 0.05, "min_requests": 10},
        )
        assert started.status_code == 201, started.text
        for _ in range(2000):
            assert predict(http, model).status_code == 200
            policy = http.get(f"/admin/models/{model}/traffic").json()["policy"]
            if policy["canary"]["status"] == "rolled_back":
                break

    def rolled_back(seen: list[dict[str, Any]]) -> bool:
        return any(e["model"] == model and e["action"] == "rollback" for e in seen)

    events = asyncio.run(_read("ai.model.traffic", rolled_back))
    (event,) = [e for e in events if e["model"] == model and e["action"] == "rollback"]
    assert event["version"] == 2 and event["weight"] == 0
    assert "error rate" in event["reason"]
