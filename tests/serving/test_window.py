"""The rolling window the canary guard reads."""

from __future__ import annotations

import pytest

from interlock.serving.window import RollingWindow
from tests.clock import ManualClock


def test_counts_errors_and_quantiles() -> None:
    clock = ManualClock()
    window = RollingWindow(clock, window_s=60, buckets=12)
    for i in range(100):
        window.record(0.002 if i < 98 else 0.5, ok=i % 10 != 0)
    snap = window.snapshot()
    assert (snap.requests, snap.errors) == (100, 10)
    assert snap.error_rate == pytest.approx(0.1)
    assert 2.0 <= snap.p50_ms <= 2.5
    assert 500 <= snap.p99_ms <= 610


def test_old_buckets_fall_out_of_the_window() -> None:
    clock = ManualClock()
    window = RollingWindow(clock, window_s=60, buckets=12)
    window.record(0.001, ok=False)
    clock.t += 30
    window.record(0.001, ok=True)
    assert window.snapshot().requests == 2
    clock.t += 35  # the first record is now older than 60 s
    snap = window.snapshot()
    assert (snap.requests, snap.errors) == (1, 0)
    clock.t += 120
    assert window.snapshot().requests == 0
    assert window.snapshot().p99_ms == 0.0
