"""The LLM gateway over HTTP: OpenAI's API under ``/llm/v1``.

Plain ASGI, like the prediction routes: the gateway's own cost must stay well under a
millisecond, and a framework's routing, validation and response classes would be most
of it. Any OpenAI SDK works with ``base_url=http://HOST:PORT/llm/v1``:

- ``POST /llm/v1/chat/completions`` (``stream: true`` answers server-sent events, with
  usage in the last chunk before ``[DONE]``),
- ``POST /llm/v1/embeddings``, ``GET /llm/v1/models``,
- ``GET /llm/v1/usage`` (``?since=&until=&tenant=&model=``: an ISO date or time, or an
  age like ``24h``): totals and breakdowns; a tenant sees its own (asking for another
  tenant's is 403), the admin key (or an open gateway) everything.

Another method on one of these routes is 405 with ``allow``.

Every answer carries ``x-interlock-deployment``, ``x-interlock-attempts``,
``x-interlock-cache`` (hit, semantic, miss, stale, coalesced, off) and
``x-interlock-overhead-ms``; ``x-interlock-model`` names a fallback model that answered,
and a tenant with limits gets OpenAI's ``x-ratelimit-*`` headers. Errors use OpenAI's
shape, ``{"error": {"message", "type", "param", "code"}}``, so SDKs raise their usual
exceptions; a 429 or 503 carries Retry-After.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from interlock._core.ids import new_request_id
from interlock._core.logs import request_id_var
from interlock.api.errors import status_for
from interlock.api.predict import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    offered_key,
    read_body,
    request_timeout_s,
)
from interlock.errors import (
    AuthError,
    BudgetExceededError,
    InterlockError,
    MalformedInputError,
    RateLimitedError,
    UpstreamError,
)
from interlock.llm.cache import CacheControl
from interlock.llm.gateway import CallInfo, ChatStream, Gateway, StreamFailure, Tenant
from interlock.llm.usage import parse_time

__all__ = ["LLMApp"]

log = logging.getLogger("interlock.api.llm")

PREFIX = "/llm/v1/"
_JSON = (b"content-type", b"application/json")
_SSE = (b"content-type", b"text/event-stream")
_DONE = b"data: [DONE]\n\n"

# The routes, and the one method each takes.
_METHODS = {"chat/completions": "POST", "embeddings": "POST", "models": "GET", "usage": "GET"}

UsageReader = Callable[..., Awaitable[dict[str, Any]]]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}


class LLMApp:
    """ASGI app for ``/llm/v1/…``; every other path goes to ``fallback``."""

    def __init__(
        self,
        gateway: Gateway,
        fallback: ASGIApp,
        *,
        usage: UsageReader | None = None,
        admin_key: bytes | None = None,
        max_body_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self._gateway = gateway
        self._fallback = fallback
        self._usage = usage
        self._admin_key = admin_key
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await self._fallback(scope, receive, send)
            return
        route = path[len(PREFIX) :]
        method = scope["method"]
        headers = dict(scope["headers"])
        rid_raw = headers.get(b"x-request-id", b"")
        rid = rid_raw.decode("latin-1") if 0 < len(rid_raw) <= 64 else new_request_id()
        token = request_id_var.set(rid)
        try:
            if method == "POST" and route == "chat/completions":
                await self._chat(headers, receive, send, rid)
            elif method == "POST" and route == "embeddings":
                await self._embeddings(headers, receive, send, rid)
            elif method == "GET" and route == "models":
                self._tenant(headers)
                body = {"object": "list", "data": self._gateway.models()}
                await _respond(send, 200, orjson.dumps(body), [(b"x-request-id", rid.encode())])
            elif method == "GET" and route == "usage":
                await self._usage_route(scope, headers, send, rid)
            elif route in _METHODS:
                allow = [(b"allow", _METHODS[route].encode())]
                message = f"{method} is not allowed on {path}; use {_METHODS[route]}"
                await _error(send, 405, message, rid, extra=allow)
            else:
                await _error(send, 404, f"no route {method} {path}", rid)
        except InterlockError as exc:
            await _send_error(send, exc, rid)
        finally:
            request_id_var.reset(token)

    # -- routes -------------------------------------------------------------------------------

    async def _chat(
        self, headers: dict[bytes, bytes], receive: Receive, send: Send, rid: str
    ) -> None:
        tenant = self._tenant(headers)
        body = await self._json_body(receive, headers)
        control = CacheControl.from_headers(
            _text(headers.get(b"cache-control")), _text(headers.get(b"x-interlock-cache"))
        )
        timeout_s = request_timeout_s(headers)
        if body.get("stream") is True:
            stream = await self._gateway.stream(
                body, tenant=tenant, control=control, timeout_s=timeout_s
            )
            await self._relay(stream, receive, send, rid)
            return
        result = await self._gateway.chat(body, tenant=tenant, control=control, timeout_s=timeout_s)
        await _respond(send, 200, orjson.dumps(result.completion), _info_headers(result.info, rid))

    async def _embeddings(
        self, headers: dict[bytes, bytes], receive: Receive, send: Send, rid: str
    ) -> None:
        tenant = self._tenant(headers)
        body = await self._json_body(receive, headers)
        result = await self._gateway.embeddings(
            body, tenant=tenant, timeout_s=request_timeout_s(headers)
        )
        await _respond(send, 200, orjson.dumps(result.completion), _info_headers(result.info, rid))

    async def _usage_route(
        self, scope: Scope, headers: dict[bytes, bytes], send: Send, rid: str
    ) -> None:
        if self._usage is None:
            await _error(send, 404, "usage is not recorded: no database is configured", rid)
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        args: dict[str, Any] = {}
        for name in ("since", "until"):
            if name in query:
                args[name] = _parse_time(name, query[name][0])
        for name in ("tenant", "model"):
            if name in query:
                args[name] = query[name][0]
        if not self._is_admin(headers):
            tenant = self._tenant(headers)
            if tenant is not None:
                asked = args.get("tenant")
                if asked is not None and asked != tenant.name:
                    message = f"tenant: a tenant key reads its own usage only ({tenant.name!r})"
                    await _error(send, 403, message, rid, code="permission_denied")
                    return
                args["tenant"] = tenant.name  # a tenant sees its own usage only
        await self._gateway.flush_usage()
        summary = await self._usage(**args)
        await _respond(send, 200, orjson.dumps(summary), [(b"x-request-id", rid.encode())])

    # -- helpers ------------------------------------------------------------------------------

    def _is_admin(self, headers: dict[bytes, bytes]) -> bool:
        key = _bearer(headers)
        return (
            self._admin_key is not None
            and key is not None
            and hmac.compare_digest(key.encode(), self._admin_key)
        )

    def _tenant(self, headers: dict[bytes, bytes]) -> Tenant | None:
        if self._gateway.open:
            return None
        return self._gateway.tenant_for_key(_bearer(headers))

    async def _json_body(self, receive: Receive, headers: dict[bytes, bytes]) -> dict[str, Any]:
        raw = await read_body(receive, headers, self._max_body)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise MalformedInputError(f"the body is not valid JSON: {exc}") from None
        if type(body) is not dict:
            raise MalformedInputError("the body must be a JSON object")
        return body

    async def _relay(self, stream: ChatStream, receive: Receive, send: Send, rid: str) -> None:
        """Send the stream as server-sent events; stop the upstream if the client leaves."""
        headers = _info_headers(stream.info, rid, sse=True)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        left = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    left.set()
                    return

        watcher = asyncio.ensure_future(watch())
        ended_well = False
        ready = stream.ready  # the leading chunks in hand: sent in one write
        held: list[bytes] = []
        try:
            async for item in stream:
                if left.is_set():
                    break
                if isinstance(item, StreamFailure):
                    event = {
                        "error": {
                            "message": item.message,
                            "type": "upstream_error",
                            "code": item.kind,
                        }
                    }
                    held.append(b"data: " + orjson.dumps(event) + b"\n\n")
                    await _body(send, b"".join(held), more=False)
                    return
                data = b"data: " + orjson.dumps(item) + b"\n\n"
                if ready > 1:
                    ready -= 1
                    held.append(data)
                    continue
                if held:
                    held.append(data)
                    data = b"".join(held)
                    held = []
                ready = 0
                await _body(send, data, more=True)
            ended_well = not left.is_set()
        except OSError:
            return  # the client went away mid-send
        finally:
            watcher.cancel()
            await stream.aclose()
        if ended_well:
            held.append(_DONE)
            await _body(send, b"".join(held), more=False)


async def _body(send: Send, data: bytes, *, more: bool) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


def _info_headers(info: CallInfo, rid: str, *, sse: bool = False) -> list[tuple[bytes, bytes]]:
    out = [
        _SSE if sse else _JSON,
        (b"x-request-id", rid.encode()),
        (b"x-interlock-deployment", (info.deployment or "").encode()),
        (b"x-interlock-attempts", str(info.attempts).encode()),
        (b"x-interlock-cache", info.cache.encode()),
        (b"x-interlock-overhead-ms", f"{info.overhead_ms():.3f}".encode()),
    ]
    if sse:
        out.append((b"cache-control", b"no-cache"))
    if info.fallback:
        out.append((b"x-interlock-model", info.model.encode()))
    for name, value in info.headers.items():
        out.append((name.encode(), value.encode()))
    return out


async def _respond(
    send: Send, status: int, payload: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    if not headers or headers[0][0] != b"content-type":
        headers = [_JSON, *headers]
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _error(
    send: Send,
    status: int,
    message: str,
    rid: str,
    *,
    code: str | None = None,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error"),
            "param": None,
            "code": code,
        }
    }
    headers = [(b"x-request-id", rid.encode()), *(extra or [])]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await _respond(send, status, orjson.dumps(body), headers)


async def _send_error(send: Send, exc: InterlockError, rid: str) -> None:
    status = status_for(exc)
    code: str | None = None
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(exc, UpstreamError) and exc.status is not None and 400 <= exc.status < 500:
        status = exc.status  # the upstream refused the request itself: the client must fix it
        code = "upstream_rejected"
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(retry_after, int | float) and status in (429, 503):
        extra.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    if isinstance(exc, RateLimitedError):
        code = "rate_limit_exceeded"
        extra.extend((k.encode(), v.encode()) for k, v in exc.headers.items())
    elif isinstance(exc, BudgetExceededError):
        code = "budget_exceeded"
    elif isinstance(exc, AuthError):
        code = "invalid_api_key"
    if status >= 500:
        log.warning("LLM request failed", extra={"status": status, "error": str(exc)})
    await _error(send, status, str(exc), rid, code=code, extra=extra)


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    key = offered_key(headers) or headers.get(b"api-key")  # api-key: Azure OpenAI's SDKs
    return key.decode("latin-1") if key else None


def _text(raw: bytes | None) -> str | None:
    return raw.decode("latin-1") if raw is not None else None


def _parse_time(name: str, value: str) -> datetime:
    try:
        return parse_time(value, now=datetime.now(UTC))
    except ValueError as exc:
        raise MalformedInputError(f"{name}: {exc}") from None
