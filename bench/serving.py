"""Serving throughput: interlock against the FastAPI server a user would write by hand.

Both servers serve the same LightGBM booster on this machine, and wrk loads them in
alternation (baseline, interlock, baseline, …) so that drift in the machine's speed hits
both alike. Printed: good responses/s, p50 and p99 for each, and the ratio; then rows/s
for 64-row requests against the raw booster predicting in-process.

    .venv/bin/python bench/serving.py [--duration 10] [--rounds 3]

Needs wrk (Debian package ``wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_FEATURES = 16
PYTHON = sys.executable

# The ten-line server a user would write: FastAPI + uvicorn (uvloop, httptools), the
# booster called per request. `async def` is the faster of the two ways to write it
# (a plain `def` goes through a thread pool and measured ~2x slower here).
BASELINE = textwrap.dedent(
    """
    import os
    import lightgbm as lgb
    import numpy as np
    from fastapi import FastAPI

    app = FastAPI()
    booster = lgb.Booster(model_file=os.environ["MODEL_PATH"])
    names = booster.feature_name()

    @app.post("/predict")
    async def predict(row: dict):
        x = np.array([[row[n] for n in names]], dtype=np.float64)
        return {"prediction": float(booster.predict(x, num_threads=1)[0])}
    """
)


@dataclass
class Run:
    system: str
    connections: int
    good_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def train(directory: Path) -> tuple[Path, np.ndarray]:
    import lightgbm as lgb

    rng = np.random.default_rng(7)
    x = rng.normal(size=(20_000, N_FEATURES))
    logit = x[:, 0] * 1.5 + x[:, 1] * x[:, 2] - np.abs(x[:, 3]) + 0.5 * x[:, 4] ** 2 - 2
    y = (logit + rng.normal(size=len(x)) > 0).astype(int)
    names = [f"f{i}" for i in range(N_FEATURES)]
    params = {"objective": "binary", "num_leaves": 31, "verbose": -1, "num_threads": 2}
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=names), num_boost_round=200)
    path = directory / "model.txt"
    booster.save_model(path)
    return path, x[:64]


def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not start: {url}")


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[bytes, Any]:
    request = urllib.request.Request(
        url, data=body, headers={"content-type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read(), response.headers


def lua_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b}" for b in data) + '"'


def write_lua(directory: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    lines = ['wrk.method = "POST"', f"wrk.body = {lua_string(body)}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    path = directory / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n")
    return path


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(text)
    return float(match[1]) * _UNITS[match[2]]


def wrk(url: str, script: Path, connections: int, seconds: int) -> tuple[float, float, float, int]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)[1])  # type: ignore[index]
    duration_match = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    assert duration_match is not None
    duration = float(duration_match[1]) * {"ms": 0.001, "s": 1.0, "m": 60.0}[duration_match[2]]
    bad = 0
    if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) is not None:
        bad += int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        bad += sum(int(g) for g in m.groups())
    p50 = _ms(re.search(r"^\s*50%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    p99 = _ms(re.search(r"^\s*99%\s+(\S+)", out, re.M)[1])  # type: ignore[index]
    return (total - bad) / duration, p50, p99, bad


def raw_rows_per_s(model: Path, rows: np.ndarray, seconds: float = 3.0) -> float:
    """The booster in-process on 64-row arrays; the best of 1 thread and its default."""
    import lightgbm as lgb

    booster = lgb.Booster(model_file=str(model))
    best = 0.0
    for threads in (1, 0):
        calls = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            booster.predict(rows, num_threads=threads)
            calls += 1
        best = max(best, calls * len(rows) / (time.perf_counter() - started))
    return best


def v2_binary_body(rows: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP64",
                    "shape": list(rows.shape),
                    "parameters": {"binary_data_size": rows.nbytes},
                }
            ],
            "outputs": [{"name": "predictions", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + rows.astype("<f8").tobytes(), len(header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per setting")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    parser.add_argument("--replicas", type=int, default=None, help="serving.max_replicas")
    parser.add_argument("--max-batch", type=int, default=None, help="serving.max_batch_size")
    parser.add_argument("--only-rows", action="store_true", help="skip the single-row runs")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="interlock-bench-"))
    model, sample = train(work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    # The prediction cache is off: wrk repeats one body, and every answer must come from
    # the model here (bench/traffic.py measures the cache).
    env.update(
        {
            "INTERLOCK_HOME": str(work / "home"),
            "INTERLOCK_LOG__LEVEL": "warning",
            "INTERLOCK_CACHE__ENABLED": "0",
        }
    )
    if args.replicas is not None:
        env["INTERLOCK_SERVING__MAX_REPLICAS"] = str(args.replicas)
    if args.max_batch is not None:
        env["INTERLOCK_SERVING__MAX_BATCH_SIZE"] = str(args.max_batch)
    subprocess.run(
        [PYTHON, "-m", "interlock", "models", "register", "bench", str(model),
         "--format", "lightgbm", "--alias", "champion"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    (work / "base.py").write_text(BASELINE)
    il_port, base_port = free_port(), free_port()
    procs = [
        subprocess.Popen(
            [PYTHON, "-m", "interlock", "serve", "--port", str(il_port)],
            env=env,
            stdout=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [PYTHON, "-m", "uvicorn", "base:app", "--port", str(base_port), "--loop", "uvloop",
             "--http", "httptools", "--no-access-log", "--log-level", "warning"],
            env={**env, "MODEL_PATH": str(model)}, cwd=work, stdout=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    try:
        il = f"http://127.0.0.1:{il_port}"
        base = f"http://127.0.0.1:{base_port}"
        wait_ready(f"{il}/v2/health/ready", procs[0])
        wait_ready(f"{base}/docs", procs[1])

        row = {f"f{i}": float(v) for i, v in enumerate(sample[0])}
        il_body = json.dumps({"instances": [row]}).encode()
        base_body = json.dumps(row).encode()
        # Both must answer what the booster itself answers before anything is timed.
        import lightgbm as lgb

        expected = float(lgb.Booster(model_file=str(model)).predict(sample[:1])[0])
        got_il = json.loads(post(f"{il}/v1/models/bench:predict", il_body)[0])["predictions"][0]
        got_base = json.loads(post(f"{base}/predict", base_body)[0])["prediction"]
        assert abs(got_il - expected) < 1e-9 and abs(got_base - expected) < 1e-9

        json_headers = {"Content-Type": "application/json"}
        il_lua = write_lua(work, "il", il_body, json_headers)
        base_lua = write_lua(work, "base", base_body, json_headers)
        rows64 = {"instances": [{f"f{i}": float(v) for i, v in enumerate(r)} for r in sample]}
        il64_lua = write_lua(work, "il64", json.dumps(rows64).encode(), json_headers)
        v2_body, v2_len = v2_binary_body(sample)
        v2_headers = {"Content-Type": "application/octet-stream",
                      "Inference-Header-Content-Length": str(v2_len)}  # fmt: skip
        v2_lua = write_lua(work, "v2", v2_body, v2_headers)
        answer, headers = post(f"{il}/v2/models/bench/infer", v2_body, v2_headers)
        got_v2 = np.frombuffer(answer[int(headers["Inference-Header-Content-Length"]) :], "<f8")
        assert np.allclose(got_v2, lgb.Booster(model_file=str(model)).predict(sample), atol=1e-9)

        for url, script in (
            (f"{base}/predict", base_lua),
            (f"{il}/v1/models/bench:predict", il_lua),
        ):
            wrk(url, script, 32, 2)  # warm-up

        runs: list[Run] = []
        for connections in () if args.only_rows else (32, 64):
            for _ in range(args.rounds):
                for system, url, script in (
                    ("baseline", f"{base}/predict", base_lua),
                    ("interlock", f"{il}/v1/models/bench:predict", il_lua),
                ):
                    rate, p50, p99, bad = wrk(url, script, connections, args.duration)
                    runs.append(Run(system, connections, rate, p50, p99, bad))
                    print(f"  {system:<9} c={connections:<3} {rate:>9.0f}/s  p50 {p50:.2f} ms"
                          f"  p99 {p99:.2f} ms  errors {bad}", flush=True)  # fmt: skip

        raw = raw_rows_per_s(model, sample)
        rate64, p50_64, p99_64, bad64 = wrk(
            f"{il}/v1/models/bench:predict", il64_lua, 32, args.duration
        )
        rate_v2, p50_v2, p99_v2, bad_v2 = wrk(
            f"{il}/v2/models/bench/infer", v2_lua, 32, args.duration
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    def median(system: str, connections: int, field: str) -> float:
        return statistics.median(
            getattr(r, field) for r in runs if r.system == system and r.connections == connections
        )

    print("\nSingle-row requests (medians of alternated runs)")
    print(f"{'connections':>11} {'system':>10} {'good/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    summary: dict[str, Any] = {"single_row": {}, "rows_64": {}}
    for connections in () if args.only_rows else (32, 64):
        for system in ("baseline", "interlock"):
            rate = median(system, connections, "good_per_s")
            p50 = median(system, connections, "p50_ms")
            p99 = median(system, connections, "p99_ms")
            print(f"{connections:>11} {system:>10} {rate:>9.0f} {p50:>7.2f} {p99:>7.2f}")
            summary["single_row"][f"{system}_c{connections}"] = {
                "good_per_s": rate, "p50_ms": p50, "p99_ms": p99,
            }  # fmt: skip
        ratio = median("interlock", connections, "good_per_s") / median(
            "baseline", connections, "good_per_s"
        )
        summary["single_row"][f"ratio_c{connections}"] = ratio
        print(f"{connections:>11} {'ratio':>10} {ratio:>8.2f}x")

    print("\n64-row requests at 32 connections, against the raw booster in-process")
    for label, rate, p50, p99, bad in (
        ("V1 JSON", rate64, p50_64, p99_64, bad64),
        ("V2 binary", rate_v2, p50_v2, p99_v2, bad_v2),
    ):
        rows = rate * 64
        share = rows / raw
        print(f"  {label:<10} {rows:>10.0f} rows/s  ({share:.0%} of raw {raw:.0f} rows/s)"
              f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms  errors {bad}")  # fmt: skip
        summary["rows_64"][label] = {"rows_per_s": rows, "share_of_raw": share}
    summary["rows_64"]["raw_booster_rows_per_s"] = raw
    summary["runs"] = [asdict(r) for r in runs]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
