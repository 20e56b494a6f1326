"""LLM usage accounting: every gateway call's tokens, cost and cache savings.

The gateway hands each finished call to :meth:`UsageRecorder.record`, which appends a
:class:`UsageRecord` to an in-memory buffer and returns: it never awaits, never touches
the database and never raises, so recording never holds up an answer. A background task
writes the buffer every ``flush_s`` seconds, or as soon as ``flush_rows`` records wait,
as batched INSERTs (one ``executemany`` per chunk of records, one transaction each)
through :meth:`Database.run <interlock.store.db.Database.run>`, on a worker thread.
Records are summed before they are written: one row per second and combination of
tenant, model, deployment, kind, status and cache hit, with the number of calls in
``requests``. At a thousand calls a second to one model that is one row a second, not a
thousand, so accounting costs the serving process almost nothing; every call's tokens
and cost are still counted, to the second.

Rules:

- The buffer is bounded by ``max_buffer``. Beyond it the oldest record is dropped and
  counted in :attr:`UsageRecorder.dropped` (for the metrics); a warning is logged once,
  and again only after a flush has succeeded since.
- A write that fails puts its rows back at the front of the buffer (still bounded) and
  is tried again at the next flush. The background writer is the ``llm-usage-flusher``
  loop of a :class:`~interlock.resilience.supervisor.Supervisor`: it logs the first
  failure of a streak once, with the cause (the database is named with the password
  masked; no key is ever in a record), backs off (from ``flush_s``, doubling, capped)
  while writes keep failing, and marks the process not ready until a write succeeds.
- A flush runs in its own task: when the caller of :meth:`UsageRecorder.flush` is
  cancelled (a client that went away), the write still finishes.
- :meth:`UsageRecorder.aclose` stops the task and writes what is left; records it
  cannot write, or recorded after it, are logged and counted as lost.
- Reads see only what has been written. For read-your-writes, call
  :meth:`UsageRecorder.flush` before :func:`usage_summary`; the gateway does so before
  it answers ``GET /llm/v1/usage``.

:func:`usage_summary` aggregates in SQL: one ``GROUP BY tenant, model, deployment`` over
the filtered rows, so totals and breakdowns come from one snapshot and always agree; the
few groups are then added up into the totals and the three breakdowns. Calls without a
tenant (the gateway is open when no tenants are configured) are shown, and filtered, as
``"(open)"``; calls that reached no upstream (cache hits, refusals) have the deployment
``"(none)"``. Amounts in USD are rounded to 6 decimals.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import re
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Self

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from interlock.errors import ConfigError, StoreError
from interlock.resilience.supervisor import Supervised, Supervisor
from interlock.store.db import Database
from interlock.store.tables import llm_usage

__all__ = [
    "NO_DEPLOYMENT",
    "OPEN_TENANT",
    "UsageRecord",
    "UsageRecorder",
    "parse_time",
    "usage_summary",
]

log = logging.getLogger("interlock.llm")

OPEN_TENANT: Final = "(open)"
"""How calls without a tenant are shown in a summary, and how to filter for them."""
NO_DEPLOYMENT: Final = "(none)"
"""The deployment of calls no upstream answered: cache hits and refused calls."""

CHUNK_ROWS: Final = 5_000  # rows per INSERT transaction
_NAME_CHARS: Final = 128  # the width of the tenant, model and deployment columns
_TAG_CHARS: Final = 16  # the width of the kind and status columns
_MAX_INT: Final = 2**31 - 1
_AGE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h|d|w)")
_AGE_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One gateway call as it is accounted.

    ``model`` is the name the client asked for; ``deployment`` is ``None`` for a cache
    hit or a call that never reached an upstream. ``saved_cost_usd`` is what a cache hit
    saved: the cost the call would have had. ``status`` is ``ok``, ``error``,
    ``rate_limited`` or ``budget``; ``kind`` is ``chat`` or ``embeddings``.
    """

    at: datetime
    tenant: str | None
    model: str
    deployment: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cache_hit: bool = False
    saved_cost_usd: float = 0.0
    status: str = "ok"
    latency_ms: float = 0.0
    kind: str = "chat"

    def __post_init__(self) -> None:
        if self.at.tzinfo is None:
            raise ValueError(f"naive datetime {self.at!r}: usage is recorded in aware UTC")
        if self.prompt_tokens < 0 or self.completion_tokens < 0:
            raise ValueError("token counts cannot be negative")
        for name in ("cost_usd", "saved_cost_usd", "latency_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, not {value!r}")


class UsageRecorder:
    """Buffers usage records and writes them in batches; one per gateway process.

    An async context manager: entering starts the background flush, leaving closes.
    """

    def __init__(
        self,
        database: Database,
        *,
        flush_s: float = 1.0,
        max_buffer: int = 100_000,
        flush_rows: int = CHUNK_ROWS,
        supervisor: Supervisor | None = None,
    ) -> None:
        if not flush_s > 0:
            raise ConfigError(f"the usage flush interval must be positive, not {flush_s}")
        if max_buffer < 1 or flush_rows < 1:
            raise ConfigError("the usage buffer and flush sizes must be at least 1")
        self._database = database
        self._flush_s = flush_s
        self._max_buffer = max_buffer
        self._flush_rows = flush_rows
        self._buffer: deque[UsageRecord] = deque()
        self._in_flight = 0
        self._dropped = 0
        self._written = 0
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._supervisor = supervisor or Supervisor()
        self._loop: Supervised | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._failing = False
        self._warned_drop = False

    def __repr__(self) -> str:
        return f"UsageRecorder({self._database.url!r}, pending={self.pending})"

    @property
    def dropped(self) -> int:
        """Records lost: pushed out of a full buffer, or recorded after :meth:`aclose`."""
        return self._dropped

    @property
    def pending(self) -> int:
        """Records not written yet, the ones being written included."""
        return len(self._buffer) + self._in_flight

    @property
    def written(self) -> int:
        """Records written to the database by this recorder."""
        return self._written

    # -- the request path ---------------------------------------------------------------

    def record(self, record: UsageRecord) -> None:
        """Buffer ``record`` for the next flush; O(1), never awaits, never raises."""
        if self._closed:
            self._drop("the usage recorder is closed: LLM usage records are lost")
            return
        buffer = self._buffer
        if len(buffer) >= self._max_buffer:
            buffer.popleft()
            self._drop(
                f"the usage buffer is full ({self._max_buffer} records):"
                " dropping the oldest LLM usage records"
            )
        buffer.append(record)
        if len(buffer) >= self._flush_rows and not self._failing:
            self._wake.set()

    def _drop(self, message: str) -> None:
        self._dropped += 1
        if not self._warned_drop:
            self._warned_drop = True
            log.warning(message, extra={"pending": self.pending})

    # -- writing ------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write every record buffered now.

        Raises :class:`~interlock.errors.StoreError` when the database fails; the
        records that were not written stay buffered for the next flush.
        """
        task = asyncio.create_task(self._flush_now(), name="llm-usage-flush")
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)
        await asyncio.shield(task)

    def _flush_done(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here too: its caller may have gone away

    async def _flush_now(self) -> None:
        async with self._lock:
            buffer = self._buffer
            remaining = len(buffer)
            while remaining > 0 and buffer:
                batch = [buffer.popleft() for _ in range(min(remaining, CHUNK_ROWS, len(buffer)))]
                self._in_flight = len(batch)
                try:
                    await self._database.run(functools.partial(_insert, batch))
                except StoreError:
                    self._restore(batch)
                    raise
                finally:
                    self._in_flight = 0
                self._written += len(batch)
                remaining -= len(batch)
            self._warned_drop = False

    def _restore(self, batch: list[UsageRecord]) -> None:
        """Put unwritten records back in front, then drop the oldest beyond the bound."""
        buffer = self._buffer
        buffer.extendleft(reversed(batch))
        overflow = len(buffer) - self._max_buffer
        for _ in range(max(overflow, 0)):
            buffer.popleft()
            self._drop(
                f"the usage buffer is full ({self._max_buffer} records) while writes fail:"
                " dropping the oldest LLM usage records"
            )

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start writing the buffer in the background."""
        if self._loop is None and not self._closed:
            self._loop = self._supervisor.spawn(
                "llm-usage-flusher", self._flush_when_due, backoff_s=self._flush_s
            )

    async def aclose(self) -> None:
        """Stop the background task and write what is left; never raises on a DB failure."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            await self._loop.stop()  # a write under way goes on: the flush below waits for it
        try:
            await self.flush()
        except StoreError as exc:
            log.error(
                "LLM usage records could not be written before closing",
                extra={"lost": self.pending, "error": str(exc)},
            )
            self._dropped += self.pending
            self._buffer.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _flush_when_due(self) -> None:
        """One step of the background writer: wait for ``flush_s`` or a full batch, write.

        After a failed write the supervisor's backoff was the wait: write at once.
        """
        if not self._failing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._flush_s):
                    await self._wake.wait()
        self._wake.clear()
        try:
            await self.flush()
        except StoreError:
            self._failing = True  # the records stay buffered; the supervisor logs and backs off
            raise
        self._failing = False


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width]


def _rows(records: list[UsageRecord]) -> list[dict[str, Any]]:
    """The records summed per second and dimensions: one row per group, not per call."""
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        tenant, deployment = record.tenant, record.deployment
        second = record.at.replace(microsecond=0)
        key = (
            second,
            tenant,
            record.model,
            deployment,
            record.kind,
            record.status,
            record.cache_hit,
        )
        row = groups.get(key)
        if row is None:
            groups[key] = {
                "at": second,
                "requests": 1,
                "tenant": None if tenant is None else _clip(tenant, _NAME_CHARS),
                "model": _clip(record.model, _NAME_CHARS),
                "deployment": None if deployment is None else _clip(deployment, _NAME_CHARS),
                "kind": _clip(record.kind, _TAG_CHARS),
                "status": _clip(record.status, _TAG_CHARS),
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "cost_usd": record.cost_usd,
                "cache_hit": record.cache_hit,
                "saved_cost_usd": record.saved_cost_usd,
                "latency_ms": record.latency_ms,
            }
            continue
        row["requests"] += 1
        row["prompt_tokens"] += record.prompt_tokens
        row["completion_tokens"] += record.completion_tokens
        row["cost_usd"] += record.cost_usd
        row["saved_cost_usd"] += record.saved_cost_usd
        row["latency_ms"] += record.latency_ms
    out = list(groups.values())
    for row in out:
        row["prompt_tokens"] = min(row["prompt_tokens"], _MAX_INT)
        row["completion_tokens"] = min(row["completion_tokens"], _MAX_INT)
    return out


def _insert(records: list[UsageRecord], conn: Connection) -> None:
    conn.execute(llm_usage.insert(), _rows(records))


# -- reading ------------------------------------------------------------------------------


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cache_hits: int = 0
    saved_cost_usd: float = 0.0
    errors: int = 0

    def add(self, other: _Totals) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.cache_hits += other.cache_hits
        self.saved_cost_usd += other.saved_cost_usd
        self.errors += other.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "total_cost_usd": round(self.cost_usd, 6),
            "cache_hits": self.cache_hits,
            "saved_cost_usd": round(self.saved_cost_usd, 6),
            "errors": self.errors,
        }


def _summary_query(
    since: datetime | None, until: datetime | None, tenant: str | None, model: str | None
) -> sa.Select[Any]:
    t = llm_usage

    def count_if(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(sa.case((condition, t.c.requests), else_=0)), 0)

    def total(column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        return sa.func.coalesce(sa.func.sum(column), 0)

    query = sa.select(
        t.c.tenant,
        t.c.model,
        t.c.deployment,
        total(t.c.requests),
        total(t.c.prompt_tokens),
        total(t.c.completion_tokens),
        total(t.c.cost_usd),
        count_if(t.c.cache_hit),
        total(t.c.saved_cost_usd),
        count_if(t.c.status != "ok"),
    ).group_by(t.c.tenant, t.c.model, t.c.deployment)
    if since is not None:
        query = query.where(t.c.at >= since)
    if until is not None:
        query = query.where(t.c.at < until)
    if tenant is not None:
        query = query.where(t.c.tenant.is_(None) if tenant == OPEN_TENANT else t.c.tenant == tenant)
    if model is not None:
        query = query.where(t.c.model == model)
    return query


async def usage_summary(
    database: Database,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    tenant: str | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """Totals of the calls at or after ``since`` and before ``until``, with breakdowns.

    Returns ``requests``, ``prompt_tokens``, ``completion_tokens``, ``total_tokens``,
    ``total_cost_usd``, ``cache_hits``, ``saved_cost_usd`` and ``errors`` (calls whose
    status is not ``ok``), the same fields per name in ``by_tenant``, ``by_model`` and
    ``by_deployment`` (sorted by name), and ``since``/``until`` as ISO 8601 or ``None``.
    ``tenant`` and ``model`` filter; ``tenant="(open)"`` selects calls without a tenant.
    """
    for label, when in (("since", since), ("until", until)):
        if when is not None and when.tzinfo is None:
            raise ValueError(f"naive datetime for {label}: {when!r}; pass an aware time")
    query = _summary_query(since, until, tenant, model)

    def fetch(conn: Connection) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in conn.execute(query)]

    groups = await database.run(fetch, readonly=True)
    totals = _Totals()
    breakdowns: tuple[dict[str, _Totals], ...] = ({}, {}, {})
    for group_tenant, group_model, group_deployment, *sums in groups:
        group = _Totals(
            int(sums[0]),
            int(sums[1]),
            int(sums[2]),
            float(sums[3]),
            int(sums[4]),
            float(sums[5]),
            int(sums[6]),
        )
        totals.add(group)
        names = (group_tenant or OPEN_TENANT, group_model, group_deployment or NO_DEPLOYMENT)
        for breakdown, name in zip(breakdowns, names, strict=True):
            breakdown.setdefault(name, _Totals()).add(group)
    by_tenant, by_model, by_deployment = (
        {name: part.to_json() for name, part in sorted(breakdown.items())}
        for breakdown in breakdowns
    )
    return {
        **totals.to_json(),
        "by_tenant": by_tenant,
        "by_model": by_model,
        "by_deployment": by_deployment,
        "since": since.astimezone(UTC).isoformat() if since is not None else None,
        "until": until.astimezone(UTC).isoformat() if until is not None else None,
    }


def parse_time(text: str, *, now: datetime) -> datetime:
    """An aware UTC time from a date, an ISO 8601 time, or an age before ``now``.

    ``2026-11-01`` is midnight UTC; ``2026-11-01T12:00`` without an offset is UTC;
    ``90m``, ``24h``, ``7d``, ``2w`` (also ``30s``) are that long before ``now`` (``m`` is
    minutes). Raises ``ValueError`` naming the text when it is none of these.
    """
    stripped = text.strip()
    age = _AGE.fullmatch(stripped)
    if age is not None:
        return (now - timedelta(**{_AGE_UNIT[age[2]]: float(age[1])})).astimezone(UTC)
    try:
        when = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a date, an ISO time or an age: use e.g. 2026-11-01, 24h or 7d"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
