"""Reading a Redis stream's newest entries without joining or creating anything.

:meth:`RedisTail.open` takes the newest ``last`` entries with ``XREVRANGE … COUNT``
(shown oldest first) and remembers the newest id; :meth:`RedisTail.fetch` reads what
comes after it with ``XREAD … BLOCK``. No consumer group is made and the stream is not
created (``events tail`` used to leave a ``tail-…`` group behind on every call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self

from redis.exceptions import ResponseError

from interlock.bus.base import Message
from interlock.bus.redis import entry_message

if TYPE_CHECKING:
    from interlock.bus.redis import RedisBus

__all__ = ["RedisTail"]

_START = b"0-0"


class RedisTail:
    """The newest entries of the stream ``topic`` (``backlog``), then the next ones."""

    def __init__(self, bus: RedisBus, topic: str, cursor: bytes) -> None:
        self.topic = topic
        self.backlog: list[Message] = []
        self._bus = bus
        self._cursor = cursor

    @classmethod
    async def open(cls, bus: RedisBus, topic: str, last: int) -> Self:
        client = bus._redis()

        async def newest_first() -> list[Any]:
            return list(await client.xrevrange(topic, "+", "-", count=max(last, 1)) or [])

        try:
            newest = await bus._call("tail", newest_first)
        except ResponseError as exc:  # the key holds something else than a stream
            raise bus._translate("tail", exc) from exc
        newest.reverse()
        tail = cls(bus, topic, newest[-1][0] if newest else _START)
        if last:
            tail.backlog = [entry_message(topic, i, fields, 1) for i, fields in newest[-last:]]
        return tail

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Entries after the last one seen, waiting up to ``timeout_s`` for the first."""
        bus, client = self._bus, self._bus._redis()
        block_ms = max(1, round(timeout_s * 1000))
        try:
            reply: Any = await bus._call(
                "tail",
                lambda: client.xread(
                    {self.topic: self._cursor}, count=max_messages, block=block_ms
                ),
                timeout_s,
            )
        except ResponseError as exc:
            raise bus._translate("tail", exc) from exc
        if not reply:
            return []
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        if isinstance(entries, list) and entries and isinstance(entries[0], list):
            entries = entries[0]  # RESP3 wraps the stream's entries once more
        out = [entry_message(self.topic, i, fields, 1) for i, fields in entries]
        if out:
            self._cursor = out[-1].handle
        return out

    async def aclose(self) -> None:
        return None  # the bus's pool is the bus's to close
