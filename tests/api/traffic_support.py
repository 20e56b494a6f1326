"""Models and helpers for the traffic and resilience tests.

The python models talk to the test through files, since they may run in worker
processes: a gate file they wait for, a counter file they bump on every call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.api.support import register, write_python_model

CONSTANT = """
class Model:
    features = ["x"]

    def predict(self, rows):
        return [{value} for _ in rows]
"""

# Broken on real traffic, yet passing the warm-up (x = 0) that guards every load.
RAISING = """
class Model:
    features = ["x"]

    def predict(self, rows):
        if rows and rows[0].get("x") == 0.0:
            return [0.0 for _ in rows]
        raise ValueError("this version is broken")
"""

GATED = """
import pathlib, time

GATE = pathlib.Path({gate!r})


class Model:
    features = ["x"]

    def predict(self, rows):
        if rows and rows[0].get("x") == 0.0:  # the warm-up row (x=0) is not gated
            return [0.0 for _ in rows]
        while not GATE.exists():
            time.sleep(0.005)
        return [{value} for _ in rows]
"""

COUNTING = """
import pathlib

COUNTER = pathlib.Path({counter!r})


class Model:
    features = ["x"]

    def predict(self, rows):
        calls = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
        COUNTER.write_text(str(calls))
        return [r["x"] * 10 for r in rows]
"""

RAISING_COUNTED = """
import pathlib

COUNTER = pathlib.Path({counter!r})


class Model:
    features = ["x"]

    def predict(self, rows):
        if rows and rows[0].get("x") == 0.0:
            return [0.0 for _ in rows]
        calls = int(COUNTER.read_text()) + 1 if COUNTER.exists() else 1
        COUNTER.write_text(str(calls))
        raise ValueError("this version is broken")
"""


def add_versions(settings: Any, tmp: Path, name: str, *bodies: str) -> None:
    """Register one version per body (1, 2, …); version 1 becomes champion."""
    for number, body in enumerate(bodies, start=1):
        path = write_python_model(tmp / f"{name}-v{number}", body)
        register(settings, name, path, "python", alias="champion" if number == 1 else None)


def put_traffic(http: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    response = http.put(f"/admin/models/{name}/traffic", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def predict(
    http: httpx.Client, name: str, x: float = 1.0, headers: dict[str, str] | None = None
) -> httpx.Response:
    return http.post(f"/v1/models/{name}:predict", json={"instances": [{"x": x}]}, headers=headers)
