"""Names shared by the registry (which records them) and the runtime (which acts on them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from interlock._core.schema import FeatureSchema

__all__ = ["Inspection", "ModelFormat", "Task"]


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


@dataclass(frozen=True, slots=True)
class Inspection:
    """What registration learns from an artifact (the runtime's loaders make it)."""

    schema: FeatureSchema | None
    task: Task = Task.UNKNOWN
    details: dict[str, Any] = field(default_factory=dict)
