"""The traffic admin routes over HTTP, in process, on a real database.

The routes are mounted on a bare FastAPI app with interlock's error-to-status table, as
``app.py`` mounts the admin routes; ``on_change`` counts the refreshes it is asked for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from interlock._core.clock import SystemClock
from interlock.api.errors import status_for
from interlock.api.traffic import build_traffic_router
from interlock.errors import InterlockError
from interlock.registry import Registry
from interlock.runtime.loaders import inspect_artifact
from interlock.serving.policies import PolicyStore
from interlock.store import ArtifactStore, Database
from tests.registry.sample_models import SUM_MODEL

KEY = "s3cret-admin"
AUTH = {"authorization": f"Bearer {KEY}"}


class Refreshes:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def refreshes() -> Refreshes:
    return Refreshes()


@pytest.fixture
async def http(
    database_url: str, tmp_path: Path, refreshes: Refreshes
) -> AsyncIterator[httpx.AsyncClient]:
    async with Database(database_url) as db:
        db.migrate()
        registry = Registry(db, ArtifactStore(tmp_path / "a"), inspect_artifact, SystemClock())
        source = tmp_path / "model.py"
        source.write_text(SUM_MODEL)
        for _ in range(3):
            await registry.register("fraud", source, "python", allow_duplicate=True)
        api = FastAPI()

        @api.exception_handler(InterlockError)
        async def interlock_error(_request: Request, exc: InterlockError) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=status_for(exc))

        store = PolicyStore(db, registry, SystemClock())
        api.include_router(build_traffic_router(store, refreshes, (KEY.encode(),)))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://interlock", headers=AUTH
        ) as client:
            yield client


URL = "/admin/models/fraud/traffic"


async def test_put_get_canary_and_delete(http: httpx.AsyncClient, refreshes: Refreshes) -> None:
    empty = await http.get(URL)
    assert empty.status_code == 200
    assert empty.json() | {"events": []} == {
        "model": "fraud",
        "policy": None,
        "effective_weights": None,
        "nodes": [],
        "pending": None,
        "last_rollback": None,
        "events": [],
    }

    body = {"weights": {"1": 80, "2": 20}, "shadow": 3, "fallback": {"static": {"p": 0}}}
    put = await http.put(URL, json=body)
    assert put.status_code == 200, put.text
    assert put.json()["weights"] == {"1": 80, "2": 20}
    assert put.json()["fallback"] == {"static": {"p": 0}}
    assert refreshes.count == 1

    unguarded = await http.post(f"{URL}/canary", json={"version": 3, "weight": 10})
    assert unguarded.status_code == 422
    assert "a canary needs a guard: give max_error_rate or max_p99_ms" in unguarded.text
    assert refreshes.count == 1
    canary = await http.post(
        f"{URL}/canary", json={"version": 3, "weight": 10, "max_error_rate": 0.05}
    )
    assert canary.status_code == 201, canary.text
    assert canary.json()["canary"]["stable"] == 1
    assert canary.json()["shadow"] is None  # the shadow became the canary
    assert refreshes.count == 2

    shown = (await http.get(URL, params={"limit": 1})).json()
    assert shown["effective_weights"] == {"1": 70.0, "2": 20.0, "3": 10.0}
    assert [e["kind"] for e in shown["events"]] == ["canary_started"]

    deleted = await http.delete(URL)
    assert deleted.status_code == 204
    assert (await http.get(URL)).json()["policy"] is None
    assert refreshes.count == 3
    assert (await http.delete(URL)).status_code == 204
    assert refreshes.count == 3  # nothing changed, nothing to refresh


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("PUT", URL, {"weights": {"1": 50, "9": 50}}, 422, "version 9 does not exist"),
        ("PUT", URL, {"weights": {"1": -1, "2": 1}}, 422, "weight for version 1 must be ≥ 0"),
        ("PUT", URL, {"weights": {"one": 1}}, 422, None),
        ("PUT", URL, {"weights": {str(10**20): 1}}, 422, f"version {10**20} does not exist"),
        ("PUT", URL, {"weights": {"1": 10**30}}, 422, "weight for version 1 must be ≤ 1000000"),
        ("PUT", URL, {"weights": {"1": 1}, "shadow": 10**20}, 422, None),
        ("POST", f"{URL}/canary", {"version": 10**20, "unguarded": True}, 422, None),
        ("PUT", URL, {"weights": {"1": 1}, "extra": True}, 422, None),
        ("PUT", "/admin/models/nope/traffic", {"weights": {"1": 1}}, 404, "no model named"),
        (
            "POST",
            f"{URL}/canary",
            {"version": 2, "steps": [50, 5], "unguarded": True},
            422,
            "steps must rise",
        ),
        ("POST", f"{URL}/canary", {"version": 2, "max_error_rate": 3}, 422, None),
        ("GET", "/admin/models/nope/traffic", None, 404, "no model named 'nope'"),
    ],
)
async def test_mistakes_get_a_status_and_a_reason(
    http: httpx.AsyncClient,
    refreshes: Refreshes,
    method: str,
    path: str,
    body: object,
    status: int,
    error: str | None,
) -> None:
    response = await http.request(method, path, json=body)
    assert response.status_code == status, response.text
    if error is not None:
        assert error in response.json()["error"]
    assert refreshes.count == 0


async def test_the_admin_key_is_required(http: httpx.AsyncClient) -> None:
    http.headers.pop("authorization")
    assert (await http.get(URL)).status_code == 401
    wrong = await http.put(URL, json={"weights": {"1": 1}}, headers={"x-api-key": "guess"})
    assert wrong.status_code == 401
    assert (await http.get(URL, headers={"x-api-key": KEY})).status_code == 200
