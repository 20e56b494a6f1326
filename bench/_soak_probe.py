"""What the soak samples from a running process: memory, descriptors, tasks, Redis links.

Everything is read from outside the process (Linux /proc, the process's own /metrics and
Redis's ``CLIENT LIST``), so sampling costs the measured process one scrape and nothing
else:

- **RSS** and **threads**: ``VmRSS`` and ``Threads`` of ``/proc/PID/status``;
- **fds**: the entries of ``/proc/PID/fd``;
- **tasks**: ``interlock_asyncio_tasks`` of the process's ``/metrics``;
- **Redis connections**, two ways: ``redis``, the clients Redis lists (``CLIENT LIST``)
  whose address is one of the process's sockets to Redis, and ``redis_sockets``, every
  socket of the process connected to Redis's port in any state (a socket Redis has
  closed and the process has not, ``CLOSE_WAIT``, counts here and not there).

The descriptors are read before the scrape, which opens a connection of its own.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


@dataclass
class Sample:
    """One process at one instant of the run."""

    t_s: float  # since the load started
    phase: str  # "start", "load", "warm-up" or "end" (the last two: idle, load paused)
    process: str  # "server" or "worker"
    rss_kib: int
    fds: int
    threads: int
    tasks: int | None  # None: the process exports no interlock_asyncio_tasks
    redis: int | None  # CLIENT LIST entries of this process; None: Redis did not say
    redis_sockets: int
    socket_states: dict[str, int] = field(default_factory=dict)  # of redis_sockets
    redis_names: dict[str, int] = field(default_factory=dict)  # CLIENT LIST, by client name
    redis_cmds: dict[str, int] = field(default_factory=dict)  # CLIENT LIST, by last command
    redis_ports: list[int] = field(default_factory=list)  # the local port of each of them


def status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def open_fds(pid: int) -> list[str]:
    """Where each descriptor of ``pid`` points (``socket:[inode]``, a path, …)."""
    out = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            out.append(os.readlink(fd))
    return out


def sockets_to(pid: int, port: int, targets: list[str]) -> list[tuple[int, str]]:
    """(local port, TCP state) of each socket of ``pid`` whose remote port is ``port``."""
    inodes = {t[8:-1] for t in targets if t.startswith("socket:[")}
    out = []
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cells = line.split()
                remote_port = int(cells[2].rsplit(":", 1)[1], 16)
                if remote_port == port and cells[9] in inodes:
                    local_port = int(cells[1].rsplit(":", 1)[1], 16)
                    out.append((local_port, _TCP_STATES.get(cells[3], cells[3])))
    return out


def quick(pid: int, port: int) -> tuple[int, int]:
    """(open fds, sockets to ``port``) of ``pid``: /proc alone, cheap enough every second."""
    targets = open_fds(pid)
    return len(targets), len(sockets_to(pid, port, targets))


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text page, by (name, labels)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float | None:
    """The sum of ``name``'s samples on ``page``, or None when there is none."""
    values = [v for (n, _), v in page.items() if n == name]
    return sum(values) if values else None


class Probe:
    """Samples processes; ``client_list`` is Redis's ``CLIENT LIST`` (a blocking call)."""

    def __init__(self, redis_port: int, client_list: Any) -> None:
        self.redis_port = redis_port
        self.client_list = client_list

    def sample(self, t_s: float, phase: str, process: str, pid: int, metrics_url: str) -> Sample:
        """One sample of ``pid``; blocking (run it in a thread)."""
        targets = open_fds(pid)
        proc = status(pid)
        sockets = sockets_to(pid, self.redis_port, targets)
        redis: int | None = None
        names: Counter[str] = Counter()
        cmds: Counter[str] = Counter()
        ports: list[int] = []
        try:
            clients = self.client_list()
        except Exception:  # Redis not answering: the sample says None
            clients = None
        if clients is not None:
            mine = {port for port, _ in sockets}
            ours = [c for c in clients if _port(c.get("addr", "")) in mine]
            redis = len(ours)
            names.update(str(c.get("name") or "-") for c in ours)
            cmds.update(str(c.get("cmd") or "-") for c in ours)
            ports = sorted(p for c in ours if (p := _port(c.get("addr", ""))) is not None)
        tasks = metric(scrape(metrics_url), "interlock_asyncio_tasks")
        return Sample(
            t_s=round(t_s, 1),
            phase=phase,
            process=process,
            rss_kib=int(proc["VmRSS"].split()[0]),
            fds=len(targets),
            threads=int(proc["Threads"]),
            tasks=None if tasks is None else int(tasks),
            redis=redis,
            redis_sockets=len(sockets),
            socket_states=dict(Counter(state for _, state in sockets)),
            redis_names=dict(names),
            redis_cmds=dict(cmds),
            redis_ports=ports,
        )


def _port(addr: str) -> int | None:
    try:
        return int(addr.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
