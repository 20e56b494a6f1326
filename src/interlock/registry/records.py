"""What the registry returns: versions, model summaries and routing tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict

from interlock._core.formats import ModelFormat
from interlock._core.schema import FeatureSchema

__all__ = [
    "CHAMPION",
    "LATEST",
    "ModelInfo",
    "ModelRouting",
    "ModelSummary",
    "ModelVersion",
    "VersionInfo",
    "describe_model",
    "describe_version",
]

CHAMPION = "champion"
"""The alias a bare model name resolves to when it is set."""

LATEST = "latest"
"""The reserved alias that always means the newest version."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One registered, immutable version of a model."""

    model: str
    version: int
    format: ModelFormat
    artifact_sha256: str
    artifact_path: Path
    """Absolute path of the artifact inside the artifact store."""
    schema: FeatureSchema
    task: str
    metrics: dict[str, float]
    tags: dict[str, str]
    trusted: bool
    created_at: datetime

    @property
    def ref(self) -> str:
        """``name:version``, a reference that always means this version."""
        return f"{self.model}:{self.version}"


@dataclass(frozen=True, slots=True)
class ModelRouting:
    """Where a model's references point: its newest version and its aliases."""

    latest: int
    aliases: dict[str, int] = field(default_factory=dict)

    def version_for(self, alias: str | None = None) -> int | None:
        """The version an alias names, by the rules of ``Registry.resolve``.

        ``None`` means the bare model name: its ``champion`` when set, else its newest
        version. ``latest`` is the newest version. An unknown alias gives ``None``.
        """
        if alias is None:
            return self.aliases.get(CHAMPION, self.latest)
        if alias == LATEST:
            return self.latest
        return self.aliases.get(alias)


@dataclass(frozen=True, slots=True)
class ModelSummary:
    """A model with the numbers of its versions and its aliases."""

    name: str
    created_at: datetime
    versions: list[int]
    aliases: dict[str, int]
    latest: int

    @property
    def routing(self) -> ModelRouting:
        return ModelRouting(latest=self.latest, aliases=dict(self.aliases))


class ModelInfo(TypedDict):
    """A :class:`ModelSummary` as JSON (the admin API and ``interlock models --json``)."""

    name: str
    created_at: str
    versions: list[int]
    aliases: dict[str, int]
    latest: int


class VersionInfo(TypedDict):
    """A :class:`ModelVersion` as JSON; the artifact is named, its server path is not."""

    model: str
    version: int
    ref: str
    format: str
    task: str
    artifact_sha256: str
    artifact_name: str
    schema: list[dict[str, Any]]
    metrics: dict[str, float]
    tags: dict[str, str]
    trusted: bool
    created_at: str


def describe_model(summary: ModelSummary) -> ModelInfo:
    return {
        "name": summary.name,
        "created_at": summary.created_at.isoformat(),
        "versions": list(summary.versions),
        "aliases": dict(summary.aliases),
        "latest": summary.latest,
    }


def describe_version(version: ModelVersion) -> VersionInfo:
    return {
        "model": version.model,
        "version": version.version,
        "ref": version.ref,
        "format": version.format.value,
        "task": version.task,
        "artifact_sha256": version.artifact_sha256,
        "artifact_name": version.artifact_path.name,
        "schema": version.schema.to_list(),
        "metrics": dict(version.metrics),
        "tags": dict(version.tags),
        "trusted": version.trusted,
        "created_at": version.created_at.isoformat(),
    }
