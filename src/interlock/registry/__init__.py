"""The model registry: models, their versions, aliases and artifacts.

Build one with a :class:`~interlock.store.Database`, an
:class:`~interlock.store.ArtifactStore`, an :class:`Inspector` and a clock; see
:class:`Registry`.
"""

from interlock.registry.records import (
    CHAMPION,
    LATEST,
    ModelInfo,
    ModelRouting,
    ModelSummary,
    ModelVersion,
    VersionInfo,
    describe_model,
    describe_version,
)
from interlock.registry.registry import Inspector, Progress, Registry

__all__ = [
    "CHAMPION",
    "LATEST",
    "Inspector",
    "ModelInfo",
    "ModelRouting",
    "ModelSummary",
    "ModelVersion",
    "Progress",
    "Registry",
    "VersionInfo",
    "describe_model",
    "describe_version",
]
