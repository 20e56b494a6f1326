"""The in-process bus: the contract, what only it promises (brokers, trimming, hand-backs),
choosing a backend by URL, and the dead-letter envelope carried through it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from interlock.bus import EventBus, MemoryBroker, MemoryBus, Message, open_bus
from interlock.bus.envelope import DeadLetter, dead_letter_payload, read_dead_letter
from interlock.errors import ConfigError
from tests.bus.contract import BusBackend, BusContract, drain


class TestMemoryContract(BusContract):
    @pytest.fixture
    def backend(self) -> BusBackend:
        broker = MemoryBroker()

        async def make_bus() -> EventBus:
            return MemoryBus(broker=broker)

        return BusBackend(make_bus, redelivery_timeout_s=5.0)


async def test_buses_on_one_broker_share_topics_and_others_do_not() -> None:
    broker = MemoryBroker()
    publisher, consumer, stranger = MemoryBus(broker=broker), MemoryBus(broker=broker), MemoryBus()
    sub = await consumer.subscribe("t", group="g", consumer="c")
    alone = await stranger.subscribe("t", group="g", consumer="c")

    await publisher.publish("t", b"x")

    assert [m.value for m in await sub.fetch(10, 0)] == [b"x"]
    assert await alone.fetch(10, 0) == []
    assert broker.topics() == ["t"]


async def test_each_hand_back_counts_one_more_delivery() -> None:
    bus = MemoryBus()
    await bus.publish("t", b"poison")
    deliveries = []
    for member in range(3):
        sub = await bus.subscribe("t", group="g", consumer=f"m{member}")
        [message] = await sub.fetch(10, 0)
        deliveries.append(message.deliveries)
        await sub.aclose()

    assert deliveries == [1, 2, 3]


async def test_an_ack_from_a_member_that_handed_a_message_back_does_nothing() -> None:
    bus = MemoryBus()
    first = await bus.subscribe("t", group="g", consumer="first")
    second = await bus.subscribe("t", group="g", consumer="second")
    await bus.publish("t", b"x")
    [stale] = await first.fetch(10, 0)
    await first.aclose()
    [held] = await second.fetch(10, 0)

    await first.ack([stale])

    assert await second.lag() == 1
    await second.ack([held])
    assert await second.lag() == 0


async def test_a_waiting_fetch_takes_what_a_closing_member_hands_back() -> None:
    bus = MemoryBus()
    leaving = await bus.subscribe("t", group="g", consumer="leaving")
    staying = await bus.subscribe("t", group="g", consumer="staying")
    await bus.publish("t", b"x")
    await leaving.fetch(10, 0)
    waiting = asyncio.create_task(staying.fetch(10, 30.0))
    await asyncio.sleep(0)  # let it start waiting

    await leaving.aclose()

    assert [(m.value, m.deliveries) for m in await waiting] == [(b"x", 2)]


async def test_closing_the_bus_closes_its_subscriptions() -> None:
    broker = MemoryBroker()
    bus, other = MemoryBus(broker=broker), MemoryBus(broker=broker)
    sub = await bus.subscribe("t", group="g", consumer="c")
    await bus.publish("t", b"x")
    await sub.fetch(10, 0)

    async with bus:
        pass

    assert await sub.fetch(10, 0) == []
    heir = await other.subscribe("t", group="g", consumer="heir")
    assert [m.deliveries for m in await heir.fetch(10, 0)] == [2]


async def test_a_topic_keeps_max_len_messages_and_counts_the_unread_it_drops() -> None:
    broker = MemoryBroker(max_len=3)
    bus = MemoryBus(broker=broker)
    behind = await bus.subscribe("t", group="behind", consumer="c")

    await bus.publish_many("t", [(None, b"%d" % i) for i in range(5)])
    late = await bus.subscribe("t", group="late", consumer="c")

    assert [m.value for m in await behind.fetch(10, 0)] == [b"2", b"3", b"4"]
    assert [m.value for m in await late.fetch(10, 0)] == [b"2", b"3", b"4"]
    assert broker.dropped_unread == 2


async def test_what_every_group_has_had_is_dropped() -> None:
    bus = MemoryBus()
    early = await bus.subscribe("t", group="early", consumer="c")
    await bus.publish_many("t", [(None, b"a"), (None, b"b")])
    await early.ack(await early.fetch(10, 0))

    late = await bus.subscribe("t", group="late", consumer="c")
    await bus.publish("t", b"c")

    assert [m.value for m in await late.fetch(10, 0)] == [b"c"]
    assert bus.broker.dropped_unread == 0


async def test_a_fetch_asks_for_at_least_one_message() -> None:
    sub = await MemoryBus().subscribe("t", group="g", consumer="c")

    with pytest.raises(ValueError, match="max_messages"):
        await sub.fetch(0, 0)
    with pytest.raises(ValueError, match="max_len"):
        MemoryBroker(max_len=0)


# -- choosing a backend ------------------------------------------------------------------


def test_memory_urls_open_a_memory_bus_with_its_options() -> None:
    broker = MemoryBroker()

    assert isinstance(open_bus("memory://"), MemoryBus)
    assert open_bus("memory://", max_len=7).broker.max_len == 7  # type: ignore[attr-defined]
    assert open_bus("MEMORY://", broker=broker).broker is broker  # type: ignore[attr-defined]


def test_kafka_and_nats_urls_open_their_backends_without_connecting() -> None:
    from interlock.bus.kafka import KafkaBus
    from interlock.bus.nats import NatsBus

    assert isinstance(open_bus("kafka://127.0.0.1:9092,127.0.0.1:9093"), KafkaBus)
    assert isinstance(open_bus("nats://127.0.0.1:4222"), NatsBus)


@pytest.mark.parametrize("url", ["amqp://h:5672", "localhost:6379", "", "memory"])
def test_an_unknown_scheme_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"unknown bus URL scheme .*expected memory://"):
        open_bus(url)


def test_the_error_does_not_show_a_password() -> None:
    with pytest.raises(ConfigError) as caught:
        open_bus("amqp://u:hunter2@h/0")

    assert "hunter2" not in str(caught.value)


# -- the dead-letter envelope ------------------------------------------------------------

AT = datetime(2025, 6, 10, 8, 0, 0, 123456, tzinfo=UTC)


def test_the_envelope_holds_the_bytes_as_base64_and_as_text() -> None:
    message = Message(
        "ai.prediction.requested",
        b'{"requestId": "r-1"}',
        key=b"card-42",
        headers={"x-trace-id": "t"},
        id="17-0",
        deliveries=2,
    )

    event = orjson.loads(
        dead_letter_payload(message, "unknown model 'x'", "ai.prediction.requested", at=AT)
    )

    assert event == {
        "reason": "unknown model 'x'",
        "sourceTopic": "ai.prediction.requested",
        "messageId": "17-0",
        "key": "card-42",
        "keyBase64": "Y2FyZC00Mg==",
        "deliveries": 2,
        "timestamp": "2025-06-10T08:00:00.123+00:00",
        "headers": {"x-trace-id": "t"},
        "valueBase64": "eyJyZXF1ZXN0SWQiOiAici0xIn0=",
        "valueText": '{"requestId": "r-1"}',
    }


def test_bytes_that_are_not_utf8_have_no_text_and_read_back_exactly() -> None:
    message = Message("in", b"\xff\xfe\x00 not json", key=b"\x80", id="3")
    local = AT.astimezone(timezone(timedelta(hours=2)))

    payload = dead_letter_payload(message, "not JSON", "in", at=local)
    event = orjson.loads(payload)

    assert (event["valueText"], event["key"]) == (None, None)
    assert read_dead_letter(payload) == DeadLetter(
        reason="not JSON",
        source_topic="in",
        message_id="3",
        value=b"\xff\xfe\x00 not json",
        key=b"\x80",
        deliveries=1,
        timestamp=AT.replace(microsecond=123000),
    )


def test_the_timestamp_is_now_in_utc_by_default() -> None:
    before = datetime.now(UTC)
    letter = read_dead_letter(dead_letter_payload(Message("in", b"{}"), "why", "in"))

    assert before - timedelta(seconds=1) <= letter.timestamp <= datetime.now(UTC)
    assert letter.timestamp.tzinfo is not None
    assert letter.key is None


@pytest.mark.parametrize(
    "payload", [b"not json", b"[]", b'{"reason": "r"}', b'{"valueBase64": "%%%"}']
)
def test_reading_something_else_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError, match="not a dead-letter envelope"):
        read_dead_letter(payload)


async def test_a_dead_letter_carries_the_original_through_the_bus() -> None:
    bus = MemoryBus()
    source = await bus.subscribe("requests", group="worker", consumer="w")
    letters = await bus.subscribe("dead", group="ops", consumer="o")
    await bus.publish("requests", b"\x00garbage", key=b"k")

    [message] = await drain(source, 1)
    await bus.publish("dead", dead_letter_payload(message, "not JSON", "requests"))
    await source.ack([message])
    [letter] = await drain(letters, 1, ack=True)

    read = read_dead_letter(letter.value)
    assert (read.value, read.key, read.source_topic, read.reason, read.message_id) == (
        b"\x00garbage",
        b"k",
        "requests",
        "not JSON",
        message.id,
    )
