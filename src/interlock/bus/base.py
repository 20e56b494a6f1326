"""The event bus port: publish, consume in a group, acknowledge, dead-letter.

Backends are chosen by URL (:func:`open_bus`):

- ``memory://``: in the process; the embedded default and the tests' reference.
- ``redis://host:port/db``: Redis Streams with consumer groups, XACK, and XAUTOCLAIM of
  messages left pending by a dead consumer.
- ``kafka://host:port[,host:port]``: aiokafka; a message counts as done only when its
  offset is committed, which happens after :meth:`Subscription.ack`.
- ``nats://host:port``: NATS JetStream durable pull consumers with explicit ack.

Delivery is at least once everywhere: a message fetched and not acknowledged is
delivered again (to this consumer or another member of its group) after a crash, so
consumers must be idempotent. Topics (streams, subjects) are created when missing.
A consumer pulls with :meth:`Subscription.fetch`, which returns what is there (up to a
maximum) as soon as something is, so messages taken together can be processed together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

__all__ = ["EventBus", "Message", "Subscription", "Tail"]


@dataclass(slots=True)
class Message:
    """One delivered message.

    ``id`` is the backend's own (a stream id, ``partition:offset``, a stream sequence);
    ``deliveries`` is 1 on the first delivery and more on a redelivery, where the backend
    knows (Kafka does not: always 1). ``handle`` is the backend's, for :meth:`ack`.
    """

    topic: str
    value: bytes
    key: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    id: str = ""
    deliveries: int = 1
    handle: Any = None


class Subscription(Protocol):
    """A member of a consumer group on one topic."""

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages``, returned as soon as at least one is there; ``[]`` after
        ``timeout_s`` with none. Includes redeliveries of messages other (dead) members
        left unacknowledged, where the backend supports it."""
        ...

    async def ack(self, messages: Sequence[Message]) -> None:
        """Mark ``messages`` done: they are not delivered again."""
        ...

    async def lag(self) -> int:
        """Messages of the topic the group has not yet acknowledged (for autoscalers)."""
        ...

    async def aclose(self) -> None:
        """Leave the group; unacknowledged messages go back to the others."""
        ...


class Tail(Protocol):
    """A reader of a topic's newest messages that leaves nothing behind on the bus.

    No group, no committed offset, no durable consumer: ``interlock events tail``
    reads with it. ``backlog`` holds the newest messages the topic had when the tail
    was opened (at most the ``last`` asked for), oldest first; :meth:`fetch` returns
    what was published after them.
    """

    backlog: list[Message]

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Messages published after the backlog (and the previous fetches), in order;
        ``[]`` after ``timeout_s`` with none."""
        ...

    async def aclose(self) -> None:
        """Release what the tail holds (connections, an ephemeral consumer)."""
        ...


class EventBus(Protocol):
    """A connection to one bus; an async context manager."""

    url: str

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish one message; returns once the bus has it (acknowledged/stored)."""
        ...

    async def publish_many(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Publish ``(key, value)`` pairs in as few round trips as the backend allows."""
        ...

    async def subscribe(self, topic: str, *, group: str, consumer: str) -> Subscription:
        """Join ``group`` on ``topic`` as ``consumer`` (unique per process)."""
        ...

    async def tail(self, topic: str, *, last: int) -> Tail:
        """The newest ``last`` messages of ``topic`` and a way to follow it, creating
        nothing on the bus (no group, no durable consumer, no topic)."""
        ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
