"""Prometheus metrics a dashboard relies on, and structured logs with request ids."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from interlock._core.logs import JsonFormatter, bind_request_id, configure_logging, request_id_var
from tests.api.support import register, write_python_model
from tests.conftest import LiveServer


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_requests_latency_batches_queue_and_load_time_are_exported(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(cache={"enabled": False})  # every row reaches the model
    register(settings, "calc", write_python_model(tmp_path), "python", alias="champion")
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        row = {"a": 1.0, "b": 2, "c": 0.5}
        for _ in range(3):
            assert http.post("/v1/models/calc:predict", json={"instances": [row, row]}).is_success
        assert http.post("/v1/models/calc:predict", json={"instances": [{}]}).status_code == 422
        assert http.post("/v1/models/nope:predict", json={"instances": [row]}).status_code == 404
        text = http.get("/metrics").text

    got = samples(text)
    ok = frozenset({("model", "calc"), ("version", "1"), ("protocol", "v1"), ("status", "200")})
    # A refused request has no answering version; it is counted under its model.
    bad = frozenset({("model", "calc"), ("version", ""), ("protocol", "v1"), ("status", "422")})
    unknown = frozenset({("model", ""), ("version", ""), ("protocol", "v1"), ("status", "404")})
    assert got[("interlock_requests_total", ok)] == 3
    assert got[("interlock_requests_total", bad)] == 1
    assert got[("interlock_requests_total", unknown)] == 1
    assert got[("interlock_request_latency_seconds_count", ok)] == 3
    version = frozenset({("model", "calc"), ("version", "1")})
    # Three requests of two rows, plus the one-row warm-up done at load time is not counted.
    assert got[("interlock_predicted_rows_total", version)] == 6
    assert got[("interlock_batch_size_rows_count", version)] == 3
    assert got[("interlock_queue_depth_rows", version)] == 0
    assert got[("interlock_replicas", version)] >= 1
    assert got[("interlock_queue_delay_seconds", version)] >= 0
    assert got[("interlock_model_loaded", version)] == 1
    assert got[("interlock_model_load_seconds_count", frozenset({("model", "calc")}))] == 1


def test_json_log_lines_carry_the_request_id() -> None:
    record = logging.makeLogRecord(
        {"name": "interlock.api", "levelname": "ERROR", "msg": "prediction failed"}
    )
    loggers = [logging.getLogger(n) for n in ("interlock", "uvicorn", "uvicorn.error")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    token = bind_request_id("req-42")
    try:
        configure_logging("info", json_lines=True)
        handler = logging.getLogger("interlock").handlers[0]
        assert handler.filter(record)
    finally:
        request_id_var.reset(token)
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-42"
    assert line["msg"] == "prediction failed"
    assert line["level"] == "error"
