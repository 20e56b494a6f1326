"""The ``interlock`` command as a user runs it: real processes, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.api.support import PYTHON_MODEL, write_python_model


def run(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    environment.update({"INTERLOCK_HOME": str(home), **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "interlock", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=home.parent,
        timeout=120,
        check=False,
    )


def test_register_list_show_and_alias(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model = write_python_model(tmp_path / "m")
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"auc": 0.91}')

    first = run(home, "models", "register", "calc", str(model), "--format", "python",
                "--alias", "champion", "--metrics", str(metrics))  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "1"
    second = run(home, "models", "register", "calc", str(model), "--format", "python",
                 "--allow-duplicate")  # fmt: skip
    assert second.stdout.strip() == "2"

    listed = run(home, "models", "list", "--json")
    assert json.loads(listed.stdout) == [
        {
            "name": "calc",
            "versions": [1, 2],
            "latest": 2,
            "aliases": {"champion": 1},
            "created_at": json.loads(listed.stdout)[0]["created_at"],
        }
    ]
    table = run(home, "models", "list")
    assert "calc" in table.stdout and "champion→1" in table.stdout

    moved = run(home, "models", "alias", "calc", "champion", "2")
    assert moved.returncode == 0, moved.stderr
    shown = json.loads(run(home, "models", "show", "calc", "--json").stdout)
    assert shown["aliases"] == {"champion": 2}
    assert shown["details"][0]["metrics"] == {"auc": 0.91}
    assert shown["details"][0]["schema"][1] == {"name": "b", "type": "int"}
    assert "sha256" in run(home, "models", "show", "calc").stdout


def test_show_prints_the_schema_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model = write_python_model(tmp_path / "m")
    colored = write_python_model(
        tmp_path / "v2",
        PYTHON_MODEL.replace(
            '{"name": "c", "type": "float"},',
            '{"name": "c", "type": "float"}, '
            '{"name": "color", "type": "category", "categories": ["red", "blue"]},',
        ),
    )
    assert run(home, "models", "register", "calc", str(model), "--format", "python").returncode == 0
    assert run(home, "models", "register", "calc", str(colored), "--format", "python",
               "--force-schema").returncode == 0  # fmt: skip

    shown = run(home, "models", "show", "calc")

    assert shown.returncode == 0, shown.stderr
    rows = [line.replace("│", " ").split() for line in shown.stdout.splitlines()]
    assert ["1", "a", "float"] in rows
    assert ["2", "b", "int"] in rows
    assert ["3", "c", "float"] in rows
    assert ["4", "color", "category", "red,", "blue"] in rows
    assert shown.stdout.index("schema of version 2") < shown.stdout.index("schema of version 1")


def test_register_says_what_it_does_and_refuses_identical_bytes(tmp_path: Path) -> None:
    home = tmp_path / "home"
    model = write_python_model(tmp_path / "m")

    first = run(home, "models", "register", "calc", str(model), "--format", "python")

    assert first.returncode == 0, first.stderr
    assert first.stdout == "1\n"
    assert first.stderr.splitlines() == [
        "storing artifact…",
        "loading to check…",
        "registered calc v1",
    ]
    again = run(home, "models", "register", "calc", str(model), "--format", "python")
    assert again.returncode == 1
    assert again.stdout == ""
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert errors == [again.stderr.splitlines()[-1]]
    assert errors[0].startswith("error: calc: version 1 already has this artifact (sha256 ")
    assert errors[0].endswith(
        "pass --allow-duplicate (API: allow_duplicate) to register the same bytes again"
    )


def test_a_schema_change_that_breaks_clients_needs_force_schema(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "models", "register", "calc", str(write_python_model(tmp_path / "m")),
        "--format", "python")  # fmt: skip
    fewer = write_python_model(
        tmp_path / "v2", PYTHON_MODEL.replace('{"name": "c", "type": "float"},', "")
    )

    refused = run(home, "models", "register", "calc", str(fewer), "--format", "python")

    assert refused.returncode == 1
    assert refused.stderr.splitlines()[-1] == (
        "error: calc: this schema would break clients of version 1: feature 'c' is gone; "
        "pass --force-schema (API: force_schema) to register it anyway"
    )
    forced = run(home, "models", "register", "calc", str(fewer), "--format", "python",
                 "--force-schema")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == "2\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("models", "show", "nope"), "error: no model named 'nope'"),
        (("models", "alias", "nope", "champion", "1"), "error: no model named 'nope'"),
        (("models", "register", "x", "MISSING.py", "--format", "python"), "does not exist"),
        (("models", "register", "x", "PLACEHOLDER", "--format", "pytorch"), "pytorch"),
        (("models", "register", "x", "PLACEHOLDER", "--format", "python", "--schema", "nope.json"),
         "cannot read schema file"),
        (("models", "register", "x", "PLACEHOLDER", "--format", "sklearn"), "error:"),
    ],
)  # fmt: skip
def test_mistakes_exit_non_zero_with_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    model = write_python_model(tmp_path / "m")
    result = run(tmp_path / "home", *(str(model) if a == "PLACEHOLDER" else a for a in args))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_show_masks_secrets(tmp_path: Path) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text(
        'database_url = "postgresql://u:hunter2@db/x"\n[auth]\nadmin_key = "s3cret"\n'
    )
    result = run(tmp_path / "home", "--config", str(config), "config", "show")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["database_url"] == "postgresql://u:***@db/x"
    assert shown["auth"]["admin_key"] == "********"
    assert "hunter2" not in result.stdout and "s3cret" not in result.stdout


def test_a_broken_config_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "interlock.toml"
    config.write_text("[server]\nport = 'eighty'\n")
    result = run(tmp_path / "home", "--config", str(config), "config", "show")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error: invalid setting server.port")
    assert len(result.stderr.strip().splitlines()) == 1


# Every command that reads the settings, with the arguments it needs to get that far.
_SETTINGS_COMMANDS = [
    ("config", "show"),
    ("models", "register", "calc", "PLACEHOLDER", "--format", "python"),
    ("models", "list"),
    ("models", "show", "calc"),
    ("models", "alias", "calc", "champion", "1"),
    ("traffic", "set", "calc", "1=100"),
    ("traffic", "canary", "calc", "2", "--max-error-rate", "0.1"),
    ("traffic", "show", "calc"),
    ("traffic", "clear", "calc"),
    ("llm", "usage"),
    ("events", "publish", "t", "{}"),
    ("events", "tail", "t"),
    ("worker",),
    ("serve",),
    ("demo", "--no-serve"),
]


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", _SETTINGS_COMMANDS, ids=" ".join)
def test_config_is_read_before_or_after_the_command(
    tmp_path: Path, command: tuple[str, ...], where: str
) -> None:
    """``interlock serve --config x.toml`` is what people type; it reads x.toml."""
    model = write_python_model(tmp_path / "m")
    config = tmp_path / "x.toml"
    config.write_text("[server]\nport = 'eighty'\n")  # read: every command stops here
    args = [str(model) if a == "PLACEHOLDER" else a for a in command]
    flag = ["--config", str(config)]
    result = run(tmp_path / "home", *(flag + args if where == "before" else args + flag))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: invalid setting server.port: Input should be a valid integer, unable to parse "
        "string as an integer"
    ]


def test_the_config_after_the_command_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text("[server]\nport = 7001\n")
    second.write_text("[server]\nport = 7002\n")
    result = run(
        tmp_path / "home", "--config", str(first), "config", "show", "--config", str(second)
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["port"] == 7002
