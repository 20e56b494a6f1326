"""CI cannot pass by skipping: the services script fails loudly, a skip under ``CI=true``
is a failure, and no ``INTERLOCK_*`` variable of the caller's shell reaches a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _free_port, require_binary

REPO = Path(__file__).resolve().parent.parent


def _pytest(test: str, **env: str) -> subprocess.CompletedProcess[str]:
    """This module's ``test`` run by pytest in a process of its own, with ``env`` added."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{test}"],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_services_script_fails_naming_each_service_that_does_not_answer() -> None:
    ports = {name: _free_port() for name in ("POSTGRES", "REDIS", "NATS")}
    env = {
        **os.environ,
        "INTERLOCK_TEST_POSTGRES_URL": f"postgresql+psycopg://u:secret@127.0.0.1:{ports['POSTGRES']}/t",
        "INTERLOCK_TEST_REDIS_URL": f"redis://127.0.0.1:{ports['REDIS']}/0",
        "INTERLOCK_TEST_NATS_URL": f"nats://127.0.0.1:{ports['NATS']}",
    }
    result = subprocess.run(
        [require_binary("bash"), str(REPO / "scripts" / "services.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    for service, name in (("PostgreSQL", "POSTGRES"), ("Redis", "REDIS"), ("NATS", "NATS")):
        expected = (
            f"services: {service} is not answering at 127.0.0.1:{ports[name]} "
            f"(INTERLOCK_TEST_{name}_URL); start it there or unset INTERLOCK_TEST_{name}_URL"
        )
        assert expected in lines
    assert "secret" not in result.stderr


PROBES = {  # a test module that skips, three ways
    "marked": "@pytest.mark.skip(reason='asked to skip')\ndef test_x():\n    pass\n",
    "called": "def test_x():\n    pytest.skip('asked to skip')\n",
    "module": "pytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n",
}


@pytest.mark.parametrize("kind", sorted(PROBES))
def test_under_ci_a_skip_is_a_failure(tmp_path: Path, kind: str) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(f"import pytest\n\n{PROBES[kind]}")

    def run(ci: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
             "--rootdir", str(tmp_path), str(probe)],
            cwd=REPO,
            env={**os.environ, "CI": ci},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip

    on_a_laptop, in_ci = run("false"), run("true")

    assert on_a_laptop.returncode in (0, 5), on_a_laptop.stdout  # 5: no test ran
    assert "1 skipped" in on_a_laptop.stdout
    assert in_ci.returncode not in (0, 5), in_ci.stdout
    assert "skipped under CI=true, which runs every test:" in in_ci.stdout
    assert "skipped" not in in_ci.stdout.splitlines()[-1]


def test_a_probe_of_the_environment() -> None:
    """No ``INTERLOCK_*`` variable here, whatever the shell that started pytest had."""
    assert sorted(name for name in os.environ if name.startswith("INTERLOCK_")) == []


def test_the_shell_s_interlock_variables_do_not_reach_a_test() -> None:
    result = _pytest(
        "test_a_probe_of_the_environment",
        INTERLOCK_HOME="/nonexistent",
        INTERLOCK_CACHE__URL="redis://127.0.0.1:1/0",
    )
    assert result.returncode == 0, result.stdout


def test_every_service_url_comes_from_its_interlock_test_variable() -> None:
    env = {
        **os.environ,
        "INTERLOCK_TEST_NATS_URL": "nats://127.0.0.1:14222",
        "INTERLOCK_TEST_REDIS_URL": "redis://127.0.0.1:16379/0",
        "INTERLOCK_TEST_KAFKA_URL": "kafka://127.0.0.1:19092",
    }
    code = (
        "import tests.bus.conftest as b, tests.bus.test_nats as n, tests.conftest as c, "
        "tests.events.test_worker_backends as w\n"
        "print(c.NATS_URL, n.NATS_URL, w.NATS_URL, c.REDIS_URL, w.REDIS_URL, b.KAFKA_URL)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [env["INTERLOCK_TEST_NATS_URL"]] * 3 + [
        env["INTERLOCK_TEST_REDIS_URL"]
    ] * 2 + [env["INTERLOCK_TEST_KAFKA_URL"]]
