"""Idempotency records: one contract for memory, Redis and the metadata database.

Every backend is checked the same way (unknown ids, order, overwrites, long lists, odd
ids, expiry); the database's own duties follow: the bounded expiry sweep that runs in
the background of a store and never on a read, records shared by workers, failures
the worker can retry, and a worker that restarts answering from its records.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from interlock.app import build_components, open_registry, start_components, stop_components
from interlock.bus import MemoryBroker, MemoryBus, Message
from interlock.errors import UnavailableError
from interlock.serving.dedupe import (
    CHUNK_IDS,
    DatabaseDedupe,
    Dedupe,
    MemoryDedupe,
    RedisDedupe,
    open_dedupe,
)
from interlock.serving.worker import PredictionWorker
from interlock.store import Database
from interlock.store.tables import event_dedupe
from tests.api.support import write_python_model
from tests.bus.contract import eventually
from tests.clock import ManualClock
from tests.conftest import REDIS_URL, require_service
from tests.events.test_worker import COUNTED, predicted_rows

TTL_S = 60.0


@dataclass
class Backend:
    """Opens stores of one backend; ``clock`` moves their time (None: Redis keeps its own)."""

    name: str
    open: Callable[[float], Dedupe]
    clock: ManualClock | None


@pytest.fixture(params=["memory", "redis", "sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """Every store opened is closed after the test, with its records."""
    opened: list[Dedupe] = []
    clock = ManualClock()
    database: Database | None = None
    prefix = f"interlock:test:dedupe:{uuid.uuid4().hex}:"

    def remember(store: Dedupe) -> Dedupe:
        opened.append(store)
        return store

    if request.param == "memory":
        yield Backend("memory", lambda ttl_s: remember(MemoryDedupe(ttl_s, clock=clock)), clock)
    elif request.param == "redis":
        require_service("Redis", REDIS_URL)
        yield Backend(
            "redis", lambda ttl_s: remember(RedisDedupe(REDIS_URL, ttl_s, prefix=prefix)), None
        )
        import redis.asyncio as aioredis

        raw = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in raw.scan_iter(match=prefix + "*", count=1000)]
            if keys:
                await raw.delete(*keys)
        finally:
            await raw.aclose()
    else:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'meta' / 'interlock.db'}"
        else:
            url = request.getfixturevalue("postgres_url")
        database = Database(url)
        database.migrate()
        db = database
        yield Backend(
            request.param,
            lambda ttl_s: remember(DatabaseDedupe(db, ttl_s, clock=clock)),
            clock,
        )
    for store in opened:
        await store.aclose()
    if database is not None:
        await database.aclose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """A migrated metadata database, on SQLite and PostgreSQL."""
    async with Database(database_url) as database:
        database.migrate()
        yield database


async def rows(db: Database) -> list[str]:
    """The request ids in the table, expired or not, sorted."""

    def query(conn: Connection) -> list[str]:
        ids = conn.execute(sa.select(event_dedupe.c.request_id)).scalars()
        return sorted(ids)

    return await db.run(query, readonly=True)


# -- the contract ------------------------------------------------------------------------


async def test_unknown_ids_have_no_record(backend: Backend) -> None:
    store = backend.open(TTL_S)
    assert await store.get_many(["never", "seen"]) == [None, None]
    assert await store.get_many([]) == []
    await store.set_many([])
    assert await store.get_many(["never"]) == [None]


async def test_records_come_back_in_the_order_asked(backend: Backend) -> None:
    store = backend.open(TTL_S)
    await store.set_many([("a", b"answer a"), ("b", b"\x00\xffbinary"), ("c", b"")])
    assert await store.get_many(["c", "x", "a", "b", "a"]) == [
        b"",
        None,
        b"answer a",
        b"\x00\xffbinary",
        b"answer a",
    ]


async def test_storing_again_replaces_the_answer_and_the_last_of_a_call_wins(
    backend: Backend,
) -> None:
    store = backend.open(TTL_S)
    await store.set_many([("a", b"first"), ("b", b"kept")])
    await store.set_many([("a", b"second")])
    assert await store.get_many(["a", "b"]) == [b"second", b"kept"]
    await store.set_many([("d", b"one"), ("d", b"two"), ("d", b"three")])
    assert await store.get_many(["d"]) == [b"three"]


async def test_many_ids_in_one_call(backend: Backend) -> None:
    count = 2 * CHUNK_IDS + 500  # several chunks in the database
    items = [(f"req-{i}", f"answer {i}".encode()) for i in range(count)]
    store = backend.open(TTL_S)
    await store.set_many(items)
    asked = [f"req-{i}" if i % 10 else f"missing-{i}" for i in range(count)]
    expected = [f"answer {i}".encode() if i % 10 else None for i in range(count)]
    assert await store.get_many(asked) == expected


async def test_long_and_odd_ids_are_told_apart(backend: Backend) -> None:
    """Ids past the database column's width, with NUL or non-ASCII characters."""
    common = "x" * 250
    ids = [common + "1", common + "2", "nul\x00a", "nul\x00b", "élan-🚀", "y" * 200]
    store = backend.open(TTL_S)
    await store.set_many([(request_id, request_id.encode()) for request_id in ids])
    assert await store.get_many(ids) == [request_id.encode() for request_id in ids]
    assert await store.get_many([common, "nul", "y" * 201]) == [None, None, None]


async def test_a_record_expires_after_its_ttl_and_a_store_renews_it(backend: Backend) -> None:
    clock = backend.clock
    if clock is None:  # Redis keeps its own time: brief records, waited out
        lasting, brief = backend.open(TTL_S), backend.open(0.2)
        await brief.set_many([("a", b"1"), ("b", b"2")])
        await lasting.set_many([("b", b"2 again")])  # renewed for TTL_S
        await brief.set_many([("c", b"3")])  # expires after a and after b's first record
        await eventually(lambda: brief.get_many(["c"]), lambda got: got == [None], what="expiry")
        assert await lasting.get_many(["a", "b"]) == [None, b"2 again"]
        return
    store = backend.open(TTL_S)
    await store.set_many([("a", b"1"), ("b", b"2")])
    clock.advance(TTL_S - 1)
    assert await store.get_many(["a", "b"]) == [b"1", b"2"]
    await store.set_many([("b", b"2 again")])
    clock.advance(2)
    assert await store.get_many(["a", "b"]) == [None, b"2 again"]
    clock.advance(TTL_S)
    assert await store.get_many(["a", "b"]) == [None, None]


# -- the database ------------------------------------------------------------------------


async def test_workers_share_the_database_records(database_url: str) -> None:
    """Two workers (two engines on one database) see each other's answers."""
    async with Database(database_url) as first, Database(database_url) as second:
        first.migrate()
        one, two = DatabaseDedupe(first, TTL_S), DatabaseDedupe(second, TTL_S)
        await one.set_many([("r1", b"from one")])
        assert await two.get_many(["r1", "r2"]) == [b"from one", None]
        await one.aclose()
        await two.aclose()


async def test_a_sweep_deletes_expired_rows_a_bounded_batch_at_a_time(db: Database) -> None:
    clock = ManualClock()
    store = DatabaseDedupe(db, TTL_S, clock=clock, sweep_rows=3)
    await store.set_many([(f"old-{i}", b"o") for i in range(5)])
    clock.advance(TTL_S / 2)
    await store.set_many([("young", b"y")])
    clock.advance(TTL_S / 2 + 1)  # the old rows have expired, the young one has not
    assert await store.get_many(["old-0", "young"]) == [None, b"y"]
    assert len(await rows(db)) == 6  # reads never delete

    assert await store.sweep() == 3
    assert await store.sweep() == 2
    assert await store.sweep() == 0
    assert await rows(db) == ["young"]
    assert store.swept == 5
    await store.aclose()


async def test_stores_sweep_in_the_background_at_most_once_per_interval(db: Database) -> None:
    clock = ManualClock()

    def open_store() -> DatabaseDedupe:
        return DatabaseDedupe(db, TTL_S, clock=clock, sweep_rows=3, sweep_every_s=600)

    async def swept(store: DatabaseDedupe, count: int) -> None:
        await eventually(lambda: _value(store.swept), lambda n: n == count, what="a sweep")

    store = open_store()
    await store.set_many([(f"old-{i}", b"o") for i in range(7)])  # sweeps: none expired
    clock.advance(TTL_S + 1)
    await store.set_many([("new-0", b"n")])  # the old rows expired, but within the interval
    await store.aclose()  # waits for a sweep still running
    assert len(await rows(db)) == 8
    assert store.swept == 0

    store = open_store()  # a worker that starts sweeps at its first store
    await store.set_many([("new-1", b"n")])
    await swept(store, 3)  # a full batch: more may be waiting, the next store sweeps again
    await store.set_many([("new-2", b"n")])
    await swept(store, 6)
    await store.set_many([("new-3", b"n")])
    await swept(store, 7)  # the last one: the next sweep waits out the interval
    await store.set_many([("new-4", b"n")])
    clock.advance(599)  # new-0 … new-4 expire meanwhile
    await store.set_many([("new-5", b"n")])
    assert await store.get_many(["new-4", "new-5"]) == [None, b"n"]
    assert await rows(db) == [f"new-{i}" for i in range(6)]
    assert store.swept == 7

    clock.advance(1)  # the interval has passed
    await store.set_many([("new-6", b"n")])
    await swept(store, 10)
    await store.aclose()
    left = await rows(db)
    assert len(left) == 4
    assert {"new-5", "new-6"} <= set(left)  # live records are never swept


async def _value(value: int) -> int:
    return value


async def test_database_failures_are_retryable_and_hide_the_password() -> None:
    async with Database("postgresql://app:s3cret@127.0.0.1:1/meta") as database:
        store = DatabaseDedupe(database, TTL_S)
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.get_many(["a"]),
            lambda: store.set_many([("a", b"1")]),
            store.sweep,
        ]
        for call in calls:
            with pytest.raises(UnavailableError) as caught:
                await call()
            message = str(caught.value)
            assert "postgresql://app:***@127.0.0.1:1/meta" in message
            assert "s3cret" not in message
            assert caught.value.retryable
        await store.aclose()


async def test_open_dedupe_picks_redis_then_the_database_then_memory(db: Database) -> None:
    redis_store = open_dedupe("redis://127.0.0.1:6379/0", TTL_S, database=db)
    assert isinstance(redis_store, RedisDedupe)
    await redis_store.aclose()
    db_store = open_dedupe(None, TTL_S, database=db)
    assert isinstance(db_store, DatabaseDedupe)
    await db_store.aclose()
    memory = open_dedupe(None, TTL_S)
    assert isinstance(memory, MemoryDedupe)
    await memory.aclose()


# -- the worker --------------------------------------------------------------------------


async def test_a_restarted_worker_answers_a_redelivery_from_the_database(
    make_settings: Any, tmp_path: Path
) -> None:
    """The records outlive the worker: the same request is predicted once."""
    settings = make_settings(bus={"url": "memory://", "retry_base_ms": 1})
    log = tmp_path / "calls.log"
    async with open_registry(settings) as registry:
        counted = write_python_model(tmp_path / "m", COUNTED.format(log=str(log)))
        await registry.register("m", counted, "python", alias="champion")
    parts = build_components(settings)
    await start_components(parts)
    bus = MemoryBus(broker=MemoryBroker())
    event = orjson.dumps({"requestId": "same", "model": "m", "inputs": {"x": 3}})
    answers: list[Any] = []
    try:
        for consumer in ("first", "restarted"):
            dedupe = open_dedupe(None, settings.bus.dedupe_ttl_s, database=parts.database)
            stop = asyncio.Event()
            worker = PredictionWorker(bus, parts.pipeline, dedupe, settings.bus, consumer=consumer)
            task = asyncio.ensure_future(worker.run(stop))
            await bus.publish_many(settings.bus.requests_topic, [(None, event)])
            sub = await bus.subscribe(settings.bus.completed_topic, group=consumer, consumer="r")
            try:
                messages: list[Message] = []
                while not messages:
                    messages = await sub.fetch(1, 5.0)
                    assert messages or not task.done(), "the worker stopped"
                answers.append(orjson.loads(messages[0].value))
            finally:
                await sub.aclose()
                stop.set()
                await task
                await dedupe.aclose()
    finally:
        await stop_components(parts)
    assert [a["result"] for a in answers] == [30, 30]
    assert answers[0] == answers[1]  # the recorded answer, as it was published
    assert predicted_rows(log) == 1
