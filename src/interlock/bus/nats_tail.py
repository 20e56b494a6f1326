"""Reading a NATS stream's newest messages without a consumer.

:meth:`NatsTail.open` reads the stream's state and gets the newest ``last`` messages
by sequence (``STREAM.MSG.GET``); :meth:`NatsTail.fetch` asks for the next message
after the last one seen (``next_by_subj``), polling every ``POLL_S`` while there is
none. No consumer is created, durable or ephemeral (``events tail`` used to leave a
durable named ``tail-…`` behind on every call), and neither is the stream.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Self

import nats.errors
import nats.js.errors
from nats.js.api import RawStreamMsg

from interlock.bus import BusError
from interlock.bus.base import Message
from interlock.bus.nats import KEY_HEADER, _key, stream_name
from interlock.bus.retry import describe

if TYPE_CHECKING:
    from interlock.bus.nats import NatsBus

__all__ = ["POLL_S", "NatsTail"]

POLL_S = 0.2
_FAILURES = (nats.errors.Error, TimeoutError, OSError)


class NatsTail:
    """The newest messages of ``topic`` (``backlog``), then the next ones."""

    def __init__(self, bus: NatsBus, topic: str, next_seq: int) -> None:
        self.topic = topic
        self.stream = stream_name(topic)
        self.backlog: list[Message] = []
        self._bus = bus
        self._next = next_seq

    @classmethod
    async def open(cls, bus: NatsBus, topic: str, last: int) -> Self:
        name = stream_name(topic)
        js = await bus._jetstream()
        try:
            try:
                info = await js.stream_info(name)
            except nats.js.errors.NotFoundError:
                return cls(bus, topic, 1)  # no stream yet: everything to come is new
            first, newest = info.state.first_seq, info.state.last_seq
            tail = cls(bus, topic, newest + 1)
            for seq in range(max(first, newest - last + 1), newest + 1) if last else ():
                try:
                    raw = await js.get_msg(name, seq)
                except nats.js.errors.NotFoundError:
                    continue  # deleted meanwhile
                tail.backlog.append(tail._message(raw))
        except _FAILURES as exc:
            raise BusError(f"cannot read the NATS stream {name!r}: {describe(exc)}") from exc
        return tail

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Messages after the last one seen; polls until one comes or ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        js = await self._bus._jetstream()
        out: list[Message] = []
        while len(out) < max_messages:
            try:
                raw = await js.get_msg(self.stream, self._next, subject=self.topic, next=True)
            except nats.js.errors.NotFoundError:
                if out or loop.time() >= deadline:
                    return out
                await asyncio.sleep(min(POLL_S, max(0.0, deadline - loop.time())))
                continue
            except _FAILURES as exc:
                raise BusError(
                    f"cannot read the NATS stream {self.stream!r}: {describe(exc)}"
                ) from exc
            out.append(self._message(raw))
        return out

    def _message(self, raw: RawStreamMsg) -> Message:
        seq = raw.seq or self._next
        self._next = max(self._next, seq + 1)
        headers = dict(raw.headers) if raw.headers else {}
        key = _key(headers.pop(KEY_HEADER, None))
        return Message(
            topic=raw.subject or self.topic,
            value=raw.data or b"",
            key=key,
            headers=headers,
            id=str(seq),
            handle=seq,
        )

    async def aclose(self) -> None:
        return None  # nothing was created on the server
