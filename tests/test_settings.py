"""The settings tree: precedence, defaults, masking and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from interlock.errors import ConfigError
from interlock.settings import LLMDeployment, LLMSettings, LLMTenant, load_settings, mask_url


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


def test_interlock_bus_url_is_bus_url_for_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Argument over INTERLOCK_BUS_URL over INTERLOCK_BUS__URL over the file."""
    config = tmp_path / "bus.toml"
    config.write_text("[bus]\nurl = 'nats://file:4222'\ngroup = 'from-file'\n")
    assert load_settings(config).bus.url == "nats://file:4222"
    monkeypatch.setenv("INTERLOCK_BUS__URL", "kafka://nested:9092")
    assert load_settings(config).bus.url == "kafka://nested:9092"
    monkeypatch.setenv("INTERLOCK_BUS_URL", "redis://short:6379/0")
    settings = load_settings(config)
    assert (settings.bus.url, settings.bus.group) == ("redis://short:6379/0", "from-file")
    assert load_settings(config, bus={"url": "memory://"}).bus.url == "memory://"


def test_llm_keys_come_from_the_variables_the_settings_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_UPSTREAM_KEY", " sk-upstream\n")
    monkeypatch.setenv("TEST_TENANT_KEY", "tenant-key")
    llm = LLMSettings(
        deployments=[
            LLMDeployment(
                name="d1", base_url="http://u/v1", model="m", api_key_env="TEST_UPSTREAM_KEY"
            ),
            LLMDeployment(name="d2", base_url="http://u/v1", model="m"),
        ],
        tenants=[LLMTenant(name="dash", key_env="TEST_TENANT_KEY")],
    )
    key = llm.deployments[0].api_key()
    assert key is not None and key.get_secret_value() == "sk-upstream"
    assert "sk-upstream" not in repr(key)
    assert llm.deployments[1].api_key() is None
    assert llm.tenants[0].key().get_secret_value() == "tenant-key"


def test_a_missing_llm_key_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_NO_KEY", raising=False)
    monkeypatch.setenv("TEST_EMPTY_KEY", "  ")
    for variable in ("TEST_NO_KEY", "TEST_EMPTY_KEY"):
        deployment = LLMDeployment(
            name="d1", base_url="http://127.0.0.1:1/v1", model="m", api_key_env=variable
        )
        with pytest.raises(ConfigError, match=f"'d1' reads its key from \\${variable}"):
            deployment.api_key()
    with pytest.raises(ConfigError, match="tenant 'dash': the variable TEST_NO_KEY"):
        LLMTenant(name="dash", key_env="TEST_NO_KEY").key()
