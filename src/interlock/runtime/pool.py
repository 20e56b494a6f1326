"""Replicas: the inference workers a batcher runs batches on, and the policy that sizes them.

A *replica* runs one batch at a time. :class:`ThreadReplicas` run a thread each, for
runtimes that release the GIL (LightGBM, XGBoost, ONNX Runtime, sklearn).
:class:`ProcessReplicas` run a child process each that loads the model itself, for the
``python`` format whose ``predict`` holds the GIL; a child that dies mid-batch fails that
batch with PredictionError and is replaced (one found dead is replaced before a batch).

``run``, ``grow`` and ``shrink`` are called on the loop and return at once. A replica
starts off the loop, in its own thread, and reports with ``call_soon_threadsafe``: the
counts change on the loop only, and the other replicas serve while one starts.
``shrink`` retires an idle replica: its thread ends, or its child finishes and exits
(terminated if it does not). :class:`Autoscaler` decides when; the batcher asks it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from multiprocessing.context import ForkServerContext, SpawnContext
from pathlib import Path
from typing import Any, Protocol, cast

from interlock._core.clock import Clock
from interlock._core.schema import FeatureSchema
from interlock.errors import PredictionError, RuntimeLoadError
from interlock.runtime._worker import (
    ChildProcess,
    PredictFn,
    WorkerDiedError,
    WorkerSpec,
    predict_batches,
)

__all__ = ["Autoscaler", "Done", "ProcessReplicas", "Replicas", "ScalePolicy", "ThreadReplicas"]

log = logging.getLogger("interlock.runtime")

Done = Callable[[list[Any] | None, BaseException | None], None]
"""Called on the loop with a batch's results, or with the error that replaced them."""

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class ScalePolicy:
    """Bounds and pace of autoscaling (``serving.min_replicas`` and friends)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_queue_delay_s: float = 0.005
    cooldown_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")


class Autoscaler:
    """When to add or retire a replica; the caller measures, the clock is injected.

    Up by one when all ready replicas are busy and either the queueing delay is over
    target or a full batch waits, while replicas (ready or starting) < max. Down by one
    when ready replicas > min and none has been needed (all busy at once) for a whole
    cooldown. Two steps are at least a cooldown apart.
    """

    def __init__(self, policy: ScalePolicy, clock: Clock) -> None:
        self.policy = policy
        self._clock = clock
        self._last_step = -math.inf
        self._last_saturated = clock.monotonic()  # a fresh pool is not "idle since ever"

    def saturated(self, now: float) -> None:
        """Record that every ready replica was busy at ``now``."""
        self._last_saturated = now

    def decide(self, *, replicas: int, busy: int, queue_delay_s: float, full_batch: bool) -> int:
        """+1, -1 or 0 for ``replicas`` ready ones; a non-zero answer is a step taken now."""
        policy, now = self.policy, self._clock.monotonic()
        if now - self._last_step < policy.cooldown_s:
            return 0
        step = 0
        if busy >= replicas:
            self._last_saturated = now
            pressed = full_batch or queue_delay_s > policy.target_queue_delay_s
            if pressed and replicas < policy.max_replicas:
                step = 1
        elif (
            replicas > policy.min_replicas
            and now - max(self._last_saturated, self._last_step) >= policy.cooldown_s
        ):
            step = -1
        if step:
            self._last_step = now
        return step


class Replicas(Protocol):
    """Workers that run one batch each at a time; every method is called on the loop."""

    @property
    def replicas(self) -> int:
        """Replicas ready to take a batch (idle or busy)."""

    @property
    def starting(self) -> int:
        """Replicas starting or being replaced."""

    @property
    def busy(self) -> int:
        """Batches running now."""

    def open(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        """Bind to ``loop``; ``on_change`` runs there each time a replica becomes ready."""

    async def wait_ready(self, count: int) -> None:
        """Wait until ``count`` replicas are ready; RuntimeLoadError when one fails to start."""

    def run(self, batches: Sequence[Any], done: Done) -> None:
        """Predict ``batches`` together on an idle ready replica; there must be one."""

    def grow(self) -> None:
        """Start one more replica; it takes batches once it reports ready."""

    def shrink(self) -> bool:
        """Retire an idle replica; False when none is idle."""

    async def aclose(self) -> None:
        """Retire every replica (busy ones after their batch) and wait until they are gone."""


class _State(StrEnum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    STOPPING = "stopping"


@dataclass(slots=True, eq=False)
class _Replica:
    id: int
    inbox: queue.SimpleQueue[tuple[Sequence[Any], Done] | None] = field(
        default_factory=queue.SimpleQueue
    )
    stop: threading.Event = field(default_factory=threading.Event)
    state: _State = _State.STARTING
    pid: int | None = None
    thread: threading.Thread | None = None


class _ReplicaPool:
    """The loop-side bookkeeping both kinds share; subclasses provide ``_drive``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._live: dict[int, _Replica] = {}
        self._retired: list[_Replica] = []
        self._idle: list[_Replica] = []
        self._ready = 0
        self._busy = 0
        self._ids = itertools.count(1)
        self._last_error: BaseException | None = None
        self._changed = asyncio.Event()

    @property
    def replicas(self) -> int:
        return self._ready

    @property
    def starting(self) -> int:
        return sum(r.state is _State.STARTING for r in self._live.values())

    @property
    def busy(self) -> int:
        return self._busy

    def open(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[], None]) -> None:
        self._loop = loop
        self._on_change = on_change

    async def wait_ready(self, count: int) -> None:
        while self._ready < count:
            if self._last_error is not None:
                error, self._last_error = self._last_error, None
                message = f"{self._name}: a replica failed to start: {error}"
                raise RuntimeLoadError(message) from error
            self._changed.clear()
            await self._changed.wait()

    def run(self, batches: Sequence[Any], done: Done) -> None:
        replica = self._idle.pop()  # the most recently used: the others stay cold and idle
        replica.state = _State.BUSY
        self._busy += 1
        replica.inbox.put((batches, done))

    def grow(self) -> None:
        if self._loop is None:
            raise RuntimeError("open the pool on a loop before growing it")
        replica = _Replica(next(self._ids))
        self._live[replica.id] = replica
        replica.thread = threading.Thread(
            target=self._drive,
            args=(replica,),
            name=f"interlock-{self._name}-{replica.id}",
            daemon=True,  # a pool never closed must not hold the interpreter at exit
        )
        replica.thread.start()

    def shrink(self) -> bool:
        if not self._idle:
            return False
        self._retire(self._idle.pop(0))  # the least recently used
        return True

    async def aclose(self) -> None:
        for replica in list(self._live.values()):
            self._retire(replica)
        threads = [r.thread for r in self._retired if r.thread is not None]
        self._retired.clear()
        await asyncio.gather(*(asyncio.to_thread(t.join) for t in threads))

    def _retire(self, replica: _Replica) -> None:
        if replica.state is _State.IDLE or replica.state is _State.BUSY:
            self._ready -= 1
        if replica in self._idle:
            self._idle.remove(replica)
        replica.state = _State.STOPPING
        replica.stop.set()
        replica.inbox.put(None)
        del self._live[replica.id]
        self._retired = [r for r in self._retired if r.thread is not None and r.thread.is_alive()]
        self._retired.append(replica)

    # -- called from replica threads ----------------------------------------------------

    def _drive(self, replica: _Replica) -> None:
        raise NotImplementedError

    def _report(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(callback, *args)
                return True
        except RuntimeError:  # a closed loop: nobody waits any more
            pass
        return False

    # -- on the loop: what replicas report -----------------------------------------------

    def _on_ready(self, replica: _Replica, pid: int | None) -> None:
        if replica.state is not _State.STARTING:
            return  # retired while it started
        replica.state = _State.IDLE
        replica.pid = pid
        self._ready += 1
        self._idle.append(replica)
        self._changed.set()
        self._on_change()

    def _on_start_failed(self, replica: _Replica, error: BaseException) -> None:
        self._last_error = error
        log.warning("replica failed to start", extra={"pool": self._name, "error": str(error)})
        self._changed.set()

    def _on_done(
        self, replica: _Replica, done: Done, result: list[Any] | None, error: BaseException | None
    ) -> None:
        self._busy -= 1
        if replica.state is _State.BUSY:
            replica.state = _State.IDLE
            self._idle.append(replica)
        done(result, error)

    def _on_lost(self, replica: _Replica, done: Done, error: BaseException) -> None:
        """The replica died in the middle of a batch; its driver starts another."""
        self._busy -= 1
        if replica.state is _State.BUSY:
            self._ready -= 1
            replica.state = _State.STARTING
            replica.pid = None
        log.warning("replica died", extra={"pool": self._name, "error": str(error)})
        done(None, error)


class ThreadReplicas(_ReplicaPool):
    """A thread per replica, calling ``predict`` in-process (for GIL-releasing runtimes)."""

    def __init__(self, predict: PredictFn, *, takes_rows: bool, name: str = "model") -> None:
        super().__init__(name)
        self._predict = predict
        self._takes_rows = takes_rows

    def _drive(self, replica: _Replica) -> None:
        self._report(self._on_ready, replica, None)
        predict, takes_rows, inbox = self._predict, self._takes_rows, replica.inbox
        while (job := inbox.get()) is not None:
            batches, done = job
            result: list[Any] | None = None
            error: BaseException | None = None
            try:
                result = predict_batches(predict, batches, takes_rows)
            except BaseException as exc:  # the model's error travels to the batch's callers
                error = exc
            if not self._report(self._on_done, replica, done, result, error):
                return


class ProcessReplicas(_ReplicaPool):
    """A child process per replica that loads the model itself (for the ``python`` format).

    The child builds its predictor from ``fmt`` and ``path`` with ``load_predictor``,
    runs ``warm`` (one batch, optional) through it, then reports ready. ``start_method``
    is ``spawn`` or ``forkserver``: the parent has threads, so never ``fork``.
    """

    def __init__(
        self,
        fmt: str,
        path: Path,
        *,
        schema: FeatureSchema | None = None,
        trusted: bool = False,
        threads: int = 1,
        warm: Any = None,
        name: str = "model",
        start_method: str = "spawn",
        start_timeout_s: float = 120.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(name)
        if start_method not in ("spawn", "forkserver"):
            raise ValueError("start_method must be 'spawn' or 'forkserver'")
        context = multiprocessing.get_context(start_method)
        self._context = cast("SpawnContext | ForkServerContext", context)
        self._spec = WorkerSpec(str(fmt), Path(path), schema, trusted, threads, warm)
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s

    @property
    def pids(self) -> list[int]:
        """The PIDs of the ready replicas."""
        return [r.pid for r in self._live.values() if r.pid is not None]

    def _start(self, replica: _Replica) -> ChildProcess:
        """A started child; retried with backoff until it starts or the replica is retired."""
        backoff_s = _FIRST_BACKOFF_S
        while not replica.stop.is_set():
            child = ChildProcess(self._context, self._spec, f"interlock-{self._name}-{replica.id}")
            try:
                child.start(self._start_timeout_s, replica.stop)
                return child
            except RuntimeLoadError as exc:
                if not replica.stop.is_set():
                    self._report(self._on_start_failed, replica, exc)
            replica.stop.wait(backoff_s)
            backoff_s = min(backoff_s * 2, _MAX_BACKOFF_S)
        raise RuntimeLoadError(f"{self._name}: replica {replica.id} retired while starting")

    def _drive(self, replica: _Replica) -> None:
        child: ChildProcess | None = None
        try:
            child = self._start(replica)
            self._report(self._on_ready, replica, child.pid)
            while (job := replica.inbox.get()) is not None:
                batches, done = job
                if not child.alive():  # it died while idle: replace it before this batch
                    child.kill()
                    try:
                        child = self._start(replica)
                    except RuntimeLoadError as exc:
                        self._report(self._on_lost, replica, done, PredictionError(str(exc)))
                        raise
                try:
                    ok, value = child.predict(batches)
                except WorkerDiedError as exc:
                    child.kill()
                    message = f"{self._name}: replica process {child.pid} died mid-batch ({exc})"
                    self._report(self._on_lost, replica, done, PredictionError(message))
                    child = self._start(replica)
                    self._report(self._on_ready, replica, child.pid)
                    continue
                error = None if ok else PredictionError(value)
                self._report(self._on_done, replica, done, value if ok else None, error)
        except RuntimeLoadError:
            return  # retired while it (re)started
        finally:
            if child is not None:
                child.stop(self._stop_timeout_s)
