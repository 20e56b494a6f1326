"""Helpers for the HTTP tests: register models the way a user does, before serving."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

from interlock.app import open_registry
from interlock.registry import ModelVersion

PYTHON_MODEL = """
class Model:
    features = [
        {"name": "a", "type": "float"},
        {"name": "b", "type": "int"},
        {"name": "c", "type": "float"},
    ]

    def predict(self, rows):
        return [r["a"] + 2 * r["b"] - r["c"] for r in rows]
"""


def write_python_model(directory: Path, body: str = PYTHON_MODEL, name: str = "model.py") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def register(settings: Any, name: str, path: Path, fmt: str, **kwargs: Any) -> ModelVersion:
    """Register a version through the real registry (what ``interlock models register`` does)."""

    async def run() -> ModelVersion:
        async with open_registry(settings) as registry:
            return await registry.register(name, path, fmt, **kwargs)

    return asyncio.run(run())


def set_alias(settings: Any, name: str, alias: str, version: int) -> None:
    async def run() -> None:
        async with open_registry(settings) as registry:
            await registry.set_alias(name, alias, version)

    asyncio.run(run())
