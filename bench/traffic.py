"""The cost of traffic management and resilience, and what the prediction cache buys.

Three servers serve the same LightGBM booster in one run, loaded in alternation by wrk
with single-row requests, every request a fresh random row (so every lookup misses):

- **foundation**: the code of the foundation issue (``--foundation REF``, checked out into
  a temporary git worktree): the plain path before traffic management existed;
- **plain**: today's code with no traffic policy and no cache (breakers and deadlines on);
- **full**: a traffic policy (routing by weight), the breaker, and the memory cache.

Then the full server again with one fixed row: every request is a cache hit.

    .venv/bin/python bench/traffic.py [--duration 10] [--rounds 3] [--foundation REF]

Target: the full path on a miss answers at least 95% of the foundation's responses/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from serving import PYTHON, free_port, post, train, wait_ready, write_lua, wrk

RANDOM_ROWS = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local names = {NAMES}
request = function()
  local parts = {{}}
  for i, name in ipairs(names) do
    parts[i] = '"' .. name .. '": ' .. string.format("%.9f", math.random())
  end
  return wrk.format(nil, nil, nil, '{{"instances": [{{' .. table.concat(parts, ", ") .. '}}]}}')
end
"""


FOUNDATION_REF = "cbdcb07"  # the last commit of the foundation issue


def start(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "interlock", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="alternations")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--foundation", default=FOUNDATION_REF, help="git ref of the baseline")
    parser.add_argument("--out", type=Path, default=Path("bench/results/traffic.json"))
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="interlock-bench-"))
    model, sample = train(work)
    base = {k: v for k, v in os.environ.items() if not k.startswith("INTERLOCK_")}
    base["INTERLOCK_LOG__LEVEL"] = "warning"
    plain_env = {**base, "INTERLOCK_HOME": str(work / "plain"), "INTERLOCK_CACHE__ENABLED": "0"}
    full_env = {**base, "INTERLOCK_HOME": str(work / "full")}
    tree = work / "foundation-tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), args.foundation],
        check=True, capture_output=True,
    )  # fmt: skip
    old_env = {**base, "INTERLOCK_HOME": str(work / "old"), "PYTHONPATH": str(tree / "src")}
    for env in (old_env, plain_env, full_env):
        subprocess.run(
            [PYTHON, "-m", "interlock", "models", "register", "bench", str(model),
             "--format", "lightgbm", "--alias", "champion"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
    subprocess.run(
        [PYTHON, "-m", "interlock", "traffic", "set", "bench", "1=100"],
        env=full_env, check=True, capture_output=True,
    )  # fmt: skip
    ports = {"foundation": free_port(), "plain": free_port(), "full": free_port()}
    procs = {
        "foundation": start(old_env, ports["foundation"]),
        "plain": start(plain_env, ports["plain"]),
        "full": start(full_env, ports["full"]),
    }
    names = [f"f{i}" for i in range(sample.shape[1])]
    random_lua = work / "random.lua"
    random_lua.write_text(RANDOM_ROWS.format(NAMES="{" + ", ".join(f'"{n}"' for n in names) + "}"))
    fixed = json.dumps({"instances": [dict(zip(names, map(float, sample[0]), strict=True))]})
    fixed_lua = write_lua(work, "fixed", fixed.encode(), {"Content-Type": "application/json"})
    runs: list[dict[str, Any]] = []
    try:
        urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
        for name, url in urls.items():
            wait_ready(f"{url}/v2/health/ready", procs[name])
            post(f"{url}/v1/models/bench:predict", fixed.encode())
        predict = "/v1/models/bench:predict"
        for name in urls:
            wrk(urls[name] + predict, random_lua, args.connections, 2)  # warm-up
        for _ in range(args.rounds):
            for name in ("foundation", "plain", "full"):
                rate, p50, p99, bad = wrk(
                    urls[name] + predict, random_lua, args.connections, args.duration
                )
                runs.append({"system": name, "rate": rate, "p50": p50, "p99": p99, "bad": bad})
                print(f"  {name:<10} miss  {rate:>9.0f}/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
                      f"  errors {bad}", flush=True)  # fmt: skip
        for _ in range(args.rounds):
            rate, p50, p99, bad = wrk(
                urls["full"] + predict, fixed_lua, args.connections, args.duration
            )
            runs.append({"system": "hit", "rate": rate, "p50": p50, "p99": p99, "bad": bad})
            print(f"  full       hit   {rate:>9.0f}/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms"
                  f"  errors {bad}", flush=True)  # fmt: skip
        with urllib.request.urlopen(urls["full"] + "/metrics") as response:
            metrics = response.read().decode()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(timeout=30)
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)

    def med(system: str, field: str) -> float:
        return statistics.median(r[field] for r in runs if r["system"] == system)

    print(f"\nSingle-row requests at {args.connections} connections (medians)")
    print(f"{'path':<28} {'good/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for label, system in (
        ("foundation (before issue 3)", "foundation"),
        ("plain (no policy, no cache)", "plain"),
        ("full, cache miss", "full"),
        ("full, cache hit", "hit"),
    ):
        print(f"{label:<28} {med(system, 'rate'):>9.0f} {med(system, 'p50'):>7.2f}"
              f" {med(system, 'p99'):>7.2f}")  # fmt: skip
    ratio = med("full", "rate") / med("foundation", "rate")
    print(f"full path on a miss: {ratio:.1%} of the foundation's responses/s (target ≥ 95%)")
    print(f"plain path today: {med('plain', 'rate') / med('foundation', 'rate'):.1%} of it")
    print(f"cache hit: {med('hit', 'rate') / med('full', 'rate'):.2f}x the miss throughput")
    hits = [line for line in metrics.splitlines() if line.startswith("interlock_cache_rows_total")]
    print("\n".join(hits))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "miss_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
