"""The in-process event bus: the embedded default and the tests' reference.

Each topic is a log of messages numbered from 0 (a message's ``id`` is its number)
and a set of consumer groups. A group starts at the beginning of what the log still
holds and delivers each message to one of its members; a member holds what it fetched
until it acknowledges it. When a member closes (as a dead process would stop), what it
holds and has not acknowledged goes back to its group and is delivered again to the
next member that fetches, with ``deliveries`` one more: at least once, as on the real
backends. An ack from a member that no longer holds a message does nothing.

Several :class:`MemoryBus` objects on one :class:`MemoryBroker` behave as several
connections to one bus (as several processes would on a real one); a bus made without
a broker has one of its own. A topic keeps at most ``max_len`` messages; it drops the
ones every group has had, and the oldest beyond ``max_len`` even if a group has not:
those are lost to that group, as with a Redis ``MAXLEN``, and counted in
:attr:`MemoryBroker.dropped_unread`.

Nothing here blocks or does I/O; everything runs on the caller's event loop. A publish
yields to the loop once, as a real one would, so that a publishing loop lets
consumers run.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from interlock.bus.base import Message

__all__ = ["DEFAULT_MAX_LEN", "MemoryBroker", "MemoryBus", "MemorySubscription", "MemoryTail"]

DEFAULT_MAX_LEN = 100_000


@dataclass(frozen=True, slots=True)
class _Entry:
    offset: int
    value: bytes
    key: bytes | None
    headers: dict[str, str]


@dataclass(slots=True)
class _Held:
    entry: _Entry
    deliveries: int
    holder: int  # the id of the MemorySubscription holding it


@dataclass(slots=True)
class _Group:
    next_offset: int
    returned: deque[tuple[_Entry, int]] = field(default_factory=deque)  # (entry, deliveries)
    held: dict[int, _Held] = field(default_factory=dict)  # by offset


class _Topic:
    def __init__(self, name: str, max_len: int, broker: MemoryBroker) -> None:
        self.name = name
        self.max_len = max_len
        self.log: deque[_Entry] = deque()
        self.next_offset = 0
        self.groups: dict[str, _Group] = {}
        self._broker = broker
        self._changed: asyncio.Event | None = None

    @property
    def first_offset(self) -> int:
        return self.log[0].offset if self.log else self.next_offset

    def group(self, name: str) -> _Group:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = _Group(self.first_offset)
        return group

    def append(self, key: bytes | None, value: bytes, headers: dict[str, str]) -> None:
        self.log.append(_Entry(self.next_offset, value, key, headers))
        self.next_offset += 1

    def trim(self) -> None:
        """Drop what every group has had, then the oldest beyond ``max_len``."""
        log = self.log
        if self.groups:
            passed = min(group.next_offset for group in self.groups.values())
            while log and log[0].offset < passed:
                log.popleft()
        while len(log) > self.max_len:
            offset = log.popleft().offset
            self._broker.dropped_unread += sum(
                1 for group in self.groups.values() if group.next_offset <= offset
            )

    def changed(self) -> asyncio.Event:
        """An event set at the next change (a publish, or messages handed back)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def wake(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()


class MemoryBroker:
    """The topics of one in-process bus, shared by the :class:`MemoryBus` objects on it."""

    def __init__(self, *, max_len: int = DEFAULT_MAX_LEN) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be at least 1, not {max_len}")
        self.max_len = max_len
        self.dropped_unread = 0
        self._topics: dict[str, _Topic] = {}

    def __repr__(self) -> str:
        return f"MemoryBroker(topics={len(self._topics)}, max_len={self.max_len})"

    def _topic(self, name: str) -> _Topic:
        topic = self._topics.get(name)
        if topic is None:
            topic = self._topics[name] = _Topic(name, self.max_len, self)
        return topic

    def topics(self) -> list[str]:
        """The names of the topics that exist, in the order they were created."""
        return list(self._topics)


class MemoryBus:
    """A connection to the in-process bus ``broker``.

    Without a broker the bus has one of its own, keeping ``max_len`` messages a topic.
    """

    url = "memory://"

    def __init__(
        self, *, broker: MemoryBroker | None = None, max_len: int = DEFAULT_MAX_LEN
    ) -> None:
        self.broker = broker if broker is not None else MemoryBroker(max_len=max_len)
        self._subscriptions: set[MemorySubscription] = set()

    def __repr__(self) -> str:
        return f"MemoryBus({self.broker!r})"

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Append one message to ``topic`` (created when missing)."""
        log = self.broker._topic(topic)
        log.append(key, value, dict(headers) if headers else {})
        log.trim()
        log.wake()
        await asyncio.sleep(0)  # as a real publish would: consumers get a turn

    async def publish_many(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Append ``(key, value)`` pairs to ``topic`` in their order."""
        if not items:
            return
        log = self.broker._topic(topic)
        for key, value in items:
            log.append(key, value, {})
        log.trim()
        log.wake()
        await asyncio.sleep(0)

    async def subscribe(self, topic: str, *, group: str, consumer: str) -> MemorySubscription:
        """Join ``group`` on ``topic``; both are created when missing."""
        sub = MemorySubscription(self, self.broker._topic(topic), group, consumer)
        self._subscriptions.add(sub)
        return sub

    async def tail(self, topic: str, *, last: int) -> MemoryTail:
        """The newest ``last`` messages of ``topic`` (created when missing), then the rest."""
        if last < 0:
            raise ValueError(f"last must be at least 0, not {last}")
        log = self.broker._topic(topic)
        start = max(log.first_offset, log.next_offset - last)
        tail = MemoryTail(log, start)
        tail.backlog = tail._take(last)
        return tail

    async def aclose(self) -> None:
        """Close every subscription made on this bus; the broker and its topics stay."""
        for sub in list(self._subscriptions):
            await sub.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


_subscription_ids = itertools.count(1)


class MemorySubscription:
    """A member of ``group`` on one in-process topic."""

    def __init__(self, bus: MemoryBus, topic: _Topic, group: str, consumer: str) -> None:
        self.topic = topic.name
        self.group = group
        self.consumer = consumer
        self._bus = bus
        self._log = topic
        self._group = topic.group(group)
        self._id = next(_subscription_ids)
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"MemorySubscription({self.topic!r}, group={self.group!r}, consumer={self.consumer!r})"
        )

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Handed-back messages first, then new ones; waits up to ``timeout_s`` for any."""
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if self._closed:
                return []
            changed = self._log.changed()
            got = self._take(max_messages)
            left_s = deadline - loop.time()
            if got or left_s <= 0:
                return got
            try:
                async with asyncio.timeout(left_s):
                    await changed.wait()
            except TimeoutError:
                return self._take(max_messages) if not self._closed else []

    def _take(self, max_messages: int) -> list[Message]:
        group, log = self._group, self._log
        taken: list[tuple[_Entry, int]] = []
        while group.returned and len(taken) < max_messages:
            entry, deliveries = group.returned.popleft()
            taken.append((entry, deliveries + 1))
        if len(taken) < max_messages and group.next_offset < log.next_offset:
            start = max(group.next_offset - log.first_offset, 0)
            stop = min(start + max_messages - len(taken), len(log.log))
            taken += [(entry, 1) for entry in itertools.islice(log.log, start, stop)]
            group.next_offset = log.first_offset + stop
        messages = []
        for entry, deliveries in taken:
            group.held[entry.offset] = _Held(entry, deliveries, self._id)
            messages.append(
                Message(
                    topic=self.topic,
                    value=entry.value,
                    key=entry.key,
                    headers=dict(entry.headers),
                    id=str(entry.offset),
                    deliveries=deliveries,
                    handle=entry.offset,
                )
            )
        if taken:
            log.trim()
        return messages

    async def ack(self, messages: Sequence[Message]) -> None:
        """Forget the messages this member holds; others (no longer held here) are ignored."""
        held = self._group.held
        for message in messages:
            entry = held.get(message.handle)
            if entry is not None and entry.holder == self._id:
                del held[message.handle]

    async def lag(self) -> int:
        """Messages the group has not had yet, plus the ones had but not acknowledged."""
        group, log = self._group, self._log
        unread = log.next_offset - max(group.next_offset, log.first_offset)
        return unread + len(group.returned) + len(group.held)

    async def aclose(self) -> None:
        """Leave the group: what this member holds unacknowledged goes back to it."""
        if self._closed:
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        group = self._group
        mine = sorted((offset for offset, held in group.held.items() if held.holder == self._id))
        for offset in mine:
            held = group.held.pop(offset)
            group.returned.append((held.entry, held.deliveries))
        self._log.wake()


class MemoryTail:
    """Reads one in-process topic from an offset on, holding nothing (see ``Tail``)."""

    def __init__(self, topic: _Topic, offset: int) -> None:
        self.topic = topic.name
        self.backlog: list[Message] = []
        self._log = topic
        self._next = offset

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            changed = self._log.changed()
            got = self._take(max_messages)
            left_s = deadline - loop.time()
            if got or left_s <= 0:
                return got
            try:
                async with asyncio.timeout(left_s):
                    await changed.wait()
            except TimeoutError:
                return self._take(max_messages)

    def _take(self, max_messages: int) -> list[Message]:
        log = self._log
        start = max(self._next - log.first_offset, 0)
        stop = min(start + max_messages, len(log.log))
        entries = list(itertools.islice(log.log, start, stop))
        if entries:
            self._next = entries[-1].offset + 1
        return [
            Message(
                topic=self.topic,
                value=e.value,
                key=e.key,
                headers=dict(e.headers),
                id=str(e.offset),
                handle=e.offset,
            )
            for e in entries
        ]

    async def aclose(self) -> None:
        return None
