"""Readiness over real HTTP follows the background loops: not ready while one fails.

A real server on SQLite; the traffic refresher is broken by taking its table away (as a
botched migration or a dropped table would), then mended.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.support import register, write_python_model
from tests.api.traffic_support import CONSTANT, put_traffic
from tests.conftest import LiveServer


def loop_failures(http: httpx.Client, loop: str) -> float:
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if (
                sample.name == "interlock_background_loop_failures_total"
                and sample.labels.get("loop") == loop
            ):
                return float(sample.value)
    return 0.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after 30 s."""
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        asyncio.run(asyncio.sleep(0.02))


def rename(database: Path, old: str, new: str) -> None:
    with sqlite3.connect(database, timeout=30) as conn:
        conn.execute(f"ALTER TABLE {old} RENAME TO {new}")


def test_ready_is_503_while_a_loop_fails_and_200_once_it_recovers(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(serving={"alias_refresh_s": 0.05}, cache={"enabled": False})
    register(settings, "m", write_python_model(tmp_path / "v1", CONSTANT.format(value=1)), "python")
    database = settings.home / "interlock.db"
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        ready = http.get("/v2/health/ready")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        assert loop_failures(http, "traffic-refresh") == 0

        rename(database, "traffic_policies", "traffic_policies_away")
        wait_for(lambda: http.get("/v2/health/ready").status_code == 503, "ready went 503")
        body = http.get("/v2/health/ready").json()
        assert body["ready"] is False
        assert body["failing_loops"] == ["traffic-refresh"]
        assert "traffic-refresh" in body["error"]
        assert http.get("/v2/health/live").status_code == 200
        assert http.post("/v1/models/m:predict", json={"instances": [{"x": 1.0}]}).json()[
            "predictions"
        ] == [1]  # the node still answers with what it holds
        wait_for(lambda: loop_failures(http, "traffic-refresh") >= 2, "a second failure counted")

        rename(database, "traffic_policies_away", "traffic_policies")
        wait_for(lambda: http.get("/v2/health/ready").status_code == 200, "ready again")
        assert http.get("/v2/health/ready").json() == {"ready": True}
        assert loop_failures(http, "traffic-refresh") >= 2
        put_traffic(http, "m", weights={"1": 100})  # the table is back for writes too
        assert http.get("/v2/health/ready").status_code == 200
