"""One loader per model format, imported only when that format is used.

Each format's third-party library (lightgbm, xgboost, onnxruntime, skops) is imported
inside its own module, so a deployment installs only the extras it needs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from interlock._core.schema import FeatureSchema
from interlock.errors import ModelFormatError
from interlock.runtime.base import Inspection, Loader, ModelFormat, Predictor

__all__ = ["get_loader", "inspect_artifact", "load_predictor"]

_MODULES = {
    ModelFormat.LIGHTGBM: ("interlock.runtime.loaders.lightgbm", "lightgbm"),
    ModelFormat.XGBOOST: ("interlock.runtime.loaders.xgboost", "xgboost"),
    ModelFormat.ONNX: ("interlock.runtime.loaders.onnx", "onnx"),
    ModelFormat.SKLEARN: ("interlock.runtime.loaders.sklearn", "sklearn"),
    ModelFormat.PYTHON: ("interlock.runtime.loaders.python", None),
}


def get_loader(fmt: ModelFormat | str) -> Loader:
    try:
        fmt = ModelFormat(fmt)
    except ValueError:
        allowed = ", ".join(f.value for f in ModelFormat)
        raise ModelFormatError(f"unknown format {fmt!r}; use one of: {allowed}") from None
    module_name, extra = _MODULES[fmt]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f" (pip install 'interlock[{extra}]')" if extra else ""
        raise ModelFormatError(f"format {fmt.value} is not installed{hint}: {exc}") from exc
    loader: Loader = module.LOADER
    return loader


def inspect_artifact(
    fmt: ModelFormat | str,
    path: Path,
    *,
    trusted: bool = False,
    schema: FeatureSchema | None = None,
) -> Inspection:
    """Load an artifact once and read what its format carries; blocking.

    With ``schema``, the artifact is loaded instead as serving will load it, with that
    schema, and closed again: :class:`ModelFormatError` when the model does not take it
    (another feature count, or probe rows of that width the model refuses). The
    inspection returned then holds just that schema. A ``python`` model reads its rows
    by name, so there is nothing to check (and its code is not run twice).
    """
    loader = get_loader(fmt)
    if schema is None:
        return loader.inspect(path, trusted=trusted)
    if loader.format is not ModelFormat.PYTHON:
        loader.load(path, schema=schema, threads=1, trusted=trusted).close()
    return Inspection(schema=schema)


def load_predictor(
    fmt: ModelFormat | str,
    path: Path,
    *,
    schema: FeatureSchema | None,
    threads: int = 1,
    trusted: bool = False,
) -> Predictor:
    """A ready predictor for an artifact; blocking."""
    return get_loader(fmt).load(path, schema=schema, threads=threads, trusted=trusted)
