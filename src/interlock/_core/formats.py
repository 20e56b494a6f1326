"""Names shared by the registry (which records them) and the runtime (which acts on them)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ModelFormat", "Task"]


class ModelFormat(StrEnum):
    LIGHTGBM = "lightgbm"
    XGBOOST = "xgboost"
    ONNX = "onnx"
    SKLEARN = "sklearn"
    PYTHON = "python"


class Task(StrEnum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    REGRESSION = "regression"
    UNKNOWN = "unknown"
