"""The ``alembic`` command as a developer runs it: the database comes from the settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from interlock.store.db import MIGRATIONS_DIR


def _alembic(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url)
    return config


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("INTERLOCK_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def _tables(path: Path) -> set[str]:
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_alembic_upgrades_the_database_of_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("INTERLOCK_HOME", str(home))  # no INTERLOCK_DATABASE_URL: the default
    command.upgrade(_alembic(), "head")
    assert {"alembic_version", "models"} <= _tables(home / "interlock.db")


def test_sqlalchemy_url_of_the_alembic_config_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("INTERLOCK_DATABASE_URL", f"sqlite:///{tmp_path / 'settings.db'}")
    command.upgrade(_alembic(f"sqlite:///{tmp_path / 'explicit.db'}"), "head")
    assert "alembic_version" in _tables(tmp_path / "explicit.db")
    assert not (tmp_path / "settings.db").exists()
