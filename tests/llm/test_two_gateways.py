"""Two ``interlock serve`` processes sharing one Redis are one gateway: the limits are
exact across them, the cache and the budget spend are shared."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import REDIS_URL, require_service
from tests.e2e.test_two_nodes import _start
from tests.llm.support import fake, upstream
from tests.llm.upstream import FakeUpstream

__all__ = ["fake", "upstream"]  # fixtures

RPM = 25


def _config(fake: FakeUpstream, tenant: str) -> str:
    return f"""
[llm.limits]
url = "{REDIS_URL}"

[llm.cache]
url = "{REDIS_URL}"

[[llm.deployments]]
name = "d1"
base_url = "{fake.base_url("d1")}"
model = "up"
input_cost_per_1k = 1.0
output_cost_per_1k = 1.0

[[llm.models]]
name = "gpt"
deployments = ["d1"]

[[llm.tenants]]
name = "{tenant}"
key_env = "TENANT_KEY"
rpm = {RPM}

[[llm.tenants]]
name = "{tenant}-free"
key_env = "FREE_KEY"
"""


@pytest.fixture(scope="module")
def gateways(
    tmp_path_factory: pytest.TempPathFactory, upstream: FakeUpstream
) -> Iterator[tuple[str, str]]:
    require_service("Redis", REDIS_URL)
    tenant = f"t{uuid.uuid4().hex[:10]}"  # fresh limit keys in the shared Redis
    tmp_path = tmp_path_factory.mktemp("gateways")
    config = tmp_path / "interlock.toml"
    config.write_text(_config(upstream, tenant))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    env.update(
        {
            "INTERLOCK_CONFIG": str(config),
            "INTERLOCK_LOG__LEVEL": "warning",
            "TENANT_KEY": "secret-key",
            "FREE_KEY": "free-key",
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    for name in ("a", "b"):
        env["INTERLOCK_HOME"] = str(tmp_path / name)
        proc, url = _start(env, tmp_path)
        procs.append(proc)
        urls.append(url)
    try:
        yield urls[0], urls[1]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def _ask(url: str, text: str, key: str = "secret-key") -> httpx.Response:
    return httpx.post(
        f"{url}/llm/v1/chat/completions",
        json={"model": "gpt", "temperature": 0, "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_the_rpm_limit_is_exact_across_two_processes(gateways: tuple[str, str]) -> None:
    a, b = gateways
    jobs = [(a if i % 2 else b, f"question {i}") for i in range(3 * RPM)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda job: _ask(*job).status_code, jobs))
    assert statuses.count(200) == RPM
    assert statuses.count(429) == 2 * RPM


def test_the_cache_is_shared(gateways: tuple[str, str], fake: FakeUpstream) -> None:
    a, b = gateways
    assert _ask(a, "shared answer", "free-key").headers["x-interlock-cache"] == "miss"
    calls = fake.count("d1")
    for _ in range(10):  # the store is written behind the answer; it lands within moments
        response = _ask(b, "shared answer", "free-key")
        if response.headers["x-interlock-cache"] == "hit":
            break
    assert response.headers["x-interlock-cache"] == "hit"
    assert fake.count("d1") - calls < 10
