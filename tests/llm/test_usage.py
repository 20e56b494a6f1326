"""LLM usage accounting on SQLite and PostgreSQL: exact summaries, batched writes, failures."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Connection

from interlock.errors import StoreError
from interlock.llm.usage import (
    NO_DEPLOYMENT,
    OPEN_TENANT,
    UsageRecord,
    UsageRecorder,
    parse_time,
    usage_summary,
)
from interlock.monitoring.metrics import ServingMetrics
from interlock.resilience.supervisor import Supervisor
from interlock.store.db import Database

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    async with Database(database_url) as database:
        await asyncio.to_thread(database.migrate)
        yield database


def call(hours: float = 0, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "at": T0 + timedelta(hours=hours),
        "tenant": "acme",
        "model": "gpt-4o",
        "deployment": "openai-east",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "cost_usd": 0.0,
    }
    values.update(fields)
    return UsageRecord(**values)


# Two tenants and calls without one, two models, a cache hit, an error and a refusal.
CALLS = [
    call(0, prompt_tokens=100, completion_tokens=50, cost_usd=0.0015, latency_ms=800.0),
    call(1, deployment=None, prompt_tokens=100, completion_tokens=50, cost_usd=0.0,
         cache_hit=True, saved_cost_usd=0.0015, latency_ms=2.0),
    call(2, model="embed-small", deployment="openai-embed", prompt_tokens=10,
         completion_tokens=0, cost_usd=0.00001, kind="embeddings"),
    call(3, tenant="globex", deployment="azure-west", prompt_tokens=200, completion_tokens=100,
         cost_usd=0.003),
    call(4, tenant="globex", deployment="azure-west", prompt_tokens=0, completion_tokens=0,
         status="error"),
    call(5, tenant="globex", deployment=None, prompt_tokens=0, completion_tokens=0,
         status="budget"),
    call(24, tenant=None, model="embed-small", deployment="openai-embed", prompt_tokens=30,
         completion_tokens=0, cost_usd=0.00003, kind="embeddings"),
]  # fmt: skip


def part(
    requests: int,
    prompt: int,
    completion: int,
    cost: float,
    hits: int = 0,
    saved: float = 0.0,
    errors: int = 0,
) -> dict[str, Any]:
    return {
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "total_cost_usd": cost,
        "cache_hits": hits,
        "saved_cost_usd": saved,
        "errors": errors,
    }


async def recorded(db: Database, calls: list[UsageRecord]) -> UsageRecorder:
    recorder = UsageRecorder(db)
    for record in calls:
        recorder.record(record)
    await recorder.flush()
    return recorder


async def test_the_summary_totals_and_breakdowns_are_exact(db: Database) -> None:
    await recorded(db, CALLS)

    assert await usage_summary(db) == {
        **part(7, 440, 200, 0.00454, hits=1, saved=0.0015, errors=2),
        "by_tenant": {
            OPEN_TENANT: part(1, 30, 0, 0.00003),
            "acme": part(3, 210, 100, 0.00151, hits=1, saved=0.0015),
            "globex": part(3, 200, 100, 0.003, errors=2),
        },
        "by_model": {
            "embed-small": part(2, 40, 0, 0.00004),
            "gpt-4o": part(5, 400, 200, 0.0045, hits=1, saved=0.0015, errors=2),
        },
        "by_deployment": {
            NO_DEPLOYMENT: part(2, 100, 50, 0.0, hits=1, saved=0.0015, errors=1),
            "azure-west": part(2, 200, 100, 0.003, errors=1),
            "openai-east": part(1, 100, 50, 0.0015),
            "openai-embed": part(2, 40, 0, 0.00004),
        },
        "since": None,
        "until": None,
    }


async def test_an_empty_database_sums_to_zero(db: Database) -> None:
    summary = await usage_summary(db, since=T0)
    assert summary == {
        **part(0, 0, 0, 0.0),
        "by_tenant": {},
        "by_model": {},
        "by_deployment": {},
        "since": "2026-11-01T12:00:00+00:00",
        "until": None,
    }


async def test_filters_by_time_tenant_and_model(db: Database) -> None:
    await recorded(db, CALLS)

    def brief(summary: dict[str, Any]) -> tuple[int, float, list[str], list[str]]:
        return (
            summary["requests"],
            summary["total_cost_usd"],
            list(summary["by_tenant"]),
            list(summary["by_model"]),
        )

    since = await usage_summary(db, since=T0 + timedelta(hours=2))
    assert brief(since) == (5, 0.00304, [OPEN_TENANT, "acme", "globex"], ["embed-small", "gpt-4o"])
    assert since["since"] == "2026-11-01T14:00:00+00:00"
    until = await usage_summary(db, until=T0 + timedelta(hours=2))  # until is exclusive
    assert brief(until) == (2, 0.0015, ["acme"], ["gpt-4o"])
    # An aware time in another zone means the same instant.
    plus_two = timezone(timedelta(hours=2))
    window = await usage_summary(
        db, since=datetime(2026, 11, 1, 17, tzinfo=plus_two), until=T0 + timedelta(hours=5)
    )
    assert brief(window) == (2, 0.003, ["globex"], ["gpt-4o"])
    assert window["since"] == "2026-11-01T15:00:00+00:00"

    assert brief(await usage_summary(db, tenant="globex")) == (3, 0.003, ["globex"], ["gpt-4o"])
    assert brief(await usage_summary(db, tenant=OPEN_TENANT)) == (
        1, 0.00003, [OPEN_TENANT], ["embed-small"],
    )  # fmt: skip
    assert brief(await usage_summary(db, model="embed-small")) == (
        2, 0.00004, [OPEN_TENANT, "acme"], ["embed-small"],
    )  # fmt: skip
    assert brief(await usage_summary(db, tenant="acme", model="embed-small")) == (
        1, 0.00001, ["acme"], ["embed-small"],
    )  # fmt: skip
    assert (await usage_summary(db, tenant="nobody"))["requests"] == 0

    with pytest.raises(ValueError, match="naive datetime for since"):
        await usage_summary(db, since=datetime(2026, 11, 1))


# -- the recorder -------------------------------------------------------------------------


def watch_statements(db: Database) -> tuple[list[str], Callable[[], None]]:
    """Every SQL statement the database runs from now on; call the second item to stop."""
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.strip().split()[0].upper())

    event.listen(db.engine, "before_cursor_execute", seen)
    return statements, lambda: event.remove(db.engine, "before_cursor_execute", seen)


async def test_record_only_buffers_and_one_flush_writes_the_batch(db: Database) -> None:
    recorder = UsageRecorder(db)
    statements, stop = watch_statements(db)
    try:
        for i in range(500):
            recorder.record(call(i / 100, prompt_tokens=i))
        assert statements == []  # recording never touches the database
        assert (recorder.pending, recorder.written) == (500, 0)
        assert (await usage_summary(db))["requests"] == 0
        statements.clear()

        await recorder.flush()
        assert statements.count("INSERT") == 1  # one batched INSERT for all 500 rows
    finally:
        stop()
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 500, 0)
    summary = await usage_summary(db)
    assert (summary["requests"], summary["prompt_tokens"]) == (500, sum(range(500)))

    await recorder.flush()  # nothing buffered: nothing written twice
    assert (await usage_summary(db))["requests"] == 500


async def rename(db: Database, old: str, new: str) -> None:
    def run(conn: Connection) -> None:
        conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")

    await db.run(run)


async def test_a_failed_flush_keeps_the_records_for_the_next(db: Database) -> None:
    recorder = UsageRecorder(db)
    for record in CALLS[:3]:
        recorder.record(record)
    await rename(db, "llm_usage", "llm_usage_away")

    with pytest.raises(StoreError, match="llm_usage"):
        await recorder.flush()
    assert (recorder.pending, recorder.written, recorder.dropped) == (3, 0, 0)

    for record in CALLS[3:]:
        recorder.record(record)
    await rename(db, "llm_usage_away", "llm_usage")
    await recorder.flush()
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 7, 0)
    summary = await usage_summary(db)
    assert (summary["requests"], summary["total_cost_usd"]) == (7, 0.00454)


async def test_a_full_buffer_drops_the_oldest_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with Database(f"sqlite:///{tmp_path / 'usage.db'}") as db:
        await asyncio.to_thread(db.migrate)
        recorder = UsageRecorder(db, max_buffer=3)
        with caplog.at_level(logging.WARNING, logger="interlock.llm"):
            for i in range(5):
                recorder.record(call(i, prompt_tokens=i))
        assert (recorder.dropped, recorder.pending) == (2, 3)
        assert [r.getMessage() for r in caplog.records] == [
            "the usage buffer is full (3 records): dropping the oldest LLM usage records"
        ]
        await recorder.flush()
        assert (await usage_summary(db))["prompt_tokens"] == 2 + 3 + 4  # the newest three

        # Records made while a failing write runs: the buffer stays bounded, newest kept.
        for i in range(3):
            recorder.record(call(i, prompt_tokens=10 + i))
        await rename(db, "llm_usage", "llm_usage_away")
        flushing = asyncio.create_task(recorder.flush())
        await asyncio.sleep(0)
        recorder.record(call(0, prompt_tokens=13))
        recorder.record(call(0, prompt_tokens=14))
        with pytest.raises(StoreError):
            await flushing
        assert (recorder.dropped, recorder.pending) == (4, 3)
        await rename(db, "llm_usage_away", "llm_usage")
        await recorder.flush()
        assert (await usage_summary(db))["prompt_tokens"] == 9 + 12 + 13 + 14


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds; fail after 10 s."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


async def test_the_background_task_writes_on_its_own(db: Database) -> None:
    # By size: an hour-long interval, so only the ten waiting records trigger the write.
    async with UsageRecorder(db, flush_s=3600, flush_rows=10) as recorder:
        for i in range(9):
            recorder.record(call(i))
        recorder.record(call(9))
        await eventually(lambda: recorder.written == 10)
    # By time.
    async with UsageRecorder(db, flush_s=0.02) as recorder:
        recorder.record(call(0))
        await eventually(lambda: recorder.written == 1)
    assert (await usage_summary(db))["requests"] == 11


async def test_the_background_writer_survives_a_failing_database(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """Failing writes are logged once, counted, retried with backoff; records are kept."""
    metrics = ServingMetrics()
    supervisor = Supervisor(observer=metrics, max_backoff_s=0.05)

    def failures() -> float:
        sample = {"loop": "llm-usage-flusher"}
        value = metrics.registry.get_sample_value(
            "interlock_background_loop_failures_total", sample
        )
        return value or 0.0

    await rename(db, "llm_usage", "llm_usage_away")
    with caplog.at_level(logging.INFO, logger="interlock.resilience"):
        async with UsageRecorder(db, flush_s=0.01, supervisor=supervisor) as recorder:
            for record in CALLS:
                recorder.record(record)
            await eventually(lambda: failures() >= 3)
            assert supervisor.failing() == ["llm-usage-flusher"]
            assert (recorder.pending, recorder.written) == (7, 0)
            await rename(db, "llm_usage_away", "llm_usage")
            await eventually(lambda: recorder.written == 7)
            await eventually(lambda: supervisor.failing() == [])
    assert [r.levelname for r in caplog.records if r.name == "interlock.resilience"] == [
        "ERROR",
        "INFO",
    ]
    assert supervisor.status() == []  # closing the recorder stopped its loop
    assert (await usage_summary(db))["requests"] == 7


async def test_aclose_writes_what_is_left(db: Database) -> None:
    recorder = UsageRecorder(db, flush_s=3600)
    await recorder.start()
    for record in CALLS:
        recorder.record(record)
    await recorder.aclose()
    assert (await usage_summary(db))["requests"] == 7
    assert (recorder.pending, recorder.written) == (0, 7)

    recorder.record(CALLS[0])  # too late: counted as lost, never buffered
    assert (recorder.dropped, recorder.pending) == (1, 0)
    await recorder.aclose()  # twice is fine


async def test_aclose_on_a_failing_database_logs_the_loss_and_returns(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = UsageRecorder(db, flush_s=3600)
    await recorder.start()
    for record in CALLS:
        recorder.record(record)
    await rename(db, "llm_usage", "llm_usage_away")
    with caplog.at_level(logging.ERROR, logger="interlock.llm"):
        await recorder.aclose()
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 0, 7)
    [line] = caplog.records
    assert line.getMessage() == "LLM usage records could not be written before closing"
    assert line.__dict__["lost"] == 7


async def test_a_flush_whose_caller_is_cancelled_still_writes(db: Database) -> None:
    """A client that leaves ``GET /usage`` mid-flush neither loses nor doubles records."""
    # Another transaction holds the table, so the recorder's write waits in its thread.
    blocker = await asyncio.to_thread(db.engine.connect)
    transaction = await asyncio.to_thread(blocker.begin)  # SQLite: BEGIN IMMEDIATE
    if db.dialect == "postgresql":
        await asyncio.to_thread(blocker.exec_driver_sql, "LOCK TABLE llm_usage IN EXCLUSIVE MODE")
    loop = asyncio.get_running_loop()
    writing = asyncio.Event()
    started = threading.Event()

    def seen(*_args: Any) -> None:
        if not started.is_set():
            started.set()
            loop.call_soon_threadsafe(writing.set)

    event.listen(db.engine, "before_cursor_execute", seen)
    recorder = UsageRecorder(db)
    try:
        try:
            for record in CALLS:
                recorder.record(record)
            caller = asyncio.create_task(recorder.flush())
            await writing.wait()
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
            assert caller.cancelled()
        finally:
            await asyncio.to_thread(transaction.rollback)
            await asyncio.to_thread(blocker.close)
        await recorder.flush()  # waits for the write that is still running
    finally:  # not earlier: removing a listener while a thread runs it is not safe
        event.remove(db.engine, "before_cursor_execute", seen)
    assert (recorder.pending, recorder.written) == (0, 7)
    assert (await usage_summary(db))["requests"] == 7


async def test_names_longer_than_the_columns_are_cut_not_refused(db: Database) -> None:
    recorder = await recorded(db, [call(0, model="m" * 300, tenant="t" * 200, status="x" * 40)])
    assert recorder.written == 1
    summary = await usage_summary(db)
    assert list(summary["by_model"]) == ["m" * 128]
    assert list(summary["by_tenant"]) == ["t" * 128]
    assert summary["errors"] == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"at": datetime(2026, 11, 1)}, "naive datetime"),
        ({"prompt_tokens": -1}, "token counts cannot be negative"),
        ({"cost_usd": float("nan")}, "cost_usd must be a finite number"),
        ({"saved_cost_usd": -0.5}, "saved_cost_usd must be a finite number"),
    ],
)
def test_a_record_that_cannot_be_stored_is_refused_when_made(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call(**fields)


# -- times as the CLI and the HTTP API take them ------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T08:30", datetime(2026, 11, 1, 8, 30, tzinfo=UTC)),
        ("2026-11-01T08:30:00+02:00", datetime(2026, 11, 1, 6, 30, tzinfo=UTC)),
        ("2026-11-01T08:30:00Z", datetime(2026, 11, 1, 8, 30, tzinfo=UTC)),
        ("24h", T0 - timedelta(hours=24)),
        ("7d", T0 - timedelta(days=7)),
        ("90m", T0 - timedelta(minutes=90)),
        ("2w", T0 - timedelta(weeks=2)),
        (" 1.5h ", T0 - timedelta(minutes=90)),
    ],
)
def test_parse_time(text: str, expected: datetime) -> None:
    parsed = parse_time(text, now=T0)
    assert parsed == expected
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["yesterday", "24x", "", "2026-13-01", "-3d"])
def test_parse_time_names_what_it_cannot_read(text: str) -> None:
    with pytest.raises(ValueError, match="is not a date, an ISO time or an age"):
        parse_time(text, now=T0)
