"""``interlock serve`` as a real process, for what only the command does (its startup lines)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.conftest import _free_port

READY = "interlock is serving"


def serve_until_ready(home: Path, env: dict[str, str], timeout_s: float = 60.0) -> list[str]:
    """Start ``interlock serve``, wait for it to serve, stop it; return its log lines."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    clean.update(env, INTERLOCK_HOME=str(home), INTERLOCK_LOG__JSON_LINES="true")
    command = [sys.executable, "-m", "interlock", "serve", "--port", str(_free_port())]
    process = subprocess.Popen(
        command, env=clean, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=timeout_s)
            if line is None:
                raise AssertionError(f"interlock serve ended before serving: {seen}")
            seen.append(line)
            if READY in line:
                return seen
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
