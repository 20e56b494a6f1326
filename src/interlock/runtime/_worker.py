"""One inference worker process: the child's main loop, and the parent's handle on it.

A process replica (:class:`interlock.runtime.pool.ProcessReplicas`) is a child started
with ``spawn`` (or ``forkserver``; never ``fork``: the parent has threads). It imports
this module, loads the model itself with :func:`interlock.runtime.loaders.load_predictor`
and answers batches over a pipe. The child ignores SIGINT: its parent decides when it
stops. It also stops when the parent's end of the pipe closes, so a parent that dies
leaves no orphan behind.

What crosses the pipe, pickled:

- parent → child: a list of batches to predict together; ``None`` to stop.
- child → parent: ``("ready", pid)`` or ``("failed", message)`` once, at start-up; then
  ``("ok", results)`` or ``("error", message)`` per batch.

:func:`predict_batches` is shared with thread replicas: it joins a batch's parts the way
the model takes them, predicts, and returns plain Python values.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from interlock._core.schema import FeatureSchema
from interlock.errors import RuntimeLoadError, describe
from interlock.runtime.loaders import load_predictor

__all__ = ["ChildProcess", "WorkerDiedError", "WorkerSpec", "predict_batches", "serve"]

PredictFn = Callable[[Any], Any]

_POLL_S = 0.05  # how often a parent waiting for start-up checks whether it was told to stop


def predict_batches(predict: PredictFn, batches: Sequence[Any], takes_rows: bool) -> list[Any]:
    """Join ``batches`` (row-dict lists or float64 matrices), predict, return plain values."""
    if takes_rows:
        joined: Any = [row for batch in batches for row in batch]
    elif len(batches) == 1:
        joined = batches[0]
    else:
        joined = np.concatenate(batches)
    result = predict(joined)
    return result.tolist() if isinstance(result, np.ndarray) else list(result)


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What a child needs to build its own predictor; pickled to it at start-up."""

    format: str
    path: Path
    schema: FeatureSchema | None = None
    trusted: bool = False
    threads: int = 1
    warm: Any = None  # one batch run once before the child says it is ready


def serve(conn: Connection, spec: WorkerSpec) -> None:
    """The child's main: load the model, say ready, then answer batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        predictor = load_predictor(
            spec.format, spec.path, schema=spec.schema, threads=spec.threads, trusted=spec.trusted
        )
        if spec.warm is not None:
            predict_batches(predictor.predict, [spec.warm], predictor.takes_rows)
    except Exception as exc:
        conn.send(("failed", describe(exc, with_type=True)))
        return
    try:
        conn.send(("ready", os.getpid()))
        while True:
            batches = conn.recv()
            if batches is None:
                return
            try:
                out = predict_batches(predictor.predict, batches, predictor.takes_rows)
                data = pickle.dumps(("ok", out), pickle.HIGHEST_PROTOCOL)
            except Exception as exc:  # the model's own error, or a result pickle refuses
                data = pickle.dumps(("error", describe(exc)), pickle.HIGHEST_PROTOCOL)
            conn.send_bytes(data)
    except (EOFError, OSError):
        return  # the parent is gone
    finally:
        predictor.close()


class WorkerDiedError(Exception):
    """The child exited (or its pipe broke) while the parent was talking to it."""


class ChildProcess:
    """The parent's handle on one worker process; used from one thread at a time."""

    def __init__(
        self, context: SpawnContext | ForkServerContext, spec: WorkerSpec, name: str
    ) -> None:
        self._context = context
        self._spec = spec
        self._name = name
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self.pid: int | None = None

    def start(self, timeout_s: float, stop: threading.Event) -> int:
        """Start the child and wait until its model is loaded; its PID.

        Raises RuntimeLoadError when the child fails to load the model, exits, does not
        answer within ``timeout_s``, or when ``stop`` is set meanwhile.
        """
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=serve, args=(theirs, self._spec), name=self._name, daemon=True
        )
        self._process, self._conn = process, ours
        try:
            process.start()
        finally:
            theirs.close()  # so that the child's exit reads as EOF here
        deadline = time.monotonic() + timeout_s
        while not ours.poll(_POLL_S):
            if stop.is_set():
                self.kill()
                raise RuntimeLoadError(f"{self._name}: stopped while starting")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeLoadError(f"{self._name}: not ready after {timeout_s:g} s")
        try:
            status, value = ours.recv()
        except (EOFError, OSError):
            self.kill()
            raise RuntimeLoadError(
                f"{self._name}: exited while starting (exit code {process.exitcode})"
            ) from None
        if status != "ready":
            self.kill()
            raise RuntimeLoadError(f"{self._name}: {value}")
        self.pid = int(value)
        return self.pid

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def predict(self, batches: Sequence[Any]) -> tuple[bool, Any]:
        """``(True, results)``, or ``(False, message)`` when the model raised.

        Raises WorkerDiedError when the child is gone before it answered.
        """
        conn = self._conn
        if conn is None:
            raise WorkerDiedError("not started")
        try:
            conn.send(batches)
            data = conn.recv_bytes()
        except (EOFError, OSError) as exc:
            code = self._reap()
            raise WorkerDiedError(f"exit code {code}") from exc
        try:
            status, value = pickle.loads(data)  # noqa: S301 - our own child's answer
        except Exception as exc:  # e.g. results of a class only the child can import
            return False, f"the model's results cannot be read here: {describe(exc)}"
        return status == "ok", value

    def _reap(self) -> int | None:
        process = self._process
        if process is None:
            return None
        process.join(1.0)
        return process.exitcode

    def stop(self, timeout_s: float) -> None:
        """Ask the child to finish and exit; terminate it after ``timeout_s``, then kill it."""
        process, conn = self._process, self._conn
        if process is None or conn is None:
            return
        with contextlib.suppress(OSError):  # already gone: the joins below return at once
            conn.send(None)
        process.join(timeout_s)
        if process.exitcode is None:
            process.terminate()
            process.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        """Kill the child if it still runs, and release the pipe and the process handle."""
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            conn.close()
        if process is not None:
            if process.exitcode is None:
                process.kill()
                process.join()
            process.close()
