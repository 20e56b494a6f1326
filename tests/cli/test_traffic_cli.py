"""``interlock traffic``: in process against the sub-app, and as a user runs it.

The in-process tests invoke the sub-app with the context object the root command sets,
on SQLite and PostgreSQL. The process tests run the real entry point; until
``cli/main.py`` adds the sub-app, the launcher adds it the way main.py will.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from interlock.cli import traffic
from interlock.cli._context import CliState
from interlock.errors import ModelNotFoundError, TrafficError
from interlock.serving.nodes import NodeIdentity
from interlock.serving.traffic import CanaryAction, CanaryDecision
from interlock.settings import Settings, load_settings
from tests.api.support import register, set_alias, write_python_model
from tests.cli.test_cli import run


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """Settings for a home with ``fraud`` versions 1–3 (champion 1) registered."""
    found = load_settings(None, home=tmp_path / "home", database_url=database_url)
    model = write_python_model(tmp_path / "m")
    for _ in range(3):
        register(found, "fraud", model, "python", allow_duplicate=True)
    set_alias(found, "fraud", "champion", 1)
    return found


@pytest.fixture
def cli(settings: Settings) -> Callable[..., Result]:
    """Invoke ``interlock traffic …`` in process with ``settings`` in the environment."""
    runner = CliRunner()
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INTERLOCK_")}
    env.update(INTERLOCK_HOME=str(settings.home), INTERLOCK_DATABASE_URL=settings.database_url)

    def invoke(*args: str) -> Result:
        return runner.invoke(traffic.app, list(args), obj=CliState(), env=env)

    return invoke


def rollback(settings: Settings, reason: str) -> None:
    async def run() -> None:
        async with traffic.open_policies(settings) as store:
            policy = await store.get("fraud")
            assert policy is not None
            decision = CanaryDecision(CanaryAction.ROLLBACK, reason)
            assert await store.update_canary("fraud", decision, policy.revision) is not None

    asyncio.run(run())


def test_set_show_canary_clear(cli: Callable[..., Result], settings: Settings) -> None:
    result = cli("set", "fraud", "1=80", "2=20", "--fallback-static", '{"p": 0}')
    assert result.exit_code == 0, result.output
    assert result.output == "fraud: 1=80% 2=20%, static fallback (revision 1)\n"

    shown = json.loads(cli("show", "fraud", "--json").output)
    assert shown["policy"]["weights"] == {"1": 80, "2": 20}
    assert shown["policy"]["fallback"] == {"static": {"p": 0}}
    assert shown["effective_weights"] == {"1": 80.0, "2": 20.0}

    result = cli("set", "fraud", "1=100", "--shadow", "3", "--no-fallback")
    assert result.output == "fraud: 1=100%, shadow 3 (revision 2)\n"

    guard = ("--max-error-rate", "0.05", "--max-p99-ms", "250", "--min-requests", "50")
    result = cli("canary", "fraud", "2", "--weight", "10", "--interval", "5m", *guard)
    assert result.exit_code == 0, result.output
    assert result.output == "fraud: 1=90% 2=10%, shadow 3 (revision 3)\n"
    plan = json.loads(cli("show", "fraud", "--json").output)["policy"]["canary"]
    assert plan["steps"] == [10, 25, 50, 100]
    assert (plan["interval_s"], plan["min_requests"], plan["stable"]) == (300.0, 50, 1)

    why = "canary p99 812 ms > max 250 ms"
    rollback(settings, why)
    text = cli("show", "fraud").output
    assert "revision 4" in text
    assert "canary: version 2 against 1, rolled_back" in text
    assert "last rollback (" in text and why in text
    assert "canary_rolled_back" in text and "canary_started" in text
    assert "shadow: 3" in text

    result = cli("clear", "fraud")
    assert result.output == "fraud: policy cleared\n"
    text = cli("show", "fraud").output
    assert "no traffic policy" in text
    assert why in text  # the last rollback outlives the policy
    assert cli("clear", "fraud").output == "fraud: had no traffic policy\n"


def test_canary_steps_and_durations(cli: Callable[..., Result]) -> None:
    result = cli(
        "canary", "fraud", "3", "--steps", "5, 50,100", "--interval", "500ms", "--unguarded"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(cli("show", "fraud", "--json").output)["policy"]["canary"]
    assert (plan["steps"], plan["interval_s"], plan["version"]) == ([5, 50, 100], 0.5, 3)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("set", "fraud", "1:80"), TrafficError, "'1:80' is not VERSION=WEIGHT"),
        (("set", "fraud", "1=80", "1=20"), TrafficError, "version 1 is given twice"),
        (("set", "fraud", "1=50", "9=50"), TrafficError, "version 9 does not exist"),
        (("set", "fraud", "1=-5", "2=5"), TrafficError, "weight for version 1 must be ≥ 0"),
        (("set", "fraud", "1=0"), TrafficError, "at least one version needs a weight above 0"),
        (("set", "fraud", "1=1", "--fallback-static", "{"), TrafficError, "not valid JSON"),
        (("canary", "fraud", "2", "--unguarded", "--interval", "5x"), TrafficError,
         "'5x' is not a duration"),
        (("canary", "fraud", "2", "--unguarded", "--steps", "5,a"), TrafficError,
         "not a list of percents"),
        (("canary", "fraud", "2", "--unguarded", "--weight", "10", "--steps", "5,50"),
         TrafficError, "weight 10 must be the first step"),
        (("canary", "fraud", "1", "--unguarded"), TrafficError,
         "version 1 already takes the most traffic"),
        (("canary", "fraud", "2"), TrafficError,
         "fraud: a canary needs a guard: give --max-error-rate or --max-p99-ms, or --unguarded"),
        (("set", "fraud", "1=1", "--shadow", "2", "--no-shadow"), TrafficError,
         "either --shadow or --no-shadow"),
        (("show", "nope"), ModelNotFoundError, "no model named 'nope'"),
    ],
)  # fmt: skip
def test_mistakes_raise_one_clear_error(
    cli: Callable[..., Result], args: tuple[str, ...], error: type[Exception], message: str
) -> None:
    result = cli(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, error), result.output
    assert message in str(result.exception)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60.0), ("5m", 300.0), ("500ms", 0.5), ("1h", 3600.0), ("90", 90.0), ("1.5s", 1.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert traffic.parse_duration(text) == seconds


# -- as a user runs it -----------------------------------------------------------------


def test_the_command_end_to_end(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model = write_python_model(tmp_path / "m")
    settings: Any = load_settings(None, home=home)
    register(settings, "fraud", model, "python")
    register(settings, "fraud", model, "python", allow_duplicate=True)

    done = run(home, "traffic", "set", "fraud", "1=80", "2=20")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "fraud: 1=80% 2=20% (revision 1)\n"
    shown = run(home, "traffic", "show", "fraud", "--json")
    assert json.loads(shown.stdout)["effective_weights"] == {"1": 80.0, "2": 20.0}

    bad = run(home, "traffic", "set", "fraud", "1=80", "7=20")
    assert bad.returncode == 1
    assert bad.stderr == "error: fraud: version 7 does not exist (versions: 1, 2)\n"

    usage = run(home, "traffic", "canary", "fraud", "2", "--weight", "500")
    assert usage.returncode == 2
    assert usage.stderr.startswith("error: ") and "Traceback" not in usage.stderr


# -- issue 11: what is accepted can serve; what is shown is applied ----------------------

BROKEN = """
class Model:
    features = ["x"]

    def predict(self, rows):
        raise RuntimeError("this version cannot answer")
"""


def test_a_version_that_cannot_load_is_refused_and_blocks_nothing(
    cli: Callable[..., Result], settings: Settings, tmp_path: Path
) -> None:
    register(
        settings,
        "fraud",
        write_python_model(tmp_path / "broken", BROKEN),
        "python",
        force_schema=True,
    )
    result = cli("canary", "fraud", "4", "--max-error-rate", "0.05")
    assert result.exit_code != 0
    assert isinstance(result.exception, TrafficError), result.output
    message = str(result.exception)
    assert message.startswith("fraud: version 4 cannot serve, change refused: ")
    assert "this version cannot answer" in message and "\n" not in message
    shown = json.loads(cli("show", "fraud", "--json").output)
    assert shown["policy"] is None  # nothing was written: no canary stuck at step 1

    refused = cli("set", "fraud", "1=50", "4=50")
    assert isinstance(refused.exception, TrafficError) and "version 4" in str(refused.exception)
    refused = cli("set", "fraud", "1=100", "--shadow", "4")
    assert isinstance(refused.exception, TrafficError) and "version 4" in str(refused.exception)
    # The next canary starts: the refused one left nothing "still running".
    result = cli("canary", "fraud", "2", "--max-error-rate", "0.05")
    assert result.exit_code == 0, result.output


def test_set_keeps_the_shadow_and_fallback_unless_replaced_or_removed(
    cli: Callable[..., Result],
) -> None:
    cli("set", "fraud", "1=100", "--shadow", "3", "--fallback-static", "0.5")
    result = cli("set", "fraud", "1=80", "2=20")
    assert result.output == "fraud: 1=80% 2=20%, shadow 3, static fallback (revision 2)\n"
    policy = json.loads(cli("show", "fraud", "--json").output)["policy"]
    assert (policy["shadow"], policy["fallback"]) == (3, {"static": 0.5})
    result = cli("set", "fraud", "1=100", "--no-shadow", "--fallback-static", "1")
    assert result.output == "fraud: 1=100%, static fallback (revision 3)\n"
    result = cli("set", "fraud", "1=100", "--no-fallback")
    assert result.output == "fraud: 1=100% (revision 4)\n"


def test_show_lists_the_nodes_and_says_when_none_applies_the_policy(
    cli: Callable[..., Result], settings: Settings
) -> None:
    assert cli("set", "fraud", "1=80", "2=20").exit_code == 0
    text = cli("show", "fraud").output
    assert "pending: no node applies revision 1" in text
    assert "nodes: none seen in the last 15 s" in text

    async def beat(revision: int) -> None:
        async with traffic.open_policies(settings) as store:
            who = NodeIdentity("node-a", "host-a", 4242, datetime.now(UTC))
            await store.beat(who, {"fraud": revision})

    asyncio.run(beat(1))  # what a serving node writes after applying revision 1
    text = cli("show", "fraud").output
    assert "pending" not in text
    assert "node-a" in text and "host-a" in text and "revision 1" in text
    shown = json.loads(cli("show", "fraud", "--json").output)
    assert [(n["node"], n["revision"]) for n in shown["nodes"]] == [("node-a", 1)]

    assert cli("set", "fraud", "1=50", "2=50").exit_code == 0
    text = cli("show", "fraud").output
    assert "pending: no node applies revision 2" in text
    assert "revision 1 (stale)" in text


def test_a_refused_change_is_one_line_from_the_command(tmp_path: Path) -> None:
    home = tmp_path / "home"
    settings: Any = load_settings(None, home=home)
    register(settings, "fraud", write_python_model(tmp_path / "m"), "python")
    register(
        settings,
        "fraud",
        write_python_model(tmp_path / "broken", BROKEN),
        "python",
        force_schema=True,
    )
    done = run(home, "traffic", "canary", "fraud", "2", "--max-p99-ms", "50")
    assert done.returncode == 1
    assert done.stderr.startswith("error: fraud: version 2 cannot serve, change refused: ")
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    unguarded = run(home, "traffic", "canary", "fraud", "2")
    assert unguarded.returncode == 1
    assert unguarded.stderr == (
        "error: fraud: a canary needs a guard: give --max-error-rate or --max-p99-ms,"
        " or --unguarded to let it promote on time alone\n"
    )
