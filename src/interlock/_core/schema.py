"""The feature schema of a model version: names, types and what training saw.

A schema is plain data, shared by the registry (which stores it), the runtime (which
reads it from the artifact where the format carries names) and serving (which checks
requests against it).

Types:

- ``float``: any JSON number; ``null`` is a missing value (NaN).
- ``int``: a JSON integer; ``null`` is a missing value.
- ``bool``: ``true`` or ``false``.
- ``category``: a string; with ``categories`` known, it is encoded as its index there
  (LightGBM's pandas-categorical coding) and an unseen value as a missing value.

Compatibility. A client of one schema sends every feature by name (V1 rows) or by
position (V2 ``[N, F]`` tensors), with values its types accept. Another schema keeps
those clients working when it has the same names in the same order and each type
accepts at least what it accepted before: a type may stay or widen ``int`` → ``float``.
Every other change refuses something a client sends (``float`` takes no ``true``,
``int`` no ``1.5``, ``bool`` no ``null``). :func:`breaking_change` says which feature
breaks; category lists may change (an unseen category is a missing value).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Feature", "FeatureSchema", "FeatureType", "breaking_change"]


class FeatureType(StrEnum):
    FLOAT = "float"
    INT = "int"
    BOOL = "bool"
    CATEGORY = "category"


@dataclass(frozen=True, slots=True)
class Feature:
    name: str
    type: FeatureType = FeatureType.FLOAT
    minimum: float | None = None
    maximum: float | None = None
    categories: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type.value}
        if self.minimum is not None:
            out["min"] = self.minimum
        if self.maximum is not None:
            out["max"] = self.maximum
        if self.categories is not None:
            out["categories"] = list(self.categories)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Feature:
        """Read one feature; raises ``ValueError`` naming what is wrong."""
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("every feature needs a non-empty string 'name'")
        raw_type = data.get("type", "float")
        try:
            ftype = FeatureType(raw_type)
        except ValueError:
            allowed = ", ".join(t.value for t in FeatureType)
            raise ValueError(
                f"feature {name!r}: type {raw_type!r} is not one of {allowed}"
            ) from None
        cats = data.get("categories")
        if cats is not None and (
            not isinstance(cats, list) or not all(isinstance(c, str) for c in cats)
        ):
            raise ValueError(f"feature {name!r}: 'categories' must be a list of strings")
        minimum, maximum = data.get("min"), data.get("max")
        for label, bound in (("min", minimum), ("max", maximum)):
            if bound is not None and (
                isinstance(bound, bool) or not isinstance(bound, int | float)
            ):
                raise ValueError(f"feature {name!r}: {label!r} must be a number")
        return cls(
            name=name,
            type=ftype,
            minimum=None if minimum is None else float(minimum),
            maximum=None if maximum is None else float(maximum),
            categories=None if cats is None else tuple(cats),
        )


@dataclass(frozen=True, slots=True)
class FeatureSchema:
    features: tuple[Feature, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        index = {f.name: i for i, f in enumerate(self.features)}
        if len(index) != len(self.features):
            raise ValueError("feature names must be unique")
        object.__setattr__(self, "_index", index)

    @classmethod
    def of(cls, features: Iterable[Feature]) -> FeatureSchema:
        return cls(tuple(features))

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def __len__(self) -> int:
        return len(self.features)

    def position(self, name: str) -> int | None:
        return self._index.get(name)

    def to_list(self) -> list[dict[str, Any]]:
        return [f.to_dict() for f in self.features]

    @classmethod
    def from_list(cls, data: Any) -> FeatureSchema:
        """Read a schema from its JSON form: a list of features, or ``{"features": [...]}``."""
        if isinstance(data, Mapping):
            data = data.get("features")
        if not isinstance(data, list) or not data:
            raise ValueError("a schema is a non-empty list of features")
        return cls(tuple(Feature.from_dict(item) for item in data))


_WIDENINGS = frozenset({(FeatureType.INT, FeatureType.FLOAT)})


def breaking_change(current: FeatureSchema, proposed: FeatureSchema) -> str | None:
    """The first change in ``proposed`` that breaks clients of ``current``; None if none.

    The answer names the feature: ``feature 'amount' is gone``, ``feature 'x' is new and
    clients do not send it``, ``feature 'a' moved from position 1 to 2``, ``feature 'b'
    changes from bool to float``.
    """
    old, new = current.names, proposed.names
    for index, (was, now) in enumerate(zip(old, new, strict=False)):
        if was == now:
            continue
        if proposed.position(was) is None:
            return f"feature {was!r} is gone"
        if current.position(now) is None:
            return f"feature {now!r} is new and clients do not send it"
        return f"feature {was!r} moved from position {index + 1} to {_position(proposed, was)}"
    if len(new) > len(old):
        return f"feature {new[len(old)]!r} is new and clients do not send it"
    if len(old) > len(new):
        return f"feature {old[len(new)]!r} is gone"
    for before, after in zip(current.features, proposed.features, strict=True):
        if before.type is not after.type and (before.type, after.type) not in _WIDENINGS:
            return f"feature {before.name!r} changes from {before.type.value} to {after.type.value}"
    return None


def _position(schema: FeatureSchema, name: str) -> int:
    """1-based position of a feature known to be in ``schema``."""
    return (schema.position(name) or 0) + 1
