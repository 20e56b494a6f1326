"""Source of the small ``python``-format models the registry tests register."""

from __future__ import annotations

from datetime import UTC, datetime

SUM_MODEL = """\
class Model:
    features = ["a", "b"]

    def predict(self, rows):
        return [r["a"] + r["b"] for r in rows]
"""

NAMELESS_MODEL = """\
class Model:
    def predict(self, rows):
        return [0.0 for _ in rows]
"""

START = datetime(2025, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
