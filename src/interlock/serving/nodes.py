"""Which policy revision each serving node applies: a heartbeat row per node.

Every :class:`~interlock.serving.router.TrafficRouter` writes its row (table
``traffic_nodes``) after each refresh: who it is (node id, host, pid, start) and, per
model, the revision of the policy it routes by. ``traffic show`` reads the rows of the
nodes seen in the last :data:`LIVE_S` seconds, so it reports the split the nodes apply,
not only the one that was asked for. A node that stops deletes its row; rows of nodes
silent for a day are pruned by the others.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from interlock.serving.traffic import JSONValue
from interlock.store.db import Database
from interlock.store.sql import upsert
from interlock.store.tables import traffic_nodes

__all__ = ["LIVE_S", "NodeBoard", "NodeIdentity", "NodeReport"]

LIVE_S = 15.0
"""A node that has not refreshed for this long is not counted as applying anything."""

_PRUNE_AFTER = timedelta(days=1)
_tn = traffic_nodes


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """One serving process: a random id, its host and pid, when it started."""

    node: str
    host: str
    pid: int
    started_at: datetime

    @classmethod
    def current(cls, started_at: datetime) -> NodeIdentity:
        return cls(uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), started_at)


@dataclass(frozen=True, slots=True)
class NodeReport:
    """A node's last heartbeat: the revision it applies per model."""

    identity: NodeIdentity
    last_seen: datetime
    applied: Mapping[str, int]

    def to_json(self, model: str) -> dict[str, JSONValue]:
        """What ``traffic show`` prints about this node, for ``model``."""
        who = self.identity
        return {
            "node": who.node,
            "host": who.host,
            "pid": who.pid,
            "started_at": who.started_at.isoformat(),
            "last_seen": self.last_seen.isoformat(),
            "revision": self.applied.get(model),
        }


class NodeBoard:
    """The heartbeat rows, on the metadata database."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def beat(self, who: NodeIdentity, applied: Mapping[str, int], now: datetime) -> None:
        """Record that ``who`` applies ``applied`` (model → revision) as of ``now``."""
        values = {
            "node": who.node,
            "host": who.host[:255],
            "pid": who.pid,
            "started_at": who.started_at,
            "last_seen": now,
            "applied": dict(applied),
        }

        def write(conn: Connection) -> None:
            upsert(conn, _tn, values, keys=("node",))
            conn.execute(sa.delete(_tn).where(_tn.c.last_seen < now - _PRUNE_AFTER))

        await self._db.run(write)

    async def forget(self, node: str) -> None:
        """Delete ``node``'s row: it stopped and applies nothing any more."""
        await self._db.run(lambda conn: conn.execute(sa.delete(_tn).where(_tn.c.node == node)))

    def live(self, conn: Connection, now: datetime) -> list[NodeReport]:
        """The nodes seen in the last :data:`LIVE_S` seconds, oldest start first."""
        since = now - timedelta(seconds=LIVE_S)
        stmt = sa.select(_tn).where(_tn.c.last_seen >= since).order_by(_tn.c.started_at, _tn.c.node)
        return [
            NodeReport(
                NodeIdentity(row["node"], row["host"], row["pid"], row["started_at"]),
                row["last_seen"],
                {str(m): int(r) for m, r in dict(row["applied"]).items()},
            )
            for row in conn.execute(stmt).mappings()
        ]
