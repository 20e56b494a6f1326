"""Reading a Kafka topic's newest records without a consumer group.

:meth:`KafkaTail.open` assigns itself every partition of the topic (no group: nothing
is joined and no offset is committed), starts each partition ``last`` records before
its end, reads up to the end, and keeps the newest ``last`` records over all the
partitions by timestamp (oldest first). :meth:`KafkaTail.fetch` goes on from there.
A topic that does not exist is not created: it is looked for again on each fetch.

The end of a partition is the high watermark of a fetch, not ``ListOffsets``: tansu
answers that with the offset after the *first* record of the last batch, which would
leave the newest records out (see :mod:`interlock.bus.kafka`).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Self, TypeAlias

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from interlock.bus import BusError
from interlock.bus.base import Message
from interlock.bus.kafka import _check_name, _quietly_stop
from interlock.bus.retry import describe

if TYPE_CHECKING:
    from interlock.bus.kafka import KafkaBus

__all__ = ["KafkaTail"]

_Record: TypeAlias = "ConsumerRecord[bytes, bytes]"


class KafkaTail:
    """The newest records of ``topic`` (``backlog``), then the next ones."""

    def __init__(self, bus: KafkaBus, topic: str, consumer: AIOKafkaConsumer) -> None:
        self.topic = topic
        self.backlog: list[Message] = []
        self._bus = bus
        self._consumer = consumer
        self._assigned = False

    @classmethod
    async def open(cls, bus: KafkaBus, topic: str, last: int) -> Self:
        _check_name("topic", topic)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bus._servers,
            client_id=f"{bus.client_id}-tail",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",  # a topic made after the tail opened: all is new
            fetch_max_wait_ms=bus._fetch_max_wait_ms,
            request_timeout_ms=round(bus.timeout_s * 1000),
        )
        await bus._start("reach Kafka", consumer)
        tail = cls(bus, topic, consumer)
        try:
            async with asyncio.timeout(bus.timeout_s):
                tail.backlog = await tail._newest(last)
        except (KafkaError, OSError) as exc:
            await _quietly_stop(consumer)
            raise BusError(f"cannot read the Kafka topic {topic!r}: {describe(exc)}") from exc
        except BaseException:
            await _quietly_stop(consumer)
            raise
        return tail

    async def _assign(self) -> list[TopicPartition]:
        """Every partition of the topic, assigned here; [] while the topic is missing."""
        consumer = self._consumer
        cluster = await consumer._client.fetch_all_metadata()
        numbers = cluster.partitions_for_topic(self.topic)
        if not numbers:
            return []
        tps = [TopicPartition(self.topic, n) for n in sorted(numbers)]
        consumer.assign(tps)
        self._assigned = True
        return tps

    async def _newest(self, last: int) -> list[Message]:
        consumer = self._consumer
        tps = await self._assign()
        if not tps:
            return []
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)  # on tansu short by the last batch's rest
        todo = set()
        for tp in tps:
            if ends[tp] > starts[tp]:
                consumer.seek(tp, max(starts[tp], ends[tp] - last))
                todo.add(tp)
            else:
                consumer.seek(tp, ends[tp])
        kept: dict[TopicPartition, list[_Record]] = {tp: [] for tp in todo}
        while todo:
            batches = await consumer.getmany(*todo, timeout_ms=200)
            for tp, records in batches.items():
                kept[tp] = (kept[tp] + records)[-last:] if last else []
            for tp in list(todo):
                end = consumer.highwater(tp)
                if end is not None and await consumer.position(tp) >= end:
                    todo.discard(tp)
        every = sorted(
            (r for records in kept.values() for r in records),
            key=lambda r: (r.timestamp, r.partition, r.offset),
        )
        return [_message(r) for r in every[len(every) - last :]] if last else []

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Records after the backlog, as ``getmany`` returns them."""
        try:
            if not self._assigned and not await self._assign():
                await asyncio.sleep(timeout_s)  # the topic does not exist (yet)
                return []
            batches = await self._consumer.getmany(
                timeout_ms=max(0, round(timeout_s * 1000)), max_records=max_messages
            )
        except (KafkaError, OSError) as exc:
            raise BusError(f"cannot read the Kafka topic {self.topic!r}: {describe(exc)}") from exc
        return [_message(r) for records in batches.values() for r in records]

    async def aclose(self) -> None:
        await _quietly_stop(self._consumer)


def _message(record: _Record) -> Message:
    return Message(
        topic=record.topic,
        value=record.value if record.value is not None else b"",
        key=record.key,
        headers={k: v.decode(errors="replace") for k, v in record.headers},
        id=f"{record.partition}:{record.offset}",
        handle=None,
    )
