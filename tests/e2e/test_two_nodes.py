"""Two ``interlock serve`` processes on one PostgreSQL and one Redis form one deployment:
a traffic change made through one is applied by the other, and they share the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.traffic_support import CONSTANT, COUNTING
from tests.conftest import REDIS_URL, _free_port, require_service


def _start(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "interlock", "serve", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("the server did not start")


@pytest.fixture
def nodes(tmp_path: Path, postgres_url: str) -> Iterator[tuple[str, str, dict[str, str]]]:
    require_service("Redis", REDIS_URL)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    env.update(
        {
            "INTERLOCK_HOME": str(tmp_path / "home"),
            "INTERLOCK_DATABASE_URL": postgres_url,
            "INTERLOCK_ARTIFACTS_DIR": str(tmp_path / "shared-artifacts"),
            "INTERLOCK_CACHE__URL": REDIS_URL,
            "INTERLOCK_LOG__LEVEL": "warning",
        }
    )
    for number, body in enumerate(
        (CONSTANT.format(value=1), COUNTING.format(counter=str(tmp_path / "calls"))), start=1
    ):
        path = tmp_path / f"v{number}.py"
        path.write_text(body)
        args = ["models", "register", "m", str(path), "--format", "python"]
        if number == 1:
            args += ["--alias", "champion"]
        subprocess.run([sys.executable, "-m", "interlock", *args], env=env, check=True)
    first, a = _start(env, tmp_path)
    second, b = _start(env, tmp_path)
    try:
        yield a, b, env
    finally:
        for proc in (first, second):
            proc.terminate()
            proc.wait(timeout=30)


def _version(url: str, x: float) -> int:
    response = httpx.post(f"{url}/v1/models/m:predict", json={"instances": [{"x": x}]})
    assert response.status_code == 200, response.text
    return int(response.headers["x-interlock-model-version"])


def test_a_traffic_change_on_one_node_reaches_the_other(
    nodes: tuple[str, str, dict[str, str]],
) -> None:
    a, b, _env = nodes
    assert _version(b, 1.0) == 1
    changed = httpx.put(f"{a}/admin/models/m/traffic", json={"weights": {"2": 100}})
    assert changed.status_code == 200, changed.text
    assert _version(a, 2.0) == 2  # the node that took the change applies it before answering
    started = time.monotonic()
    for i in range(100_000):
        if _version(b, 3.0 + i) == 2:
            break
    print(f"\nnode b followed the change after {time.monotonic() - started:.3f} s")
    assert _version(b, 1e6) == 2
    # Both nodes report the revision they apply; show says so, and nothing is pending.
    revision = changed.json()["revision"]
    for _ in range(600):
        shown = httpx.get(f"{b}/admin/models/m/traffic").json()
        if [n["revision"] for n in shown["nodes"]] == [revision, revision]:
            break
        time.sleep(0.05)  # the nodes write their heartbeat after each 1 s refresh
    assert [n["revision"] for n in shown["nodes"]] == [revision, revision]
    assert len({n["pid"] for n in shown["nodes"]}) == 2
    assert shown["pending"] is None


def test_the_nodes_share_the_redis_cache(nodes: tuple[str, str, dict[str, str]]) -> None:
    a, b, _env = nodes
    httpx.put(f"{a}/admin/models/m/traffic", json={"weights": {"2": 100}})
    x = float(uuid.uuid4().int % 10**9)
    for _ in range(100_000):  # until b routes to version 2 too
        if _version(b, -1.0) == 2:
            break
    first = httpx.post(f"{a}/v1/models/m:predict", json={"instances": [{"x": x}]})
    assert first.headers["x-interlock-cache"] == "miss"
    for _ in range(100_000):  # the write lands just after a's answer
        second = httpx.post(f"{b}/v1/models/m:predict", json={"instances": [{"x": x}]})
        if second.headers["x-interlock-cache"] == "hit":
            break
    assert second.headers["x-interlock-cache"] == "hit"
    assert second.json()["predictions"] == [x * 10]
