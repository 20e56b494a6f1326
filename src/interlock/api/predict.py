"""The prediction hot path: KServe V1 ``:predict`` and Open Inference Protocol ``/infer``.

These two routes carry nearly all traffic, so they are plain ASGI: one pass over the
headers, the body read against its size limit, the rows decoded and checked, the
batcher awaited, one ``orjson`` encode. Everything else (metadata, health, admin,
metrics) goes to the FastAPI app behind it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from interlock._core.ids import new_request_id
from interlock._core.logs import request_id_var
from interlock.api import v2codec
from interlock.api.errors import status_for
from interlock.errors import (
    AuthError,
    InterlockError,
    MalformedInputError,
    ModelNotFoundError,
    PayloadTooLargeError,
)
from interlock.monitoring.metrics import ServingMetrics
from interlock.serving.pipeline import Answer, Pipeline

__all__ = ["PredictionApp", "check_key", "offered_key", "read_body", "request_timeout_s"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("interlock.api")

_V2_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_JSON = (b"content-type", b"application/json")


def offered_key(headers: dict[bytes, bytes]) -> bytes | None:
    """The key a client sent: ``x-api-key: K``, else ``Authorization: Bearer K``."""
    offered = headers.get(b"x-api-key")
    if offered is None:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            offered = auth[7:].strip()
    return offered


def request_timeout_s(headers: dict[bytes, bytes]) -> float | None:
    """``x-request-timeout-ms`` in seconds; None without it; MalformedInputError if bad."""
    raw = headers.get(b"x-request-timeout-ms")
    if raw is None:
        return None
    try:
        timeout_ms = float(raw)
    except ValueError:
        timeout_ms = math.nan
    if not (timeout_ms > 0 and math.isfinite(timeout_ms)):
        raise MalformedInputError("x-request-timeout-ms must be a positive number")
    return timeout_ms / 1000.0


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The request body, refused (PayloadTooLargeError) as soon as it passes ``limit``."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"the body is over the {limit}-byte limit")
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLargeError(f"the body is over the {limit}-byte limit")
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"the body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def check_key(headers: dict[bytes, bytes], keys: tuple[bytes, ...]) -> None:
    """Raise AuthError unless ``Authorization: Bearer K`` or ``x-api-key: K`` holds a key."""
    if not keys:
        return
    offered = offered_key(headers)
    if offered is None:
        raise AuthError("a key is required: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(offered, key) for key in keys):
        raise AuthError("the key is not valid")


class PredictionApp:
    """ASGI app answering predictions itself and passing every other request on."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: ServingMetrics,
        fallback: ASGIApp,
        *,
        max_body_bytes: int,
        default_timeout_ms: float = 1000.0,
        client_keys: tuple[bytes, ...] = (),
        announce: Callable[[str, str, int, list[Any], float], None] | None = None,
    ) -> None:
        self._announce = announce  # publishes each answer to the bus (bus.publish_http)
        self._pipeline = pipeline
        self._default_timeout_ms = default_timeout_ms
        self._metrics = metrics
        self._fallback = fallback
        self._max_body = max_body_bytes
        self._keys = client_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/v1/models/") and path.endswith(":predict"):
                if scope["method"] == "POST":
                    await self._serve(scope, receive, send, "v1", path[11:-8], None)
                else:
                    await _not_allowed(scope, send)
                return
            if path.startswith("/v2/models/") and path.endswith("/infer"):
                match = _V2_PATH.match(path)
                if match is not None:
                    if scope["method"] == "POST":
                        await self._serve(scope, receive, send, "v2", match[1], match[2])
                    else:
                        await _not_allowed(scope, send)
                    return
        await self._fallback(scope, receive, send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        protocol: str,
        ref: str,
        version_text: str | None,
    ) -> None:
        started = time.perf_counter()
        headers = dict(scope["headers"])
        rid_raw = headers.get(b"x-request-id")
        rid = rid_raw.decode("latin-1") if rid_raw else ""
        if not _REQUEST_ID_OK.match(rid):
            rid = new_request_id()
        token = request_id_var.set(rid)
        answer: Answer | None = None
        extra: list[tuple[bytes, bytes]] = []
        model_label = ""
        try:
            check_key(headers, self._keys)
            deadline = self._deadline(headers)
            body = await read_body(receive, headers, self._max_body)
            version = None
            if version_text is not None:
                if not (version_text.isascii() and version_text.isdigit()):
                    raise ModelNotFoundError(f"version {version_text!r} is not a version number")
                version = int(version_text)
            route_key = headers.get(b"x-interlock-route-key")
            if protocol == "v1":
                payload, answer = await self._v1(ref, version, body, deadline, route_key, rid)
            else:
                payload, extra, answer = await self._v2(
                    ref, version, body, headers, deadline, route_key, rid
                )
            status = 200
        except InterlockError as exc:
            status = status_for(exc)
            payload = orjson.dumps({"error": str(exc)})
            retry_after = getattr(exc, "retry_after_s", None)
            if retry_after is not None:
                extra = [(b"retry-after", str(max(1, math.ceil(retry_after))).encode())]
            if not isinstance(exc, ModelNotFoundError | AuthError):
                model_label = ref.partition("@")[0]  # a known model: a bounded label
            if status >= 500:
                log.error("prediction failed", extra={"route": ref, "error": str(exc)})
        except Exception:
            status = 500
            payload = orjson.dumps({"error": "internal error; the request id is " + rid})
            log.exception("unexpected error in the prediction path", extra={"route": ref})
        finally:
            request_id_var.reset(token)
        response_headers = [
            (b"content-length", str(len(payload)).encode()),
            (b"x-request-id", rid.encode()),
        ]
        if status != 200 or protocol == "v1" or not extra:
            response_headers.append(_JSON)
        response_headers.extend(extra)
        version_label = ""
        if answer is not None:
            model_label, version_label = answer.model, str(answer.version)
            response_headers.append((b"x-interlock-model-version", version_label.encode()))
            if answer.cache != "off":
                response_headers.append((b"x-interlock-cache", answer.cache.encode()))
            if answer.fallback is not None:
                response_headers.append((b"x-interlock-fallback", answer.fallback.encode()))
        if status == 401:
            response_headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": payload})
        if answer is not None and self._announce is not None and status == 200:
            self._announce(rid, answer.model, answer.version, answer.values, started)
        self._metrics.request_done(
            model_label, version_label, protocol, status, time.perf_counter() - started
        )

    def _deadline(self, headers: dict[bytes, bytes]) -> float:
        timeout_s = request_timeout_s(headers)
        if timeout_s is None:
            timeout_s = self._default_timeout_ms / 1000.0
        return asyncio.get_running_loop().time() + timeout_s

    async def _v1(
        self,
        ref: str,
        version: int | None,
        body: bytes,
        deadline: float,
        route_key: bytes | None,
        rid: str,
    ) -> tuple[bytes, Answer]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedInputError(f"the body is not valid JSON: {exc}") from None
        if type(doc) is not dict or "instances" not in doc:
            raise MalformedInputError("the body must be a JSON object with 'instances'")
        instances = doc["instances"]
        answer = await self._pipeline.predict(
            ref,
            version,
            lambda decoder: decoder.rows(instances),
            deadline=deadline,
            route_key=route_key,
            request_id=rid,
        )
        out: dict[str, Any] = {
            "predictions": answer.values,
            "model_name": answer.model,
            "model_version": str(answer.version),
        }
        if answer.degraded:
            out["degraded"] = True
        return orjson.dumps(out), answer

    async def _v2(
        self,
        ref: str,
        version: int | None,
        body: bytes,
        headers: dict[bytes, bytes],
        deadline: float,
        route_key: bytes | None,
        rid: str,
    ) -> tuple[bytes, list[tuple[bytes, bytes]], Answer]:
        header_len = headers.get(b"inference-header-content-length")
        if header_len is not None and not header_len.isdigit():
            raise MalformedInputError("Inference-Header-Content-Length must be a number")
        request = v2codec.parse_request(body, int(header_len) if header_len else None)
        answer = await self._pipeline.predict(
            ref,
            version,
            lambda decoder: decoder.tensors(request.inputs),
            deadline=deadline,
            route_key=route_key,
            request_id=request.id or rid,
        )
        payload, json_len = v2codec.encode_response(
            answer.model, answer.version, request, answer.values, degraded=answer.degraded
        )
        if json_len is None:
            return payload, [], answer
        return (
            payload,
            [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(json_len).encode()),
            ],
            answer,
        )


async def _not_allowed(scope: Scope, send: Send) -> None:
    """405 for another method on a prediction route: they take POST only."""
    rid_raw = dict(scope["headers"]).get(b"x-request-id", b"")
    rid = rid_raw.decode("latin-1")
    if not _REQUEST_ID_OK.match(rid):
        rid = new_request_id()
    message = f"{scope['method']} is not allowed on {scope['path']}; predictions take POST"
    payload = orjson.dumps({"error": message})
    headers = [
        _JSON,
        (b"content-length", str(len(payload)).encode()),
        (b"allow", b"POST"),
        (b"x-request-id", rid.encode()),
    ]
    await send({"type": "http.response.start", "status": 405, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
