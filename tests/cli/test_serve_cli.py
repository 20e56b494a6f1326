"""``interlock serve`` as users start it: the bus from ``INTERLOCK_BUS_URL``, ``--config`` last."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from interlock.bus import open_bus
from tests.api.support import write_python_model
from tests.cli.test_cli import run
from tests.conftest import REDIS_URL, _free_port, require_service


def _serve(
    home: Path, before: list[str], after: list[str], env: dict[str, str]
) -> subprocess.Popen[str]:
    """``interlock [before] serve [after]``."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    environment.update({"INTERLOCK_HOME": str(home), "INTERLOCK_LOG__LEVEL": "warning", **env})
    return subprocess.Popen(
        [sys.executable, "-m", "interlock", *before, "serve", *after],
        env=environment,
        cwd=home.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def served() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def _until_ready(url: str, process: subprocess.Popen[str], limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            assert process.stderr is not None
            raise AssertionError(f"interlock serve ended: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling the condition itself, bounded by the deadline
    raise AssertionError("interlock serve did not get ready")


async def _completions(topic: str, want: int, limit_s: float = 30.0) -> list[dict[str, object]]:
    seen: list[dict[str, object]] = []
    async with open_bus(REDIS_URL) as bus:
        sub = await bus.subscribe(topic, group=f"t-{uuid.uuid4().hex[:6]}", consumer="t")
        deadline = time.monotonic() + limit_s
        try:
            while len(seen) < want and time.monotonic() < deadline:
                messages = await sub.fetch(100, 0.5)
                seen.extend(orjson.loads(m.value) for m in messages)
        finally:
            await sub.aclose()
    return seen


@pytest.mark.parametrize("config_first", [True, False], ids=["config-first", "config-last"])
def test_serve_publishes_to_the_bus_of_interlock_bus_url(
    tmp_path: Path, served: list[subprocess.Popen[str]], config_first: bool
) -> None:
    """``INTERLOCK_BUS_URL`` reaches ``interlock serve`` as it reaches the worker."""
    require_service("Redis", REDIS_URL)
    home = tmp_path / "home"
    model = write_python_model(tmp_path / "m")
    registered = run(home, "models", "register", "calc", str(model), "--format", "python")
    assert registered.returncode == 0, registered.stderr
    topic = f"done-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "serve.toml"
    config.write_text(f'[bus]\npublish_http = true\ncompleted_topic = "{topic}"\n')
    port = _free_port()
    where = ["--config", str(config)]
    before, after = (where, []) if config_first else ([], where)
    env = {"INTERLOCK_BUS_URL": REDIS_URL}
    process = _serve(home, before, [*after, "--port", str(port)], env)
    served.append(process)
    url = f"http://127.0.0.1:{port}"
    _until_ready(url, process)

    answer = httpx.post(
        f"{url}/v1/models/calc:predict",
        json={"instances": [{"a": 1.0, "b": 2, "c": 0.5}]},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    events = asyncio.run(_completions(topic, 1))
    assert [(e["model"], e["result"], e["requestId"]) for e in events] == [
        ("calc", [4.5], answer.headers["x-request-id"])
    ]


def test_serve_names_an_unset_key_variable_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "llm.toml"
    config.write_text(
        "[[llm.deployments]]\nname = 'd1'\nbase_url = 'http://127.0.0.1:1/v1'\nmodel = 'm'\n"
        "[[llm.models]]\nname = 'gpt'\ndeployments = ['d1']\n"
        "[[llm.tenants]]\nname = 'dash'\nkey_env = 'INTERLOCK_TEST_UNSET_TENANT_KEY'\n"
    )
    result = run(tmp_path / "home", "serve", "--config", str(config), "--port", "0")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: tenant 'dash': the variable INTERLOCK_TEST_UNSET_TENANT_KEY holding its key "
        "is not set"
    )
