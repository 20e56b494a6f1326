"""A Kafka consumer-group member: fetch, acknowledge, commit, hand over on a rebalance.

:class:`KafkaSubscription` is what :meth:`interlock.bus.kafka.KafkaBus.subscribe` returns.
It commits a partition's offset only past the contiguous run of acknowledged records, on
the bus's commit interval (or at every acknowledgement), and again before giving a
partition up in a rebalance, so a crash redelivers and never skips.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import ConsumerRecord, TopicPartition

from interlock.bus import BusError
from interlock.bus.base import Message
from interlock.bus.retry import Backoff, describe

if TYPE_CHECKING:
    from interlock.bus.kafka import KafkaBus

__all__ = ["KafkaSubscription"]

logger = logging.getLogger("interlock.bus")


class _Partition:
    """The offsets handed out from one partition since it was assigned, in order."""

    __slots__ = ("committed", "done", "pending", "tp")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        self.pending: OrderedDict[int, bool] = OrderedDict()  # offset → acknowledged
        self.done: int | None = None  # the offset after the acknowledged prefix
        self.committed: int | None = None  # what this member last committed

    def fetched(self, offset: int) -> None:
        if offset not in self.pending and (self.done is None or offset >= self.done):
            self.pending[offset] = False

    def ack(self, offset: int) -> bool:
        """Mark ``offset`` done; whether the commit point moved (it never moves back)."""
        pending = self.pending
        if pending.get(offset) is not False:
            return False  # acknowledged twice, or not handed out since the assignment
        pending[offset] = True
        moved = False
        while pending:
            first = next(iter(pending))
            if not pending[first]:
                break
            pending.popitem(last=False)
            if self.done is None or first >= self.done:
                self.done = first + 1
                moved = True
        return moved


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, subscription: KafkaSubscription) -> None:
        self._subscription = subscription

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._subscription._give_up(revoked)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        logger.debug("kafka group %s: assigned %s", self._subscription.group, sorted(assigned))
        self._subscription._on_joined()


class KafkaSubscription:
    """A member of ``group`` on ``topic``; see the module docstring for commits."""

    def __init__(self, bus: KafkaBus, topic: str, group: str, consumer: AIOKafkaConsumer) -> None:
        self.topic = topic
        self.group = group
        self._bus = bus
        self._consumer = consumer
        self._listener = _Listener(self)
        self._partitions: dict[TopicPartition, _Partition] = {}
        self._commit_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None  # the commit due within the interval
        self._closed = False
        self._committing = Backoff(f"kafka group {group}: committing offsets", logger)
        self._joined = asyncio.Event()  # set by the first assignment (even an empty one)
        self._join_started = time.monotonic()
        self._join_warned = False

    async def _wait_joined(self, timeout_s: float) -> None:
        """Until the group has given this member its first assignment, or ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._joined.wait()
        except TimeoutError:
            self._join_warned = True
            logger.warning(
                "kafka group %s: not joined after %.0f s (a member that died keeps its "
                "place until its session of %.0f s times out); joining in the background",
                self.group,
                timeout_s,
                self._bus._session_timeout_ms / 1000,
            )

    def _on_joined(self) -> None:
        if not self._joined.is_set():
            self._joined.set()
            if self._join_warned:
                logger.info(
                    "kafka group %s: joined after %.1f s",
                    self.group,
                    time.monotonic() - self._join_started,
                )

    def __repr__(self) -> str:
        return f"KafkaSubscription(topic={self.topic!r}, group={self.group!r})"

    @property
    def partitions(self) -> frozenset[int]:
        """The numbers of the topic's partitions this member owns now (none mid-rebalance)."""
        return frozenset(tp.partition for tp in self._consumer.assignment())

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """What ``getmany`` returns: up to ``max_messages``, as soon as there are any."""
        if self._closed:
            raise BusError(f"{self!r} is closed")
        try:
            batches: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]
            batches = await self._consumer.getmany(
                timeout_ms=max(0, round(timeout_s * 1000)), max_records=max_messages
            )
        except (KafkaError, OSError) as exc:
            raise BusError(
                f"cannot fetch from the Kafka topic {self.topic!r}: {describe(exc)}"
            ) from exc
        out: list[Message] = []
        for tp, records in batches.items():
            partition = self._partitions.get(tp)
            if partition is None:
                partition = self._partitions[tp] = _Partition(tp)
            for record in records:
                partition.fetched(record.offset)
                out.append(
                    Message(
                        topic=record.topic,
                        value=record.value if record.value is not None else b"",
                        key=record.key,
                        headers={k: v.decode(errors="replace") for k, v in record.headers},
                        id=f"{record.partition}:{record.offset}",
                        handle=(partition, record.offset),
                    )
                )
        return out

    async def ack(self, messages: Sequence[Message]) -> None:
        """Commit, per partition, the offset after the longest acknowledged prefix: at
        once, or within the bus's ``commit_interval_s`` when it has one."""
        moved = False
        for message in messages:
            handle: tuple[_Partition, int] = message.handle
            partition, offset = handle
            if self._partitions.get(partition.tp) is not partition:
                continue  # fetched before a rebalance: the partition's owner has it again
            moved |= partition.ack(offset)
        if moved:
            if self._bus.commit_interval_s > 0:
                self._commit_soon()
            else:
                await self._commit()

    def _commit_soon(self) -> None:
        """Commit what is acknowledged once the interval has passed, unless that is due."""
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.ensure_future(self._commit_later())

    async def _commit_later(self) -> None:
        await asyncio.sleep(self._bus.commit_interval_s)
        self._flusher = None  # what is acknowledged from here on needs another commit
        try:
            await self._commit()
        except BusError as exc:
            self._committing.failed(exc)  # one warning per outage, not one per interval
            self._commit_soon()
        else:
            self._committing.succeeded()

    async def _commit(self, only: Iterable[TopicPartition] | None = None) -> None:
        """Commit every partition whose commit point moved; one request, one at a time.

        A commit refused because the group is rebalancing is left to the rebalance
        (which commits again before giving the partitions up) and not raised.
        """
        async with self._commit_lock:
            chosen = (
                self._partitions.values()
                if only is None
                else (self._partitions[tp] for tp in only if tp in self._partitions)
            )
            offsets = {
                p.tp: p.done
                for p in chosen
                if p.done is not None and (p.committed is None or p.done > p.committed)
            }
            if not offsets:
                return
            try:
                async with asyncio.timeout(self._bus.timeout_s):
                    await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                logger.info(
                    "kafka group %s: commit skipped during a rebalance (%s)",
                    self.group,
                    describe(exc),
                )
                return
            except (KafkaError, TimeoutError) as exc:
                raise BusError(
                    f"cannot commit offsets of group {self.group!r}: {describe(exc)}"
                ) from exc
            for tp, offset in offsets.items():
                if (partition := self._partitions.get(tp)) is not None:
                    partition.committed = offset

    async def _give_up(self, revoked: Iterable[TopicPartition]) -> None:
        """Before a rebalance: commit what is contiguous, forget the revoked partitions."""
        revoked = list(revoked)
        try:
            await self._commit(revoked)
        except BusError as exc:
            logger.warning("kafka group %s: %s before a rebalance", self.group, describe(exc))
        for tp in revoked:
            self._partitions.pop(tp, None)

    async def lag(self) -> int:
        """Over the topic's partitions: end offset − the group's committed offset (what
        this member has acknowledged is committed first)."""
        await self._commit()
        consumer = self._consumer
        producer, admin = await self._bus._clients()
        reader = await self._bus._offsets_reader()
        try:
            async with asyncio.timeout(self._bus.timeout_s):
                numbers = await producer.partitions_for(self.topic)
                tps = [TopicPartition(self.topic, n) for n in sorted(numbers)]
                ends = await reader.end_offsets(tps)
                offsets = await admin.list_consumer_group_offsets(self.group, partitions=tps)
                done = {tp: offsets[tp].offset if tp in offsets else -1 for tp in tps}
                # Where the group has committed nothing it starts at the beginning; the
                # beginning is asked for only then (each ListOffsets costs tansu a scan).
                fresh = [tp for tp in tps if done[tp] < 0]
                starts = await reader.beginning_offsets(fresh) if fresh else {}
        except (KafkaError, TimeoutError) as exc:
            raise BusError(f"cannot read the lag of group {self.group!r}: {describe(exc)}") from exc
        assigned = consumer.assignment()
        total = 0
        for tp in tps:
            end = ends[tp]
            if tp in assigned:
                end = max(end, consumer.highwater(tp) or 0)
            total += max(0, end - (starts[tp] if done[tp] < 0 else done[tp]))
        return total

    async def aclose(self) -> None:
        """Commit what is contiguous, then leave the group: the others take the rest."""
        if self._closed:
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        try:
            await self._commit()
        except BusError as exc:
            logger.warning("kafka group %s: %s on close", self.group, describe(exc))
        finally:
            self._partitions.clear()
            # aiokafka leaves only a generation > 0; tansu's first one is 0.
            coordinator = getattr(self._consumer, "_coordinator", None)
            member_id, node_id = "", None
            if coordinator is not None and coordinator.generation == 0:
                member_id, node_id = coordinator.member_id, coordinator.coordinator_id
            await self._consumer.stop()
            if member_id and node_id is not None:
                await self._leave(member_id, node_id)

    async def _leave(self, member_id: str, node_id: int) -> None:
        """Send ``LeaveGroup`` for ``member_id`` from the bus's own connection; best effort."""
        try:
            producer, _ = await self._bus._clients()
            async with asyncio.timeout(self._bus.timeout_s):
                await producer.client.send(node_id, LeaveGroupRequest(self.group, member_id))
        except (BusError, KafkaError, OSError) as exc:
            logger.info(
                "kafka group %s: LeaveGroup failed (%s); the session will expire",
                self.group,
                describe(exc),
            )
