"""The Kafka backend on a real broker (tansu, started by the session): the contract, and
what only Kafka does: commits that never pass a gap, partitions shared in a group and
handed over on a rebalance or a crash, lag from offsets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from interlock.bus import BusError, EventBus, Message, Subscription, bus_options, open_bus
from interlock.bus.kafka import STICKY_RUN, KafkaBus, KafkaSubscription, bootstrap_servers
from interlock.errors import ConfigError
from interlock.settings import BusSettings
from tests.bus.contract import BusBackend, BusContract, drain, eventually, unique_name

# Short group timings so that joins, rebalances and crash detection take about a second.
FAST: dict[str, Any] = {
    "session_timeout_s": 2.0,
    "heartbeat_interval_s": 0.1,
    "rebalance_timeout_s": 1.0,
    "timeout_s": 15.0,
}
SETTLE_TIMEOUT_S = 20.0


async def _drop_topics(url: str, topics: Sequence[str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(url))
    await admin.start()
    try:
        await admin.delete_topics(list(topics))
    finally:
        await admin.close()


async def settle(subscriptions: Sequence[Subscription]) -> None:
    """Wait until the members of one group own disjoint shares of every partition."""

    async def shares() -> list[frozenset[int]]:
        return [sub.partitions for sub in subscriptions if isinstance(sub, KafkaSubscription)]

    def settled(owned: list[frozenset[int]]) -> bool:
        if not owned or not all(owned):
            return False
        union = frozenset().union(*owned)
        return sum(map(len, owned)) == len(union) == _PARTITIONS

    await eventually(shares, settled, timeout_s=SETTLE_TIMEOUT_S, what="the group to settle")


_PARTITIONS = 4


class TestKafkaContract(BusContract):
    @pytest.fixture
    def backend(self, kafka_url: str) -> BusBackend:
        async def make_bus() -> EventBus:
            return KafkaBus(kafka_url, partitions=_PARTITIONS, **FAST)

        async def drop_topic(topic: str) -> None:
            await _drop_topics(kafka_url, [topic])

        return BusBackend(
            make_bus,
            drop_topic=drop_topic,
            settle=settle,
            counts_deliveries=False,
            redelivery_timeout_s=SETTLE_TIMEOUT_S,
        )


@pytest.fixture
async def make_kafka(kafka_url: str) -> AsyncIterator[Callable[..., Awaitable[KafkaBus]]]:
    """Open buses to the test broker (4 partitions unless told; closed afterwards); their
    topics are dropped."""
    buses: list[KafkaBus] = []

    async def make(**options: Any) -> KafkaBus:
        bus = KafkaBus(kafka_url, **{**FAST, "partitions": _PARTITIONS, **options})
        buses.append(bus)
        return bus

    yield make
    topics = {t for bus in buses for t in bus._topics}
    for bus in buses:
        await bus.aclose()
    if topics:
        await _drop_topics(kafka_url, sorted(topics))


def _topic() -> str:
    return unique_name("test.kafka.")


# -- URLs --------------------------------------------------------------------------------


def test_the_url_names_the_bootstrap_servers() -> None:
    assert bootstrap_servers("kafka://127.0.0.1:9093") == "127.0.0.1:9093"
    assert bootstrap_servers("kafka://a:1,b:2,c") == "a:1,b:2,c:9092"
    assert isinstance(open_bus("kafka://127.0.0.1:9093"), KafkaBus)
    for bad in ("kafka://", "redis://a:1", "kafka://a:x", "kafka://a:1/topic", "kafka://u:p@a:1"):
        with pytest.raises(ConfigError):
            bootstrap_servers(bad)


async def test_topic_and_group_names_are_checked(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    bus = await make_kafka()
    with pytest.raises(ConfigError):
        await bus.publish("no spaces", b"x")
    with pytest.raises(ConfigError):
        await bus.subscribe(_topic(), group="no/slash", consumer="c1")


# -- topics ------------------------------------------------------------------------------


async def test_a_topic_is_created_once_with_the_configured_partitions(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    topic = _topic()
    first, second = await make_kafka(partitions=3), await make_kafka(partitions=3)
    await first.publish(topic, b"x")
    await second.ensure_topic(topic)  # already there: fine

    sub = await second.subscribe(topic, group=unique_name("g-"), consumer="c1")
    await eventually(lambda: _partitions(sub), lambda p: p == {0, 1, 2}, what="assignment")
    assert [m.value for m in await drain(sub, 1, ack=True)] == [b"x"]


async def _partitions(sub: KafkaSubscription) -> frozenset[int]:
    return sub.partitions


async def test_topics_created_with_the_worker_settings_have_bus_kafka_partitions(
    make_kafka: Callable[..., Awaitable[KafkaBus]], kafka_url: str
) -> None:
    settings = BusSettings(
        url=kafka_url, kafka_partitions=6, redelivery_s=FAST["session_timeout_s"]
    )
    bus = await make_kafka(**bus_options(settings))
    topic = _topic()
    await bus.publish(topic, b"x")
    sub = await bus.subscribe(topic, group=unique_name("g-"), consumer="c1")
    await eventually(lambda: _partitions(sub), lambda p: p == set(range(6)), what="assignment")


# -- commits -----------------------------------------------------------------------------


async def test_out_of_order_acks_never_commit_past_a_gap(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    bus = await make_kafka(partitions=1)
    topic, group = _topic(), unique_name("g-")
    for i in range(5):
        await bus.publish(topic, b"m%d" % i)  # one batch each: exact offsets everywhere
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    m = await drain(sub, 5)
    assert [x.id for x in m] == ["0:0", "0:1", "0:2", "0:3", "0:4"]

    await sub.ack([m[3], m[1], m[4]])
    assert await sub.lag() == 5  # offset 0 is open: nothing may be committed
    await sub.ack([m[0]])
    assert await sub.lag() == 3  # 0 and 1 done; 2 is the gap
    await sub.ack([m[0], m[1]])  # acked twice: nothing changes
    assert await sub.lag() == 3
    await sub.aclose()

    # The next member starts at the gap: 3 and 4 come again (at least once), 0 and 1 not.
    again = await bus.subscribe(topic, group=group, consumer="c2")
    assert [x.value for x in await drain(again, 3, ack=True)] == [b"m2", b"m3", b"m4"]
    assert await again.fetch(10, 0.3) == []
    assert await again.lag() == 0


async def test_an_ack_after_a_rebalance_does_not_commit_a_lost_partition(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    writer = await make_kafka()
    first = await (await make_kafka()).subscribe(topic, group=group, consumer="first")
    await settle([first])
    sent = {b"%d" % i for i in range(40)}
    await writer.publish_many(topic, [(b"key-%d" % i, b"%d" % i) for i in range(40)])
    held = await drain(first, 40)  # not acknowledged before the rebalance

    second = await (await make_kafka()).subscribe(topic, group=group, consumer="second")
    await settle([first, second])
    await first.ack(held)  # too late: the partitions were given up uncommitted

    # Every message comes again, split between the two owners, from the old offsets.
    seen: list[bytes] = []
    for sub in (first, second):
        while batch := await sub.fetch(100, 0.5):
            await sub.ack(batch)
            seen += [m.value for m in batch]
    assert set(seen) == sent
    assert len(seen) == len(sent)
    assert await second.lag() == 0


# -- members of a group ------------------------------------------------------------------


async def test_two_members_own_partitions_and_both_work(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    members = [
        await (await make_kafka()).subscribe(topic, group=group, consumer=f"w{i}") for i in range(2)
    ]
    await settle(members)
    assert members[0].partitions.isdisjoint(members[1].partitions)
    assert members[0].partitions | members[1].partitions == {0, 1, 2, 3}

    total = 400
    await (await make_kafka()).publish_many(
        topic, [(b"req-%d" % i, b"%d" % i) for i in range(total)]
    )
    done: list[list[bytes]] = [[], []]

    async def work(sub: KafkaSubscription, out: list[bytes]) -> None:
        while sum(map(len, done)) < total:
            batch = await sub.fetch(50, 0.2)
            out += [m.value for m in batch]
            await sub.ack(batch)

    async with asyncio.timeout(30):
        await asyncio.gather(*(work(s, d) for s, d in zip(members, done, strict=True)))

    assert sorted(done[0] + done[1], key=int) == [b"%d" % i for i in range(total)]
    assert done[0] and done[1]
    # Each member had exactly the messages of its own partitions.
    for sub, out in zip(members, done, strict=True):
        assert out and sub.partitions
    assert await members[0].lag() == 0


async def test_a_member_closed_without_acking_hands_its_messages_over(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    a = await (await make_kafka()).subscribe(topic, group=group, consumer="a")
    b = await (await make_kafka()).subscribe(topic, group=group, consumer="b")
    await settle([a, b])
    await (await make_kafka()).publish_many(topic, [(b"k%d" % i, b"%d" % i) for i in range(60)])

    taken_by_a = await drain(a, 1)  # at least one batch, never acknowledged
    taken_by_a += await a.fetch(100, 0.2)
    await a.aclose()
    await settle([b])

    got = await drain(b, 60, ack=True, timeout_s=SETTLE_TIMEOUT_S)
    assert sorted((m.value for m in got), key=int) == [b"%d" % i for i in range(60)]
    assert {m.value for m in taken_by_a} <= {m.value for m in got}
    assert await b.lag() == 0


_CRASHING_MEMBER = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from interlock.bus.kafka import KafkaBus

    async def main():
        url, topic, group, interval = sys.argv[1:5]
        bus = KafkaBus(url, session_timeout_s=2.0, heartbeat_interval_s=0.1,
                       rebalance_timeout_s=1.0, commit_interval_s=float(interval))
        sub = await bus.subscribe(topic, group=group, consumer="doomed")
        got = []
        while len(got) < 10:
            got += await sub.fetch(10, 0.5)
        await sub.ack(got[:3])
        print(len(got), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    ("commit_interval_s", "handed_over"),
    [
        (0.0, range(3, 10)),  # every ack committed at once: the 3 acked stay done
        (3600.0, range(10)),  # the interval's price: at least once, never lost
    ],
    ids=["commit-per-ack", "commit-interval"],
)
async def test_a_killed_members_messages_go_to_the_others_after_its_session(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
    kafka_url: str,
    commit_interval_s: float,
    handed_over: range,
) -> None:
    bus = await make_kafka(partitions=1)
    topic, group = _topic(), unique_name("g-")
    await bus.publish_many(topic, [(b"k", b"%d" % i) for i in range(10)])

    await _crash_after_acking_three(kafka_url, topic, group, commit_interval_s=commit_interval_s)

    survivor = await bus.subscribe(topic, group=group, consumer="survivor")
    got = await drain(survivor, len(handed_over), ack=True, timeout_s=SETTLE_TIMEOUT_S)
    assert [m.value for m in got] == [b"%d" % i for i in handed_over]


async def _crash_after_acking_three(
    url: str, topic: str, group: str, *, commit_interval_s: float
) -> None:
    """A member in a process of its own fetches 10 messages, acks 3 and is SIGKILLed."""
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CRASHING_MEMBER,
        url,
        topic,
        group,
        str(commit_interval_s),
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out, _ = await doomed.communicate()
    assert doomed.returncode == -signal.SIGKILL
    assert out.strip() == b"10"


# -- commits within an interval ----------------------------------------------------------


async def _committed(url: str, group: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers(url))
    await admin.start()
    try:
        tp = TopicPartition(topic, 0)
        offsets = await admin.list_consumer_group_offsets(group, partitions=[tp])
    finally:
        await admin.close()
    return offsets[tp].offset if tp in offsets else -1


async def _one_partition_read(
    bus: KafkaBus, count: int
) -> tuple[str, str, KafkaSubscription, list[Message]]:
    """``count`` messages published to a new topic and fetched, unacknowledged, by
    member ``c1`` of a new group: (topic, group, subscription, messages)."""
    topic, group = _topic(), unique_name("g-")
    await bus.publish_many(topic, [(b"k", b"%d" % i) for i in range(count)])
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    return topic, group, sub, await drain(sub, count)


async def test_with_a_commit_interval_acks_are_committed_in_the_background(
    make_kafka: Callable[..., Awaitable[KafkaBus]], kafka_url: str
) -> None:
    bus = await make_kafka(partitions=1, commit_interval_s=0.1)
    topic, group, sub, got = await _one_partition_read(bus, 5)
    await sub.ack(got[:2])
    await sub.ack(got[2:])

    # Both acks end up in the group's offsets without anything else asking for it.
    await eventually(lambda: _committed(kafka_url, group, topic), lambda o: o == 5,
                     what="the background commit")  # fmt: skip


async def test_lag_and_close_commit_what_the_interval_holds_back(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    bus = await make_kafka(partitions=1, commit_interval_s=3600.0)
    topic, group, sub, got = await _one_partition_read(bus, 6)
    await sub.ack(got[:3])
    assert await sub.lag() == 3  # the group's figure: the acks are committed first
    await sub.ack(got[3:])
    await sub.aclose()  # commits too: the next member has nothing left

    again = await bus.subscribe(topic, group=group, consumer="c2")
    assert await again.fetch(10, 0.5) == []
    assert await again.lag() == 0


def test_the_worker_settings_reach_the_kafka_bus() -> None:
    settings = BusSettings(
        url="kafka://127.0.0.1:9092",
        redelivery_s=12,
        kafka_fetch_wait_ms=7,
        kafka_commit_interval_ms=250,
    )
    options = bus_options(settings)
    assert options == {
        "session_timeout_s": 12,
        "partitions": 16,
        "fetch_max_wait_ms": 7,
        "commit_interval_s": 0.25,
    }
    bus = KafkaBus(settings.url, **options)
    assert bus.commit_interval_s == 0.25
    assert bus.partitions == KafkaBus(settings.url).partitions == 16  # one default
    # The other backends take only their own redelivery option.
    assert bus_options(BusSettings(url="redis://h:6379/0", redelivery_s=12)) == {
        "claim_idle_ms": 12000
    }
    assert bus_options(BusSettings(url="nats://h:4222", redelivery_s=12)) == {"ack_wait_s": 12}


# -- keyless records: one partition per run ----------------------------------------------


def _partition_of(message: Message) -> int:
    return int(message.id.partition(":")[0])


async def test_keyless_records_go_to_one_partition_per_run_and_keyed_ones_by_key(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    bus = await make_kafka(partitions=4)
    topic, group = _topic(), unique_name("g-")
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    await settle([sub])

    # A call of fewer than a run's records: one partition, one batch on the broker.
    await bus.publish_many(topic, [(None, b"a%d" % i) for i in range(10)])
    small = await drain(sub, 10, ack=True)
    assert len({_partition_of(m) for m in small}) == 1

    # A longer call moves on after every run, to each partition in turn.
    count = 3 * STICKY_RUN + 10
    await bus.publish_many(topic, [(None, b"%d" % i) for i in range(count)])
    big = await drain(sub, count, ack=True, max_messages=1000)
    assert sorted(Counter(map(_partition_of, big)).values()) == [10] + [STICKY_RUN] * 3
    for number in {_partition_of(m) for m in big}:
        values = sorted(int(m.value) for m in big if _partition_of(m) == number)
        assert values == list(range(values[0], values[0] + len(values)))  # one run each

    # A key keeps its own partition whatever the runs around it do.
    mixed = [(b"card-7", b"k%d" % i) if i % 2 else (None, b"n%d" % i) for i in range(20)]
    await bus.publish_many(topic, mixed)
    await bus.publish(topic, b"lone", key=b"card-7")
    got = await drain(sub, 21, ack=True)
    assert len({_partition_of(m) for m in got if m.key == b"card-7"}) == 1


# -- lag ---------------------------------------------------------------------------------


async def test_lag_counts_every_partition_and_batches_fully(
    make_kafka: Callable[..., Awaitable[KafkaBus]],
) -> None:
    topic, group = _topic(), unique_name("g-")
    bus = await make_kafka()
    sub = await bus.subscribe(topic, group=group, consumer="c1")
    other = await bus.subscribe(topic, group=unique_name("g-"), consumer="c1")
    await settle([sub])
    assert await sub.lag() == 0

    # Batches of many records: the high watermark, not ListOffsets alone, counts them.
    await bus.publish_many(topic, [(b"k%d" % i, b"%d" % i) for i in range(100)])
    await eventually(sub.lag, lambda n: n == 100, what="lag 100")
    got = await drain(sub, 100)
    await sub.ack(got[:50])
    lag = await sub.lag()
    assert 50 <= lag < 100  # a gap in a partition holds its later acks back
    await sub.ack(got[50:])
    assert await sub.lag() == 0
    # Another group's lag is its own.
    await eventually(other.lag, lambda n: n == 100, what="the other group's lag")


async def test_a_broker_that_never_answers_gives_a_bus_error_with_a_cause() -> None:
    """A timed-out start used to give ``cannot … at host:port: `` (an empty cause)."""

    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()  # accept, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bus = KafkaBus(f"kafka://127.0.0.1:{port}", timeout_s=0.5)
    try:
        with pytest.raises(BusError) as caught:
            await bus.publish("t", b"x")
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message
        assert not message.rstrip().endswith(":")
        assert "timed out" in message
    finally:
        await bus.aclose()
        server.close()
        await server.wait_closed()
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
