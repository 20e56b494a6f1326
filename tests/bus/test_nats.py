"""The NATS JetStream backend on the real server: the contract, and what only it does:
one stream per topic, redelivery after ack_wait (counted), naks on close, consumer lag."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats
import pytest
from nats.js.api import StorageType
from nats.js.errors import NotFoundError

from interlock.bus import EventBus, open_bus
from interlock.bus.nats import KEY_HEADER, NatsBus, servers, stream_name
from interlock.errors import ConfigError
from tests.bus.contract import BusBackend, BusContract, drain, eventually, unique_name
from tests.conftest import NATS_URL, require_service

ACK_WAIT_S = 1.0


async def _delete_streams(*names: str) -> None:
    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for name in names:
            with contextlib.suppress(NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def _drop_topic(topic: str) -> None:
    await _delete_streams(stream_name(topic))


class TestNatsContract(BusContract):
    @pytest.fixture
    def backend(self) -> BusBackend:
        require_service("NATS", NATS_URL)

        async def make_bus() -> EventBus:
            return NatsBus(NATS_URL, storage="memory", ack_wait_s=ACK_WAIT_S)

        return BusBackend(
            make_bus,
            drop_topic=_drop_topic,
            redelivery_timeout_s=10.0,
        )


@pytest.fixture
async def make_nats() -> AsyncIterator[Callable[..., Awaitable[NatsBus]]]:
    """Open buses to the test server (closed afterwards); their streams are deleted."""
    require_service("NATS", NATS_URL)
    buses: list[NatsBus] = []

    async def make(**options: Any) -> NatsBus:
        bus = NatsBus(NATS_URL, **{"storage": "memory", "ack_wait_s": ACK_WAIT_S, **options})
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.aclose()
    await _delete_streams(*{name for bus in buses for name in bus._streams})


def _topic() -> str:
    return unique_name("test.nats.")


async def _js_stream(topic: str) -> Any:
    nc = await nats.connect(NATS_URL)
    try:
        return await nc.jetstream().stream_info(stream_name(topic))
    finally:
        await nc.close()


# -- names and URLs ----------------------------------------------------------------------


def test_a_topic_maps_to_a_stream_without_dots() -> None:
    assert stream_name("ai.prediction.requested") == "ai_prediction_requested"
    assert stream_name("ai.prediction.dead-letter") == "ai_prediction_dead-letter"
    for bad in ("", "a..b", ".a", "a.", "a.*", "a.>", "a b", "a/b"):
        with pytest.raises(ConfigError):
            stream_name(bad)


def test_the_url_names_the_servers() -> None:
    assert servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]
    assert servers("nats://u:p@a:1,b") == ["nats://u:p@a:1", "nats://u:p@b:4222"]
    assert isinstance(open_bus("nats://127.0.0.1:4222"), NatsBus)
    for bad in ("nats://", "kafka://a:1", "nats://a:x", "nats://a:1/x"):
        with pytest.raises(ConfigError):
            servers(bad)


async def test_a_stream_is_created_per_topic_with_the_settings(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    bus = await make_nats(max_msgs=5, max_age_s=3600.0)
    topic = _topic()
    await bus.publish_many(topic, [(None, b"%d" % i) for i in range(8)])

    info = await _js_stream(topic)
    assert info.config.subjects == [topic]
    assert info.config.storage == StorageType.MEMORY
    assert (info.config.max_msgs, info.config.max_age) == (5, 3600.0)
    # The limits apply: a new group finds the newest five.
    sub = await bus.subscribe(topic, group=unique_name("g-"), consumer="c1")
    assert [m.value for m in await drain(sub, 5, ack=True)] == [b"3", b"4", b"5", b"6", b"7"]


async def test_a_stream_holding_another_subject_is_refused(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    bus = await make_nats()
    dotted = _topic()
    await bus.publish(dotted, b"x")
    clash = dotted.replace(".", "_")  # the same stream name, another subject
    other = await make_nats()
    with pytest.raises(ConfigError, match="exists for"):
        await other.publish(clash, b"y")
    with pytest.raises(ConfigError):
        await bus.subscribe(dotted, group="no.dots", consumer="c1")


# -- redelivery --------------------------------------------------------------------------


async def test_a_dead_members_messages_come_again_after_ack_wait(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    writer = await make_nats()
    await writer.publish_many(topic, [(b"k", b"m%d" % i) for i in range(3)])
    dead = await (await make_nats()).subscribe(topic, group=group, consumer="dead")
    taken = await drain(dead, 3)  # and never acked nor closed: the process "died"
    assert [m.deliveries for m in taken] == [1, 1, 1]

    alive = await (await make_nats()).subscribe(topic, group=group, consumer="alive")
    again = await drain(alive, 3, ack=True, timeout_s=10 * ACK_WAIT_S)

    assert [m.value for m in again] == [b"m0", b"m1", b"m2"]
    assert [m.deliveries for m in again] == [2, 2, 2]
    assert [m.id for m in again] == [m.id for m in taken]
    assert await alive.fetch(10, 0.2) == []


async def test_a_closing_member_hands_back_what_it_holds_at_once(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    # ack_wait is far longer than the wait below: only the nak on close can do it.
    topic, group = _topic(), unique_name("g-")
    bus = await make_nats(ack_wait_s=300.0)
    await bus.publish_many(topic, [(None, b"m%d" % i) for i in range(4)])
    first = await bus.subscribe(topic, group=group, consumer="first")
    taken = await drain(first, 4)
    await first.ack(taken[:1])
    await first.aclose()

    second = await bus.subscribe(topic, group=group, consumer="second")
    again = await drain(second, 3, ack=True, timeout_s=10)
    assert sorted(m.value for m in again) == [b"m1", b"m2", b"m3"]
    assert {m.deliveries for m in again} == {2}


async def test_an_ack_sticks_and_acking_twice_is_harmless(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    bus = await make_nats()
    await bus.publish(topic, b"once", key=b"\x00\xffkey")
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    [message] = await drain(sub, 1)
    assert (message.key, message.headers) == (b"\x00\xffkey", {})
    await sub.ack([message])
    await sub.ack([message])
    await eventually(sub.lag, lambda n: n == 0, what="lag 0")
    # Past ack_wait, nothing comes back.
    assert await sub.fetch(10, 3 * ACK_WAIT_S) == []


async def test_a_key_header_set_by_someone_else_is_kept_as_text(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    topic = _topic()
    bus = await make_nats()
    await bus.publish(topic, b"v", headers={KEY_HEADER: "not base64!"})
    sub = await bus.subscribe(topic, group=unique_name("g-"), consumer="c1")
    [message] = await drain(sub, 1, ack=True)
    assert message.key == b"not base64!"


# -- lag ---------------------------------------------------------------------------------


async def test_lag_is_pending_plus_unacked(
    make_nats: Callable[..., Awaitable[NatsBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    bus = await make_nats()
    await bus.publish_many(topic, [(None, b"%d" % i) for i in range(10)])
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    peer = await (await make_nats()).subscribe(topic, group=group, consumer="c2")
    assert await sub.lag() == 10

    taken = await drain(sub, 4, max_messages=4)
    assert await sub.lag() == 10  # delivered, not acked: still owed
    await sub.ack(taken)
    assert await sub.lag() == 6
    assert await peer.lag() == 6  # one durable: the group's figure, seen by every member
