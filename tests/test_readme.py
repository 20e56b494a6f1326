"""Every fenced block of README.md runs, in the README's order, as a reader would run it.

- ``toml`` blocks load through :func:`interlock.settings.load_settings`;
- ``sh`` blocks run line by line: ``interlock …`` through the real CLI (``python -m
  interlock``) in a fresh directory whose ``.interlock`` home the demo filled, ``curl …``
  with curl against a real server that the test started (``localhost:8000`` and
  ``127.0.0.1:8000`` become its port), ``export`` into the environment of what follows;
  ``interlock serve`` is that server;
- ``python`` blocks run in a process of their own, against the same server.

The LLM gateway of that server is the README's own ``interlock.toml`` block, with each
deployment's ``base_url`` pointed at the fake upstream of tests/llm and its Redis at
the test Redis. A block that cannot run as it is says so in the README, in an HTML
comment just before it: ``<!-- readme-test: skip (the reason) -->``. The skipped blocks
are listed here (:data:`SKIPPED`), so that adding one is a visible decision.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REDIS_URL, LiveServer, require_binary, require_service
from tests.llm.support import fake, upstream
from tests.llm.upstream import FakeUpstream

__all__ = ["fake", "upstream"]  # fixtures

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"

SKIPPED = [
    "make targets: they install and run the whole suite, which CI does itself",
]
"""The reasons of the blocks README.md marks as not run, in the README's order."""

KNOWN_DEFECTS: dict[str, str] = {}
"""Failures of README examples that another change fixes: met, the walk-through goes on
and ends as an xfail naming them; once fixed they no longer occur and it passes. Delete
an entry with its fix."""

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->$")
_LOCAL = re.compile(r"\b(?:localhost|127\.0\.0\.1):8000\b")
_README_REDIS = "redis://127.0.0.1:6379/0"
_EVENTS_DB = 13  # the README's worker example runs on this database of the test Redis


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    code: str
    skip: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        skip = _SKIP.fullmatch(before)
        blocks.append(
            Block(
                line=text.count("\n", 0, match.start()) + 1,
                language=match.group(1),
                code=match.group(2),
                skip=skip.group(1) if skip else None,
            )
        )
    return blocks


def test_every_block_runs_or_says_why_not() -> None:
    blocks = readme_blocks()
    skipped = [b for b in blocks if b.skip is not None]
    print(f"\n{len(skipped)} of {len(blocks)} README blocks are not run:")
    for block in skipped:
        print(f"  {block}: {block.skip}")
    assert {b.language for b in blocks} <= {"sh", "python", "toml"}, [str(b) for b in blocks]
    assert [b.skip for b in skipped] == SKIPPED


@pytest.mark.parametrize(
    "block",
    [b for b in readme_blocks() if b.language == "toml" and b.skip is None],
    ids=str,
)
def test_a_toml_block_loads_as_copied(block: Block, tmp_path: Path) -> None:
    from interlock.settings import load_settings

    config = tmp_path / "interlock.toml"
    config.write_text(block.code, encoding="utf-8")
    load_settings(config)


# -- the walk-through ---------------------------------------------------------------------


class Reader:
    """Runs the README's commands in ``cwd``, as a reader would, against ``server``."""

    def __init__(self, cwd: Path, server: LiveServer, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.server = server
        self.env = env
        self.port = server.url.rsplit(":", 1)[1]
        self.known: list[str] = []  # the KNOWN_DEFECTS met
        self.background: list[subprocess.Popen[str]] = []  # commands run with '&'
        self.published: list[str] = []  # the requestIds of `events publish`
        self.bus_url = f"{REDIS_URL.rsplit('/', 1)[0]}/{_EVENTS_DB}"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.metrics_port = sock.getsockname()[1]

    def local(self, text: str) -> str:
        text = text.replace(_README_REDIS, self.bus_url)
        text = text.replace("--metrics-port 9100", f"--metrics-port {self.metrics_port}")
        return _LOCAL.sub(f"127.0.0.1:{self.port}", text)

    def close(self) -> None:
        for process in self.background:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def run_sh(self, block: Block) -> None:
        for line in _logical_lines(block.code):
            argv = shlex.split(self.local(line), comments=True)
            if not argv:
                continue
            where = f"{block}: {line.strip()}"
            try:
                self._command(argv, where)
            except AssertionError as exc:
                known = [why for text, why in KNOWN_DEFECTS.items() if text in str(exc)]
                if not known:
                    raise
                self.known.append(f"{where.splitlines()[0]}: {known[0]}")

    def _command(self, argv: list[str], where: str) -> None:
        if argv[-1] == "&":
            assert argv[0] == "interlock", f"{where}: only interlock runs in the background"
            self.background.append(
                subprocess.Popen(
                    [sys.executable, "-m", "interlock", *argv[1:-1]],
                    cwd=self.cwd,
                    env=dict(self.env),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        elif argv[0] == "export":
            name, _, value = argv[1].partition("=")
            self.env[name] = value
        elif argv[:2] == ["interlock", "serve"]:
            pass  # the test's server is that server
        elif argv[:3] == ["interlock", "events", "publish"]:
            self.published.append(json.loads(argv[4])["requestId"])
            self._check([sys.executable, "-m", "interlock", *argv[1:]], where)
        elif argv[:3] == ["interlock", "events", "tail"]:
            self._tail_until_answered(argv, where)
        elif argv[0] == "interlock":
            self._check([sys.executable, "-m", "interlock", *argv[1:]], where)
        elif argv[0] == "curl":
            self._curl(argv, where)
        else:
            raise AssertionError(f"{where}: the README test cannot run {argv[0]!r}")

    def _tail_until_answered(self, argv: list[str], where: str) -> None:
        """Tail as a reader would, again until the answer to the last request published
        is the newest (the worker in the background may still be starting)."""
        wanted = f'"requestId":"{self.published[-1]}"'
        deadline = time.monotonic() + 120
        while True:
            out = self._check([sys.executable, "-m", "interlock", *argv[1:]], where).stdout
            if wanted in out:
                answer = json.loads(out.strip().splitlines()[-1])
                assert answer["model"] == "fraud" and 0 <= answer["result"] <= 1, out
                return
            for process in self.background:
                assert process.poll() is None, f"{where}: the background command exited"
            assert time.monotonic() < deadline, f"{where}: no answer to {wanted}: {out!r}"
            time.sleep(0.5)

    def run_python(self, block: Block) -> None:
        self._check([sys.executable, "-c", self.local(block.code)], str(block))

    def _curl(self, argv: list[str], where: str) -> None:
        curl = require_binary("curl")
        out = self.cwd / "curl-body"
        result = self._check(
            [curl, *argv[1:], "-sS", "-o", str(out), "-w", "%{http_code}", "--max-time", "60"],
            where,
        )
        status = int(result.stdout.strip() or 0)
        body = out.read_text(errors="replace") if out.exists() else ""
        assert 200 <= status < 300, f"{where}: HTTP {status}: {body}"

    def _check(self, argv: list[str], where: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            argv,
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, (
            f"{where}: exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
        return result


def _logical_lines(code: str) -> Iterator[str]:
    """The commands of a shell block: lines ending in a backslash, or inside an open quote,
    go on on the next line, as in a shell."""
    pending = ""
    for raw in code.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        pending += raw
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote is open
            pending += "\n"
            continue
        yield pending
        pending = ""
    assert not pending, f"unfinished command in a README block: {pending}"


def _readme_llm_config(fake: FakeUpstream) -> str:
    """The README's ``interlock.toml`` with its deployments at the fake upstream."""
    block = next(b for b in readme_blocks() if b.language == "toml" and "[[llm." in b.code)
    first, *sections = block.code.split("[[llm.deployments]]")
    for i, section in enumerate(sections):
        name = tomllib.loads(section.split("\n[", 1)[0])["name"]
        sections[i] = re.sub(
            r'^base_url = "[^"]*"', f'base_url = "{fake.base_url(name)}"', section, flags=re.M
        )
    return "[[llm.deployments]]".join([first, *sections]).replace(_README_REDIS, REDIS_URL)


@pytest.fixture
def reader(tmp_path: Path, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> Iterator[Reader]:
    require_service("Redis", REDIS_URL)
    from interlock.settings import load_settings

    config = tmp_path / "interlock.toml"
    config.write_text(_readme_llm_config(fake), encoding="utf-8")
    secrets = {"OPENAI_API_KEY": "sk-readme", "AZURE_OPENAI_API_KEY": "az-readme"}
    secrets["DASHBOARDS_KEY"] = "dash-readme"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")} | secrets
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)

    # `make run`: the demo trains and registers fraud version 1 under .interlock.
    demo = subprocess.run(
        [sys.executable, "-m", "interlock", "demo", "--no-serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    settings = load_settings(config, home=tmp_path / ".interlock")
    server = LiveServer(settings).start()
    reader = Reader(tmp_path, server, env)
    import redis  # the worker example's database starts empty: no answers of earlier runs

    with redis.Redis.from_url(reader.bus_url) as client:
        client.flushdb()
    try:
        yield reader
    finally:
        reader.close()
        server.stop()


@pytest.mark.timeout(900)
def test_the_readme_runs_top_to_bottom(reader: Reader, fake: FakeUpstream) -> None:
    ran: list[str] = []
    for block in readme_blocks():
        if block.skip is not None or block.language == "toml":
            continue
        if block.language == "sh":
            reader.run_sh(block)
        else:
            reader.run_python(block)
        ran.append(str(block))
    print(f"\nran {len(ran)} README blocks: {', '.join(ran)}")
    assert fake.requests("primary"), "the LLM examples never reached the upstream"
    if reader.known:
        pytest.xfail("; ".join(reader.known))
