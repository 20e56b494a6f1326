"""The settings tree: precedence, defaults, masking and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from interlock.errors import ConfigError
from interlock.settings import load_settings, mask_url


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("INTERLOCK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_are_the_embedded_deployment() -> None:
    settings = load_settings()
    assert settings.effective_database_url == "sqlite:///.interlock/interlock.db"
    assert settings.effective_artifacts_dir == Path(".interlock/artifacts")
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 8000)
    assert settings.auth.admin_key is None


def test_argument_beats_environment_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "custom.toml"
    config.write_text(
        "home = '/srv/il'\n[server]\nport = 7000\nhost = '0.0.0.0'\n[serving]\nmax_batch_size = 8\n"
    )
    monkeypatch.setenv("INTERLOCK_SERVER__PORT", "7100")
    monkeypatch.setenv("INTERLOCK_SERVING__MAX_BATCH_SIZE", "16")
    settings = load_settings(config, serving={"max_batch_size": 32})
    assert settings.home == Path("/srv/il")  # file over default
    assert settings.server.host == "0.0.0.0"  # file, untouched by the port override
    assert settings.server.port == 7100  # environment over file
    assert settings.serving.max_batch_size == 32  # argument over environment
    assert settings.effective_database_url == "sqlite:////srv/il/interlock.db"


def test_config_path_from_the_environment_and_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "interlock.toml").write_text("[server]\nport = 7001\n")
    assert load_settings().server.port == 7001
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 7002\n")
    monkeypatch.setenv("INTERLOCK_CONFIG", str(other))
    assert load_settings().server.port == 7002


def test_secrets_are_masked_when_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INTERLOCK_DATABASE_URL", "postgresql://app:hunter2@db:5432/il")
    monkeypatch.setenv("INTERLOCK_AUTH__ADMIN_KEY", "admin-secret")
    monkeypatch.setenv("INTERLOCK_AUTH__CLIENT_KEYS", '["client-secret"]')
    shown = load_settings().masked()
    text = repr(shown)
    assert "hunter2" not in text and "admin-secret" not in text and "client-secret" not in text
    assert shown["database_url"] == "postgresql://app:***@db:5432/il"
    assert shown["auth"] == {
        "admin_key": "********",
        "client_keys": ["********"],
        "allow_code_uploads": False,
    }


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[server]\nport = 'x'\n", "invalid setting server.port"),
        ("[server]\nprot = 1\n", "invalid setting server.prot"),
        ("[server\n", "cannot read config file"),
    ],
)
def test_bad_config_files_say_what_to_fix(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(path)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_mask_url_leaves_passwordless_urls_alone() -> None:
    assert mask_url("sqlite:///x.db") == "sqlite:///x.db"
    assert mask_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
