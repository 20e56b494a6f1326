"""The ``python`` format: a ``.py`` file that defines ``class Model``.

The class is built with no arguments and must have
``predict(self, rows: list[dict]) -> list`` returning one result per row. It may declare
its features as a class attribute ``features``: a list of names (all ``float``) or of
schema dicts (``{"name": ..., "type": ...}``). Use it for rules, custom pre- and
post-processing, and tests. The file runs as code: register only files you trust.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from interlock._core.schema import Feature, FeatureSchema
from interlock.errors import ModelFormatError
from interlock.runtime.base import Inspection, ModelFormat, Predictor
from interlock.runtime.loaders._messages import library_message

__all__ = ["LOADER", "PythonLoader", "PythonPredictor"]

_counter = itertools.count()


def _instantiate(path: Path) -> Any:
    if path.suffix != ".py":
        raise ModelFormatError(f"a python model is a .py file, got {path.name}")
    name = f"interlock_user_model_{next(_counter)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    try:
        # Compiled here rather than imported, so no __pycache__ lands in the artifact store.
        code = compile(path.read_bytes(), str(path), "exec")
        exec(code, module.__dict__)  # noqa: S102 - running the registered model is the point
    except Exception as exc:
        raise ModelFormatError(
            f"{path.name} failed to import: {type(exc).__name__}: {library_message(exc, path)}"
        ) from exc
    cls = getattr(module, "Model", None)
    if not isinstance(cls, type) or not callable(getattr(cls, "predict", None)):
        raise ModelFormatError(f"{path.name} must define class Model with a predict(rows) method")
    try:
        return cls()
    except Exception as exc:
        raise ModelFormatError(
            f"{path.name}: Model() failed: {type(exc).__name__}: {library_message(exc, path)}"
        ) from exc


def _declared_schema(model: Any) -> FeatureSchema | None:
    declared = getattr(model, "features", None)
    if declared is None:
        return None
    try:
        return FeatureSchema.of(
            Feature(name=item) if isinstance(item, str) else Feature.from_dict(item)
            for item in declared
        )
    except (TypeError, ValueError) as exc:
        raise ModelFormatError(f"Model.features is not a valid schema: {exc}") from exc


class PythonPredictor:
    takes_rows = True
    accepts_missing = True

    def __init__(self, model: Any) -> None:
        self._model = model

    def predict(self, batch: Any) -> Sequence[Any]:
        result = self._model.predict(batch)
        out = list(result)
        if len(out) != len(batch):
            raise ModelFormatError(
                f"Model.predict returned {len(out)} results for {len(batch)} rows"
            )
        return out

    def close(self) -> None:
        close = getattr(self._model, "close", None)
        if callable(close):
            close()


class PythonLoader:
    format = ModelFormat.PYTHON

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        model = _instantiate(path)
        return Inspection(schema=_declared_schema(model))

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        return PythonPredictor(_instantiate(path))


LOADER = PythonLoader()
