"""``make run`` end to end: a fresh home, the demo trains, serves, and its curl example works."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import _free_port


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], list[str], int]]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "interlock", "demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # read until the server says it is up
            lines.append(line)
            if "Application startup complete" in line or "interlock is serving" in line:
                break
        yield proc, lines, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_make_run_trains_registers_and_serves_the_fraud_model(
    demo: tuple[subprocess.Popen[str], list[str], int], tmp_path: Path
) -> None:
    proc, lines, port = demo
    text = "".join(lines)
    assert proc.poll() is None, text
    assert "Registered fraud version 1 as champion" in text
    curl = next(line.strip() for line in lines if line.strip().startswith("curl "))
    argv = shlex.split(curl)
    url = argv[2]
    body = argv[argv.index("-d") + 1]
    assert url == f"http://127.0.0.1:{port}/v1/models/fraud:predict"

    response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "fraud" and answer["model_version"] == "1"
    assert 0.0 <= answer["predictions"][0] <= 1.0
    # The embedded state lives in .interlock under the working directory.
    assert (tmp_path / ".interlock" / "interlock.db").is_file()
    assert re.search(r"ROC AUC 0\.\d+", text)
