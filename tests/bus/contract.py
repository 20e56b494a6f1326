"""What every event-bus backend promises, as tests a backend's test module inherits.

How to use it, in ``tests/bus/test_<backend>.py``::

    import pytest

    from tests.bus.contract import BusBackend, BusContract


    class TestKafkaContract(BusContract):
        @pytest.fixture
        def backend(self, kafka_url: str) -> BusBackend:
            async def make_bus() -> EventBus:
                return KafkaBus(kafka_url)

            return BusBackend(
                make_bus,
                drop_topic=...,              # optional: async (topic) -> None, run afterwards
                settle=...,                  # optional: async (subscriptions) -> None
                counts_deliveries=False,     # Kafka does not know; the others do
                redelivery_timeout_s=30.0,   # how long a closed member's messages may take
            )

Every ``test_*`` method of :class:`BusContract` then runs against the backend. The
class itself is not collected (its name does not start with ``Test``) and this module
is not a test module. Each test gets a :class:`BusKit`: ``await kit.bus()`` opens one
more connection (``make_bus`` is called each time, as each process of a deployment
would; every bus is closed after the test, so ``aclose`` must be idempotent);
``kit.topic()`` and ``kit.group()`` give names no other test uses (dotted topics such as
``test.bus.1a2b…``, groups such as ``g-1a2b…``); each topic is passed to ``drop_topic``
after the test.

What the contract checks: publish → fetch → ack; a new group starts at the beginning of
the topic; topics are created when missing (by publish and by subscribe); a fetch
blocked on an empty topic returns for a message published meanwhile; ``max_messages``
bounds a fetch; ``publish_many`` keeps the order of one key; keys, headers and binary
values round trip; members of one group share the messages, each seen once, and both
get work; two groups each see every message; the unacknowledged messages of a member
that closes go to another member (with ``deliveries`` > 1 where the backend counts),
the acknowledged ones never come back; lag goes up with publishing and down with acks;
closing twice is harmless; a tail (``bus.tail``) gives a topic's newest messages, oldest
first, and then what is published after them, creating nothing.

``settle`` is called once every member of a group has subscribed, before anything is
published: a backend whose membership settles in the background (a Kafka rebalance)
waits there until each member owns its share. Helpers :func:`drain` and
:func:`eventually` are exported for the backends' own tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from interlock.bus import EventBus, Message, Subscription

__all__ = ["BusBackend", "BusContract", "BusKit", "drain", "eventually", "unique_name"]

T = TypeVar("T")

FETCH_WAIT_S = 0.2  # one fetch's timeout in loops that poll for messages


@dataclass
class BusBackend:
    """A backend under test: how to connect, and what differs between backends."""

    make_bus: Callable[[], Awaitable[EventBus]]
    drop_topic: Callable[[str], Awaitable[None]] | None = None
    settle: Callable[[Sequence[Subscription]], Awaitable[None]] | None = None
    counts_deliveries: bool = True
    redelivery_timeout_s: float = 20.0


@dataclass
class BusKit:
    """Per test: buses, names, and the backend's traits."""

    backend: BusBackend
    buses: list[EventBus] = field(default_factory=list)
    topics: list[str] = field(default_factory=list)

    async def bus(self) -> EventBus:
        """One more connection to the bus, closed after the test."""
        bus = await self.backend.make_bus()
        self.buses.append(bus)
        return bus

    def topic(self) -> str:
        topic = unique_name("test.bus.")
        self.topics.append(topic)
        return topic

    def group(self) -> str:
        return unique_name("g-")

    async def settle(self, subscriptions: Sequence[Subscription]) -> None:
        if self.backend.settle is not None:
            await self.backend.settle(subscriptions)

    async def close(self) -> None:
        for bus in reversed(self.buses):
            await bus.aclose()
        if self.backend.drop_topic is not None:
            for topic in self.topics:
                await self.backend.drop_topic(topic)


def unique_name(prefix: str) -> str:
    """``prefix`` and 12 random hex digits: a name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    *,
    timeout_s: float = 10.0,
    what: str = "the condition",
) -> T:
    """Call ``probe`` until ``until(result)`` holds; fail after ``timeout_s`` of real time."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await probe()
        if until(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s (last: {result!r})")
        await asyncio.sleep(0.01)


async def drain(
    sub: Subscription,
    count: int,
    *,
    timeout_s: float = 10.0,
    max_messages: int = 100,
    ack: bool = False,
) -> list[Message]:
    """Fetch until ``count`` messages came (acking each batch when ``ack``) and return them.

    Fails the test when they have not all come within ``timeout_s``. A fetch may
    bring more than asked for the last batch; they are all returned.
    """
    got: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            pytest.fail(f"{len(got)} of {count} messages came within {timeout_s} s")
        batch = await sub.fetch(min(max_messages, count - len(got)), min(FETCH_WAIT_S, left_s))
        if ack and batch:
            await sub.ack(batch)
        got += batch
    return got


def values(messages: Sequence[Message]) -> list[bytes]:
    return [m.value for m in messages]


class BusContract:
    """The contract tests; subclass as ``Test<Backend>Contract`` and provide ``backend``."""

    @pytest.fixture
    def backend(self) -> BusBackend:
        raise NotImplementedError("a backend's test class provides the backend fixture")

    @pytest.fixture
    async def kit(self, backend: BusBackend) -> AsyncIterator[BusKit]:
        kit = BusKit(backend)
        try:
            yield kit
        finally:
            await kit.close()

    # -- one member -------------------------------------------------------------------

    async def test_a_message_is_fetched_with_its_topic_and_acked(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic, group = kit.topic(), kit.group()
        sub = await bus.subscribe(topic, group=group, consumer="c1")
        await kit.settle([sub])

        await bus.publish(topic, b'{"n": 1}')
        [message] = await drain(sub, 1)
        await sub.ack([message])
        await sub.ack([])

        assert (message.topic, message.value, message.key, message.headers) == (
            topic,
            b'{"n": 1}',
            None,
            {},
        )
        assert message.id
        assert message.deliveries == 1
        assert await sub.fetch(10, FETCH_WAIT_S) == []

    async def test_a_new_group_starts_at_the_beginning_of_the_topic(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        await bus.publish_many(topic, [(b"k", b"first"), (b"k", b"second")])
        await bus.publish(topic, b"third", key=b"k")

        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])

        assert values(await drain(sub, 3, ack=True)) == [b"first", b"second", b"third"]

    async def test_subscribing_creates_a_missing_topic(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])

        assert await sub.fetch(10, FETCH_WAIT_S) == []
        assert await sub.lag() == 0
        await bus.publish(topic, b"late")
        assert values(await drain(sub, 1, ack=True)) == [b"late"]

    async def test_a_waiting_fetch_returns_for_a_message_published_meanwhile(
        self, kit: BusKit
    ) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])

        waiting = asyncio.create_task(sub.fetch(10, 30.0))
        try:
            await bus.publish(topic, b"wake up")
            got = await waiting
        finally:
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting

        assert values(got) == [b"wake up"]

    async def test_max_messages_bounds_a_fetch(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])
        await bus.publish_many(topic, [(b"k", b"%d" % i) for i in range(5)])

        first = await drain(sub, 1, max_messages=2)
        rest = await drain(sub, 5 - len(first))

        assert 1 <= len(first) <= 2
        assert values(first + rest) == [b"0", b"1", b"2", b"3", b"4"]

    async def test_publish_many_keeps_the_order_of_a_key(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])
        sent = [b"event-%03d" % i for i in range(200)]

        await bus.publish_many(topic, [(b"card-7", value) for value in sent])
        await bus.publish_many(topic, [(None, b"no key 1"), (None, b"no key 2")])
        await bus.publish_many(topic, [])
        got = await drain(sub, 202, ack=True)

        assert [m.value for m in got if m.key == b"card-7"] == sent
        assert sorted(m.value for m in got if m.key is None) == [b"no key 1", b"no key 2"]
        assert len({m.id for m in got}) == 202

    async def test_keys_headers_and_binary_values_round_trip(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])
        headers = {"content-type": "application/json", "x-trace-id": "t-1"}

        await bus.publish(topic, bytes(range(256)), key=b"card-42", headers=headers)
        await bus.publish(topic, b"", key=None, headers=None)
        got = {m.value: m for m in await drain(sub, 2, ack=True)}

        assert set(got) == {bytes(range(256)), b""}
        full, empty = got[bytes(range(256))], got[b""]
        assert (full.key, full.headers) == (b"card-42", headers)
        assert (empty.key, empty.headers) == (None, {})

    # -- groups -----------------------------------------------------------------------

    async def test_members_of_a_group_share_the_messages_and_see_each_once(
        self, kit: BusKit
    ) -> None:
        topic, group = kit.topic(), kit.group()
        members = [
            await (await kit.bus()).subscribe(topic, group=group, consumer=f"member-{i}")
            for i in range(2)
        ]
        await kit.settle(members)
        sent = [b"%d" % i for i in range(100)]
        await (await kit.bus()).publish_many(
            topic, [(b"key-%d" % i, v) for i, v in enumerate(sent)]
        )

        seen: list[list[Message]] = [[], []]
        deadline = time.monotonic() + 30
        while sum(map(len, seen)) < len(sent) and time.monotonic() < deadline:
            for sub, got in zip(members, seen, strict=True):
                batch = await sub.fetch(5, FETCH_WAIT_S)
                await sub.ack(batch)
                got += batch

        everything = seen[0] + seen[1]
        assert sorted(values(everything), key=int) == sent
        assert len({m.id for m in everything}) == len(sent)
        assert seen[0] and seen[1], "both members got work"

    async def test_each_group_sees_every_message(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        subs = [
            await bus.subscribe(topic, group=kit.group(), consumer="c1"),
            await (await kit.bus()).subscribe(topic, group=kit.group(), consumer="c1"),
        ]
        for sub in subs:
            await kit.settle([sub])
        sent = [b"%d" % i for i in range(20)]
        await bus.publish_many(topic, [(b"k", v) for v in sent])

        for sub in subs:
            assert values(await drain(sub, 20, ack=True)) == sent

    async def test_a_closed_members_unacked_messages_go_to_another_member(
        self, kit: BusKit
    ) -> None:
        topic, group = kit.topic(), kit.group()
        first = await (await kit.bus()).subscribe(topic, group=group, consumer="first")
        await kit.settle([first])
        await (await kit.bus()).publish_many(topic, [(b"k", b"m%d" % i) for i in range(5)])
        taken = await drain(first, 5)
        await first.ack(taken[:2])

        second = await (await kit.bus()).subscribe(topic, group=group, consumer="second")
        await first.aclose()
        again = await drain(second, 3, timeout_s=kit.backend.redelivery_timeout_s)
        await second.ack(again)

        assert sorted(values(again)) == [b"m2", b"m3", b"m4"]
        if kit.backend.counts_deliveries:
            assert [m.deliveries >= 2 for m in again] == [True] * 3
        assert await second.fetch(10, FETCH_WAIT_S) == []

    async def test_lag_rises_with_publishing_and_falls_with_acks(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        sub = await bus.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])

        assert await sub.lag() == 0
        await bus.publish_many(topic, [(b"k", b"%d" % i) for i in range(10)])
        await eventually(sub.lag, lambda n: n == 10, what="lag 10")
        got = await drain(sub, 10)
        await sub.ack(got[:4])
        await eventually(sub.lag, lambda n: n == 6, what="lag 6 after 4 acks")
        await sub.ack(got[4:])
        await eventually(sub.lag, lambda n: n == 0, what="lag 0 after every ack")

    # -- lifecycle --------------------------------------------------------------------

    async def test_a_bus_is_an_async_context_manager_closed_once_or_twice(
        self, kit: BusKit
    ) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        async with bus as entered:
            assert entered is bus
            await bus.publish(topic, b"x")
        await bus.aclose()  # and once more after the test

        reader = await kit.bus()
        sub = await reader.subscribe(topic, group=kit.group(), consumer="c1")
        await kit.settle([sub])
        assert values(await drain(sub, 1, ack=True)) == [b"x"]
        await sub.aclose()
        await sub.aclose()
        assert isinstance(bus.url, str)

    # -- tail -------------------------------------------------------------------------

    async def test_a_tail_gives_the_newest_messages_oldest_first(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        await bus.publish_many(topic, [(b"k", b"%d" % i) for i in range(5)])

        newest = await bus.tail(topic, last=2)
        everything = await bus.tail(topic, last=10)
        try:
            assert values(newest.backlog) == [b"3", b"4"]
            assert values(everything.backlog) == [b"0", b"1", b"2", b"3", b"4"]
        finally:
            await newest.aclose()
            await everything.aclose()

    async def test_a_tail_follows_what_is_published_after_it(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()
        await bus.publish_many(topic, [(b"k", b"old"), (b"k", b"newest")])

        tail = await bus.tail(topic, last=1)
        try:
            await bus.publish_many(topic, [(b"k", b"next"), (b"k", b"after")])
            assert values(tail.backlog) == [b"newest"]
            assert values(await drain(tail, 2)) == [b"next", b"after"]  # type: ignore[arg-type]
        finally:
            await tail.aclose()

    async def test_a_tail_of_a_missing_topic_is_empty_and_then_follows(self, kit: BusKit) -> None:
        bus = await kit.bus()
        topic = kit.topic()

        tail = await bus.tail(topic, last=5)
        try:
            assert tail.backlog == []
            await (await kit.bus()).publish(topic, b"first")
            assert values(await drain(tail, 1, timeout_s=30)) == [b"first"]  # type: ignore[arg-type]
        finally:
            await tail.aclose()
