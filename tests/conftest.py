"""Shared fixtures: real services over loopback, isolated per test.

A test that needs a service asks for its fixture. When the service does not answer,
the test is skipped on a developer's machine and fails under ``CI=true``: CI never
passes by skipping. Under ``CI=true`` every skip, whatever raised it, is reported as a
failure (:func:`pytest_runtest_makereport`).

The services' URLs come from ``INTERLOCK_TEST_POSTGRES_URL``, ``INTERLOCK_TEST_REDIS_URL``,
``INTERLOCK_TEST_NATS_URL`` and ``INTERLOCK_TEST_KAFKA_URL`` (see tests/bus/conftest.py),
read once when the tests are collected. Each test then runs with no ``INTERLOCK_*``
variable in its environment (:func:`_no_interlock_environment`): a setting a test needs,
it sets itself.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get(
    "INTERLOCK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("INTERLOCK_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("INTERLOCK_TEST_NATS_URL", "nats://127.0.0.1:4222")
IN_CI = os.environ.get("CI", "").lower() == "true"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "semantic: needs the interlock[semantic] extra (run by make test-semantic)"
    )


@pytest.fixture(autouse=True)
def _no_interlock_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``INTERLOCK_*`` variable of the caller's shell reaches a test's settings."""
    for name in list(os.environ):
        if name.startswith("INTERLOCK_"):
            monkeypatch.delenv(name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under ``CI=true`` a skipped test is a failed one: CI never passes by skipping."""
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which runs every test: {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    """The same for a whole module skipped while collected (``pytest.importorskip``)."""
    report = yield
    if IN_CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        reason = str(reason).removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which runs every test: {reason}"
    return report


def unavailable(message: str) -> NoReturn:
    """Skip the test on a developer's machine; under ``CI=true``, fail it."""
    if IN_CI:
        pytest.fail(f"{message}; CI needs every service and tool (see scripts/services.sh)")
    pytest.skip(message)


def require_binary(name: str) -> str:
    """The path of program ``name``; skip without it, or fail under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
    return path


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0), 1.0):
            return True
    except OSError:
        return False


def require_service(name: str, url: str) -> None:
    """Skip (or, under CI=true, fail) when the service at ``url`` does not answer."""
    if not _answers(url):
        unavailable(f"{name} is not answering at {url}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped after the test."""
    require_service("PostgreSQL", POSTGRES_URL)
    import sqlalchemy as sa

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(POSTGRES_URL)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL for an empty database: a file under tmp_path, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'meta' / 'interlock.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


# -- a real interlock server on a loopback port ----------------------------------------


class LiveServer:
    """``interlock serve`` running in a background thread on a free loopback port."""

    def __init__(self, settings: Any) -> None:
        import threading

        import uvicorn

        from interlock.app import create_app

        self.settings = settings
        config = uvicorn.Config(
            create_app(settings),
            host="127.0.0.1",
            port=_free_port(),
            loop="uvloop",
            http="httptools",
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.url = f"http://127.0.0.1:{config.port}"
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        import time

        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Any]:
    """Settings rooted in the test's own directory; keyword arguments override fields."""
    from interlock.settings import load_settings

    def make(**overrides: Any) -> Any:
        overrides.setdefault("home", tmp_path / "home")
        return load_settings(None, **overrides)

    return make


@pytest.fixture
def server_factory() -> Iterator[Callable[[Any], LiveServer]]:
    """Start real servers for the test; every one is stopped afterwards."""
    servers: list[LiveServer] = []

    def start(settings: Any) -> LiveServer:
        server = LiveServer(settings).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
