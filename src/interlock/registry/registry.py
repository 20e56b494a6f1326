"""The model registry: named models, their immutable versions, and movable aliases.

A version is an artifact (stored by content in the :class:`ArtifactStore`) plus what
registration learned about it: its format, feature schema, task, metrics and tags.
Aliases (``champion``, ``challenger``…) point at versions and move atomically.

References, as :meth:`Registry.resolve` reads them:

- ``fraud``: the ``champion`` alias when set, else the newest version;
- ``fraud@blue``: the version the alias ``blue`` names; ``fraud@latest`` is the newest;
- ``fraud:3`` or ``resolve("fraud", version=3)``: version 3.

The registry never imports the model loaders: an :class:`Inspector` is passed in
(``interlock.runtime.loaders.inspect_artifact`` in the application).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from interlock._core.clock import Clock
from interlock._core.formats import Inspection, ModelFormat
from interlock._core.schema import FeatureSchema
from interlock.errors import InterlockError, ModelNotFoundError, RegistryError
from interlock.registry import _rules
from interlock.registry._evolution import Base, evolve_schema
from interlock.registry.records import ModelRouting, ModelSummary, ModelVersion
from interlock.store.artifacts import ArtifactStore, StoredArtifact
from interlock.store.db import Database
from interlock.store.sql import insert_or_ignore, upsert
from interlock.store.tables import model_aliases, model_versions, models

__all__ = ["Inspector", "Progress", "Registry"]

_log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Told each step of a registration: ``storing artifact…``, ``loading to check…``,
``registered fraud v3``."""

_mv = model_versions
_ma = model_aliases


class Inspector(Protocol):
    """Reads an artifact at registration; blocking, run in a worker thread.

    Raises ``ModelFormatError`` or ``UnsafeArtifactError`` when the artifact cannot be
    registered. With ``schema``, loads the artifact as serving will, with that schema,
    and raises ``ModelFormatError`` when the model does not take it.
    ``interlock.runtime.loaders.inspect_artifact`` is one.
    """

    def __call__(
        self, fmt: str, path: Path, *, trusted: bool, schema: FeatureSchema | None = None
    ) -> Inspection: ...


class Registry:
    """Models, versions and aliases in the metadata database; artifacts in the store."""

    def __init__(
        self, db: Database, artifacts: ArtifactStore, inspector: Inspector, clock: Clock
    ) -> None:
        self._db = db
        self._artifacts = artifacts
        self._inspect = inspector
        self._clock = clock

    @property
    def artifacts(self) -> ArtifactStore:
        return self._artifacts

    async def register(
        self,
        name: str,
        path: Path,
        fmt: ModelFormat | str,
        *,
        schema: FeatureSchema | None = None,
        metrics: Mapping[str, float] | None = None,
        tags: Mapping[str, str] | None = None,
        alias: str | None = None,
        trusted: bool = False,
        allow_duplicate: bool = False,
        force_schema: bool = False,
        progress: Progress | None = None,
    ) -> ModelVersion:
        """Store an artifact as the next version of ``name`` (created on first use).

        The artifact is copied into a staging area of the store and checked there, so
        the bytes checked are the bytes served; it enters the store only with its
        version, and a refused registration leaves no file behind. The checks, in order:

        - bytes another version of ``name`` already has are refused, naming it, unless
          ``allow_duplicate``;
        - the artifact must load (``inspector``); its schema is decided by
          :func:`~interlock.registry._evolution.evolve_schema`: a new version inherits
          the schema of the version clients use, and a change that breaks them is
          refused unless ``force_schema``;
        - the artifact is loaded with that schema, as serving will load it.

        ``alias``, when given, is pointed at the new version in the same transaction.
        ``progress`` is told each step (``storing artifact…``…). A refusal is one line
        (a :class:`RegistryError`); what the libraries said is logged.
        """
        _rules.check_name(name)
        if alias is not None:
            _rules.check_alias(alias)
        clean_metrics = _rules.clean_metrics(name, metrics)
        clean_tags = _rules.clean_tags(name, tags)
        model_format = _rules.parse_format(fmt)
        tell = progress or _silent
        tell("storing artifact…")
        staged = await asyncio.to_thread(self._stage, name, Path(path))
        try:
            version, stored, final_schema, task = await self._register_staged(
                name,
                model_format,
                staged,
                explicit=schema,
                alias=alias,
                trusted=trusted,
                allow_duplicate=allow_duplicate,
                force_schema=force_schema,
                row={"metrics": clean_metrics, "tags": clean_tags, "trusted": trusted},
                tell=tell,
            )
        except InterlockError as exc:
            # The user gets the one line; what the model library said (the chained
            # cause, with its native messages and paths) is for the log.
            _log.info(
                "registration of %s (%s) refused: %s",
                name,
                Path(path).name,
                exc,
                exc_info=exc if exc.__cause__ is not None else None,
            )
            raise
        finally:
            await asyncio.to_thread(self._artifacts.discard, staged)
        tell(f"registered {name} v{version.version}")
        return ModelVersion(
            model=name,
            version=version.version,
            format=model_format,
            artifact_sha256=stored.sha256,
            artifact_path=stored.path,
            schema=final_schema,
            task=task,
            metrics=clean_metrics,
            tags=clean_tags,
            trusted=trusted,
            created_at=version.created_at,
        )

    async def _register_staged(
        self,
        name: str,
        model_format: ModelFormat,
        staged: StoredArtifact,
        *,
        explicit: FeatureSchema | None,
        alias: str | None,
        trusted: bool,
        allow_duplicate: bool,
        force_schema: bool,
        row: dict[str, Any],
        tell: Progress,
    ) -> tuple[_Inserted, StoredArtifact, FeatureSchema, str]:
        fmt = model_format.value
        base = await self._db.run(
            lambda conn: _before_insert(conn, name, staged.sha256, allow_duplicate),
            readonly=True,
        )
        tell("loading to check…")
        inspection = await asyncio.to_thread(self._inspect, fmt, staged.path, trusted=trusted)
        n_features = inspection.details.get("n_features")

        def decide(current: Base | None) -> FeatureSchema:
            return evolve_schema(
                name,
                fmt,
                inspected=inspection.schema,
                n_features=n_features if isinstance(n_features, int) else None,
                explicit=explicit,
                base=current,
                force=force_schema,
            )

        final_schema = decide(base)
        await asyncio.to_thread(
            self._inspect, fmt, staged.path, trusted=trusted, schema=final_schema
        )
        now = self._clock.now().astimezone(UTC)
        values: dict[str, Any] = {
            **row,
            "model": name,
            "format": fmt,
            "artifact_sha256": staged.sha256,
            "artifact_name": staged.path.name,
            "schema": final_schema.to_list(),
            "task": str(inspection.task),
            "created_at": now,
        }

        def insert(conn: Connection) -> tuple[_Inserted, StoredArtifact]:
            insert_or_ignore(conn, models, {"name": name, "created_at": now})
            # Concurrent registrations of one model queue on this row lock (PostgreSQL);
            # on SQLite every writing transaction already holds the database write lock.
            conn.execute(sa.select(models.c.name).where(models.c.name == name).with_for_update())
            current = _before_insert(conn, name, staged.sha256, allow_duplicate)
            if current != base and decide(current) != final_schema:
                raise RegistryError(
                    f"{name}: another version was registered meanwhile and changes the "
                    "schema this one would get; register it again"
                )
            latest = conn.execute(
                sa.select(sa.func.max(_mv.c.version)).where(_mv.c.model == name)
            ).scalar_one()
            version = int(latest or 0) + 1
            conn.execute(sa.insert(_mv).values({**values, "version": version}))
            if alias is not None:
                _set_alias(conn, name, alias, version, now)
            # Into the store last: a failure here rolls the row back with it.
            return _Inserted(version, now), self._artifacts.commit(staged)

        inserted, stored = await self._db.run(insert)
        return inserted, stored, final_schema, values["task"]

    async def list_models(self) -> list[ModelSummary]:
        """Every model, by name."""

        def query(conn: Connection) -> list[ModelSummary]:
            created = {
                n: at for n, at in conn.execute(sa.select(models.c.name, models.c.created_at))
            }
            versions: dict[str, list[int]] = {n: [] for n in created}
            for model, version in conn.execute(
                sa.select(_mv.c.model, _mv.c.version).order_by(_mv.c.model, _mv.c.version)
            ):
                versions.setdefault(model, []).append(version)
            aliases: dict[str, dict[str, int]] = {n: {} for n in created}
            for model, alias, version in conn.execute(
                sa.select(_ma.c.model, _ma.c.alias, _ma.c.version).order_by(_ma.c.alias)
            ):
                aliases.setdefault(model, {})[alias] = version
            return [
                _summary(n, created[n], versions[n], aliases[n])
                for n in sorted(created)
                if versions[n]
            ]

        return await self._db.run(query, readonly=True)

    async def get_model(self, name: str) -> ModelSummary:
        """One model; :class:`ModelNotFoundError` when there is none by that name."""

        def query(conn: Connection) -> ModelSummary:
            created = conn.execute(
                sa.select(models.c.created_at).where(models.c.name == name)
            ).scalar_one_or_none()
            versions, aliases = _state(conn, name)
            if created is None or not versions:
                raise _no_model(conn, name)
            return _summary(name, created, versions, aliases)

        return await self._db.run(query, readonly=True)

    async def get_version(self, name: str, version: int) -> ModelVersion:
        """One version of a model, or :class:`ModelNotFoundError` naming what exists."""
        return await self.resolve(name, version)

    async def list_versions(self, name: str) -> list[ModelVersion]:
        """Every version of a model, oldest first."""

        def query(conn: Connection) -> list[ModelVersion]:
            rows = conn.execute(
                sa.select(_mv).where(_mv.c.model == name).order_by(_mv.c.version)
            ).mappings()
            found = [self._version(row) for row in rows]
            if not found:
                raise _no_model(conn, name)
            return found

        return await self._db.run(query, readonly=True)

    async def resolve(self, ref: str, version: int | None = None) -> ModelVersion:
        """The version a reference names (see the module docstring for the rules)."""
        name, alias, version = _rules.parse_ref(ref, version)

        def query(conn: Connection) -> ModelVersion:
            versions, aliases = _state(conn, name)
            if not versions:
                raise _no_model(conn, name)
            target = version
            if target is None:
                target = ModelRouting(versions[-1], aliases).version_for(alias)
            if target is None:
                known = ", ".join(sorted(aliases)) or "none"
                raise ModelNotFoundError(
                    f"model {name!r} has no alias {alias!r} (aliases: {known})"
                )
            row = conn.execute(
                sa.select(_mv).where(_mv.c.model == name, _mv.c.version == target)
            ).mappings()
            found = row.one_or_none()
            if found is None:
                raise _no_version(name, target, versions)
            return self._version(found)

        return await self._db.run(query, readonly=True)

    async def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` at ``version``, creating or moving it atomically."""
        _rules.check_alias(alias)
        _rules.check_version(name, version)
        now = self._clock.now().astimezone(UTC)

        def update(conn: Connection) -> None:
            exists = conn.execute(
                sa.select(_mv.c.version).where(_mv.c.model == name, _mv.c.version == version)
            ).scalar_one_or_none()
            if exists is None:
                versions, _ = _state(conn, name)
                if not versions:
                    raise _no_model(conn, name)
                raise _no_version(name, version, versions)
            _set_alias(conn, name, alias, version, now)

        await self._db.run(update)

    async def delete_alias(self, name: str, alias: str) -> None:
        """Remove an alias; :class:`ModelNotFoundError` when it does not exist."""

        def delete(conn: Connection) -> None:
            deleted = conn.execute(
                sa.delete(_ma).where(_ma.c.model == name, _ma.c.alias == alias)
            ).rowcount
            if deleted:
                return
            versions, aliases = _state(conn, name)
            if not versions:
                raise _no_model(conn, name)
            known = ", ".join(sorted(aliases)) or "none"
            raise ModelNotFoundError(f"model {name!r} has no alias {alias!r} (aliases: {known})")

        await self._db.run(delete)

    async def routing(self) -> dict[str, ModelRouting]:
        """Newest version and aliases of every model, in one query.

        Cheap enough to poll every second: servers use it to follow alias moves made
        by other processes.
        """
        latest = sa.select(
            _mv.c.model,
            sa.func.max(_mv.c.version).label("version"),
            sa.cast(sa.null(), _ma.c.alias.type).label("alias"),
        ).group_by(_mv.c.model)
        named = sa.select(_ma.c.model, _ma.c.version, _ma.c.alias)
        stmt = sa.union_all(latest, named)

        def query(conn: Connection) -> dict[str, ModelRouting]:
            newest: dict[str, int] = {}
            aliases: dict[str, dict[str, int]] = {}
            for model, version, alias in conn.execute(stmt):
                if alias is None:
                    newest[model] = version
                else:
                    aliases.setdefault(model, {})[alias] = version
            return {
                model: ModelRouting(latest=newest[model], aliases=aliases.get(model, {}))
                for model in sorted(newest)
            }

        return await self._db.run(query, readonly=True)

    async def verify(self, version: ModelVersion) -> None:
        """Re-hash a version's artifact; ``ArtifactIntegrityError`` when it changed."""
        await asyncio.to_thread(
            self._artifacts.verify, version.artifact_path, version.artifact_sha256
        )

    def _stage(self, name: str, path: Path) -> StoredArtifact:
        if not path.is_file():
            raise RegistryError(f"{name}: {path} is not a file")
        return self._artifacts.stage(path)

    def _version(self, row: sa.RowMapping) -> ModelVersion:
        return ModelVersion(
            model=row["model"],
            version=row["version"],
            format=ModelFormat(row["format"]),
            artifact_sha256=row["artifact_sha256"],
            artifact_path=self._artifacts.path(row["artifact_sha256"], row["artifact_name"]),
            schema=FeatureSchema.from_list(row["schema"]),
            task=row["task"],
            metrics=dict(row["metrics"]),
            tags=dict(row["tags"]),
            trusted=row["trusted"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class _Inserted:
    version: int
    created_at: datetime


def _silent(step: str) -> None:
    """The default :data:`Progress`: says nothing."""


def _before_insert(conn: Connection, name: str, sha256: str, allow_duplicate: bool) -> Base | None:
    """The version clients of ``name`` use, after refusing bytes a version already has."""
    if not allow_duplicate:
        same = conn.execute(
            sa.select(sa.func.min(_mv.c.version)).where(
                _mv.c.model == name, _mv.c.artifact_sha256 == sha256
            )
        ).scalar_one_or_none()
        if same is not None:
            raise RegistryError(
                f"{name}: version {same} already has this artifact (sha256 {sha256[:12]}); "
                "pass --allow-duplicate (API: allow_duplicate) to register the same bytes again"
            )
    versions, aliases = _state(conn, name)
    if not versions:
        return None
    target = ModelRouting(versions[-1], aliases).version_for(None) or versions[-1]
    raw = conn.execute(
        sa.select(_mv.c.schema).where(_mv.c.model == name, _mv.c.version == target)
    ).scalar_one()
    return Base(target, FeatureSchema.from_list(raw))


def _set_alias(conn: Connection, name: str, alias: str, version: int, now: datetime) -> None:
    values = {"model": name, "alias": alias, "version": version, "updated_at": now}
    upsert(conn, _ma, values, keys=("model", "alias"))


def _state(conn: Connection, name: str) -> tuple[list[int], dict[str, int]]:
    """A model's version numbers (ascending) and aliases; empty when it does not exist."""
    versions = list(
        conn.execute(
            sa.select(_mv.c.version).where(_mv.c.model == name).order_by(_mv.c.version)
        ).scalars()
    )
    stmt = sa.select(_ma.c.alias, _ma.c.version).where(_ma.c.model == name)
    aliases = {alias: version for alias, version in conn.execute(stmt.order_by(_ma.c.alias))}
    return versions, aliases


def _summary(
    name: str, created_at: datetime, versions: list[int], aliases: dict[str, int]
) -> ModelSummary:
    return ModelSummary(
        name=name, created_at=created_at, versions=versions, aliases=aliases, latest=versions[-1]
    )


def _no_model(conn: Connection, name: str) -> ModelNotFoundError:
    names = list(conn.execute(sa.select(models.c.name)).scalars())
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ModelNotFoundError(f"no model named {name!r}{hint}")


def _no_version(name: str, version: int, versions: list[int]) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model {name!r} has no version {version} (versions: {_rules.format_versions(versions)})"
    )
