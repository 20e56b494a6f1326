"""The event worker: prediction requests from the bus, answers back to it.

It consumes ``ai.prediction.requested`` in a consumer group::

    {"requestId": "r-1", "model": "fraud", "inputs": {…} | [{…}, …],
     "key": "card-42" (optional route key), "replyTo": "topic" (optional)}

and publishes to ``ai.prediction.completed`` (or ``replyTo``)::

    {"requestId", "model", "version", "result", "latencyMs", "timestamp"}

``result`` is one prediction for an object of inputs, a list for a list. Each request
goes through the same :class:`~interlock.serving.pipeline.Pipeline` as HTTP: routing,
cache, breakers, batching, fallbacks.

Rules:

- **Batches.** Events are taken from the bus in batches (at most ``batch``, at most
  ``concurrency`` in flight). The requests of a batch for one model are predicted in one
  pipeline call (their rows concatenated), unless a traffic policy routes each of them;
  the pipeline's batcher joins concurrent calls too. Their completions are published with one
  call per topic, their idempotency records stored with one call, and the batch is
  acknowledged last. A crash before the acknowledgement means redelivery, never loss.
- **Idempotency.** Before predicting, every requestId of a batch is looked up in the
  dedupe store: a request answered before (a redelivery, a duplicate publish) is
  answered again from its record, not predicted again.
- **Dead letters.** An event that cannot be processed (not JSON, not the shape above,
  an unknown model, bad features) goes at once to ``ai.prediction.dead-letter`` with its
  original bytes, the reason and the source topic. A transient failure (the model
  raised, a timeout, an open circuit, an overloaded queue) is retried with exponential
  backoff up to ``max_attempts``, then dead-lettered. Nothing is dropped.
- **Back-pressure.** No more than ``concurrency`` events are in flight; the worker fetches
  more only when there is room.
- **A bus that fails.** Joining the group, fetching, publishing, recording and
  acknowledging are retried with capped exponential backoff and jitter while the bus (or
  the dedupe store) is down, restarting, or rebalancing: one warning per outage, with
  its cause, and one line when it ends. Only a configuration error (a bad URL, a refused
  password, an invalid name) ends the worker.
- **Shutdown.** When ``stop`` is set the worker takes nothing more, finishes (and
  acknowledges) what it holds, and leaves its group; what it could not finish is left
  unacknowledged and the bus redelivers it to the group.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from interlock.bus.base import EventBus, Message, Subscription
from interlock.bus.envelope import dead_letter_payload
from interlock.bus.retry import Backoff, describe
from interlock.errors import (
    InputError,
    InterlockError,
    ModelNotFoundError,
    TrafficError,
)
from interlock.serving.dedupe import Dedupe
from interlock.serving.pipeline import Answer, Pipeline
from interlock.settings import BusSettings

__all__ = ["PredictionWorker", "WorkerObserver", "parse_model_ref"]

log = logging.getLogger("interlock.worker")

# Errors that another try cannot fix: the event goes to the dead-letter topic at once.
_FINAL = (ModelNotFoundError, InputError, TrafficError)
_LAG_EVERY_S = 5.0
_GROUP_ROWS = 256  # rows of one pipeline call when requests are predicted together


class WorkerObserver(Protocol):
    """What the worker reports as it goes (``monitoring.events.WorkerMetrics`` counts it)."""

    def events_taken(self, events: int, redelivered: int) -> None:
        """``events`` taken from the bus, ``redelivered`` of them not for the first time."""
        ...

    def events_completed(self, source: str, events: int) -> None:
        """Completions published, ``source`` saying how: ``predicted`` or ``recorded``."""
        ...

    def event_dead_lettered(self, reason: str) -> None:
        """One event went to the dead-letter topic; ``reason`` is a bounded label."""
        ...

    def prediction_retried(self) -> None: ...

    def in_flight_changed(self, events: int) -> None: ...

    def lag_read(self, events: int) -> None:
        """The group's unacknowledged events on the requests topic."""
        ...

    def batch_answered(self, seconds: float) -> None:
        """From a batch's arrival to its last completion's (or dead letter's) publication."""
        ...


class _Unobserved:
    def events_taken(self, events: int, redelivered: int) -> None:
        pass

    def events_completed(self, source: str, events: int) -> None:
        pass

    def event_dead_lettered(self, reason: str) -> None:
        pass

    def prediction_retried(self) -> None:
        pass

    def in_flight_changed(self, events: int) -> None:
        pass

    def lag_read(self, events: int) -> None:
        pass

    def batch_answered(self, seconds: float) -> None:
        pass


class _DeadLetterError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_model_ref(model: str) -> tuple[str, int | None]:
    """``name``, ``name@alias`` → (ref, None); ``name:3`` → (``name``, 3)."""
    name, sep, version = model.rpartition(":")
    if sep and version.isascii() and version.isdigit() and name:  # not '³': int() refuses it
        return name, int(version)
    return model, None


class PredictionWorker:
    """Consumes prediction requests in ``settings.group`` as ``consumer``."""

    def __init__(
        self,
        bus: EventBus,
        pipeline: Pipeline,
        dedupe: Dedupe,
        settings: BusSettings,
        *,
        consumer: str,
        observer: WorkerObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._bus = bus
        self._pipeline = pipeline
        self._dedupe = dedupe
        self._settings = settings
        self._consumer = consumer
        self._observer: WorkerObserver = observer or _Unobserved()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._in_flight = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._backoffs: dict[str, Backoff] = {}
        self.processed = 0  # events acknowledged, for tests and logs

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set, then drain what is in flight and leave the group."""
        settings = self._settings
        sub = await self._join(stop)
        if sub is None:
            return  # stopped before the bus could be joined
        fetching = Backoff(f"worker: fetching from {settings.requests_topic!r}", log, max_s=5.0)
        lag_task = asyncio.ensure_future(self._watch_lag(sub, stop))
        log.info(
            "worker consuming",
            extra={"topic": settings.requests_topic, "group": settings.group},
        )
        try:
            while not stop.is_set():
                room = settings.concurrency - self._in_flight
                if room <= 0:
                    self._room.clear()
                    await _first(self._room.wait(), stop.wait())
                    continue
                try:
                    messages = await sub.fetch(min(settings.batch, room), 0.25)
                except InterlockError as exc:
                    if not exc.retryable:
                        raise
                    await fetching.wait(exc, stop)  # a broker restarting, a rebalance
                    continue
                fetching.succeeded()
                if not messages:
                    continue
                self._in_flight += len(messages)
                self._observer.in_flight_changed(self._in_flight)
                task = asyncio.ensure_future(self._process(sub, messages, stop))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            lag_task.cancel()
            await sub.aclose()
            log.info("worker stopped", extra={"processed": self.processed})

    async def _join(self, stop: asyncio.Event) -> Subscription | None:
        """The worker's subscription, retried with backoff until it is made or ``stop``.

        A bus that is down, a coordinator that moved, a group still rebalancing: all are
        retried (one warning per streak, with the cause). A configuration error (a bad
        URL, a refused password, an invalid name) is raised: retrying cannot fix it.
        """
        settings = self._settings
        joining = Backoff(
            f"worker: joining the group {settings.group!r} on {settings.requests_topic!r}",
            log,
            max_s=10.0,
            rng=self._rng,
        )
        while not stop.is_set():
            attempt = asyncio.ensure_future(
                self._bus.subscribe(
                    settings.requests_topic, group=settings.group, consumer=self._consumer
                )
            )
            await _first(attempt, stop.wait())  # a join may wait long: SIGTERM ends it
            if attempt.cancelled():
                return None
            try:
                sub = attempt.result()
            except InterlockError as exc:
                if not exc.retryable:
                    raise
                await joining.wait(exc, stop)
                continue
            joining.succeeded()
            return sub
        return None

    # -- one batch -------------------------------------------------------------------------

    async def _process(self, sub: Subscription, batch: list[Message], stop: asyncio.Event) -> None:
        started = time.perf_counter()
        try:
            done = await self._answer(batch, started, stop)
            if done:
                await self._until_done(lambda: sub.ack(batch), stop, "acknowledge")
                self.processed += len(batch)
        except Exception:
            log.exception("a batch of events failed; the bus will deliver it again")
        finally:
            self._in_flight -= len(batch)
            self._observer.in_flight_changed(self._in_flight)
            self._room.set()

    async def _answer(self, batch: list[Message], started: float, stop: asyncio.Event) -> bool:
        """Publish an answer or a dead letter for every event; False if stopped first."""
        settings, observer = self._settings, self._observer
        observer.events_taken(len(batch), sum(1 for m in batch if m.deliveries > 1))
        dead: list[tuple[Message, str]] = []
        valid: list[tuple[Message, dict[str, Any]]] = []
        for message in batch:
            request, reason = _parse(message.value)
            if request is None:
                dead.append((message, reason))
            else:
                valid.append((message, request))
        records = await self._until_done(
            lambda: self._dedupe.get_many([r["requestId"] for _, r in valid]), stop, "look up"
        )
        if records is None:
            return False
        out: dict[str, list[tuple[bytes | None, bytes]]] = defaultdict(list)
        todo: list[tuple[Message, dict[str, Any]]] = []
        for (message, request), record in zip(valid, records, strict=True):
            if record is not None:
                out[request.get("replyTo") or settings.completed_topic].append(
                    (message.key, record)
                )
                observer.events_completed("recorded", 1)
            else:
                todo.append((message, request))
        results = await self._predict_all([request for _, request in todo], started)
        fresh: list[tuple[str, bytes]] = []
        for (message, request), (payload, reason) in zip(todo, results, strict=True):
            if payload is None:
                dead.append((message, reason))
                continue
            out[request.get("replyTo") or settings.completed_topic].append((message.key, payload))
            fresh.append((request["requestId"], payload))
        # The answers and their records go out together: a record stored before its
        # answer is published only means a redelivery is answered from the record.
        steps = [
            self._until_done(lambda t=topic, i=items: self._bus.publish_many(t, i), stop, "publish")
            for topic, items in out.items()
        ]
        if fresh:
            steps.append(self._until_done(lambda: self._dedupe.set_many(fresh), stop, "record"))
        if steps and any(done is None for done in await asyncio.gather(*steps)):
            return False
        if fresh:
            observer.events_completed("predicted", len(fresh))
        if dead:
            letters = [
                (m.key, dead_letter_payload(m, reason, settings.requests_topic))
                for m, reason in dead
            ]
            if (
                await self._until_done(
                    lambda: self._bus.publish_many(settings.dead_letter_topic, letters),
                    stop,
                    "dead-letter",
                )
                is None
            ):
                return False
            for _, reason in dead:
                observer.event_dead_lettered(_reason_label(reason))
        observer.batch_answered(time.perf_counter() - started)
        return True

    async def _predict_all(
        self, requests: list[dict[str, Any]], started: float
    ) -> list[tuple[bytes | None, str]]:
        """Every request's payload (or why it is dead-lettered), in order.

        Requests for the same model (and version) without a traffic policy are predicted
        in one pipeline call, their rows concatenated (up to ``_GROUP_ROWS``);
        a group that fails is split, and each request is tried on its own, so that only
        the request at fault is dead-lettered.
        """
        results: list[tuple[bytes | None, str]] = [(None, "")] * len(requests)
        groups: dict[tuple[str, int | None], list[int]] = defaultdict(list)
        alone: list[int] = []
        for i, request in enumerate(requests):
            ref, version = parse_model_ref(request["model"])
            if self._pipeline.routes_by_key(ref):
                alone.append(i)  # a traffic policy routes each request on its own
            else:
                groups[(ref, version)].append(i)
        jobs: list[Any] = []
        for (ref, version), members in groups.items():
            group: list[int] = []
            rows = 0
            for i in members:
                count = len(requests[i]["inputs"]) if isinstance(requests[i]["inputs"], list) else 1
                if group and rows + count > _GROUP_ROWS:
                    jobs.append(
                        self._predict_group(ref, version, group, requests, results, started)
                    )
                    group, rows = [], 0
                group.append(i)
                rows += count
            if group:
                jobs.append(self._predict_group(ref, version, group, requests, results, started))

        async def one(i: int) -> None:
            results[i] = await self._predict(requests[i], started)

        jobs.extend(one(i) for i in alone)
        if len(jobs) == 1:
            await jobs[0]
        else:
            await asyncio.gather(*jobs)
        return results

    async def _predict_group(
        self,
        ref: str,
        version: int | None,
        members: list[int],
        requests: list[dict[str, Any]],
        results: list[tuple[bytes | None, str]],
        started: float,
    ) -> None:
        if len(members) == 1:
            results[members[0]] = await self._predict(requests[members[0]], started)
            return
        rows: list[dict[str, Any]] = []
        counts: list[int] = []
        for i in members:
            inputs = requests[i]["inputs"]
            part = inputs if isinstance(inputs, list) else [inputs]
            rows.extend(part)
            counts.append(len(part))
        loop = asyncio.get_running_loop()
        try:
            answer = await self._pipeline.predict(
                ref,
                version,
                lambda decoder: decoder.rows(rows),
                deadline=loop.time() + self._settings.timeout_ms / 1000.0,
            )
        except InterlockError:
            # One request's rows may be at fault: each on its own, with its own retries.
            outcomes = await asyncio.gather(*(self._predict(requests[i], started) for i in members))
            for i, outcome in zip(members, outcomes, strict=True):
                results[i] = outcome
            return
        at = 0
        for i, count in zip(members, counts, strict=True):
            values = answer.values[at : at + count]
            at += count
            results[i] = (self._payload(requests[i], answer, values, started), "")

    def _payload(
        self, request: dict[str, Any], answer: Answer, values: list[Any], started: float
    ) -> bytes:
        body: dict[str, Any] = {
            "requestId": request["requestId"],
            "model": answer.model,
            "version": answer.version,
            "result": values if isinstance(request["inputs"], list) else values[0],
            "latencyMs": round((time.perf_counter() - started) * 1000.0, 3),
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        if answer.degraded:
            body["degraded"] = True
        return orjson.dumps(body)

    async def _predict(self, request: dict[str, Any], started: float) -> tuple[bytes | None, str]:
        """The completion payload, or None and why the event is dead-lettered."""
        settings = self._settings
        ref, version = parse_model_ref(request["model"])
        inputs = request["inputs"]
        rows = inputs if isinstance(inputs, list) else [inputs]
        key = request.get("key")
        route_key = key.encode() if isinstance(key, str) else None
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            try:
                answer = await self._pipeline.predict(
                    ref,
                    version,
                    lambda decoder: decoder.rows(rows),
                    deadline=loop.time() + settings.timeout_ms / 1000.0,
                    route_key=route_key,
                    request_id=request["requestId"],
                )
            except _FINAL as exc:
                return None, describe(exc)
            except InterlockError as exc:
                if attempt >= settings.max_attempts:
                    return None, f"gave up after {attempt} attempts: {describe(exc)}"
                self._observer.prediction_retried()
                cap = settings.retry_base_ms * (2 ** (attempt - 1)) / 1000.0
                await asyncio.sleep(self._rng.uniform(cap / 2, cap))
                continue
            return self._payload(request, answer, answer.values, started), ""

    async def _until_done(self, call: Any, stop: asyncio.Event, what: str) -> Any:
        """``await call()`` until it succeeds, backing off; None once ``stop`` is set.

        A bus or store that is down holds the batch (unacknowledged) instead of losing it.
        The batches in flight share one :class:`Backoff` per step, so an outage is one
        warning (with its cause) and one line when it ends, not one per batch and try.
        """
        backoff = self._backoffs.get(what)
        if backoff is None:
            backoff = self._backoffs[what] = Backoff(
                f"worker: {what}", log, first_s=0.05, max_s=5.0, rng=self._rng
            )
        while True:
            try:
                result = await call()
            except InterlockError as exc:
                if stop.is_set():
                    return None
                await backoff.wait(exc, stop)
                continue
            backoff.succeeded()
            return True if result is None else result

    async def _watch_lag(self, sub: Subscription, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self._observer.lag_read(await sub.lag())
            except Exception as exc:  # a metric: never worth stopping the worker for
                log.debug("lag unavailable", extra={"error": type(exc).__name__})
            await _first(asyncio.sleep(_LAG_EVERY_S), stop.wait())


def _parse(value: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return None, f"not JSON: {exc}"
    if type(doc) is not dict:
        return None, "the event must be a JSON object"
    request_id = doc.get("requestId")
    if not isinstance(request_id, str) or not request_id:
        return None, "requestId: a non-empty string is required"
    if not isinstance(doc.get("model"), str) or not doc["model"]:
        return None, "model: a model name is required"
    inputs = doc.get("inputs")
    if not isinstance(inputs, dict | list) or (isinstance(inputs, list) and not inputs):
        return None, "inputs: an object of features, or a non-empty list of them, is required"
    if isinstance(inputs, list) and not all(type(row) is dict for row in inputs):
        return None, "inputs: every item of the list must be an object of features"
    key = doc.get("key")
    if key is not None and not isinstance(key, str):
        return None, "key: must be a string"
    reply = doc.get("replyTo")
    if reply is not None and (not isinstance(reply, str) or not reply):
        return None, "replyTo: must be a topic name"
    return doc, ""


def _reason_label(reason: str) -> str:
    """A bounded label for a dead-letter reason."""
    if reason.startswith("not JSON"):
        return "malformed"
    if reason.startswith("gave up"):
        return "exhausted"
    if ":" in reason.split(" ", 1)[0]:
        return "invalid"
    return "rejected"


async def _first(*waits: Any) -> None:
    """Until the first of ``waits`` completes; the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
