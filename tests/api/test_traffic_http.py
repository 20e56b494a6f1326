"""Traffic policies over real HTTP, with the metadata in the real PostgreSQL.

Splits, sticky keys, shadows and canaries, exactly as a client and an operator see them.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.traffic_support import (
    CONSTANT,
    GATED,
    RAISING,
    add_versions,
    predict,
    put_traffic,
)
from tests.conftest import LiveServer


@pytest.fixture
def pg_settings(make_settings: Callable[..., Any], postgres_url: str) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        # Every answer counts here: a 1 s deadline is luck on a loaded 2-core machine.
        overrides["serving"] = {"default_timeout_ms": 30_000, **overrides.get("serving", {})}
        return make_settings(database_url=postgres_url, **overrides)

    return make


def _answers(url: str, n: int, key: Callable[[int], str | None]) -> list[tuple[int, int]]:
    """``n`` predictions from 16 concurrent clients: (request index, answer)."""

    async def run() -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        queue = iter(range(n))
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:

            async def worker() -> None:
                for i in queue:
                    k = key(i)
                    headers = {"x-interlock-route-key": k} if k is not None else None
                    response = await http.post(
                        "/v1/models/m:predict", json={"instances": [{"x": 1.0}]}, headers=headers
                    )
                    assert response.status_code == 200, response.text
                    out.append((i, int(response.json()["predictions"][0])))

            await asyncio.gather(*(worker() for _ in range(16)))
        return out

    return asyncio.run(run())


def test_weighted_split_stays_within_binomial_bounds(
    tmp_path: Path, pg_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = pg_settings(cache={"enabled": False})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1), CONSTANT.format(value=2))
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 80, "2": 20})
    n = 3000
    shares = Counter(answer for _, answer in _answers(server.url, n, lambda i: None))
    sigma = math.sqrt(n * 0.2 * 0.8)
    assert abs(shares[2] - 0.2 * n) < 4 * sigma, shares
    assert shares[1] + shares[2] == n


def test_route_keys_stick_and_a_weight_change_moves_only_what_it_must(
    tmp_path: Path, pg_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = pg_settings(cache={"enabled": False})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1), CONSTANT.format(value=2))
    server = server_factory(settings)
    keys = 600
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 80, "2": 20})
        before = _answers(server.url, keys * 2, lambda i: f"card-{i % keys}")
        put_traffic(http, "m", weights={"1": 70, "2": 30})
        after = _answers(server.url, keys, lambda i: f"card-{i}")

    first: dict[int, set[int]] = {}
    for i, answer in before:
        first.setdefault(i % keys, set()).add(answer)
    assert all(len(v) == 1 for v in first.values()), "a key answered by two versions"
    was = {k: next(iter(v)) for k, v in first.items()}
    now = dict(after)
    moved = [k for k in range(keys) if was[k] != now[k]]
    assert all(was[k] == 1 and now[k] == 2 for k in moved), "a key moved away from version 2"
    # 10% of the keys must move from 1 to 2; allow the binomial spread, nothing more.
    sigma = math.sqrt(keys * 0.1 * 0.9)
    assert len(moved) < 0.1 * keys + 4 * sigma


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "gate"
    yield path
    path.touch()  # never leave a worker blocked


def test_a_slow_shadow_never_delays_an_answer(
    tmp_path: Path,
    gate: Path,
    pg_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = pg_settings(cache={"enabled": False})
    add_versions(
        settings, tmp_path, "m", CONSTANT.format(value=1), GATED.format(gate=str(gate), value=2)
    )
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 100}, shadow=2)
        # The shadow is blocked for as long as the gate is shut: every answer arrives anyway.
        answers = [predict(http, "m") for _ in range(10)]
        assert [r.json()["predictions"] for r in answers] == [[1]] * 10
        assert http.get("/admin/models/m/shadow").json()["comparisons"] == []
        gate.touch()
        for _ in range(1000):
            log = http.get("/admin/models/m/shadow").json()["comparisons"]
            if len(log) == 10:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert len(log) == 10
        assert log[0]["primary_version"] == 1 and log[0]["shadow_version"] == 2
        assert log[0]["max_abs_delta"] == 1.0 and log[0]["primary"] == [1]


def test_a_failing_shadow_is_only_counted(
    tmp_path: Path, pg_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = pg_settings(cache={"enabled": False})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1), RAISING)
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 100}, shadow=2)
        for _ in range(20):
            response = predict(http, "m")
            assert response.status_code == 200 and response.json()["predictions"] == [1]
        metric = 'interlock_shadow_requests_total{model="m",outcome="failed",version="2"}'
        for _ in range(1000):
            text = http.get("/metrics").text
            if f"{metric} 20.0" in text:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert f"{metric} 20.0" in text


def test_a_broken_canary_is_rolled_back_with_no_client_visible_error(
    tmp_path: Path, pg_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = pg_settings(cache={"enabled": False}, serving={"alias_refresh_s": 0.05})
    add_versions(settings, tmp_path, "m", CONSTANT.format(value=1), RAISING)
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        put_traffic(http, "m", weights={"1": 100})
        started = http.post(
            "/admin/models/m/traffic/canary",
            json={"version": 2, "weight": 50, "max_error_rate": 0.05, "min_requests": 10},
        )
        assert started.status_code == 201, started.text
        statuses: Counter[int] = Counter()
        fallbacks = 0
        for _ in range(2000):
            response = predict(http, "m")
            statuses[response.status_code] += 1
            assert response.json()["predictions"] == [1]
            fallbacks += response.headers.get("x-interlock-fallback") == "stable"
            shown = http.get("/admin/models/m/traffic").json()
            canary = shown["policy"]["canary"]
            if canary["status"] == "rolled_back":
                break
        assert statuses == Counter({200: sum(statuses.values())})
        assert fallbacks >= 10  # the canary was tried, failed, and the stable version answered
        assert canary["status"] == "rolled_back"
        assert "error rate" in canary["reason"]


BROKEN = """
class Model:
    features = ["x"]

    def predict(self, rows):
        raise RuntimeError("this version cannot answer")
"""


def test_a_version_that_cannot_load_is_refused_and_show_lists_the_node(
    tmp_path: Path, pg_settings: Callable[..., Any], server_factory: Callable[[Any], LiveServer]
) -> None:
    settings = pg_settings(cache={"enabled": False})
    add_versions(
        settings, tmp_path, "m", CONSTANT.format(value=1), BROKEN, CONSTANT.format(value=3)
    )
    server = server_factory(settings)
    url = "/admin/models/m/traffic"
    with httpx.Client(base_url=server.url, timeout=30) as http:
        put_traffic(http, "m", weights={"1": 100}, fallback={"static": 0})
        refused = http.post(f"{url}/canary", json={"version": 2, "max_error_rate": 0.05})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"].startswith("m: version 2 cannot serve, change refused:")
        assert "this version cannot answer" in refused.json()["error"]
        refused = http.put(url, json={"weights": {"1": 50, "2": 50}})
        assert refused.status_code == 422, refused.text

        shown = http.get(url).json()
        assert shown["policy"]["canary"] is None and shown["policy"]["revision"] == 1
        assert shown["pending"] is None  # this server applies revision 1 and says so
        assert [n["revision"] for n in shown["nodes"]] == [1]

        unguarded = http.post(f"{url}/canary", json={"version": 3})
        assert unguarded.status_code == 422
        assert "a canary needs a guard" in unguarded.json()["error"]
        started = http.post(f"{url}/canary", json={"version": 3, "unguarded": True})
        assert started.status_code == 201, started.text  # nothing was left "still running"

        kept = put_traffic(http, "m", weights={"1": 100})  # no shadow, no fallback given
        assert kept["fallback"] == {"static": 0}
        cleared = put_traffic(http, "m", weights={"1": 100}, fallback=None)
        assert cleared["fallback"] is None
