"""``interlock worker`` rides out what operators do to it and to its bus.

- A worker SIGKILLed on Kafka and started again at once joins while the dead member's
  session is still open (it used to exit 1 with an empty cause), answers every request,
  and predicts none twice.
- A worker started while its broker is down waits, says why once, and works once the
  broker is up (Kafka on a broker of the test's own; a Redis of the test's own too).
- A Redis restarted under a running worker: the worker waits and goes on.
- A wrong password is a configuration error: the worker exits at once, in one line.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bus.conftest import START_TIMEOUT_S, accepts, start_tansu, tansu_binary
from tests.conftest import _free_port
from tests.events.test_worker import predicted_xs
from tests.events.test_worker_backends import (
    Worker,
    _answers,
    _publish,
    _request,
    bus_url,
    kafka_url,
    setup,
)

__all__ = ["bus_url", "kafka_url", "setup"]  # fixtures

LIMIT_S = 120.0


def _wait_for(condition: object, what: str, worker: Worker, limit_s: float = LIMIT_S) -> None:
    """Until ``condition()`` holds; fails if ``worker`` exits first or after ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while not condition():  # type: ignore[operator]
        code = worker.proc.poll()
        assert code is None, f"the worker exited with {code}: {worker.output()[-2000:]}"
        assert time.monotonic() < deadline, f"{what}: not after {limit_s} s\n{worker.output()}"
        time.sleep(0.05)


def _answered(url: str, topic: str, ids: set[str], worker: Worker) -> dict[str, object]:
    """The answers to ``ids``, read while checking that ``worker`` stays up."""
    answers: dict[str, object] = {}

    async def read() -> None:
        answers.update(await _answers(url, topic, ids, LIMIT_S))

    async def watch() -> None:
        while not ids <= answers.keys():
            code = worker.proc.poll()
            assert code is None, f"the worker exited with {code}: {worker.output()[-2000:]}"
            await asyncio.sleep(0.1)

    async def both() -> None:
        reader = asyncio.ensure_future(read())
        watcher = asyncio.ensure_future(watch())
        await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_EXCEPTION)
        for task in (reader, watcher):
            if task.done():
                task.result()  # raises what failed
        reader.cancel()
        watcher.cancel()

    asyncio.run(both())
    return answers


@pytest.mark.parametrize("bus_url", ["kafka"], indirect=True)
def test_a_kafka_worker_restarted_at_once_joins_and_predicts_nothing_twice(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path
) -> None:
    env, log, url = setup
    # The default session (30 s): the dead member's lasts longer than a join used to wait.
    env = {**env, "INTERLOCK_BUS__REDELIVERY_S": "30", "INTERLOCK_LOG__LEVEL": "info"}
    requests, completed = (
        env["INTERLOCK_BUS__REQUESTS_TOPIC"],
        env["INTERLOCK_BUS__COMPLETED_TOPIC"],
    )
    tag = uuid.uuid4().hex[:6]
    first = Worker(env, tmp_path, tmp_path / "first.log")
    workers = [first]
    try:
        first.wait_metrics()
        before = [_request(tag, i) for i in range(200)]
        asyncio.run(_publish(url, requests, before))
        _answered(url, completed, {f"{tag}-{i}" for i in range(200)}, first)
        first.kill()  # its session stays open for 30 s
        again = Worker(env, tmp_path, tmp_path / "again.log")
        workers.append(again)
        after = [_request(tag, i) for i in range(200, 400)]  # the stream goes on
        asyncio.run(_publish(url, requests, after))
        answers = _answered(url, completed, {f"{tag}-{i}" for i in range(400)}, again)
        assert all(answers[f"{tag}-{i}"]["result"] == (i + 1) * 10 for i in range(400))  # type: ignore[index]
        xs = predicted_xs(log)
        assert sorted(xs) == [float(i + 1) for i in range(400)]  # each predicted once
        assert again.proc.poll() is None
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def own_port() -> Iterator[int]:
    yield _free_port()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_accepting(port: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while not accepts(port):
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.05)


def _config_error_line(env: dict[str, str], tmp_path: Path) -> str:
    """Start a worker that must exit 1 at once; its one line of output."""
    worker = Worker(env, tmp_path, tmp_path / "worker.log")
    try:
        assert worker.proc.wait(timeout=60) == 1
    finally:
        worker.stop()
    lines = worker.output().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("bus_url", ["kafka"], indirect=True)
def test_a_worker_waits_for_a_kafka_broker_that_is_down_at_start(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path, own_port: int
) -> None:
    env, _log, _shared = setup
    url = f"kafka://127.0.0.1:{own_port}"
    env = {**env, "INTERLOCK_BUS_URL": url}
    worker = Worker(env, tmp_path, tmp_path / "worker.log")
    broker: subprocess.Popen[bytes] | None = None
    try:
        worker.wait_metrics()
        _wait_for(lambda: "cannot reach Kafka" in worker.output(), "the warning", worker)
        with tempfile.TemporaryFile() as broker_log:
            broker = start_tansu(tansu_binary(), own_port, broker_log)
            _wait_for(lambda: accepts(own_port), "the broker", worker, START_TIMEOUT_S)
            tag = uuid.uuid4().hex[:6]
            asyncio.run(
                _publish(
                    url, env["INTERLOCK_BUS__REQUESTS_TOPIC"], [_request(tag, i) for i in range(50)]
                )
            )
            ids = {f"{tag}-{i}" for i in range(50)}
            answers = _answered(url, env["INTERLOCK_BUS__COMPLETED_TOPIC"], ids, worker)
            assert set(answers) == ids
        warnings = [line for line in worker.output().splitlines() if "cannot reach Kafka" in line]
        assert len(warnings) == 1, warnings  # one warning for the whole outage
    finally:
        worker.stop()
        if broker is not None:
            _stop(broker)


def _redis_server(port: int, directory: Path, *extra: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server binary to run a Redis of the test's own")
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "yes", "--appendfsync", "always", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.parametrize("bus_url", ["redis"], indirect=True)
def test_a_worker_waits_through_a_redis_restart(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path, own_port: int
) -> None:
    env, _log, _shared = setup
    url = f"redis://127.0.0.1:{own_port}/0"
    env = {**env, "INTERLOCK_BUS_URL": url}
    requests, completed = (
        env["INTERLOCK_BUS__REQUESTS_TOPIC"],
        env["INTERLOCK_BUS__COMPLETED_TOPIC"],
    )
    (tmp_path / "redis").mkdir()
    worker = Worker(env, tmp_path, tmp_path / "worker.log")  # Redis is not up yet
    redis = _redis_server(own_port, tmp_path / "redis")
    try:
        worker.wait_metrics()
        _wait_for(lambda: accepts(own_port), "Redis", worker, 30)
        tag = uuid.uuid4().hex[:6]
        asyncio.run(_publish(url, requests, [_request(tag, i) for i in range(50)]))
        _answered(url, completed, {f"{tag}-{i}" for i in range(50)}, worker)
        _stop(redis)  # the worker's fetch fails from here on
        _wait_for(lambda: "redis bus" in worker.output(), "the warning", worker)
        redis = _redis_server(own_port, tmp_path / "redis")
        _wait_for(lambda: accepts(own_port), "Redis again", worker, 30)
        asyncio.run(_publish(url, requests, [_request(tag, i) for i in range(50, 100)]))
        answers = _answered(url, completed, {f"{tag}-{i}" for i in range(100)}, worker)
        assert len(answers) == 100
    finally:
        worker.stop()
        _stop(redis)


@pytest.mark.parametrize("bus_url", ["redis"], indirect=True)
def test_a_wrong_redis_password_exits_at_once_in_one_line(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path, own_port: int
) -> None:
    env, _log, _shared = setup
    (tmp_path / "redis").mkdir()
    redis = _redis_server(own_port, tmp_path / "redis", "--requirepass", "right-one")
    try:
        _wait_accepting(own_port, "Redis")
        env = {**env, "INTERLOCK_BUS_URL": f"redis://:wrong-one@127.0.0.1:{own_port}/0"}
        line = _config_error_line(env, tmp_path)
        assert "auth" in line.lower()
        assert "wrong-one" not in line  # no secret in the line
    finally:
        _stop(redis)


def _nats_server(port: int, directory: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("no nats-server binary to run a NATS of the test's own")
    return subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("bus_url", ["nats"], indirect=True)
def test_a_worker_waits_for_nats_down_at_start_and_through_a_restart(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path, own_port: int
) -> None:
    env, _log, _shared = setup
    url = f"nats://127.0.0.1:{own_port}"
    env = {**env, "INTERLOCK_BUS_URL": url}
    requests, completed = (
        env["INTERLOCK_BUS__REQUESTS_TOPIC"],
        env["INTERLOCK_BUS__COMPLETED_TOPIC"],
    )
    worker = Worker(env, tmp_path, tmp_path / "worker.log")
    server: subprocess.Popen[bytes] | None = None
    try:
        worker.wait_metrics()
        _wait_for(lambda: "cannot connect to NATS" in worker.output(), "the warning", worker)
        server = _nats_server(own_port, tmp_path / "nats")
        _wait_for(lambda: accepts(own_port), "NATS", worker, 30)
        tag = uuid.uuid4().hex[:6]
        asyncio.run(_publish(url, requests, [_request(tag, i) for i in range(50)]))
        _answered(url, completed, {f"{tag}-{i}" for i in range(50)}, worker)
        warnings = [line for line in worker.output().splitlines() if "NATS" in line]
        assert len(warnings) == 1, warnings  # one line for the whole outage, with its cause
        assert "Connect call failed" in warnings[0] or "refused" in warnings[0].lower()

        _stop(server)  # a restart under the running worker (the streams are on disk)
        _wait_for(lambda: "disconnected" in worker.output(), "the disconnection", worker)
        server = _nats_server(own_port, tmp_path / "nats")
        _wait_for(lambda: accepts(own_port), "NATS again", worker, 30)
        asyncio.run(_publish(url, requests, [_request(tag, i) for i in range(50, 100)]))
        answers = _answered(url, completed, {f"{tag}-{i}" for i in range(100)}, worker)
        assert len(answers) == 100
    finally:
        worker.stop()
        if server is not None:
            _stop(server)


@pytest.mark.parametrize("bus_url", ["nats"], indirect=True)
def test_refused_nats_credentials_exit_at_once_in_one_line(
    setup: tuple[dict[str, str], Path, str], tmp_path: Path, own_port: int
) -> None:
    env, _log, _shared = setup
    binary = shutil.which("nats-server")
    if binary is None:
        pytest.skip("no nats-server binary to run a NATS of the test's own")
    server = subprocess.Popen(
        [binary, "-js", "-a", "127.0.0.1", "-p", str(own_port), "-sd", str(tmp_path / "nats"),
         "--user", "worker", "--pass", "right-one"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_accepting(own_port, "NATS")
        env = {**env, "INTERLOCK_BUS_URL": f"nats://worker:wrong-one@127.0.0.1:{own_port}"}
        line = _config_error_line(env, tmp_path)
        assert "credentials" in line
        assert "wrong-one" not in line
    finally:
        _stop(server)
