"""The schema a new version of an existing model gets, and when that is refused.

Clients of a model send the features of the version that answers ``NAME`` (its
``champion``, else its newest version): the *base*. A new version keeps them working:

- Without ``--schema``, the new version inherits the base's schema when its artifact
  takes the same features: the same names in the same order, or, for a format without
  names, the same count. The artifact's own facts (ranges, categories) are kept; the
  base's types narrow the artifact's ``float`` as an explicit schema would. So the demo's
  LightGBM file registered again keeps ``is_foreign`` a ``bool``, not the ``float``
  LightGBM records.
- An artifact with other features, or an explicit schema, gets that schema, and it is
  refused when it would break the base's clients (see
  :func:`interlock._core.schema.breaking_change`), unless forced.
"""

from __future__ import annotations

from dataclasses import dataclass

from interlock._core.schema import FeatureSchema, breaking_change
from interlock.errors import RegistryError
from interlock.registry._rules import decide_schema

__all__ = ["Base", "evolve_schema"]


@dataclass(frozen=True, slots=True)
class Base:
    """The version whose clients a new version must keep working."""

    version: int
    schema: FeatureSchema


def evolve_schema(
    name: str,
    fmt: str,
    *,
    inspected: FeatureSchema | None,
    n_features: int | None,
    explicit: FeatureSchema | None,
    base: Base | None,
    force: bool,
) -> FeatureSchema:
    """The schema of the next version of ``name``; RegistryError naming what breaks."""
    if explicit is not None or base is None:
        schema = decide_schema(name, fmt, inspected, explicit)
    else:
        schema = _inherit(name, fmt, inspected, n_features, base)
    if base is not None and not force:
        why = breaking_change(base.schema, schema)
        if why is not None:
            raise RegistryError(
                f"{name}: this schema would break clients of version {base.version}: {why}; "
                "pass --force-schema (API: force_schema) to register it anyway"
            )
    return schema


def _inherit(
    name: str, fmt: str, inspected: FeatureSchema | None, n_features: int | None, base: Base
) -> FeatureSchema:
    if inspected is None or len(inspected) == 0:
        if n_features is not None and n_features != len(base.schema):
            raise RegistryError(
                f"{name}: this {fmt} artifact takes {n_features} features but version "
                f"{base.version} has {len(base.schema)}; pass --schema FILE"
            )
        return base.schema
    if inspected.names != base.schema.names:
        return inspected
    try:
        return decide_schema(name, fmt, inspected, base.schema)
    except RegistryError:  # a type the artifact contradicts: the break check names it
        return inspected
