"""What ``interlock serve`` tells the event bus: HTTP predictions and canary decisions.

With a bus configured, downstream systems see every decision, not only those made from
events:

- ``bus.publish_http = true``: each HTTP prediction is published to
  ``ai.prediction.completed`` in the worker's shape, with ``"source": "http"``;
- a canary step, promotion or rollback is published to ``ai.model.traffic``
  (``{"model", "version", "action", "weight", "reason", "timestamp"}``).

Publishing never holds up an answer: events are queued and published in batches, one
``publish_many`` per topic per loop turn, in a background task. The queue is bounded
(``max_pending``); beyond it, and when the bus fails, events are dropped and counted
(:attr:`Announcer.dropped`) with a warning — a prediction already answered is never
failed for its announcement. For guaranteed delivery, send requests through the bus
(``interlock worker``), which acknowledges nothing it has not published.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson

from interlock.bus.base import EventBus
from interlock.errors import InterlockError

__all__ = ["TRAFFIC_TOPIC", "Announcer"]

log = logging.getLogger("interlock.serving")

TRAFFIC_TOPIC = "ai.model.traffic"


class Announcer:
    """Queues events for ``bus`` and publishes them behind the answers."""

    def __init__(self, bus: EventBus, *, completed_topic: str, max_pending: int = 100_000) -> None:
        self._bus = bus
        self._completed = completed_topic
        self._max = max_pending
        self._pending: dict[str, list[tuple[bytes | None, bytes]]] = defaultdict(list)
        self._count = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._failing = False
        self.published = 0
        self.dropped = 0

    # -- what is announced -------------------------------------------------------------------

    def prediction(
        self, request_id: str, model: str, version: int, values: list[Any], started: float
    ) -> None:
        """An HTTP prediction, as the worker would have published it."""
        body = {
            "requestId": request_id,
            "model": model,
            "version": version,
            "result": values,
            "latencyMs": round((time.perf_counter() - started) * 1000.0, 3),
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "source": "http",
        }
        self._queue(self._completed, model.encode(), orjson.dumps(body))

    def canary_changed(
        self, model: str, version: int, weight: float, action: str, reason: str = ""
    ) -> None:
        """A canary step, promotion or rollback (a :class:`RouterObserver` method)."""
        body = {
            "model": model,
            "version": version,
            "action": action,
            "weight": weight,
            "reason": reason,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        self._queue(TRAFFIC_TOPIC, model.encode(), orjson.dumps(body))

    # -- publishing ---------------------------------------------------------------------------

    def _queue(self, topic: str, key: bytes | None, value: bytes) -> None:
        if self._count >= self._max:
            self.dropped += 1
            return
        if self._count == 0:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending[topic].append((key, value))
        self._count += 1

    def _flush(self) -> None:
        pending, self._pending, self._count = self._pending, defaultdict(list), 0
        task = asyncio.ensure_future(self._publish(pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, pending: dict[str, list[tuple[bytes | None, bytes]]]) -> None:
        for topic, items in pending.items():
            try:
                await self._bus.publish_many(topic, items)
            except (InterlockError, OSError) as exc:
                self.dropped += len(items)
                if not self._failing:
                    log.warning(
                        "events could not be published; dropping them until the bus answers",
                        extra={"topic": topic, "error": str(exc)},
                    )
                self._failing = True
                continue
            self.published += len(items)
            if self._failing:
                log.info("events are published again", extra={"topic": topic})
                self._failing = False

    async def aclose(self) -> None:
        """Publish what is queued, then close the bus."""
        if self._count:
            self._flush()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self._bus.aclose()
