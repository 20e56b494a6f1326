"""HTTP for the LLM providers: one pooled session per deployment, SSE, and errors.

:class:`UpstreamClient` owns one keep-alive connection pool per upstream origin
(:mod:`._wire`, at most ``max_connections``), opened on first use inside the running
loop; no cookies, no redirects; ``asyncio.timeout`` bounds every wait.
Bodies go out as bytes that the provider serialised with ``orjson``, under headers
built once, so a call costs one request object and nothing more.

Every failure leaves as an :class:`~interlock.errors.UpstreamError`, its ``kind`` one of:

- ``http``: the upstream answered a status outside 2xx. 408, 409, 429 and 5xx
  (Anthropic's 529 included) are transient, other statuses are not; an
  ``x-should-retry`` header overrides that. ``retry_after_s`` comes from
  ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP date) or, for OpenAI, the
  ``x-ratelimit-reset-*`` of a spent limit. The message carries the upstream's own
  error message, whitespace folded and cut to 300 characters.
- ``timeout``: no answer, or no next event of a stream, within ``timeout_s``.
- ``connect``: the connection was refused, reset or broke before a whole answer came.
- ``malformed``: a 2xx whose body is not the protocol's (not JSON, a missing field).
- ``stream_cut``: a stream that broke or ended before its end marker.

Every kind but ``http`` is transient. No message ever holds the API key:
each is scrubbed of it before it is raised.

:class:`SSEParser` reads server-sent events from bytes cut anywhere (inside a line,
between ``\\r`` and ``\\n``, inside a UTF-8 character): it splits on ASCII line ends
only and hands each event's ``data`` lines, joined by ``\\n``, on as bytes for
``orjson``; comments and the ``event``/``id``/``retry`` fields are skipped. A last
event that the body's end leaves unterminated is still handed on.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections import deque
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from interlock import __version__
from interlock.errors import UpstreamError, describe
from interlock.llm.providers._wire import Pool, Response, WireError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from interlock.settings import LLMDeployment

__all__ = ["SSEParser", "SSEStream", "UpstreamClient", "retry_after_s"]

KEEPALIVE_S = 30.0
"""How long an idle connection stays open for reuse (under the usual 60 s of upstreams)."""
DNS_TTL_S = 60
DRAIN_TIMEOUT_S = 1.0
"""How long a finished stream waits for its body's end, so its connection can be reused."""
DRAIN_MAX_BYTES = 64 * 1024
MAX_LINE_BYTES = 16 * 1024 * 1024
MESSAGE_MAX_CHARS = 300

_TRANSIENT_STATUSES = frozenset({408, 409, 429})
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class UpstreamClient:
    """The connections to one deployment's upstream, with failures as UpstreamError.

    ``headers`` are sent with every request (the key among them); ``secret`` is the key,
    scrubbed from every error message.
    """

    def __init__(
        self, deployment: LLMDeployment, *, headers: Mapping[str, str], secret: str | None
    ) -> None:
        self.name = deployment.name
        self._max_connections = deployment.max_connections
        self._secret = secret or None
        common = {"User-Agent": f"interlock/{__version__}", "Content-Type": "application/json"}
        self._json_headers = {**common, "Accept": "application/json", **headers}
        self._sse_headers = {**common, "Accept": "text/event-stream", **headers}
        self._pools: dict[str, Pool] = {}
        self._heads: dict[tuple[str, bool], tuple[Pool, bytes]] = {}

    def _target(self, url: str, sse: bool) -> tuple[Pool, bytes]:
        """The pool of ``url``'s origin and the request head, built once per URL."""
        found = self._heads.get((url, sse))
        if found is not None:
            return found
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = Pool(
                origin, max_connections=self._max_connections, keepalive_s=KEEPALIVE_S
            )
        path = parts.path or "/"
        if parts.query:
            path = f"{path}?{parts.query}"
        head = pool.head("POST", path, self._sse_headers if sse else self._json_headers)
        self._heads[(url, sse)] = (pool, head)
        return pool, head

    async def post_json(self, url: str, payload: bytes, timeout_s: float) -> Any:
        """POST ``payload`` and return the parsed JSON of a 2xx answer.

        Raises:
            UpstreamError: any failure (see the module's docstring for the kinds).
        """
        try:
            pool, head = self._target(url, sse=False)
        except ValueError as exc:
            raise self._connection_error(exc) from exc
        resp: Response | None = None
        try:
            async with asyncio.timeout(timeout_s):
                resp = await pool.send(head, payload)
                raw = await resp.read()
        except TimeoutError as exc:
            if resp is not None:
                resp.close()
            raise self.error(f"no answer within {timeout_s:g} s", kind="timeout") from exc
        except (WireError, OSError) as exc:
            raise self._connection_error(exc) from exc
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        if not 200 <= resp.status < 300:
            raise self.status_error(resp.status, resp.headers, raw)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise self.malformed(f"the answer is not JSON: {_excerpt(raw)}") from exc

    async def open_stream(self, url: str, payload: bytes, timeout_s: float) -> SSEStream:
        """POST ``payload`` and return the events of the 2xx answer as they come.

        ``timeout_s`` bounds the wait for the answer's headers, then each wait for an
        event. The caller must end the stream with :meth:`SSEStream.finish` or
        :meth:`SSEStream.close`.

        Raises:
            UpstreamError: the request failed or the answer was not a 2xx.
        """
        try:
            pool, head = self._target(url, sse=True)
        except ValueError as exc:
            raise self._connection_error(exc) from exc
        try:
            async with asyncio.timeout(timeout_s):
                resp = await pool.send(head, payload)
        except TimeoutError as exc:
            raise self.error(f"no answer within {timeout_s:g} s", kind="timeout") from exc
        except (WireError, OSError) as exc:
            raise self._connection_error(exc) from exc
        if 200 <= resp.status < 300:
            return SSEStream(self, resp, timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                raw = await resp.read()
        except (TimeoutError, WireError, OSError):
            resp.close()
            raw = b""
        except BaseException:
            resp.close()
            raise
        raise self.status_error(resp.status, resp.headers, raw)

    # -- errors ----------------------------------------------------------------------

    def error(
        self,
        reason: str,
        *,
        kind: str,
        status: int | None = None,
        transient: bool = True,
        retry_after_s: float | None = None,
    ) -> UpstreamError:
        """An UpstreamError for this deployment, its message scrubbed of the key."""
        message = f"{self.name}: {reason}"
        if self._secret is not None and self._secret in message:
            message = message.replace(self._secret, "***")
        return UpstreamError(
            message, status=status, kind=kind, transient=transient, retry_after_s=retry_after_s
        )

    def status_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> UpstreamError:
        """The error for an answer with a status outside 2xx and body ``raw``."""
        transient = status in _TRANSIENT_STATUSES or status >= 500
        hint = headers.get("x-should-retry")
        if hint == "true":
            transient = True
        elif hint == "false":
            transient = False
        message = error_message(raw)
        return self.error(
            f"upstream answered {status}: {message}" if message else f"upstream answered {status}",
            kind="http",
            status=status,
            transient=transient,
            retry_after_s=retry_after_s(headers, time.time()),
        )

    def malformed(self, reason: str) -> UpstreamError:
        return self.error(reason, kind="malformed")

    def _connection_error(self, exc: BaseException) -> UpstreamError:
        transient = not isinstance(exc, ValueError)
        return self.error(
            f"cannot reach the upstream: {describe(exc, with_type=True)}",
            kind="connect",
            transient=transient,
        )

    async def aclose(self) -> None:
        """Close every connection; a later call would open new ones."""
        pools, self._pools = self._pools, {}
        self._heads.clear()
        for pool in pools.values():
            await pool.aclose()


class SSEStream:
    """The ``data`` of each event of a streamed answer, in order, until the body ends.

    A wait for more bytes that outlives ``timeout_s`` raises UpstreamError(kind="timeout");
    a connection that breaks raises kind="stream_cut". When the body ends the iteration
    stops: whether an end marker came first is the provider's to judge (:meth:`cut`).
    """

    __slots__ = ("_client", "_eof", "_parser", "_pending", "_resp", "_timeout_s")

    def __init__(self, client: UpstreamClient, resp: Response, timeout_s: float):
        self._client = client
        self._resp = resp
        self._timeout_s = timeout_s
        self._parser = SSEParser()
        self._pending: deque[bytes] = deque()
        self._eof = False

    def __aiter__(self) -> SSEStream:
        return self

    async def __anext__(self) -> bytes:
        pending = self._pending
        while not pending:
            if self._eof:
                raise StopAsyncIteration
            await self._read()
        return pending.popleft()

    async def _read(self) -> None:
        """Parse what has arrived, waiting (at most ``timeout_s``) only when nothing has."""
        content = self._resp
        try:
            data = content.read_nowait()
            if not data and not content.at_eof():
                async with asyncio.timeout(self._timeout_s):
                    data = await content.readany()
        except TimeoutError as exc:
            raise self._client.error(
                f"no stream event within {self._timeout_s:g} s", kind="timeout"
            ) from exc
        except (WireError, OSError) as exc:
            raise self._client.error(
                f"the stream broke: {describe(exc, with_type=True)}", kind="stream_cut"
            ) from exc
        try:
            if data:
                self._pending.extend(self._parser.feed(data))
            else:
                self._eof = True
                self._pending.extend(self._parser.close())
        except ValueError as exc:
            raise self._client.malformed(str(exc)) from exc

    def cut(self) -> UpstreamError:
        """The error for a body that ended before the protocol's end marker."""
        return self._client.error("the stream ended before its end marker", kind="stream_cut")

    def malformed(self, reason: str) -> UpstreamError:
        return self._client.malformed(reason)

    def error(self, reason: str, *, status: int | None, transient: bool) -> UpstreamError:
        """An error the upstream reported inside the stream."""
        return self._client.error(reason, kind="http", status=status, transient=transient)

    async def finish(self) -> None:
        """After the end marker: read to the body's end, then give the connection back.

        Whatever is left must come within a second and 64 KiB; otherwise, or if it
        breaks, the connection is closed instead. Nothing is raised.
        """
        resp = self._resp
        left = DRAIN_MAX_BYTES
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while left > 0 and (data := await resp.readany()):
                    left -= len(data)
        except (TimeoutError, WireError, OSError):
            resp.close()
            return
        if resp.at_eof():
            resp.release()
        else:
            resp.close()

    def close(self) -> None:
        """Close the connection at once (a no-op after :meth:`finish`)."""
        self._resp.close()


class SSEParser:
    """The ``data`` of each server-sent event, from bytes fed in arbitrary pieces."""

    __slots__ = ("_data", "_skip_lf", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[bytes] = []
        self._skip_lf = False

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events that ``chunk`` completes.

        Raises:
            ValueError: a line longer than 16 MiB.
        """
        if self._skip_lf:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if self._tail:
            chunk = self._tail + chunk
            self._tail = b""
        if not chunk:
            return []
        lines = chunk.splitlines()
        last = chunk[-1]
        if last == 0x0A or last == 0x0D:
            self._skip_lf = last == 0x0D  # a "\n" may follow in the next piece
        else:
            self._tail = lines.pop()
            if len(self._tail) > MAX_LINE_BYTES:
                raise ValueError("a stream line over 16 MiB")
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    event = data[0] if len(data) == 1 else b"\n".join(data)
                    if event:  # an event whose data is empty is not dispatched
                        events.append(event)
                    data.clear()
            elif line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
        return events

    def close(self) -> list[bytes]:
        """At the body's end: the event left unterminated, if any."""
        return self.feed(b"\n\n")


# -- helpers ------------------------------------------------------------------------


def retry_after_s(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the upstream asks to wait, from its headers; None when it says nothing.

    ``retry-after-ms`` first, then ``Retry-After`` (seconds or an HTTP date, against the
    wall-clock ``now``), then OpenAI's ``x-ratelimit-reset-{requests,tokens}`` (``6m0s``)
    of the limits whose ``x-ratelimit-remaining-*`` is 0, the longest.
    """
    value = headers.get("retry-after-ms")
    if value and (seconds := _number(value)) is not None:
        return seconds / 1000.0
    value = headers.get("retry-after")
    if value:
        seconds = _number(value)
        if seconds is not None:
            return seconds
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            pass
        else:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, when.timestamp() - now)
    waits = [
        seconds
        for limit in ("requests", "tokens")
        if headers.get(f"x-ratelimit-remaining-{limit}") == "0"
        and (seconds := _duration_s(headers.get(f"x-ratelimit-reset-{limit}"))) is not None
    ]
    return max(waits) if waits else None


def _number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return max(0.0, number) if math.isfinite(number) else None


def _duration_s(value: str | None) -> float | None:
    """``1h2m3.5s``, ``20ms``, ``6m0s`` in seconds; None when it is not such a duration."""
    if not value or not _DURATION.fullmatch(value):
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))


def error_message(raw: bytes) -> str:
    """The upstream's own error message from an error body, folded and cut short.

    Understands ``{"error": {"type", "message"}}`` (OpenAI, Anthropic),
    ``{"error": "..."}``, ``{"message": ...}`` and ``{"detail": ...}``; any other body
    is quoted as it came.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _excerpt(raw)
    text = None
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            message = error.get("message") or error.get("detail")
            kind = error.get("type") or error.get("code")
            if isinstance(message, str):
                text = f"{kind}: {message}" if isinstance(kind, str) and kind else message
        elif isinstance(error, str):
            text = error
    elif isinstance(data, str):
        text = data
    if text is None:
        return _excerpt(raw)
    return _fold(text)


def _excerpt(raw: bytes) -> str:
    return _fold(raw[: MESSAGE_MAX_CHARS * 4].decode("utf-8", "replace"))


def _fold(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_MAX_CHARS else text[:MESSAGE_MAX_CHARS] + "…"
