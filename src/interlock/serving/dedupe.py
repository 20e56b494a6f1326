"""Idempotency records for the event worker: a requestId answered once stays answered.

The worker looks up every requestId of a batch in one call before predicting, and
stores the answers of a batch in one call after publishing them. A record lives
``ttl_s``; a redelivered request found here is answered from its record, not predicted.
Storing an id again replaces its answer and starts its ``ttl_s`` afresh; when one call
names an id twice, the last answer wins.

- :class:`MemoryDedupe`: in the process (a single worker, the embedded default; lost
  when the worker stops).
- :class:`RedisDedupe`: shared by every worker of a group and kept across restarts: one
  ``MGET`` per lookup and one pipelined ``SET … PX`` per store.
- :class:`DatabaseDedupe`: shared and kept in the metadata database (SQLite or
  PostgreSQL), table ``event_dedupe``: one ``SELECT … WHERE request_id IN (…)`` per
  lookup and one ``INSERT … ON CONFLICT DO UPDATE`` per store (lists beyond a thousand
  ids are split into chunks, in the same transaction), on the database's worker
  threads. Expired rows are never returned, and never deleted on the read path: a store
  starts a background sweep at most once every ``sweep_every_s`` (and at the first
  store) that deletes at most ``sweep_rows`` of them; when it finds a full batch, the
  next store sweeps again, so a backlog drains in short transactions. A requestId
  longer than the column (200 characters) or holding a NUL character is keyed by its
  SHA-256 (``sha256:`` and 64 hex digits).

When the Redis or database store fails the worker is told
(:class:`~interlock.errors.UnavailableError`, naming the store with its password masked):
it retries the batch later rather than risk predicting twice. The Redis store thus
**fails closed**, under the outage policy of :class:`interlock.store.redis.Outage`: one
warning per outage on ``interlock.serving``, then a jittered backoff (0.5 s doubling to
5 s) during which calls raise at once without touching the network, then a single probe,
so a worker group does not hammer a Redis that is coming back.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from interlock._core.clock import Clock, SystemClock
from interlock.errors import ConfigError, StoreError, UnavailableError
from interlock.settings import mask_url
from interlock.store.db import Database
from interlock.store.redis import Outage, check_url, is_redis_url, open_client
from interlock.store.tables import event_dedupe

if TYPE_CHECKING:
    import redis.asyncio
    from redis.commands.core import AsyncScript

__all__ = ["DatabaseDedupe", "Dedupe", "MemoryDedupe", "RedisDedupe", "open_dedupe"]

log = logging.getLogger("interlock.serving")

T = TypeVar("T")

CHUNK_IDS: Final = 1_000  # ids per SELECT, and rows per INSERT, in the database
_ID_CHARS: Final = 200  # the width of event_dedupe.request_id


class Dedupe(Protocol):
    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        """The recorded answer of each id, in order; None where there is none."""
        ...

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Record ``(id, answer)`` pairs for ``ttl_s``."""
        ...

    async def aclose(self) -> None: ...


class MemoryDedupe:
    """Records in the process, the oldest dropped beyond ``max_entries``."""

    def __init__(
        self, ttl_s: float, *, max_entries: int = 1_000_000, clock: Clock | None = None
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock if clock is not None else SystemClock()
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        now = self._clock.monotonic()
        out: list[bytes | None] = []
        for request_id in ids:
            found = self._records.get(request_id)
            out.append(found[1] if found is not None and found[0] > now else None)
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        until = self._clock.monotonic() + self._ttl_s
        records = self._records
        for request_id, answer in items:
            records[request_id] = (until, answer)
            records.move_to_end(request_id)
        while len(records) > self._max:
            records.popitem(last=False)

    async def aclose(self) -> None:
        self._records.clear()


# SET each key to its answer with the TTL (the last argument), in one round trip.
_SET_ALL = """
local ttl = ARGV[#ARGV]
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[i], 'PX', ttl)
end
return #KEYS
"""


class RedisDedupe:
    """Records in Redis under ``prefix + requestId``.

    Fails closed: a failed call, or any call during the backoff after one, raises
    :class:`~interlock.errors.UnavailableError`; ``clock.monotonic()`` times the backoff.
    """

    def __init__(
        self,
        url: str,
        ttl_s: float,
        *,
        prefix: str = "interlock:dedupe:",
        timeout_s: float = 2.0,
        clock: Clock | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"the dedupe store timeout must be positive, not {timeout_s}")
        check_url(url, "dedupe store")
        self._url = url
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._timeout_s = timeout_s
        self.outage = Outage(
            "redis dedupe store",
            url,
            clock=clock if clock is not None else SystemClock(),
            logger=log,
            fails_open=False,
            while_down="retrying batches later",
        )
        self._client: redis.asyncio.Redis | None = None
        self._script: AsyncScript | None = None

    def __repr__(self) -> str:
        return f"RedisDedupe({mask_url(self._url)!r}, prefix={self._prefix!r})"

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            self._client = open_client(self._url, timeout_s=self._timeout_s)
        return self._client

    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        keys = [self._prefix + request_id for request_id in ids]
        values = await self._call("get_many", lambda: self._redis().mget(keys))
        return cast("list[bytes | None]", values)  # decode_responses is off: bytes

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """One script call for the whole batch: a pipeline of SETs cost ~35 µs a command
        in redis-py, the worker's largest single cost."""
        if not items:
            return
        keys = [self._prefix + request_id for request_id, _ in items]
        args: list[bytes | int] = [answer for _, answer in items]
        args.append(self._ttl_ms)
        await self._call("set_many", lambda: self._set_all()(keys=keys, args=args))

    def _set_all(self) -> AsyncScript:
        if self._script is None:
            self._script = self._redis().register_script(_SET_ALL)
        return self._script

    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        """``await call()`` under the timeout and the outage policy (fails closed)."""
        if not self.outage.may_call():
            raise self.outage.unavailable(op)
        try:
            async with asyncio.timeout(self._timeout_s):
                result = await call()
        except Exception as exc:
            self.outage.failed(op, exc)
            raise self.outage.unavailable(op, exc) from exc
        except BaseException:
            self.outage.cancelled()
            raise
        self.outage.succeeded()
        return result

    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._script = None
        if client is not None:
            await client.aclose()


class DatabaseDedupe:
    """Records in the metadata database's ``event_dedupe`` table.

    The database must be migrated, and it stays open: its owner closes it. Closing this
    waits for a running sweep and starts no other.
    """

    def __init__(
        self,
        database: Database,
        ttl_s: float,
        *,
        clock: Clock | None = None,
        sweep_every_s: float = 60.0,
        sweep_rows: int = 5_000,
    ) -> None:
        if not ttl_s > 0 or not sweep_every_s > 0:
            raise ConfigError("the dedupe TTL and sweep interval must be positive")
        if sweep_rows < 1:
            raise ConfigError("the dedupe sweep must delete at least 1 row at a time")
        if database.dialect == "postgresql":
            self._insert: Callable[[sa.Table], postgresql.Insert | sqlite.Insert] = (
                postgresql.insert
            )
        else:
            self._insert = sqlite.insert
        self._database = database
        self._ttl = timedelta(seconds=ttl_s)
        self._clock = clock if clock is not None else SystemClock()
        self._sweep_every_s = sweep_every_s
        self._sweep_rows = sweep_rows
        self._next_sweep = float("-inf")  # monotonic seconds; the first store sweeps
        self._sweeping: asyncio.Task[None] | None = None
        self._swept = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"DatabaseDedupe({self._database.url!r})"

    @property
    def swept(self) -> int:
        """Expired records this store has deleted."""
        return self._swept

    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        keys = [_key(request_id) for request_id in ids]
        query = functools.partial(_select, keys, self._clock.now())
        try:
            found = await self._database.run(query, readonly=True)
        except StoreError as exc:
            raise UnavailableError(f"the dedupe store failed: {exc}") from exc
        return [found.get(key) for key in keys]

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        rows = {_key(request_id): answer for request_id, answer in items}  # the last wins
        now = self._clock.now()
        write = functools.partial(_upsert, self._insert, rows, now + self._ttl)
        try:
            await self._database.run(write)
        except StoreError as exc:
            raise UnavailableError(f"the dedupe store failed: {exc}") from exc
        if (
            not self._closed
            and self._sweeping is None
            and self._clock.monotonic() >= self._next_sweep
        ):
            self._next_sweep = self._clock.monotonic() + self._sweep_every_s
            self._sweeping = asyncio.create_task(
                self._sweep_in_background(now), name="dedupe-sweep"
            )

    async def sweep(self) -> int:
        """Delete at most ``sweep_rows`` expired records now; how many were deleted."""
        return await self._delete_expired(self._clock.now())

    async def _delete_expired(self, now: datetime) -> int:
        delete = functools.partial(_delete_expired, now, self._sweep_rows, self._database.dialect)
        try:
            deleted = await self._database.run(delete)
        except StoreError as exc:
            raise UnavailableError(f"the dedupe store failed: {exc}") from exc
        self._swept += deleted
        return deleted

    async def _sweep_in_background(self, now: datetime) -> None:
        try:
            if await self._delete_expired(now) >= self._sweep_rows:
                self._next_sweep = self._clock.monotonic()  # more are waiting
        except UnavailableError as exc:
            log.warning("expired dedupe records were not deleted", extra={"error": str(exc)})
        finally:
            self._sweeping = None

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeping is not None:
            await self._sweeping


def open_dedupe(
    url: str | None,
    ttl_s: float,
    *,
    database: Database | None = None,
    timeout_s: float = 2.0,
    clock: Clock | None = None,
) -> Dedupe:
    """Redis for a ``redis://`` URL, else the metadata database when given, else memory.

    ``timeout_s`` bounds each Redis call; ``clock`` times expiry and the Redis backoff.
    """
    if url is not None and is_redis_url(url):
        return RedisDedupe(url, ttl_s, timeout_s=timeout_s, clock=clock)
    if database is not None:
        return DatabaseDedupe(database, ttl_s, clock=clock)
    return MemoryDedupe(ttl_s, clock=clock)


def _key(request_id: str) -> str:
    """The column's value for a requestId: itself, or its digest when it cannot be."""
    if len(request_id) <= _ID_CHARS and "\x00" not in request_id:
        return request_id
    digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()
    return f"sha256:{digest}"


def _select(keys: list[str], now: datetime, conn: Connection) -> dict[str, bytes]:
    t = event_dedupe
    unique = list(dict.fromkeys(keys))
    found: dict[str, bytes] = {}
    for start in range(0, len(unique), CHUNK_IDS):
        query = sa.select(t.c.request_id, t.c.answer).where(
            t.c.request_id.in_(unique[start : start + CHUNK_IDS]), t.c.expires_at > now
        )
        for request_id, answer in conn.execute(query):
            found[request_id] = bytes(answer)
    return found


def _upsert(
    insert: Callable[[sa.Table], postgresql.Insert | sqlite.Insert],
    rows: dict[str, bytes],
    expires_at: datetime,
    conn: Connection,
) -> None:
    values = [
        {"request_id": key, "answer": answer, "expires_at": expires_at}
        for key, answer in rows.items()
    ]
    for start in range(0, len(values), CHUNK_IDS):
        stmt = insert(event_dedupe).values(values[start : start + CHUNK_IDS])
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[event_dedupe.c.request_id],
                set_={"answer": stmt.excluded.answer, "expires_at": stmt.excluded.expires_at},
            )
        )


def _delete_expired(now: datetime, limit: int, dialect: str, conn: Connection) -> int:
    t = event_dedupe
    expired = sa.select(t.c.request_id).where(t.c.expires_at < now).limit(limit)
    if dialect == "postgresql":
        # Concurrent sweeps (one per worker) take different rows instead of queueing.
        expired = expired.with_for_update(skip_locked=True)
    # expires_at is tested again on the row deleted: one a store renewed meanwhile stays.
    stmt = sa.delete(t).where(t.c.expires_at < now, t.c.request_id.in_(expired))
    deleted: int = conn.execute(stmt).rowcount
    return deleted
