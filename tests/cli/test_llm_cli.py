"""``interlock llm usage``: in process on SQLite and PostgreSQL, and as a user runs it."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from interlock.cli import llm
from interlock.cli._context import CliState
from interlock.llm.usage import UsageRecord, UsageRecorder
from interlock.settings import Settings, load_settings
from interlock.store.db import Database
from tests.cli.test_cli import run

NOW = datetime.now(UTC)

CALLS = [
    UsageRecord(NOW - timedelta(hours=2), "acme", "gpt-4o", "openai-east", 1200, 300, 0.0021),
    UsageRecord(NOW - timedelta(hours=1), None, "gpt-4o", None, 1200, 300, 0.0,
                cache_hit=True, saved_cost_usd=0.0021),
    UsageRecord(NOW - timedelta(days=3), "globex", "embed-small", "openai-embed", 5000, 0,
                0.0001, kind="embeddings"),
    UsageRecord(NOW - timedelta(days=3), "globex", "gpt-4o", "openai-east", 0, 0, 0.0,
                status="error"),
]  # fmt: skip


def write_usage(database_url: str, calls: list[UsageRecord]) -> None:
    async def main() -> None:
        async with Database(database_url) as database:
            await asyncio.to_thread(database.migrate)
            async with UsageRecorder(database) as recorder:
                for record in calls:
                    recorder.record(record)

    asyncio.run(main())


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    found = load_settings(None, home=tmp_path / "home", database_url=database_url)
    write_usage(found.effective_database_url, CALLS)
    return found


@pytest.fixture
def cli(settings: Settings) -> Callable[..., Result]:
    """Invoke ``interlock llm …`` in process with ``settings`` in the environment."""
    runner = CliRunner()
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INTERLOCK_")}
    env.update(INTERLOCK_HOME=str(settings.home), INTERLOCK_DATABASE_URL=settings.database_url)

    def invoke(*args: str) -> Result:
        return runner.invoke(llm.app, list(args), obj=CliState(), env=env)

    return invoke


def summary(cli: Callable[..., Result], *args: str) -> dict[str, Any]:
    result = cli("usage", "--json", *args)
    assert result.exit_code == 0, result.output
    parsed: dict[str, Any] = json.loads(result.output)
    return parsed


def test_usage_json_is_the_summary(cli: Callable[..., Result]) -> None:
    everything = summary(cli)
    assert {k: v for k, v in everything.items() if not k.startswith("by_")} == {
        "requests": 4,
        "prompt_tokens": 7400,
        "completion_tokens": 600,
        "total_tokens": 8000,
        "total_cost_usd": 0.0022,
        "cache_hits": 1,
        "saved_cost_usd": 0.0021,
        "errors": 1,
        "since": None,
        "until": None,
    }
    assert {name: part["requests"] for name, part in everything["by_tenant"].items()} == {
        "(open)": 1,
        "acme": 1,
        "globex": 2,
    }
    assert everything["by_model"]["embed-small"]["total_cost_usd"] == 0.0001
    assert everything["by_deployment"]["(none)"]["cache_hits"] == 1


def test_usage_filters(cli: Callable[..., Result]) -> None:
    recent = summary(cli, "--since", "24h")
    assert (recent["requests"], recent["total_cost_usd"]) == (2, 0.0021)
    since = datetime.fromisoformat(recent["since"])
    assert timedelta(hours=23) < NOW - since < timedelta(hours=25)

    older = summary(cli, "--until", "1d")
    assert (older["requests"], list(older["by_tenant"])) == (2, ["globex"])
    dated = summary(cli, "--since", (NOW - timedelta(days=10)).date().isoformat(), "--until", "2d")
    assert dated["requests"] == 2

    assert summary(cli, "--tenant", "globex", "--model", "gpt-4o")["errors"] == 1
    assert summary(cli, "--tenant", "(open)")["saved_cost_usd"] == 0.0021
    assert summary(cli, "--model", "nope")["requests"] == 0


def test_usage_prints_tables(cli: Callable[..., Result]) -> None:
    result = cli("usage")
    assert result.exit_code == 0, result.output
    text = result.output
    assert "LLM usage from the start to now" in text
    for shown in ("totals", "by tenant", "by model", "by deployment", "acme", "globex"):
        assert shown in text
    assert "(open)" in text and "(none)" in text
    assert "0.0022" in text and "7,400" in text


def test_a_bad_since_names_the_option(cli: Callable[..., Result]) -> None:
    result = cli("usage", "--since", "yesterday")
    assert result.exit_code == 2
    assert "Invalid value for '--since'" in result.output
    assert "'yesterday' is not a date" in result.output


# -- as a user runs it -----------------------------------------------------------------


def test_the_command_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings = load_settings(None, home=home)
    write_usage(settings.effective_database_url, CALLS)

    done = run(home, "llm", "usage", "--json", "--tenant", "acme")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["requests"], shown["total_cost_usd"]) == (1, 0.0021)

    bad = run(home, "llm", "usage", "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: Invalid value for '--since': 'yesterday' is not a date")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
