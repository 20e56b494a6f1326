"""What every subcommand shares: the config file, given before or after the command.

``interlock --config x.toml serve`` and ``interlock serve --config x.toml`` are the same;
given in both places, the one after the command wins.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from interlock.settings import Settings, load_settings

__all__ = ["CONFIG_HELP", "CliState", "ConfigOption", "settings_from", "share_the_gil"]

CONFIG_HELP = "interlock.toml to read (else INTERLOCK_CONFIG, else ./interlock.toml)."
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help=CONFIG_HELP)]


@dataclass(frozen=True, slots=True)
class CliState:
    config: Path | None = None


def settings_from(ctx: typer.Context, config: Path | None = None, **overrides: Any) -> Settings:
    """The settings tree: CLI options over environment over config file over defaults.

    ``config`` is the command's own ``--config``; without it, the root command's.
    """
    if config is None:
        state = ctx.find_root().obj
        config = state.config if isinstance(state, CliState) else None
    return load_settings(config, **overrides)


def share_the_gil(settings: Settings) -> None:
    """How long a thread may keep the GIL while another waits for it, for this process.

    The event loop and the model threads take turns: with CPython's 5 ms, a model thread
    back from a prediction may wait up to 5 ms for the loop to let go of the GIL (and the
    loop for it), on every batch. At 1 ms, ``bench/serving.py``'s 64-row requests gave
    4-83% more rows/s (V1 JSON) and 12-29% more (V2 binary) in three interleaved pairs of
    runs; single rows and ``bench/events.py`` did not move beyond their noise.
    """
    sys.setswitchinterval(settings.serving.gil_switch_interval_ms / 1000.0)
