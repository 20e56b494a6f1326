"""The values, the port and what both limiters share (see :mod:`interlock.llm.limits`)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from interlock.errors import RateLimitedError

__all__ = [
    "WINDOW_S",
    "Limit",
    "LimiterStats",
    "Quota",
    "RateLimiter",
    "Reservation",
    "acquire_within",
    "format_reset",
]

WINDOW_S = 60.0

_US = 1_000_000


# -- values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``rpm`` requests and ``tpm`` tokens per window under the name ``name``.

    The name identifies the limit's state (``tenant:dashboards``,
    ``deployment:primary``); ``None`` leaves that dimension unlimited.
    """

    name: str
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a limit needs a name")
        for field, value in (("rpm", self.rpm), ("tpm", self.tpm)):
            if value is not None and not value > 0:
                raise ValueError(f"{self.name}: {field} must be positive or None, not {value}")

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(slots=True)
class Reservation:
    """What one :meth:`RateLimiter.acquire` took, to reconcile later.

    ``recorded`` is False when the request was admitted unchecked (the limiter's store
    was unavailable): reconciling it changes nothing but ``tokens``.
    """

    id: str
    limits: tuple[Limit, ...]
    tokens: int
    recorded: bool = True


@dataclass(frozen=True, slots=True)
class Quota:
    """The room left after an acquire (or at a refusal), for OpenAI's rate-limit headers.

    Requests and tokens each report the tightest limit that caps them: the one with the
    least room left. ``reset_*_s`` is the time until that limit's oldest counted request
    leaves the window and its room grows again (0 with an empty window). A dimension
    that no limit caps has a ``limit_*`` of ``None`` and gets no headers.
    """

    limit_requests: int | None = None
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    limit_tokens: int | None = None
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0

    def headers(self) -> dict[str, str]:
        """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, as OpenAI sends them."""
        out: dict[str, str] = {}
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(max(0, self.remaining_requests))
            out["x-ratelimit-reset-requests"] = format_reset(self.reset_requests_s)
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(max(0, self.remaining_tokens))
            out["x-ratelimit-reset-tokens"] = format_reset(self.reset_tokens_s)
        return out


@dataclass(slots=True)
class LimiterStats:
    """Counters of one limiter: requests ``admitted`` and ``refused``, store ``errors``,
    and requests admitted ``unchecked`` because the store was unavailable (fail open)."""

    admitted: int = 0
    refused: int = 0
    errors: int = 0
    unchecked: int = 0


def format_reset(seconds: float) -> str:
    """A duration as OpenAI writes it: ``120ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h0m0s``.

    Rounded up to the millisecond, so that a client waiting that long finds room.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


# -- the port --------------------------------------------------------------------------


class RateLimiter(Protocol):
    """Where the sliding windows of every limit are kept."""

    window_s: float
    stats: LimiterStats

    async def acquire(self, limits: Sequence[Limit], tokens: int) -> tuple[Reservation, Quota]:
        """Take one request and ``tokens`` tokens from every limit, or nothing.

        Returns the reservation and the room left. Limits with neither rpm nor tpm are
        skipped, and a name given twice counts once.

        Raises:
            RateLimitedError: a limit has no room for this request; nothing was taken.
                ``retry_after_s`` is when the refusing limit has room again for it (the
                longest wait when several refuse), ``limit`` is ``NAME:rpm`` or
                ``NAME:tpm``, ``headers`` are that limit's ``x-ratelimit-*`` headers.
        """
        ...

    async def reconcile(self, reservation: Reservation, tokens: int) -> None:
        """Replace the reserved token count by the real one (lower or higher).

        A no-op for limits the reservation has already left the window of.
        """
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter cannot be used afterwards."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


async def acquire_within(
    limiter: RateLimiter, limits: Sequence[Limit], tokens: int, *, timeout_s: float
) -> tuple[Reservation, Quota]:
    """:meth:`RateLimiter.acquire`, waiting up to ``timeout_s`` for room instead of failing.

    Each refusal says when room comes back; this sleeps until then and tries again.
    Waiters are not served in order: whoever tries first after room frees up takes it.

    Raises:
        RateLimitedError: at once when the room will not come back within what is left
            of ``timeout_s``, or when the request can never pass (more tokens than a tpm).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            return await limiter.acquire(limits, tokens)
        except RateLimitedError as exc:
            if _too_large(limits, tokens) is not None:
                raise
            if exc.retry_after_s > deadline - loop.time():
                raise
            await asyncio.sleep(exc.retry_after_s)


# -- shared by both limiters ---------------------------------------------------------------


@dataclass(slots=True)
class _Room:
    """One limit's state as an acquire saw it: requests and tokens in the window."""

    limit: Limit
    requests: int
    tokens: int
    reset_s: float


def _quota(rooms: Sequence[_Room]) -> Quota:
    req: _Room | None = None
    tok: _Room | None = None
    req_left = tok_left = 0
    for room in rooms:
        rpm, tpm = room.limit.rpm, room.limit.tpm
        if rpm is not None and (req is None or rpm - room.requests < req_left):
            req, req_left = room, rpm - room.requests
        if tpm is not None and (tok is None or tpm - room.tokens < tok_left):
            tok, tok_left = room, tpm - room.tokens
    return Quota(
        None if req is None else req.limit.rpm,
        req_left,
        0.0 if req is None else req.reset_s,
        None if tok is None else tok.limit.tpm,
        tok_left,
        0.0 if tok is None else tok.reset_s,
    )


def _active(limits: Sequence[Limit]) -> tuple[Limit, ...]:
    seen: set[str] = set()
    out: list[Limit] = []
    for limit in limits:
        if limit.active and limit.name not in seen:
            seen.add(limit.name)
            out.append(limit)
    return tuple(out)


def _per(window_s: float) -> str:
    return "minute" if window_s == 60.0 else f"{window_s:g} s"


def _too_large(limits: Sequence[Limit], tokens: int) -> Limit | None:
    for limit in limits:
        if limit.tpm is not None and tokens > limit.tpm:
            return limit
    return None


def _check_request(limits: Sequence[Limit], tokens: int, window_s: float) -> None:
    if tokens < 0:
        raise ValueError(f"a request cannot reserve {tokens} tokens")
    limit = _too_large(limits, tokens)
    if limit is not None:
        quota = _quota([_Room(limit, 0, 0, 0.0)])
        raise RateLimitedError(
            f"request too large for {limit.name}: it needs {tokens} tokens (prompt and "
            f"max_tokens) and the limit is {limit.tpm} tokens per {_per(window_s)}, so it "
            "can never pass; shorten the prompt or lower max_tokens",
            retry_after_s=window_s,
            limit=f"{limit.name}:tpm",
            headers=quota.headers(),
        )


def _refused(
    room: _Room, kind: str, retry_after_s: float, tokens: int, window_s: float
) -> RateLimitedError:
    limit, per = room.limit, _per(window_s)
    if kind == "rpm":
        what = f"{limit.rpm} requests per {per}, and {room.requests} were admitted in the last"
    else:
        what = (
            f"{limit.tpm} tokens per {per}, {room.tokens} are taken in the last and this "
            f"request needs {tokens}"
        )
    return RateLimitedError(
        f"rate limit {limit.name}:{kind} reached: {what} {per}; "
        f"retry in {format_reset(retry_after_s)}",
        retry_after_s=retry_after_s,
        limit=f"{limit.name}:{kind}",
        headers=_quota([room]).headers(),
    )
