"""Traffic policies: which versions of a model answer, and in what shares. Pure logic.

A :class:`TrafficPolicy` holds integer weights per version, an optional shadow version
(it gets a copy of each request; its answers are never returned), an optional
:class:`CanaryPlan` and an optional :class:`Fallback`. It is built once per refresh;
:meth:`TrafficPolicy.choose` runs per request in a few microseconds: without a route
key, a weighted draw from the caller's uniform ``rand``; with one, weighted rendezvous
hashing (each version scores ``-weight / ln(hash01(key, version))``, the highest wins):
a key keeps its version while the weights hold, and moves only to a version whose
weight grew relative to its own (between two versions, or to an added one, exactly the
keys that must move). :func:`evaluate_canary` decides on a canary from the rolling
window the serving side measures; :func:`apply_decision` gives the policy that follows.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeAlias, TypeGuard, TypeVar

from interlock.errors import TrafficError

__all__ = [
    "CanaryAction",
    "CanaryDecision",
    "CanaryPlan",
    "CanaryStatus",
    "Fallback",
    "JSONValue",
    "TrafficPolicy",
    "WindowStats",
    "apply_decision",
    "evaluate_canary",
]

JSONValue: TypeAlias = "str | int | float | bool | list[JSONValue] | dict[str, JSONValue] | None"

_U52 = 2.0**-52
MAX_WEIGHT = 1_000_000  # weights are relative; a bound keeps sums and hashing in range
_T = TypeVar("_T")
_Route: TypeAlias = "tuple[hashlib.blake2b, float, int]"  # seeded hash, 1/weight, version


class CanaryStatus(StrEnum):
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


class CanaryAction(StrEnum):
    HOLD = "hold"
    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


@dataclass(frozen=True, slots=True)
class CanaryPlan:
    """A version rolled out in rising steps (percent of traffic), guarded by error rate and p99.

    ``updated_at`` is when the step or status last changed; the next step is due after it.
    """

    version: int
    stable: int
    steps: tuple[int, ...]
    step: int
    interval_s: float
    max_error_rate: float | None
    max_p99_ms: float | None
    min_requests: int
    status: CanaryStatus
    reason: str | None
    started_at: datetime
    updated_at: datetime

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "status", CanaryStatus(self.status))
        _version(self.version, "canary version")
        _version(self.stable, "canary stable version")
        rising = bool(steps) and all(map(_is_int, steps)) and steps == tuple(sorted(set(steps)))
        rising = rising and 1 <= steps[0] <= steps[-1] <= 100
        rate, p99 = self.max_error_rate, self.max_p99_ms
        _check(
            (self.version != self.stable, f"version {self.version} cannot be its own stable"),
            (rising, f"canary steps must rise strictly within 1..100, not {list(steps)}"),
            (
                _is_int(self.step) and 0 <= self.step < len(steps),
                f"canary step {self.step} is not in 0..{len(steps) - 1}",
            ),
            (0 < self.interval_s < math.inf, f"canary interval must be > 0 s ({self.interval_s})"),
            (rate is None or 0 <= rate <= 1, f"max error rate must be within 0..1 ({rate})"),
            (p99 is None or 0 < p99 < math.inf, f"max p99 must be > 0 ms ({p99})"),
            (
                _is_int(self.min_requests) and self.min_requests >= 1,
                f"min requests must be an integer ≥ 1 ({self.min_requests})",
            ),
            (self.reason is None or isinstance(self.reason, str), "reason must be text"),
            (_aware(self.started_at, self.updated_at), "canary times must be aware datetimes"),
        )

    @property
    def weight(self) -> int:
        """Percent of traffic the canary takes now: 0 once rolled back, 100 once promoted."""
        done = self.status is CanaryStatus.PROMOTED
        return self.steps[self.step] if self.running else 100 if done else 0

    @property
    def running(self) -> bool:
        return self.status is CanaryStatus.RUNNING

    def to_json(self) -> dict[str, JSONValue]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CanaryPlan:
        """The plan :meth:`to_json` gave; :class:`TrafficError` naming what is wrong."""
        raw: Any = data
        return _parse(
            lambda: cls(
                **{f.name: raw[f.name] for f in fields(cls)}
                | {"started_at": _time(raw["started_at"]), "updated_at": _time(raw["updated_at"])}
            )
        )


@dataclass(frozen=True, slots=True)
class Fallback:
    """What answers when no version can: ``static``, one answer per row, marked degraded."""

    static: JSONValue = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """Which versions of ``model`` answer, and how; see the module docstring."""

    model: str
    weights: dict[int, int]
    shadow: int | None = None
    canary: CanaryPlan | None = None
    fallback: Fallback | None = None
    revision: int = 0
    updated_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    _effective: dict[int, float] = field(init=False, repr=False, compare=False)
    _versions: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _cumulative: tuple[float, ...] = field(init=False, repr=False, compare=False)
    _routes: tuple[_Route, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check(
            (isinstance(self.model, str) and self.model != "", "a policy needs a model name"),
            (isinstance(self.weights, Mapping) and len(self.weights) > 0, "a policy needs weights"),
        )
        for version, weight in self.weights.items():
            _version(version, "a weighted version")
            _check((_is_int(weight) and weight >= 0, f"weight for version {version} must be ≥ 0"))
            _check((weight <= MAX_WEIGHT, f"weight for version {version} must be ≤ {MAX_WEIGHT}"))
        weights = dict(sorted(self.weights.items()))
        object.__setattr__(self, "weights", weights)
        canary, shadow = self.canary, self.shadow
        running = canary.version if canary is not None and canary.running else None
        if shadow is not None:
            _version(shadow, "the shadow version")
        _check(
            (any(weights.values()), f"{self.model}: at least one version needs a weight above 0"),
            (_is_int(self.revision) and self.revision >= 0, f"bad revision {self.revision!r}"),
            (
                running is None or weights.get(running, 0) == 0,
                f"canary version {running} must not also have a weight: the canary sets its share",
            ),
            (
                canary is None or running is None or canary.stable in weights,
                f"canary stable version {canary and canary.stable} has no weight",
            ),
            (
                shadow is None or (weights.get(shadow, 0) == 0 and shadow != running),
                f"shadow version {shadow} already takes traffic; a shadow gets copies only",
            ),
            (_aware(self.updated_at), "policy updated_at must be an aware datetime"),
        )
        # What choose() needs, computed once per policy.
        effective = _effective(self.weights, self.canary)
        routed = [(v, pct) for v, pct in effective.items() if pct > 0]
        cumulative = (*itertools.accumulate(pct / 100.0 for _, pct in routed[:-1]), 1.0)
        prefix = self.model.encode() + b"\0"  # keys route independently per model
        routes = tuple(
            (hashlib.blake2b(prefix, digest_size=8, salt=v.to_bytes(16, "little")), 1.0 / pct, v)
            for v, pct in routed
        )
        set_ = object.__setattr__
        set_(self, "_effective", effective)
        set_(self, "_versions", tuple(v for v, _ in routed))
        set_(self, "_cumulative", cumulative)
        set_(self, "_routes", routes)

    def effective_weights(self) -> dict[int, float]:
        """Percent of traffic per version (summing to 100), the canary's share carved out.

        A running canary at W% takes W% of all traffic, from the stable version first and,
        should its share be smaller, from the others in proportion; rolled back, it has 0.
        """
        return dict(self._effective)

    @property
    def versions(self) -> tuple[int, ...]:
        """The versions that take traffic now, ascending."""
        return self._versions

    def choose(self, key: str | bytes | None, rand: float) -> int:
        """The version that answers: sticky per ``key``, else drawn with ``rand`` ∈ [0, 1)."""
        versions = self._versions
        if len(versions) == 1:
            return versions[0]
        if key is None:
            index = bisect.bisect_right(self._cumulative, rand)
            return versions[index if index < len(versions) else -1]
        data = key.encode() if isinstance(key, str) else key
        best, best_score, log, from_bytes = 0, math.inf, math.log, int.from_bytes
        for hasher, inverse, version in self._routes:
            h = hasher.copy()
            h.update(data)
            # -ln(u)/w is an exponential draw of rate w: its minimum has the highest -w/ln(u).
            score = -log(((from_bytes(h.digest(), "little") >> 12) + 0.5) * _U52) * inverse
            if score < best_score:
                best, best_score = version, score
        return best

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "model": self.model,
            "weights": {str(v): w for v, w in self.weights.items()},
            "shadow": self.shadow,
            "canary": self.canary.to_json() if self.canary is not None else None,
            "fallback": {"static": self.fallback.static} if self.fallback is not None else None,
            "revision": self.revision,
            "updated_at": self.updated_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> TrafficPolicy:
        """The policy :meth:`to_json` gave; :class:`TrafficError` naming what is wrong."""
        raw: Any = data
        return _parse(
            lambda: cls(
                model=raw["model"],
                weights={int(v): w for v, w in raw["weights"].items()},
                shadow=raw["shadow"],
                canary=None if raw["canary"] is None else CanaryPlan.from_json(raw["canary"]),
                fallback=None if raw["fallback"] is None else Fallback(raw["fallback"]["static"]),
                revision=raw["revision"],
                updated_at=_time(raw["updated_at"]),
            )
        )


@dataclass(frozen=True, slots=True)
class WindowStats:
    """One version's requests, errors and p99 latency over the rolling window."""

    requests: int
    errors: int
    p99_ms: float | None = None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True, slots=True)
class CanaryDecision:
    """What :func:`evaluate_canary` decided, and why, in words for the operator."""

    action: CanaryAction
    reason: str


def evaluate_canary(
    plan: CanaryPlan, stable: WindowStats, canary: WindowStats, now: datetime
) -> CanaryDecision:
    """Hold, advance, promote or roll back, with a reason a person can act on.

    Nothing is decided before ``min_requests`` canary requests; a breach rolls back; a
    healthy canary moves a step ``interval_s`` after the last one, and is promoted when
    it has been healthy that long at the last step.
    """
    action, rate, p99 = CanaryAction.HOLD, canary.error_rate, canary.p99_ms
    waited = (now - plan.updated_at).total_seconds()
    if not plan.running:
        reason = f"canary is {plan.status}"
    elif canary.requests < plan.min_requests:
        reason = f"waiting for {plan.min_requests} canary requests ({canary.requests} so far)"
    elif plan.max_error_rate is not None and rate > plan.max_error_rate:
        action, limit = CanaryAction.ROLLBACK, plan.max_error_rate
        digits = 2 if f"{rate:.2f}" != f"{limit:.2f}" else 4
        base = f"{stable.error_rate:.{digits}f}" if stable.requests else "n/a"
        reason = (
            f"canary error rate {rate:.{digits}f} > max {limit:.{digits}f}"
            f" over {canary.requests} requests (stable {base})"
        )
    elif plan.max_p99_ms is not None and p99 is not None and p99 > plan.max_p99_ms:
        action = CanaryAction.ROLLBACK
        reason = f"canary p99 {p99:.0f} ms > max {plan.max_p99_ms:.0f} ms"
    elif waited < plan.interval_s:
        reason = f"healthy; next step in {plan.interval_s - waited:.0f} s"
    else:
        last = plan.step + 1 == len(plan.steps)
        action = CanaryAction.PROMOTE if last else CanaryAction.ADVANCE
        health = f"error rate {rate:.2f}" + (f", p99 {p99:.0f} ms" if p99 is not None else "")
        then = f"version {plan.version} promoted" if last else f"→ {plan.steps[plan.step + 1]}%"
        reason = f"healthy at {plan.weight}% over {canary.requests} requests ({health}): {then}"
    return CanaryDecision(action, reason)


def apply_decision(policy: TrafficPolicy, decision: CanaryDecision, now: datetime) -> TrafficPolicy:
    """The policy after ``decision``, at the next revision; the canary must be running.

    Promotion makes the canary the one stable version (weights ``{canary: 100}``);
    rollback keeps the weights, so the stable version takes its whole share back.
    """
    plan, action, weights = policy.canary, decision.action, policy.weights
    if plan is None or not plan.running or action is CanaryAction.HOLD:
        raise TrafficError(f"{policy.model}: no running canary to {action}")
    if action is CanaryAction.ADVANCE:
        if plan.step + 1 == len(plan.steps):
            raise TrafficError(f"{policy.model}: the canary is at its last step")
        plan = replace(plan, step=plan.step + 1, updated_at=now)
    else:
        promoted = action is CanaryAction.PROMOTE
        status = CanaryStatus.PROMOTED if promoted else CanaryStatus.ROLLED_BACK
        plan = replace(plan, status=status, reason=decision.reason, updated_at=now)
        weights = {plan.version: 100} if promoted else weights
    shadow, revision = None if policy.shadow in weights else policy.shadow, policy.revision + 1
    return replace(
        policy, weights=weights, shadow=shadow, canary=plan, revision=revision, updated_at=now
    )


def _effective(weights: dict[int, int], canary: CanaryPlan | None) -> dict[int, float]:
    total = sum(weights.values())
    effective = {v: 100.0 * w / total for v, w in weights.items()}
    if canary is not None and canary.running:
        share = float(canary.weight)
        taken = min(share, effective[canary.stable])
        rest = 100.0 - effective[canary.stable]  # what the other versions hold
        effective[canary.stable] -= taken
        if share > taken and rest > 0:
            kept = max(0.0, 1.0 - (share - taken) / rest)
            effective = {v: p if v == canary.stable else p * kept for v, p in effective.items()}
        effective[canary.version] = share
    elif canary is not None and canary.status is CanaryStatus.ROLLED_BACK:
        effective.setdefault(canary.version, 0.0)
    return dict(sorted(effective.items()))


def _check(*rules: tuple[bool, str]) -> None:
    """Raise :class:`TrafficError` with the message of the first rule that does not hold."""
    for ok, message in rules:
        if not ok:
            raise TrafficError(message)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _version(value: object, what: str) -> None:
    if not _is_int(value) or value < 1:
        raise TrafficError(f"{what} must be a version number ≥ 1 (got {value!r})")


def _aware(*values: object) -> bool:
    return all(isinstance(v, datetime) and v.tzinfo is not None for v in values)


def _plain(value: object) -> JSONValue:
    if isinstance(value, datetime):
        return value.isoformat()
    return list(value) if isinstance(value, tuple) else value  # type: ignore[return-value]


def _parse(build: Callable[[], _T]) -> _T:
    """``build()``; data of the wrong shape or type becomes a :class:`TrafficError`."""
    try:
        return build()
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TrafficError(f"not a stored traffic policy: {exc!r}") from None


def _time(value: object) -> datetime:
    parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    if parsed is None or parsed.tzinfo is None:
        raise TrafficError(f"{value!r} is not an ISO 8601 time with an offset")
    return parsed.astimezone(UTC)
