"""The LLM gateway's cost: the same requests sent straight to the upstream and through it.

One fake upstream (``tests/llm/upstream.py``) and one ``interlock serve`` in front of
it (the default configuration: memory cache on, usage recorded), both subprocesses, run
on this machine with the load generator. Every figure compares *direct* (client → fake)
with *gateway* (client → interlock → fake), same fake, same run, in alternating rounds
(the order reversed every other round); the figures are medians over rounds:

1. **sequential**, fake latency 0 ms: one request at a time; p50/p99 of each, and the
   latency the gateway adds (gateway − direct, round by round);
2. **streaming**, sequential: time to the first ``data:`` event with content, added;
   the fake waits ``--chunk-delay-ms`` between events, so a gateway that held the
   stream back would show;
3. **concurrent**, wrk with ``--connections`` for ``--duration`` s: req/s, the
   gateway/direct ratio and p50/p99, at the fake's ``--latency-ms`` (default 50 ms: the
   upstream is the bottleneck, as a real LLM is; the target applies here) and at 0 ms
   (a stress figure: three processes contend for the CPUs);
4. **cache hit**: one prompt repeated through the gateway, sequential (in the rounds
   of 1) and concurrent (in the 0 ms rounds of 3).

Every miss has a prompt of its own and ``temperature: 0``, so the gateway looks it up
in its cache and stores the answer: the miss path measured is the default one. The
fake's request counter checks it: one upstream call per gateway miss, none per hit.
The sequential client (aiohttp on uvloop) runs in this process, wrk in its own; both
send the same bodies to both sides, and only the URL differs. Each run also reports the
CPU time the fake and the gateway used per answer (from /proc): the gateway's cost free
of the machine's load, and what its throughput is bound by when the CPUs are shared.

    .venv/bin/python bench/llm_gateway.py [--quick] [--rounds 3] [--duration 6]
        [--connections 64] [--latency-ms 50] [--phases sequential,streaming,concurrent,cache]

Targets: added p50 ≤ 1 ms and p99 ≤ 5 ms (sequential), concurrent throughput ≥ 90% of
direct (at ``--latency-ms``), first token ≤ 1 ms added (p50). Needs wrk.
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).parent))

from serving import PYTHON, free_port, post, wait_ready, wrk

UPSTREAM = Path(__file__).resolve().parent.parent / "tests" / "llm" / "upstream.py"
JSON_HEADERS = {"Content-Type": "application/json"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PHASES = ("sequential", "streaming", "concurrent", "cache")
LABELS = {"direct": "direct", "gateway": "gateway (cache miss)", "hit": "gateway (cache hit)"}

# The fake's deployments, one per purpose, with a model of the same name in the gateway:
# "fast" answers at once, "slow" after --latency-ms, "stream" waits between SSE events.
GATEWAY_CONFIG = """
[[llm.deployments]]
name = "{name}"
base_url = "{fake}/{name}/v1"
model = "fake-model"

[[llm.models]]
name = "{name}"
deployments = ["{name}"]
"""

# wrk, every request a prompt of its own: each thread gets a number in setup() and
# counts its requests; HEAD carries a salt per run, so that no run meets an earlier
# run's answers in the cache.
DISTINCT_PROMPTS = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, HEAD .. tid .. " " .. counter .. TAIL)
end
"""


# -- requests ----------------------------------------------------------------------------


def body(model: str, number: str, tag: str, *, stream: bool = False) -> bytes:
    """A chat request with one user message and ``temperature: 0`` (so it is cacheable)."""
    # The fake echoes the prompt: a stream is one event per word, a short answer here.
    ask = "name four seas" if stream else "summarise the quarterly report in three sentences"
    text = f"bench {tag} {number} {ask}"
    data: dict[str, Any] = {
        "model": model,
        "temperature": 0,
        "messages": [{"role": "user", "content": text}],
    }
    if stream:
        data["stream"] = True
    return orjson.dumps(data)


HIT = body("fast", "0", "hit")


def bodies(side: str, model: str, tag: str, *, stream: bool = False) -> Iterator[bytes]:
    """A prompt of its own for every request, or for ``hit`` the same one again and again."""
    number = 0
    while True:
        number += 1
        yield HIT if side == "hit" else body(model, f"{number:07d}", tag, stream=stream)


def lua_quote(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def wrk_script(directory: Path, side: str, model: str, tag: str) -> Path:
    path = directory / f"{tag}-{side}-{model}.lua"
    if side == "hit":
        lines = ['wrk.method = "POST"', f"wrk.body = {lua_quote(HIT)}"]
        lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in JSON_HEADERS.items()]
        path.write_text("\n".join(lines) + "\n")
    else:
        head, tail = body(model, "NUMBER", tag).split(b"NUMBER")
        lines = [f"local HEAD = {lua_quote(head)}", f"local TAIL = {lua_quote(tail)}"]
        path.write_text("\n".join(lines) + DISTINCT_PROMPTS)
    return path


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the values at or below it."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def med(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def alternate(sides: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, side) in alternation, the order reversed every other round."""
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            yield r, side


# -- the sequential client ---------------------------------------------------------------


@dataclass
class Series:
    """One side's sequential run: latencies (streams: to the first token) and headers."""

    latencies_ms: list[float] = field(default_factory=list)
    totals_ms: list[float] = field(default_factory=list)
    overhead_ms: list[float] = field(default_factory=list)
    cache: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per answer, by server

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    def note(self, headers: Any) -> None:
        if (overhead := headers.get("x-interlock-overhead-ms")) is not None:
            self.overhead_ms.append(float(overhead))
        if (state := headers.get("x-interlock-cache")) is not None:
            self.cache[state] += 1


async def _one(session: aiohttp.ClientSession, url: str, payload: bytes, series: Series) -> None:
    started = time.perf_counter()
    async with session.post(url, data=payload, headers=JSON_HEADERS) as response:
        answer = await response.read()
        elapsed = (time.perf_counter() - started) * 1000.0
        if response.status != 200 or b'"choices"' not in answer:
            series.errors += 1
            return
        series.latencies_ms.append(elapsed)
        series.note(response.headers)


async def _one_stream(
    session: aiohttp.ClientSession, url: str, payload: bytes, series: Series
) -> None:
    started = time.perf_counter()
    first: float | None = None
    done = False
    async with session.post(url, data=payload, headers=JSON_HEADERS) as response:
        if response.status != 200:
            await response.read()
            series.errors += 1
            return
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                done = True
            elif first is None:
                choices = orjson.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter()
        ended = time.perf_counter()
        if first is None or not done:
            series.errors += 1
            return
        series.latencies_ms.append((first - started) * 1000.0)
        series.totals_ms.append((ended - started) * 1000.0)
        series.note(response.headers)


async def _sequential(url: str, payloads: Iterator[bytes], count: int, stream: bool) -> Series:
    series = Series()
    one = _one_stream if stream else _one
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        await one(session, url, next(payloads), Series())  # opens the connection, untimed
        gc.collect()
        gc.disable()
        try:
            for _ in range(count):
                await one(session, url, next(payloads), series)
        finally:
            gc.enable()
    return series


def run_async(coroutine: Coroutine[Any, Any, Series]) -> Series:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    result: Series = uvloop.run(coroutine)
    return result


def sequential(url: str, payloads: Iterator[bytes], count: int, *, stream: bool = False) -> Series:
    """``count`` requests one after another over one kept-alive connection."""
    return run_async(_sequential(url, payloads, count, stream))


# -- the servers -------------------------------------------------------------------------


@dataclass
class Bench:
    fake: str
    gateway: str
    work: Path
    pids: dict[str, int]  # "fake", "gateway"

    def url(self, side: str, model: str) -> str:
        if side == "direct":
            return f"{self.fake}/{model}/v1/chat/completions"
        return f"{self.gateway}/llm/v1/chat/completions"

    def upstream_calls(self, model: str) -> int:
        url = f"{self.fake}/_fake/count?deployment={model}"
        with urllib.request.urlopen(url) as response:
            count: int = json.loads(response.read())["count"]
            return count

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds each server has used so far (its child processes included)."""
        return {name: cpu_s(pid) for name, pid in self.pids.items()}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
        todo += children.get(current, [])
    return total


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[Bench]:
    """The fake upstream and the gateway in front of it, until the block ends."""
    work = Path(tempfile.mkdtemp(prefix="interlock-bench-llm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    procs: list[subprocess.Popen[Any]] = []
    try:
        fake_proc = subprocess.Popen(
            [PYTHON, str(UPSTREAM), "--port", "0"], env=env, stdout=subprocess.PIPE, text=True
        )
        procs.append(fake_proc)
        assert fake_proc.stdout is not None
        ready = fake_proc.stdout.readline().strip()  # "ready URL", or "" if it died
        if not ready.startswith("ready "):
            raise RuntimeError(f"the fake upstream did not start: {ready!r}")
        fake = ready.removeprefix("ready ")
        faults: dict[str, dict[str, float]] = {
            "fast": {},
            "slow": {"latency_ms": args.latency_ms},
            "stream": {"chunk_delay_ms": args.chunk_delay_ms},
        }
        for name, fault in faults.items():
            post(f"{fake}/_fake/default", orjson.dumps({"deployment": name, "fault": fault}))
        config = work / "interlock.toml"
        config.write_text("".join(GATEWAY_CONFIG.format(name=n, fake=fake) for n in faults))
        port = free_port()
        gateway_env = {
            **env,
            "INTERLOCK_CONFIG": str(config),
            "INTERLOCK_HOME": str(work / "home"),
            "INTERLOCK_LOG__LEVEL": "warning",
        }
        procs.append(
            subprocess.Popen(
                [PYTHON, "-m", "interlock", "serve", "--port", str(port)],
                env=gateway_env,
                stdout=subprocess.DEVNULL,
            )
        )
        gateway = f"http://127.0.0.1:{port}"
        wait_ready(f"{gateway}/llm/v1/models", procs[-1])
        yield Bench(fake, gateway, work, {"fake": procs[0].pid, "gateway": procs[1].pid})
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def one_answer(url: str, payload: bytes) -> str:
    """What one request gets, for the report when a check fails."""
    request = urllib.request.Request(url, data=payload, headers=JSON_HEADERS)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return f"HTTP {response.status}: {response.read()[:300]!r}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:300]!r}"
    except OSError as exc:
        return repr(exc)


def preflight(bench: Bench, phases: list[str], warm: int) -> dict[str, str]:
    """Check (and warm) each phase's paths before anything is timed.

    Returns why each phase that cannot run failed: the direct path must answer, the
    gateway must answer misses as misses, and repeats as hits for the cache phase.
    """
    failures: dict[str, str] = {}
    for phase in phases:
        model = {"streaming": "stream", "concurrent": "slow"}.get(phase, "fast")
        stream = phase == "streaming"
        count = 5 if phase == "concurrent" else warm  # wrk warms the slow path
        try:
            for side in ("direct", "gateway"):
                url = bench.url(side, model)
                got = sequential(
                    url, bodies(side, model, f"w{phase}", stream=stream), count, stream=stream
                )
                if got.errors or not got.latencies_ms:
                    raise RuntimeError(f"{side}: {got.errors} of {count} requests failed")
                if side == "gateway" and set(got.cache) != {"miss"}:
                    raise RuntimeError(f"x-interlock-cache was {dict(got.cache)}, not all miss")
            if phase == "cache":
                got = sequential(bench.url("hit", model), bodies("hit", model, ""), count)
                if got.cache["hit"] < count:  # the first one may be the miss that stores it
                    raise RuntimeError(
                        f"the same prompt again: x-interlock-cache {dict(got.cache)}"
                    )
        except (RuntimeError, aiohttp.ClientError, OSError, ValueError) as exc:
            probe = body(model, "1", "probe", stream=stream)
            failures[phase] = (
                f"{exc}; one request: {one_answer(bench.url('gateway', model), probe)}"
            )
            print(f"  {phase}: not measured, it failed: {failures[phase]}", flush=True)
    return failures


def per_answer(
    before: dict[str, float], after: dict[str, float], answers: float
) -> dict[str, float]:
    """Each server's CPU milliseconds per answer between two readings."""
    return {k: 1000.0 * (after[k] - before[k]) / answers if answers else math.nan for k in after}


def format_cpu(cpu_ms: dict[str, float]) -> str:
    return ", ".join(f"{name} {ms:.2f} ms" for name, ms in cpu_ms.items())


# -- the measurements --------------------------------------------------------------------


def measure_sequential(
    bench: Bench, sides: list[str], args: argparse.Namespace, *, stream: bool = False
) -> dict[str, list[Series]]:
    model, count = ("stream", args.stream_requests) if stream else ("fast", args.requests)
    results: dict[str, list[Series]] = {side: [] for side in sides}
    for r, side in alternate(sides, args.rounds):
        payloads = bodies(side, model, f"{'t' if stream else 's'}{r}", stream=stream)
        before = bench.cpu_s()
        series = sequential(bench.url(side, model), payloads, count, stream=stream)
        series.cpu_ms = per_answer(before, bench.cpu_s(), count + 1)
        results[side].append(series)
        extra = f"  whole stream p50 {percentile(series.totals_ms, 0.5):.2f} ms" if stream else ""
        print(f"  round {r + 1}  {LABELS[side]:<21} p50 {series.p(0.5):7.3f} ms"
              f"  p99 {series.p(0.99):7.3f} ms  errors {series.errors}  CPU/answer"
              f" {format_cpu(series.cpu_ms)}{extra}", flush=True)  # fmt: skip
    return results


@dataclass
class Run:
    """One wrk run."""

    latency_ms: float
    side: str
    round: int
    per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    upstream_per_answer: float | None  # the fake's count / answers; None for direct
    cpu_ms: dict[str, float]  # per answer, by server


def measure_concurrent(
    bench: Bench, plan: list[tuple[str, float, list[str]]], args: argparse.Namespace
) -> list[Run]:
    """wrk on each (model, fake latency, sides) of the plan, warmed up, in alternation."""
    warm_s = 1 if args.quick else 2
    for model, _, sides in plan:
        for side in sides:
            script = wrk_script(bench.work, side, model, "warm")
            wrk(bench.url(side, model), script, args.connections, warm_s)
    runs: list[Run] = []
    for model, latency_ms, sides in plan:
        for r, side in alternate(sides, args.rounds):
            script = wrk_script(bench.work, side, model, f"c{r}")
            calls, cpu = bench.upstream_calls(model), bench.cpu_s()
            per_s, p50, p99, errors = wrk(
                bench.url(side, model), script, args.connections, args.duration
            )
            answers = per_s * args.duration
            cpu_ms = per_answer(cpu, bench.cpu_s(), answers)
            calls = bench.upstream_calls(model) - calls
            ratio = calls / answers if side != "direct" and answers else None
            runs.append(Run(latency_ms, side, r + 1, per_s, p50, p99, errors, ratio, cpu_ms))
            print(f"  round {r + 1}  fake {latency_ms:>3g} ms  {LABELS[side]:<21} {per_s:>7.0f}/s"
                  f"  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  errors {errors}  CPU/answer"
                  f" {format_cpu(cpu_ms)}", flush=True)  # fmt: skip
    return runs


# -- the report --------------------------------------------------------------------------


def report_sequential(title: str, results: dict[str, list[Series]]) -> dict[str, Any]:
    """Print p50/p99 per side and the added latency; return them for the JSON file."""
    print(f"\n{title:<40} {'p50 ms':>8} {'p99 ms':>8}   CPU ms/answer")
    out: dict[str, Any] = {}
    for side, series in results.items():
        p50, p99 = med([s.p(0.5) for s in series]), med([s.p(0.99) for s in series])
        cpu = {k: med([s.cpu_ms[k] for s in series]) for k in series[0].cpu_ms}
        extra = ""
        if side == "hit":
            per_s = med([1000.0 * len(s.latencies_ms) / sum(s.latencies_ms) for s in series])
            extra = f"  ({per_s:.0f} req/s one at a time)"
            out["hit_per_s"] = per_s
        print(f"  {LABELS[side]:<38} {p50:>8.3f} {p99:>8.3f}   {format_cpu(cpu)}{extra}")
        out[side] = {"p50_ms": p50, "p99_ms": p99, "errors": sum(s.errors for s in series)}
        out[side]["cpu_ms_per_answer"] = cpu
    if results.get("direct") and results.get("gateway"):
        pairs = list(zip(results["direct"], results["gateway"], strict=True))
        added = {f"p{q * 100:g}_ms": med([g.p(q) - d.p(q) for d, g in pairs]) for q in (0.5, 0.99)}
        print(f"  {'added by the gateway':<38} {added['p50_ms']:>8.3f} {added['p99_ms']:>8.3f}")
        out["added"] = added
    return out


def report_concurrent(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    print(f"\nConcurrent: wrk, {args.connections} connections, {args.duration} s runs"
          f"          {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}"
          "   CPU ms/answer")  # fmt: skip
    out: dict[str, Any] = {}
    for latency_ms in sorted({r.latency_ms for r in runs}, reverse=True):
        kind = "target" if latency_ms == args.latency_ms else "stress"
        figures: dict[str, Any] = {}
        here = [r for r in runs if r.latency_ms == latency_ms]
        for side in ("direct", "gateway", "hit"):
            mine = [r for r in here if r.side == side]
            if not mine:
                continue
            per_s, p50, p99 = (
                med([getattr(r, k) for r in mine]) for k in ("per_s", "p50_ms", "p99_ms")
            )
            errors = sum(r.errors for r in mine)
            cpu = {k: med([r.cpu_ms[k] for r in mine]) for k in mine[0].cpu_ms}
            print(f"  fake {latency_ms:>3g} ms ({kind}) {LABELS[side]:<35} {per_s:>8.0f}"
                  f" {p50:>8.2f} {p99:>8.2f} {errors:>6}   {format_cpu(cpu)}")  # fmt: skip
            figures[side] = {"per_s": per_s, "p50_ms": p50, "p99_ms": p99, "errors": errors,
                             "cpu_ms_per_answer": cpu}  # fmt: skip
        pairs = [
            (d, g)
            for d in here
            for g in here
            if d.side == "direct" and g.side == "gateway" and d.round == g.round
        ]
        if pairs:
            ratio = med([g.per_s / d.per_s for d, g in pairs])
            add50 = med([g.p50_ms - d.p50_ms for d, g in pairs])
            add99 = med([g.p99_ms - d.p99_ms for d, g in pairs])
            print(f"  fake {latency_ms:>3g} ms ({kind}) gateway/direct {ratio:>29.1%}"
                  f"    added p50 {add50:.2f} ms, p99 {add99:.2f} ms")  # fmt: skip
            figures.update(ratio=ratio, added_p50_ms=add50, added_p99_ms=add99)
        out[f"fake_{latency_ms:g}ms"] = figures
    calls = {
        kind: med(
            [
                r.upstream_per_answer
                for r in runs
                if r.side == side and r.upstream_per_answer is not None
            ]
        )
        for kind, side in (("miss", "gateway"), ("hit", "hit"))
    }
    shown = ", ".join(f"{k} {v:.2f}" for k, v in calls.items() if not math.isnan(v))
    print(f"  upstream calls per gateway answer (the fake's counter): {shown}")
    out["upstream_calls_per_answer"] = calls
    return out


def verdict(label: str, value: float, target: float, *, ratio: bool = False) -> str:
    sign = "≥" if ratio else "≤"
    goal = f"{target:.0%}" if ratio else f"{target:g} ms"
    if math.isnan(value):
        return f"  {label}: not measured (target {sign} {goal})"
    met = value >= target if ratio else value <= target
    shown = f"{value:.1%}" if ratio else f"{value:.2f} ms"
    return f"  {label} {shown} (target {sign} {goal}): {'met' if met else 'MISSED'}"


@dataclass
class Results:
    failures: dict[str, str] = field(default_factory=dict)
    sequential: dict[str, list[Series]] = field(default_factory=dict)
    streaming: dict[str, list[Series]] = field(default_factory=dict)
    concurrent: list[Run] = field(default_factory=list)
    seconds: float = 0.0


def measure(args: argparse.Namespace, phases: list[str]) -> Results:
    """Start the servers, check each phase's paths, and run the phases that can run."""
    started = time.monotonic()
    results = Results()
    with servers(args) as bench:
        results.failures = preflight(bench, phases, warm=20 if args.quick else 200)
        ok = [p for p in phases if p not in results.failures]

        pair = ["direct", "gateway"]
        hit = ["hit"] if "cache" in ok else []
        sequential_sides = (pair if "sequential" in ok else []) + hit
        if sequential_sides:
            print("\nSequential, fake latency 0 ms", flush=True)
            results.sequential = measure_sequential(bench, sequential_sides, args)
        if "streaming" in ok:
            print(f"\nStreaming, {args.chunk_delay_ms:g} ms between events", flush=True)
            results.streaming = measure_sequential(bench, pair, args, stream=True)
        concurrent = pair if "concurrent" in ok else []
        plan = [("slow", args.latency_ms, concurrent), ("fast", 0.0, concurrent + hit)]
        plan = [step for step in plan if step[2]]
        if plan:
            print(f"\nConcurrent, wrk {args.connections} connections", flush=True)
            results.concurrent = measure_concurrent(bench, plan, args)
    results.seconds = time.monotonic() - started
    return results


def report(args: argparse.Namespace, results: Results) -> dict[str, Any]:
    """Print the tables and the verdicts; return everything for the JSON file."""
    print(f"\nEverything ran on this machine: {os.cpu_count()} CPUs shared by the load generator"
          " (this process, wrk), the gateway and the fake upstream."
          f" Medians over {args.rounds} round(s).")  # fmt: skip
    seq, streams, runs = results.sequential, results.streaming, results.concurrent
    summary: dict[str, Any] = {"cpus": os.cpu_count(), "args": vars(args) | {"out": str(args.out)}}
    if seq:
        title = f"Sequential, {args.requests} requests/round"
        summary["sequential"] = report_sequential(title, seq)
    if streams:
        title = f"Streaming, {args.stream_requests}/round: first token"
        summary["streaming_first_token"] = report_sequential(title, streams)
    if runs:
        summary["concurrent"] = report_concurrent(runs, args)
    overhead = {
        "miss": med([v for s in seq.get("gateway", []) for v in s.overhead_ms]),
        "hit": med([v for s in seq.get("hit", []) for v in s.overhead_ms]),
        "stream": med([v for s in streams.get("gateway", []) for v in s.overhead_ms]),
    }
    shown = ", ".join(f"{k} {v:.3f} ms" for k, v in overhead.items() if not math.isnan(v))
    print(f"\nThe gateway's own x-interlock-overhead-ms, median (sequential): {shown or '-'}")

    def get(section: str, *keys: str) -> float:
        value: Any = summary.get(section, {})
        for key in keys:
            value = value.get(key, {})
        return value if isinstance(value, float) else math.nan

    throughput = get("concurrent", f"fake_{args.latency_ms:g}ms", "ratio")
    lines = [
        verdict("added p50", get("sequential", "added", "p50_ms"), 1.0),
        verdict("added p99", get("sequential", "added", "p99_ms"), 5.0),
        verdict(f"throughput at {args.latency_ms:g} ms upstream", throughput, 0.9, ratio=True),
        verdict("first token added (p50)", get("streaming_first_token", "added", "p50_ms"), 1.0),
    ]
    lines += [f"  {phase}: NOT MEASURED: {why}" for phase, why in results.failures.items()]
    print("\nTargets\n" + "\n".join(lines))
    return summary | {
        "x_interlock_overhead_ms_median": overhead,
        "verdicts": [line.strip() for line in lines],
        "failures": results.failures,
        "seconds": round(results.seconds, 1),
        "rounds": {
            "sequential": {k: [_round(s) for s in v] for k, v in seq.items()},
            "streaming": {k: [_round(s) for s in v] for k, v in streams.items()},
            "concurrent": [asdict(r) for r in runs],
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternations per measurement")
    parser.add_argument("--requests", type=int, default=2000, help="sequential, per round")
    parser.add_argument("--stream-requests", type=int, default=300, help="per round")
    parser.add_argument("--duration", type=int, default=6, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64, help="wrk's connections")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="the fake's, concurrent")
    parser.add_argument("--chunk-delay-ms", type=float, default=1.0, help="between SSE events")
    parser.add_argument("--phases", default=",".join(PHASES), help="a comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (~30 s)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/llm_gateway.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.requests, args.stream_requests, args.duration = 1, 300, 100, 3
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := set(phases) - set(PHASES):
        sys.exit(f"error: unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    if shutil.which("wrk") is None and {"concurrent", "cache"} & set(phases):
        sys.exit("error: wrk is not installed (apt-get install wrk)")

    results = measure(args, phases)
    summary = report(args, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(_finite(summary), indent=2) + "\n")
    print(f"\nwritten: {args.out} ({results.seconds:.0f} s)")
    if results.failures:
        sys.exit(1)


def _finite(value: Any) -> Any:
    """The summary for JSON: NaN (not measured) as null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _round(series: Series) -> dict[str, Any]:
    return {
        "p50_ms": series.p(0.5),
        "p99_ms": series.p(0.99),
        "errors": series.errors,
        "cache": dict(series.cache),
        "cpu_ms_per_answer": series.cpu_ms,
    }


if __name__ == "__main__":
    main()
