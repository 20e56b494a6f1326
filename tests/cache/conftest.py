"""Fixtures for the cache tests: a hand-moved clock, both backends, private Redis servers.

``cache_backend`` runs a contract test once on :class:`MemoryCache` and once on the
real Redis at ``INTERLOCK_TEST_REDIS_URL``, under a key prefix of its own.
``redis_server`` starts ``redis-server`` processes on free loopback ports that a test
may pause, kill and restart; without the binary the test is skipped, or fails under
``CI=true``, as :func:`tests.conftest.require_service` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from interlock._core.clock import SystemClock
from interlock.cache import Cache, MemoryCache
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service

T = TypeVar("T")


@dataclass
class Backend:
    """A cache under test, and how to make time pass for it."""

    kind: str
    cache: Cache
    clock: ManualClock | None  # None: the real clock, and real Redis expiry

    def pass_time(self, seconds: float) -> None:
        """Move a manual clock; with real time, callers poll with :func:`eventually`."""
        if self.clock is not None:
            self.clock.advance(seconds)


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout_s: float = 10.0,
    what: str = "the condition",
) -> T:
    """Call ``probe`` until ``until(result)`` holds; fail after ``timeout_s`` of real time."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if until(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s (last: {result!r})")
        await asyncio.sleep(0.01)


def unique_prefix() -> bytes:
    """A key prefix no other test uses."""
    return f"interlock-test:{uuid.uuid4().hex[:12]}:".encode()


@pytest.fixture(params=["memory", "redis"])
async def cache_backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """Each backend in turn, empty; the Redis one is cleaned up afterwards."""
    if request.param == "memory":
        clock = ManualClock()
        async with MemoryCache(1 << 20, clock) as memory:
            yield Backend("memory", memory, clock)
        return
    require_service("Redis", REDIS_URL)
    from interlock.cache.redis import RedisCache

    async with RedisCache(
        REDIS_URL, timeout_s=2.0, prefix=unique_prefix(), clock=SystemClock()
    ) as shared:
        yield Backend("redis", shared, None)
        await shared.delete_prefix(b"")


# -- private redis-server processes ------------------------------------------------------


def require_binary(name: str) -> str:
    """The path of program ``name``; skip without it, or fail under CI=true."""
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI needs every service (see scripts/services.sh)")
    pytest.skip(message)


def free_port() -> int:
    """A loopback TCP port nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` of the test's own, without persistence, on ``port``."""

    def __init__(self, binary: str, port: int, directory: Path) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start the process and return once it answers PING."""
        assert self.process is None, "already running"
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await eventually(self._pings, bool, timeout_s=timeout_s, what="redis-server starting")
        return self

    async def _pings(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"redis-server exited with {self.process.returncode}")
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            answer = await reader.readline()
        except OSError:
            answer = b""
        finally:
            writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return answer == b"+PONG\r\n"

    def kill(self) -> None:
        """SIGKILL (a paused server too): connections drop, the port refuses until a restart."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers, as on a hung host."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Make private Redis servers (not started yet); every one is killed afterwards."""
    binary = require_binary("redis-server")
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        directory = tmp_path / f"redis-{len(servers)}"
        directory.mkdir()
        server = RedisServer(binary, free_port(), directory)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()
