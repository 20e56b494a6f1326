"""The registry's rules for names, references, metrics, tags and feature schemas."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from interlock._core.formats import ModelFormat
from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import ModelFormatError, ModelNotFoundError, RegistryError
from interlock.registry.records import LATEST

__all__ = [
    "check_alias",
    "check_name",
    "check_version",
    "clean_metrics",
    "clean_tags",
    "decide_schema",
    "format_versions",
    "parse_format",
    "parse_ref",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_NAME_RULE = (
    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    " ('@' and ':' are reserved for references)"
)
_NUMERIC = {FeatureType.FLOAT, FeatureType.INT, FeatureType.BOOL}
_MAX_VERSION = 2**63 - 1  # the database's BIGINT: a larger number cannot be looked up


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: use {_NAME_RULE}")


def check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _NAME.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}: use {_NAME_RULE}")
    if alias == LATEST:
        raise RegistryError(f"alias {LATEST!r} is reserved: it always means the newest version")


def parse_ref(ref: str, version: int | None) -> tuple[str, str | None, int | None]:
    """Split ``name``, ``name@alias`` or ``name:version`` into its parts."""
    usage = "use NAME, NAME@ALIAS or NAME:VERSION"
    name, at, alias = ref.partition("@")
    if at:
        if not alias or not name:
            raise RegistryError(f"invalid model reference {ref!r}: {usage}")
        if version is not None:
            raise RegistryError(f"{ref!r} names an alias; do not also give version {version}")
        return name, alias, None
    name, colon, number = ref.partition(":")
    if colon:
        if not (number.isascii() and number.isdigit()) or not name:
            raise RegistryError(f"invalid model reference {ref!r}: {usage}")
        if version is not None and version != int(number):
            raise RegistryError(f"{ref!r} names a version; do not also give version {version}")
        version = int(number)
    if version is not None:
        check_version(name, version)
    return name, None, version


def check_version(name: str, version: int) -> None:
    """ModelNotFoundError for a number no version can have (the database cannot hold it)."""
    if version > _MAX_VERSION:
        raise ModelNotFoundError(f"model {name!r} has no version {version}")


def parse_format(fmt: str) -> ModelFormat:
    try:
        return ModelFormat(fmt)
    except ValueError:
        allowed = ", ".join(f.value for f in ModelFormat)
        raise ModelFormatError(f"unknown format {fmt!r}; use one of: {allowed}") from None


def clean_metrics(name: str, metrics: Mapping[str, float] | None) -> dict[str, float]:
    """Metrics as JSON-safe floats; NaN, infinities and non-numbers are refused."""
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        if not isinstance(key, str) or not key:
            raise RegistryError(f"{name}: metric names must be non-empty strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RegistryError(f"{name}: metric {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise RegistryError(f"{name}: metric {key!r} is {value}; metrics must be finite")
        out[key] = float(value)
    return out


def clean_tags(name: str, tags: Mapping[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key:
            raise RegistryError(f"{name}: tag names must be non-empty strings, got {key!r}")
        if not isinstance(value, str):
            raise RegistryError(f"{name}: tag {key!r} must be a string, got {value!r}")
        out[key] = value
    return out


def decide_schema(
    name: str, fmt: str, inspected: FeatureSchema | None, explicit: FeatureSchema | None
) -> FeatureSchema:
    """The schema a new version gets.

    The artifact's own schema wins when its format carries feature names. An explicit
    schema must then list the same names in the same order; it fills the ranges and
    categories the artifact lacks, and may narrow a ``float`` to ``int`` or ``bool``.
    With no inspected schema, the explicit one is used; with neither, it is an error.
    """
    if inspected is None or len(inspected) == 0:
        if explicit is None or len(explicit) == 0:
            raise RegistryError(
                f"{name}: this {fmt} artifact carries no feature names; pass --schema FILE"
            )
        return explicit
    if explicit is None:
        return inspected
    _check_same_names(name, inspected.names, explicit.names)
    return FeatureSchema.of(
        _merge_feature(name, ours, theirs)
        for ours, theirs in zip(inspected.features, explicit.features, strict=True)
    )


def _check_same_names(name: str, artifact: list[str], given: list[str]) -> None:
    if artifact == given:
        return
    given_set, artifact_set = set(given), set(artifact)
    missing = [n for n in artifact if n not in given_set]
    extra = [n for n in given if n not in artifact_set]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the schema given: {', '.join(missing)}")
        if extra:
            parts.append(f"not in the artifact: {', '.join(extra)}")
        raise RegistryError(
            f"{name}: the schema given does not match the artifact's features ("
            + "; ".join(parts)
            + ")"
        )
    at = next(i for i, (a, g) in enumerate(zip(artifact, given, strict=True)) if a != g)
    raise RegistryError(
        f"{name}: the schema given lists the artifact's features in another order: "
        f"feature {at + 1} is {artifact[at]!r} in the artifact but {given[at]!r} in the schema"
    )


def _merge_feature(name: str, ours: Feature, theirs: Feature) -> Feature:
    ftype = ours.type
    if theirs.type != ours.type:
        if ours.type is FeatureType.FLOAT and theirs.type in _NUMERIC:
            ftype = theirs.type
        elif not (ours.type in _NUMERIC and theirs.type is FeatureType.FLOAT):
            raise RegistryError(
                f"{name}: feature {ours.name!r} is {ours.type.value} in the artifact"
                f" but {theirs.type.value} in the schema given"
            )
    return replace(
        ours,
        type=ftype,
        minimum=ours.minimum if ours.minimum is not None else theirs.minimum,
        maximum=ours.maximum if ours.maximum is not None else theirs.maximum,
        categories=ours.categories if ours.categories is not None else theirs.categories,
    )


def format_versions(versions: Sequence[int]) -> str:
    """``1, 2, 3``; long runs are shortened to ``1, 2, 3, …, 40 (40 versions)``."""
    if len(versions) <= 10:
        return ", ".join(str(v) for v in versions)
    head = ", ".join(str(v) for v in versions[:3])
    return f"{head}, …, {versions[-1]} ({len(versions)} versions)"
