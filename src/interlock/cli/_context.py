"""What every subcommand shares: the config file chosen on the root command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from interlock.settings import Settings, load_settings

__all__ = ["CliState", "settings_from"]


@dataclass(frozen=True, slots=True)
class CliState:
    config: Path | None = None


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    """The settings tree: CLI options over environment over config file over defaults."""
    state = ctx.find_root().obj
    config = state.config if isinstance(state, CliState) else None
    return load_settings(config, **overrides)
