"""Soak: mixed load on the demo fraud model for ten minutes; nothing may grow but the counts.

One ``interlock serve`` (the demo fraud model, the prediction cache in Redis, the LLM
gateway in front of the fake upstream of ``tests/llm/upstream.py`` with its answer cache
and its rate limits in Redis) and one ``interlock worker`` (Redis Streams, the same
model and cache, idempotency records in Redis), all on loopback, take three loads at
once from this process, each a fixed number of closed-loop clients (a client sends its
next request when the last one is answered, so nothing queues without bound):

- **predict**: ``--predict-clients`` clients POST one row to ``/v1/models/fraud:predict``;
  ``--repeat-share`` of the rows come from a small hot set (cache hits after their first
  time), the others are fresh (cache misses);
- **llm**: ``--llm-clients`` clients POST to ``/llm/v1/chat/completions``: a quarter
  stream a fresh prompt (SSE), a third repeat one of a few prompts (cache hits), the
  rest send a fresh prompt (a miss, answered by the fake after 5 ms);
- **events**: prediction requests published to the worker's topic in batches, with at
  most ``--event-window`` of them unanswered, and their completions read back from the
  reply topic (the same mix of hot and fresh rows).

It runs ``--duration`` seconds or until ``--requests`` answers in all, whichever comes
first. Every ``--sample-s`` it samples both processes (``bench/_soak_probe.py``): RSS,
open file descriptors, threads, asyncio tasks (the ``interlock_asyncio_tasks`` gauge of
their ``/metrics``) and Redis connections (Redis's ``CLIENT LIST``, matched to each
process's sockets). At the end of the warm-up (``--warmup`` s, by default 10% of the
run and at least 60 s) and at the end, the load pauses: in-flight requests finish,
``--settle-s`` pass, and both processes are sampled idle. The checks hold that idle
sample at the end against the warm-up, per process:

- RSS within ±``--rss-tolerance`` (10%) of the warm-up's idle sample;
- asyncio tasks no more than at the warm-up's idle sample plus ``--task-slack`` (2):
  idle, only the long-lived loops remain;
- open fds and Redis connections no more than the most the warm-up had (loaded or idle;
  read from /proc every second as well as at each sample) plus ``--redis-slack`` (6)
  and ``--fd-slack`` (8, the connections' fds and a couple of HTTP sockets): each
  process has three Redis pools (the server: prediction cache, LLM cache, rate limiter;
  the worker: bus, idempotency records, prediction cache), redis-py's pools keep every
  connection their busiest moment needed and drop one whose call timed out (the
  prediction cache gives Redis 50 ms), so the count wanders within what the load needs,
  a couple more per pool when a rarer burst comes; a leak grows with the requests
  served, past that bound;
- and, for each load, errors at most ``--max-error-share`` (1%) of its requests.

Printed: the samples over time, each check's verdict, and throughput, p50/p99 and errors
per load; ``--json PATH`` writes them. Exit 1 when a check fails.

    .venv/bin/python bench/soak.py [--duration 600] [--requests 1000000] [--warmup S]
        [--sample-s 15] [--json bench/results/soak.json] [--redis-url URL]

Redis is the service at ``--redis-url``, by default database 15 of 127.0.0.1:6379: the
soak's own, whose ``interlock:*`` keys and streams it deletes at the end. The CPUs are
shared by everything (this load generator included), so the throughput is this
machine's; the checks do not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).parent))

from _soak_load import Events, Gate, Load, Rows, llm_client, predict_client
from _soak_probe import Probe, Sample, metric, quick, scrape
from events import Worker, run_async, stop
from llm_gateway import UPSTREAM, percentile
from serving import PYTHON, free_port, post, wait_ready

JSON_HEADERS = {"Content-Type": "application/json"}
GATEWAY_CONFIG = """
[llm.cache]
url = "{redis}"
ttl_s = 300
stale_ttl_s = 0

[llm.limits]
url = "{redis}"
{deployments}
"""
DEPLOYMENT = """
[[llm.deployments]]
name = "{name}"
base_url = "{fake}/{name}/v1"
model = "fake-model"
rpm = 1000000

[[llm.models]]
name = "{name}"
deployments = ["{name}"]
"""
FAKE_FAULTS: dict[str, dict[str, float]] = {
    "chat": {"latency_ms": 5.0},
    "stream": {"first_token_delay_ms": 5.0, "chunk_delay_ms": 1.0},
}


# -- the run -----------------------------------------------------------------------------


@dataclass
class Target:
    name: str  # "server" or "worker"
    proc: subprocess.Popen[Any]
    metrics_url: str


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    load_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    cache: dict[str, dict[str, float | None]] = field(default_factory=dict)
    # Per process and period ("warm-up", "after"): the most fds and Redis sockets seen,
    # read every second from /proc (between the samples, a pool's bursts show here).
    peaks: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


async def drive(args: argparse.Namespace, setup: dict[str, Any], targets: list[Target]) -> Run:
    """The three loads, the periodic samples, the two idle samples; returns them all."""
    run = Run()
    probe = Probe(setup["redis_port"], setup["client_list"])
    gate = Gate()
    rows = Rows(setup["sample"], args.repeat_share, seed=1)
    predict, llm = Load("predict"), Load("llm")
    events = Events(
        setup["redis_url"],
        setup["topics"],
        Rows(setup["sample"], args.repeat_share, 2),
        args.event_window,
    )
    run.loads = [predict, llm, events.load]
    started = time.monotonic()

    async def sample(phase: str) -> None:
        t_s = time.monotonic() - started
        for target in targets:
            if target.proc.poll() is not None:
                raise RuntimeError(f"the {target.name} exited with {target.proc.returncode}")
            got = await asyncio.to_thread(
                probe.sample, t_s, phase, target.name, target.proc.pid, target.metrics_url
            )
            run.samples.append(got)
            print(row(got), flush=True)

    async def idle_sample(phase: str) -> None:
        paused = time.monotonic()
        if not await gate.pause(lambda: len(events.outstanding)):
            run.failures.append(f"{phase}: in-flight work did not finish within 60 s")
        await asyncio.sleep(args.settle_s)
        await sample(phase)
        gate.paused_s += time.monotonic() - paused

    def answered() -> int:
        return sum(load.done for load in run.loads)

    period = ["warm-up"]

    async def watch() -> None:
        while True:
            for target in targets:
                with contextlib.suppress(OSError):  # exited: sample() says so
                    fds, sockets = await asyncio.to_thread(
                        quick, target.proc.pid, setup["redis_port"]
                    )
                    peak = run.peaks.setdefault(target.name, {}).setdefault(
                        period[0], {"fds": 0, "redis": 0}
                    )
                    peak["fds"], peak["redis"] = max(peak["fds"], fds), max(peak["redis"], sockets)
            await asyncio.sleep(1.0)

    server = setup["server_url"]
    connector = aiohttp.TCPConnector(limit=args.predict_clients + args.llm_clients)
    async with aiohttp.ClientSession(connector=connector, headers=JSON_HEADERS) as session:
        print(header(), flush=True)
        await sample("start")
        ready = asyncio.Event()
        tasks = [asyncio.create_task(events.run(gate, ready))]
        await ready.wait()
        started = time.monotonic()
        watcher = asyncio.create_task(watch())
        tasks += [
            asyncio.create_task(
                predict_client(session, f"{server}/v1/models/fraud:predict", rows, predict, gate)
            )
            for _ in range(args.predict_clients)
        ]
        tasks += [
            asyncio.create_task(
                llm_client(session, f"{server}/llm/v1/chat/completions", setup["tag"], n, llm, gate)
            )
            for n in range(args.llm_clients)
        ]
        try:
            next_sample = args.sample_s
            warmed = False
            while True:
                await asyncio.sleep(0.25)
                for task in tasks:
                    if task.done():
                        task.result()  # a client that ended by itself raises here
                        raise RuntimeError("a load client stopped")
                elapsed = time.monotonic() - started
                if not warmed and elapsed >= args.warmup:
                    await idle_sample("warm-up")
                    warmed = True
                    period[0] = "after"
                    gate.resume()
                elif elapsed >= args.duration or answered() >= args.requests:
                    if not warmed:
                        raise RuntimeError(
                            f"the run ended ({answered()} answers in {elapsed:.0f} s) before"
                            f" the warm-up ({args.warmup:g} s): raise --requests or --duration"
                        )
                    break
                elif elapsed >= next_sample:
                    await sample("load")
                    next_sample += args.sample_s
            await idle_sample("end")
            run.load_s = time.monotonic() - started - gate.paused_s
        finally:
            watcher.cancel()
            gate.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
    for target in targets:
        page = await asyncio.to_thread(scrape, target.metrics_url)
        run.cache[target.name] = {
            result: sum(
                v
                for (n, labels), v in page.items()
                if n == "interlock_cache_rows_total" and ("result", result) in labels
            )
            for result in ("hit", "miss")
        }
        run.cache[target.name]["asyncio_tasks"] = metric(page, "interlock_asyncio_tasks")
    return run


# -- the report --------------------------------------------------------------------------

COLUMNS = ("t s", "phase", "process", "RSS MiB", "fds", "threads", "tasks", "redis", "sockets")


def header() -> str:
    return "".join(f"{c:>9}" for c in COLUMNS)


def row(s: Sample) -> str:
    cells = [
        f"{s.t_s:.0f}",
        s.phase,
        s.process,
        f"{s.rss_kib / 1024:.1f}",
        s.fds,
        s.threads,
        "-" if s.tasks is None else s.tasks,
        "-" if s.redis is None else s.redis,
        s.redis_sockets,
    ]
    return "".join(f"{c!s:>9}" for c in cells)


def checks(args: argparse.Namespace, run: Run) -> list[dict[str, Any]]:
    """Each process's end against its warm-up, then each load's error share."""
    out: list[dict[str, Any]] = []
    for process in ("server", "worker"):
        warm = next((s for s in run.samples if s.process == process and s.phase == "warm-up"), None)
        end = next((s for s in run.samples if s.process == process and s.phase == "end"), None)
        if warm is None or end is None:
            out.append({"check": f"{process}: samples", "ok": False, "detail": "missing"})
            continue
        change = (end.rss_kib - warm.rss_kib) / warm.rss_kib
        out.append(
            {
                "check": f"{process} RSS",
                "ok": abs(change) <= args.rss_tolerance,
                "warm": warm.rss_kib,
                "end": end.rss_kib,
                "detail": f"{warm.rss_kib / 1024:.1f} → {end.rss_kib / 1024:.1f} MiB"
                f" ({change:+.1%}, within ±{args.rss_tolerance:.0%})",
            }
        )
        # Pools keep the connections their busiest moment needed, and Redis calls that
        # time out drop theirs: fds and connections are held against the most the
        # warm-up had, loaded or idle. Tasks come and go with requests: idle against idle.
        window = [s for s in run.samples if s.process == process and s.t_s <= warm.t_s]
        for name, slack in (
            ("fds", args.fd_slack),
            ("tasks", args.task_slack),
            ("redis", args.redis_slack),
        ):
            before, after = getattr(warm, name), getattr(end, name)
            if before is None or after is None:
                out.append(
                    {
                        "check": f"{process} {name}",
                        "ok": False,
                        "detail": "not measured (no figure)",
                    }
                )
                continue
            most = before
            detail = f"{before} → {after} ({after - before:+d}"
            if name == "tasks":
                detail += f", at most +{slack})"
            else:
                peaks = run.peaks.get(process, {})
                most = max(
                    [v for s in window if (v := getattr(s, name)) is not None]
                    + [peaks.get("warm-up", {}).get(name, 0)]
                )
                later = peaks.get("after", {}).get(name)
                detail += f"; at most the warm-up's most {most} + {slack}"
                detail += f"; the most under load after the warm-up: {later})"
            if name == "redis":
                opened = len(set(end.redis_ports) - set(warm.redis_ports))
                closed = len(set(warm.redis_ports) - set(end.redis_ports))
                detail += f"; {opened} opened and {closed} closed since; by last command"
                detail += f" {dict(sorted(end.redis_cmds.items()))}"
            out.append(
                {
                    "check": f"{process} {name}",
                    "ok": after <= most + slack,
                    "warm": before,
                    "warm_most": most,
                    "end": after,
                    "detail": detail,
                }
            )
    for load in run.loads:
        errors = sum(load.errors.values())
        share = errors / load.done if load.done else 1.0
        out.append(
            {
                "check": f"{load.name} errors",
                "ok": load.ok > 0 and share <= args.max_error_share,
                "detail": f"{errors} of {load.done} ({share:.2%}, at most"
                f" {args.max_error_share:.0%})",
            }
        )
    for failure in run.failures:
        out.append({"check": "run", "ok": False, "detail": failure})
    return out


def report(
    args: argparse.Namespace,
    run: Run,
    verdicts: list[dict[str, Any]],
    logs: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    print(
        f"\nLoad ({run.load_s:.0f} s under load, pauses excluded; {os.cpu_count()} CPUs shared"
        " by the load generator, the server, the worker, the fake upstream and Redis)"
    )
    print(f"  {'load':<8} {'answers':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    loads: dict[str, Any] = {}
    for load in run.loads:
        per_s = load.ok / run.load_s if run.load_s else 0.0
        p50, p99 = percentile(load.latency.values, 0.5), percentile(load.latency.values, 0.99)
        errors = sum(load.errors.values())
        print(
            f"  {load.name:<8} {load.ok:>9,} {per_s:>8.0f} {p50:>8.2f} {p99:>8.2f} {errors:>7}"
            + (f"  {dict(load.notes)}" if load.notes else "")
        )
        for kind, count in load.errors.items():
            print(f"      {kind}: {count} (first: {load.examples[kind]})")
        loads[load.name] = {
            "ok": load.ok,
            "per_s": per_s,
            "p50_ms": p50,
            "p99_ms": p99,
            "errors": dict(load.errors),
            "error_examples": load.examples,
            "notes": dict(load.notes),
        }
    for name, figures in run.cache.items():
        print(
            f"  prediction cache rows in the {name}: {figures['hit']:.0f} hits,"
            f" {figures['miss']:.0f} misses"
        )
    for name, summary in logs.items():
        print(f"  {name} log lines by level: {summary['levels'] or 'none'}")
        for message, count in summary["messages"].items():
            print(f"      {count} × {message}")
    print("\nChecks (the idle sample at the end against the one after the warm-up)")
    for v in verdicts:
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {v['check']}: {v['detail']}")
    return {
        "args": vars(args) | {"json": str(args.json) if args.json else None},
        "cpus": os.cpu_count(),
        "load_s": round(run.load_s, 1),
        "loads": loads,
        "prediction_cache_rows": run.cache,
        "peaks": run.peaks,
        "logs": logs,
        "samples": [asdict(s) for s in run.samples],
        "checks": verdicts,
        "ok": all(v["ok"] for v in verdicts),
    }


# -- the processes -----------------------------------------------------------------------


@contextlib.contextmanager
def processes(args: argparse.Namespace, work: Path, tag: str) -> Iterator[dict[str, Any]]:
    """The fake upstream, the demo model, ``interlock serve`` and ``interlock worker``."""
    redis_url = args.redis_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    env |= {
        "INTERLOCK_HOME": str(work / "home"),
        "INTERLOCK_LOG__LEVEL": "warning",
        "INTERLOCK_CACHE__URL": redis_url,
    }
    procs: list[subprocess.Popen[Any]] = []
    worker: Worker | None = None
    try:
        fake_proc = subprocess.Popen(
            [PYTHON, str(UPSTREAM), "--port", "0"], env=env, stdout=subprocess.PIPE, text=True
        )
        procs.append(fake_proc)
        assert fake_proc.stdout is not None
        ready = fake_proc.stdout.readline().strip()
        if not ready.startswith("ready "):
            raise RuntimeError(f"the fake upstream did not start: {ready!r}")
        fake = ready.removeprefix("ready ")
        for name, fault in FAKE_FAULTS.items():
            post(f"{fake}/_fake/default", orjson.dumps({"deployment": name, "fault": fault}))
        print("Training the demo fraud model…", flush=True)
        subprocess.run(
            [PYTHON, "-m", "interlock", "demo", "--no-serve"],
            env=env,
            check=True,
            capture_output=True,
        )
        sample = json.loads((work / "home" / "demo" / "sample.json").read_text())
        config = work / "interlock.toml"
        deployments = "".join(DEPLOYMENT.format(name=n, fake=fake) for n in FAKE_FAULTS)
        config.write_text(GATEWAY_CONFIG.format(redis=redis_url, deployments=deployments))
        port = free_port()
        log = (work / "server.log").open("wb")
        procs.append(
            subprocess.Popen(
                [PYTHON, "-m", "interlock", "serve", "--port", str(port)],
                env=env | {"INTERLOCK_CONFIG": str(config)},
                cwd=work,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        )
        server_url = f"http://127.0.0.1:{port}"
        wait_ready(f"{server_url}/v2/health/ready", procs[-1])
        topics = {
            "tag": tag,
            "requests": f"{tag}-req",
            "reply": f"{tag}-reply",
            "dlq": f"{tag}-dlq",
            "completed": f"{tag}-completed",
        }
        worker = Worker(
            env
            | {
                "INTERLOCK_BUS__URL": redis_url,
                "INTERLOCK_BUS__GROUP": f"{tag}-workers",
                "INTERLOCK_BUS__REQUESTS_TOPIC": topics["requests"],
                "INTERLOCK_BUS__COMPLETED_TOPIC": topics["completed"],
                "INTERLOCK_BUS__DEAD_LETTER_TOPIC": topics["dlq"],
                "INTERLOCK_BUS__DEDUPE_TTL_S": "600",
            },
            work,
        )
        wait_loaded(f"http://127.0.0.1:{worker.port}/metrics", worker)
        yield {
            "redis_url": redis_url,
            "server_url": server_url,
            "sample": sample,
            "topics": topics,
            "tag": tag,
            "targets": [
                Target("server", procs[1], f"{server_url}/metrics"),
                Target("worker", worker.proc, f"http://127.0.0.1:{worker.port}/metrics"),
            ],
        }
    finally:
        if worker is not None:
            worker.close()
        for proc in reversed(procs):
            stop(proc)


def wait_loaded(metrics_url: str, worker: Worker, limit_s: float = 180.0) -> None:
    """Until the worker has loaded the model (it serves /metrics before it has)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        worker.check()
        with contextlib.suppress(OSError):
            if (metric(scrape(metrics_url), "interlock_model_loaded") or 0) >= 1:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the worker did not load the model within {limit_s:g} s")


def log_summary(work: Path) -> dict[str, dict[str, Any]]:
    """Each process's log lines (JSON): how many per level, and the distinct warnings."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(work.glob("*.log")):
        levels: Counter[str] = Counter()
        messages: Counter[str] = Counter()
        for line in path.read_bytes().splitlines():
            try:
                doc = orjson.loads(line)
                level, message = str(doc["level"]), str(doc["msg"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                level, message = "other", line.decode(errors="replace")
            levels[level] += 1
            if level != "info":
                messages[f"{level}: {message[:160]}"] += 1
        name = "server" if path.name == "server.log" else "worker"
        out[name] = {"levels": dict(levels), "messages": dict(messages.most_common(10))}
    return out


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=10)


def clean_up(client: Any, tag: str) -> None:
    """The run's streams, and every ``interlock:*`` key of the soak's database."""
    client.delete(*(f"{tag}-{k}" for k in ("req", "reply", "dlq", "completed")))
    batch = []
    for key in client.scan_iter(match="interlock:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch.clear()
    if batch:
        client.unlink(*batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load, at most")
    parser.add_argument("--requests", type=int, default=1_000_000, help="answers in all, at most")
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds; default 10%% of --duration, at least 60",
    )
    parser.add_argument(
        "--sample-s",
        type=float,
        default=None,
        help="between samples; default --duration / 40, at least 5",
    )
    parser.add_argument("--settle-s", type=float, default=2.0, help="paused, before idle samples")
    parser.add_argument("--predict-clients", type=int, default=8)
    parser.add_argument("--llm-clients", type=int, default=4)
    parser.add_argument("--event-window", type=int, default=256, help="events unanswered, max")
    parser.add_argument("--repeat-share", type=float, default=0.5, help="rows from the hot set")
    parser.add_argument("--rss-tolerance", type=float, default=0.10)
    parser.add_argument("--fd-slack", type=int, default=8)
    parser.add_argument("--task-slack", type=int, default=2)
    parser.add_argument("--redis-slack", type=int, default=6)
    parser.add_argument("--max-error-share", type=float, default=0.01)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = max(60.0, args.duration / 10)
    if args.sample_s is None:
        args.sample_s = max(5.0, args.duration / 40)
    if args.warmup >= args.duration:
        sys.exit(f"error: --warmup ({args.warmup:g} s) must be shorter than --duration")

    client = redis_client(args.redis_url)
    try:
        client.ping()
    except Exception as exc:  # one line, then exit
        sys.exit(f"error: Redis does not answer at {args.redis_url}: {exc}")
    redis_port = urlsplit(args.redis_url).port or 6379
    tag = f"soak-{uuid.uuid4().hex[:6]}"
    work = Path(tempfile.mkdtemp(prefix="interlock-soak-"))
    started = time.monotonic()
    try:
        try:
            with processes(args, work, tag) as setup:
                setup |= {"redis_port": redis_port, "client_list": client.client_list}
                run = run_async(drive(args, setup, setup["targets"]))
        finally:  # once the worker has stopped: it would make its group's stream again
            clean_up(client, tag)
        logs = log_summary(work)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        tail = ""
        for log in ("server.log", "worker-*.log"):
            for path in work.glob(log):
                tail += f"\n--- {path.name}\n" + path.read_bytes()[-1500:].decode(errors="replace")
        sys.exit(f"error: {exc}{tail}")
    finally:
        client.close()
        shutil.rmtree(work, ignore_errors=True)
    verdicts = checks(args, run)
    summary = report(args, run, verdicts, logs) | {"seconds": round(time.monotonic() - started, 1)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"\nwritten: {args.json}")
    print(f"\nSoak {'passed' if summary['ok'] else 'FAILED'} ({summary['seconds']:.0f} s)")
    if not summary["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
