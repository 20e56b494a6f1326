"""Resilience in the prediction path, over real HTTP: breakers, fallbacks, deadlines,
the prediction cache (in memory and in the real Redis), and load shedding."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.traffic_support import (
    CONSTANT,
    COUNTING,
    GATED,
    RAISING,
    RAISING_COUNTED,
    add_versions,
    predict,
    put_traffic,
)
from tests.conftest import (
    REDIS_URL,
    LiveServer,
    _answers,
    _free_port,
    require_binary,
    require_service,
)


def _count(path: Path) -> int:
    return int(path.read_text()) if path.exists() else 0


def test_an_open_breaker_stops_calling_the_model_and_the_static_answer_is_degraded(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    counter = tmp_path / "calls"
    settings = make_settings(
        cache={"enabled": False},
        breaker={"min_calls": 5, "window_calls": 10, "open_s": 600, "failure_rate": 0.5},
    )
    add_versions(settings, tmp_path, "m", RAISING_COUNTED.format(counter=str(counter)))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 100}, fallback={"static": 0.0})
        counter.unlink(missing_ok=True)  # the warm-up does not count
        answers = [predict(http, "m") for _ in range(20)]
        assert {r.status_code for r in answers} == {200}
        assert all(r.json() == {"predictions": [0.0], "model_name": "m", "model_version": "1",
                                "degraded": True} for r in answers)  # fmt: skip
        assert all(r.headers["x-interlock-fallback"] == "static" for r in answers)
        # Five failures opened the breaker; the fifteen requests after it never reached the model.
        assert _count(counter) == 5
        metrics = http.get("/metrics").text
        assert 'interlock_breaker_state{model="m",version="1"} 2.0' in metrics
        assert 'interlock_breaker_transitions_total{model="m",state="open",version="1"} 1.0' in (
            metrics
        )


def test_with_no_fallback_a_failing_model_is_503_with_retry_after(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = make_settings(cache={"enabled": False})
    add_versions(settings, tmp_path, "m", RAISING)
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = predict(http, "m")
    assert response.status_code == 503
    assert "this version is broken" in response.json()["error"]
    assert int(response.headers["retry-after"]) >= 1


def test_a_pinned_version_that_fails_falls_back_to_the_champion(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = make_settings(cache={"enabled": False})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1), RAISING)
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = predict(http, "m@latest")
    assert response.status_code == 200
    assert response.json()["predictions"] == [1]
    assert response.headers["x-interlock-fallback"] == "stable"
    assert response.headers["x-interlock-model-version"] == "1"


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    yield path
    path.touch()


def test_the_deadline_is_enforced_while_queued(
    tmp_path: Path,
    gate: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(cache={"enabled": False}, serving={"max_replicas": 1})
    add_versions(settings, tmp_path, "m", GATED.format(gate=str(gate), value=7))
    server = server_factory(settings)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"instances": [{"x": 1.0}]}
            # The first request holds the only worker until the gate opens.
            blocking = asyncio.create_task(
                http.post(
                    "/v1/models/m:predict", json=body, headers={"x-request-timeout-ms": "60000"}
                )
            )
            late = await http.post(
                "/v1/models/m:predict", json=body, headers={"x-request-timeout-ms": "50"}
            )
            gate.touch()
            return await blocking, late

    blocking, late = asyncio.run(scenario())
    assert blocking.status_code == 200 and blocking.json()["predictions"] == [7]
    assert late.status_code == 503
    assert "deadline" in late.json()["error"]


def test_bad_timeouts_are_400(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = make_settings()
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for bad in ("soon", "-5", "0", "nan"):
            response = predict(http, "m", headers={"x-request-timeout-ms": bad})
            assert response.status_code == 400
            assert "x-request-timeout-ms" in response.json()["error"]


def test_a_full_queue_sheds_with_429_and_retry_after(
    tmp_path: Path,
    gate: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(
        cache={"enabled": False}, serving={"max_replicas": 1, "max_queue_rows": 3}
    )
    add_versions(settings, tmp_path, "m", GATED.format(gate=str(gate), value=7))
    server = server_factory(settings)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            body = {"instances": [{"x": 1.0}]}
            headers = {"x-request-timeout-ms": "60000"}
            tasks = [
                asyncio.create_task(http.post("/v1/models/m:predict", json=body, headers=headers))
                for _ in range(12)
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            # Shed requests answer while the others are still held at the gate.
            assert all(t.result().status_code == 429 for t in done)
            gate.touch()
            return [await t for t in tasks]

    responses = asyncio.run(scenario())
    statuses = Counter(r.status_code for r in responses)
    assert statuses[429] >= 1 and statuses[200] >= 1
    assert set(statuses) == {200, 429}
    shed = next(r for r in responses if r.status_code == 429)
    assert int(shed.headers["retry-after"]) >= 1
    assert "queue" in shed.json()["error"]


def test_cache_hits_skip_the_model(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    counter = tmp_path / "calls"
    settings = make_settings()
    add_versions(settings, tmp_path, "m", COUNTING.format(counter=str(counter)))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        first = predict(http, "m", x=4.0)
        calls = _count(counter)
        second = predict(http, "m", x=4.0)
        third = http.post("/v1/models/m:predict", json={"instances": [{"x": 4.0}, {"x": 5.0}]})
    assert first.headers["x-interlock-cache"] == "miss"
    assert second.headers["x-interlock-cache"] == "hit"
    assert second.json()["predictions"] == first.json()["predictions"] == [40.0]
    assert _count(counter) == calls + 1  # only the new row of the third request reached it
    assert third.headers["x-interlock-cache"] == "partial"
    assert third.json()["predictions"] == [40.0, 50.0]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A redis-server of the test's own, on a free port, that the test may kill."""
    binary = require_binary("redis-server")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while not _answers(url):
        assert proc.poll() is None, f"redis-server exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"redis-server did not answer on port {port}"
        time.sleep(0.01)

    def kill() -> None:
        proc.kill()
        proc.wait(timeout=10)

    yield url, kill
    if proc.poll() is None:
        kill()


def test_a_redis_outage_mid_test_only_costs_cache_hits(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
    private_redis: tuple[str, Callable[[], None]],
) -> None:
    url, kill = private_redis
    settings = make_settings(cache={"url": url})
    add_versions(settings, tmp_path, "m", COUNTING.format(counter=str(tmp_path / "calls")))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert predict(http, "m", x=2.0).headers["x-interlock-cache"] == "miss"
        for _ in range(1000):  # the cache write happens after the answer
            if predict(http, "m", x=2.0).headers["x-interlock-cache"] == "hit":
                break
        assert predict(http, "m", x=2.0).headers["x-interlock-cache"] == "hit"
        kill()
        answers = [predict(http, "m", x=float(i)) for i in range(30)]
    assert {r.status_code for r in answers} == {200}
    assert [r.json()["predictions"][0] for r in answers] == [10.0 * i for i in range(30)]
    assert {r.headers["x-interlock-cache"] for r in answers} == {"miss"}


def test_two_servers_share_the_redis_cache(
    tmp_path: Path, make_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    require_service("Redis", REDIS_URL)
    settings = make_settings(cache={"url": REDIS_URL})
    add_versions(settings, tmp_path, "m", COUNTING.format(counter=str(tmp_path / "calls")))
    a, b = server_factory(settings), server_factory(settings)
    x = float(uuid.uuid4().int % 10**9)  # a row no earlier run has cached
    with (
        httpx.Client(base_url=a.url, timeout=10) as first,
        httpx.Client(base_url=b.url, timeout=10) as second,
    ):
        assert predict(first, "m", x=x).headers["x-interlock-cache"] == "miss"
        for _ in range(1000):
            if predict(second, "m", x=x).headers["x-interlock-cache"] == "hit":
                break
        answer = predict(second, "m", x=x)
    assert answer.headers["x-interlock-cache"] == "hit"
    assert answer.json()["predictions"] == [x * 10]
