"""Idempotency records for the event worker: a requestId answered once stays answered.

The worker looks up every requestId of a batch in one call before predicting, and
stores the answers of a batch in one call after publishing them. A record lives
``ttl_s``; a redelivered request found here is answered from its record, not predicted.

- :class:`MemoryDedupe`: in the process (a single worker, the embedded default; lost
  when the worker stops).
- :class:`RedisDedupe`: shared by every worker of a group and kept across restarts: one
  ``MGET`` per lookup and one pipelined ``SET … PX`` per store. When Redis fails the
  worker is told (:class:`~interlock.errors.UnavailableError`): it retries the batch
  later rather than risk predicting twice.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

from interlock.errors import UnavailableError
from interlock.settings import mask_url

__all__ = ["Dedupe", "MemoryDedupe", "RedisDedupe", "open_dedupe"]


class Dedupe(Protocol):
    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        """The recorded answer of each id, in order; None where there is none."""
        ...

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Record ``(id, answer)`` pairs for ``ttl_s``."""
        ...

    async def aclose(self) -> None: ...


class MemoryDedupe:
    """Records in the process, the oldest dropped beyond ``max_entries``."""

    def __init__(self, ttl_s: float, *, max_entries: int = 1_000_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._records: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for request_id in ids:
            found = self._records.get(request_id)
            out.append(found[1] if found is not None and found[0] > now else None)
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        until = time.monotonic() + self._ttl_s
        records = self._records
        for request_id, answer in items:
            records[request_id] = (until, answer)
            records.move_to_end(request_id)
        while len(records) > self._max:
            records.popitem(last=False)

    async def aclose(self) -> None:
        self._records.clear()


class RedisDedupe:
    """Records in Redis under ``prefix + requestId``."""

    def __init__(
        self,
        url: str,
        ttl_s: float,
        *,
        prefix: str = "interlock:dedupe:",
        timeout_s: float = 2.0,
    ) -> None:
        import redis.asyncio as aioredis

        self._url = url
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._prefix = prefix
        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )

    async def get_many(self, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        try:
            values: list[bytes | None] = await self._redis.mget(
                [self._prefix + request_id for request_id in ids]
            )
        except Exception as exc:
            raise UnavailableError(
                f"the dedupe store at {mask_url(self._url)} failed: {type(exc).__name__}"
            ) from exc
        return values

    async def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        if not items:
            return
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for request_id, answer in items:
                    pipe.set(self._prefix + request_id, answer, px=self._ttl_ms)
                await pipe.execute()
        except Exception as exc:
            raise UnavailableError(
                f"the dedupe store at {mask_url(self._url)} failed: {type(exc).__name__}"
            ) from exc

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_dedupe(url: str | None, ttl_s: float) -> Dedupe:
    """Redis for a ``redis://`` URL, else records in memory."""
    if url is not None and url.split(":", 1)[0] in ("redis", "rediss", "unix"):
        return RedisDedupe(url, ttl_s)
    return MemoryDedupe(ttl_s)
