"""The Redis Streams bus on the real server: the contract, the entry layout, XAUTOCLAIM
of a dead member's entries, a stream deleted under its group, and failures."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import redis.asyncio

from interlock.bus import BusError, EventBus, open_bus
from interlock.bus.redis import RedisBus
from interlock.errors import ConfigError
from tests.bus.contract import BusBackend, BusContract, drain, eventually, unique_name
from tests.conftest import REDIS_URL, _free_port, require_service

CLAIM_IDLE_MS = 200  # how long a dead member's entries stay with it in these tests


class TestRedisContract(BusContract):
    @pytest.fixture
    def backend(self) -> BusBackend:
        require_service("Redis", REDIS_URL)

        async def make_bus() -> EventBus:
            return RedisBus(REDIS_URL, claim_idle_ms=CLAIM_IDLE_MS, timeout_s=5.0)

        async def drop_topic(topic: str) -> None:
            client = redis.asyncio.Redis.from_url(REDIS_URL)
            await client.delete(topic)
            await client.aclose()

        return BusBackend(make_bus, drop_topic=drop_topic, redelivery_timeout_s=10.0)


@pytest.fixture
async def raw() -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client of the test Redis, to look behind the bus."""
    require_service("Redis", REDIS_URL)
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def stream(raw: redis.asyncio.Redis) -> AsyncIterator[str]:
    """A stream name of the test's own, deleted afterwards."""
    name = unique_name("test.bus.")
    yield name
    await raw.delete(name)


@pytest.fixture
async def bus() -> AsyncIterator[RedisBus]:
    require_service("Redis", REDIS_URL)
    async with RedisBus(REDIS_URL, claim_idle_ms=CLAIM_IDLE_MS) as bus:
        yield bus


async def test_a_message_is_one_entry_with_v_k_and_h(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    await bus.publish(stream, b"value", key=b"key", headers={"a": "1"})
    await bus.publish_many(stream, [(None, b"bare")])

    entries = await raw.xrange(stream) or []

    assert [fields for _, fields in entries] == [
        {b"v": b"value", b"k": b"key", b"h": b'{"a":"1"}'},
        {b"v": b"bare"},
    ]


async def test_streams_are_capped_near_max_len(raw: redis.asyncio.Redis, stream: str) -> None:
    async with RedisBus(REDIS_URL, max_len=100) as capped:
        for _ in range(10):
            await capped.publish_many(stream, [(None, b"x")] * 100)
        await capped.publish(stream, b"last")

    assert 100 <= await raw.xlen(stream) < 1001


async def test_an_entry_written_by_another_producer_arrives_as_its_fields(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    sub = await bus.subscribe(stream, group="g", consumer="c")
    await raw.xadd(stream, {"requestId": "r-1", "h": "not json"})

    [message] = await drain(sub, 1)

    assert message.value == b'{"requestId":"r-1","h":"not json"}'
    assert (message.key, message.headers) == (None, {})


async def test_a_dead_members_entries_are_claimed_with_their_delivery_count(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    dead = await bus.subscribe(stream, group="g", consumer="dead")
    await bus.publish_many(stream, [(None, b"a"), (None, b"b")])
    taken = await drain(dead, 2)
    await dead.ack(taken[:1])
    del dead  # no ack, no aclose: as a killed process
    gc.collect()

    heir = await bus.subscribe(stream, group="g", consumer="heir")
    [again] = await drain(heir, 1)
    pending = await raw.xpending_range(stream, "g", "-", "+", 10)

    assert (again.value, again.id, again.deliveries) == (b"b", taken[1].id, 2)
    assert [(p["message_id"], p["consumer"]) for p in pending] == [(again.handle, b"heir")]

    successor = await bus.subscribe(stream, group="g", consumer="successor")
    [third] = await drain(successor, 1)  # the heir died too
    await successor.ack([third])

    assert (third.value, third.deliveries) == (b"b", 3)
    assert await raw.xpending_range(stream, "g", "-", "+", 10) == []


async def test_a_closing_member_hands_its_entries_back_at_once(
    raw: redis.asyncio.Redis, stream: str
) -> None:
    async with RedisBus(REDIS_URL, claim_idle_ms=3_600_000) as patient:
        leaving = await patient.subscribe(stream, group="g", consumer="leaving")
        await patient.publish(stream, b"held")
        [held] = await drain(leaving, 1)
        await leaving.aclose()
        assert await leaving.fetch(10, 0.01) == []

        staying = await patient.subscribe(stream, group="g", consumer="staying")
        [again] = await drain(staying, 1)  # an hour of claim_idle_ms, not waited for

    assert (again.id, again.deliveries) == (held.id, 2)


async def test_fetching_goes_on_after_the_stream_is_deleted(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    sub = await bus.subscribe(stream, group="g", consumer="c")
    await bus.publish(stream, b"before")
    assert [m.value for m in await drain(sub, 1, ack=True)] == [b"before"]

    await raw.delete(stream)
    await bus.publish(stream, b"after")  # a new stream, without the group

    assert [m.value for m in await drain(sub, 1, ack=True)] == [b"after"]
    assert [g["name"] for g in await raw.xinfo_groups(stream)] == [b"g"]


async def test_a_waiting_fetch_goes_on_when_its_stream_is_deleted(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    sub = await bus.subscribe(stream, group="g", consumer="c")
    waiting = asyncio.create_task(sub.fetch(10, 10.0))
    await eventually(
        lambda: raw.client_list(), _blocked_in_xreadgroup, what="the fetch waiting in Redis"
    )

    await raw.delete(stream)  # Redis answers the waiting XREADGROUP with UNBLOCKED
    await eventually(lambda: raw.exists(stream), lambda n: n == 1, what="the group made again")
    await bus.publish(stream, b"after")

    assert [m.value for m in await waiting] == [b"after"]


def _blocked_in_xreadgroup(clients: list[dict[str, str]]) -> bool:
    return any(c.get("cmd") == "xreadgroup" and "b" in c.get("flags", "") for c in clients)


async def test_fetching_goes_on_after_the_group_is_destroyed(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    sub = await bus.subscribe(stream, group="g", consumer="c")
    await raw.xgroup_destroy(stream, "g")
    await bus.publish(stream, b"kept")

    assert [m.value for m in await drain(sub, 1, ack=True)] == [b"kept"]
    assert await sub.lag() == 0


async def test_lag_counts_what_was_there_before_the_group(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    await bus.publish_many(stream, [(None, b"%d" % i) for i in range(7)])
    sub = await bus.subscribe(stream, group="late", consumer="c")

    assert await sub.lag() == 7
    await raw.xgroup_destroy(stream, "late")
    assert await sub.lag() == 7  # gone: recreated, the group would read all of it


async def test_an_unreachable_redis_is_a_bus_error_without_the_password() -> None:
    url = f"redis://user:hunter2@127.0.0.1:{_free_port()}/0"
    async with RedisBus(url, timeout_s=2.0) as dead:
        with pytest.raises(BusError, match=r"publish failed") as caught:
            await dead.publish("t", b"x")
        assert "hunter2" not in str(caught.value)
        with pytest.raises(BusError):
            await dead.subscribe("t", group="g", consumer="c")
    assert BusError.retryable


async def test_a_non_stream_key_is_a_bus_error(
    bus: RedisBus, raw: redis.asyncio.Redis, stream: str
) -> None:
    await raw.set(stream, b"a string")

    with pytest.raises(BusError, match="WRONGTYPE"):
        await bus.publish(stream, b"x")
    with pytest.raises(BusError, match="WRONGTYPE"):
        await bus.subscribe(stream, group="g", consumer="c")


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///s"])
def test_redis_urls_open_a_redis_bus_without_connecting(url: str) -> None:
    bus = open_bus(url, claim_idle_ms=500, max_len=None)

    assert isinstance(bus, RedisBus)
    assert (bus.url, bus.claim_idle_ms, bus.max_len) == (url, 500, None)


@pytest.mark.parametrize("options", [{"claim_idle_ms": 0}, {"max_len": 0}, {"timeout_s": 0.0}])
def test_unusable_options_are_config_errors(options: dict[str, int | float]) -> None:
    with pytest.raises(ConfigError):
        RedisBus("redis://127.0.0.1/0", **options)  # type: ignore[arg-type]


def test_importing_the_package_does_not_import_redis() -> None:
    code = "import sys, interlock.bus; print('redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)

    assert out.stdout.strip() == "False"
