"""A lean HTTP/1.1 client for the gateway's upstream calls: pooled, keep-alive, no frills.

Why not aiohttp here: measured on the gateway's hot path, aiohttp's client was a third
of the gateway's CPU per call (request objects, multidicts, URL objects, tracing hooks,
payload registries), which alone broke the "≤ 1 ms added" target. This client does only
what an LLM upstream needs: ``POST`` a JSON body with headers built once, read the
status, headers and body (whole, or piece by piece for server-sent events), reuse the
connection. Parsing is httptools (the C parser uvicorn uses); TLS is asyncio's.

Rules:

- One :class:`Pool` per upstream origin (scheme, host, port), at most
  ``max_connections`` open; a caller beyond that waits for one to come back.
- A connection goes back to the pool only when its answer was read to the end and both
  sides allow keep-alive; an idle one is dropped after ``keepalive_s``.
- A reused connection the server had closed while idle (the request meets a closed
  socket before any byte of an answer) is retried once on a new connection: the server
  never saw the request. Any other failure is the caller's.
- No redirects, no cookies, no compression (no ``Accept-Encoding`` is sent, so the
  body comes as is), no proxies.
- Errors: :class:`WireError` for a broken or unparsable exchange; ``OSError`` for
  connect failures. Timeouts are the caller's (``asyncio.timeout``).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from urllib.parse import urlsplit

import httptools

__all__ = ["Pool", "Response", "WireError"]

_MAX_BUFFER = 1 << 20  # pause reading beyond this many unread body bytes


class WireError(Exception):
    """The exchange broke: the connection closed early, or the answer could not be parsed."""

    def __init__(self, message: str, *, started: bool = True) -> None:
        super().__init__(message)
        self.started = started  # whether any byte of an answer had arrived


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.error: WireError | None = None
        self.received = False
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(WireError(f"the upstream's answer is not valid HTTP: {exc}"))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete and self.error is None:
            reason = f": {exc}" if exc else ""
            self._fail(
                WireError(
                    f"the connection closed before the answer ended{reason}", started=self.received
                )
            )
        self._wake()

    # -- httptools callbacks -------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.keep_alive = self._parser.should_keep_alive()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > _MAX_BUFFER and not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- for the pool and the response ------------------------------------------------------------

    def _fail(self, error: WireError) -> None:
        if self.error is None:
            self.error = error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something happens: headers, body bytes, the end, or a failure."""
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self) -> bytes:
        if not self.body:
            return b""
        data = self.body.popleft() if len(self.body) == 1 else b"".join(self.body)
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False
        return data

    def send(self, data: bytes) -> None:
        self._reset()
        if self.transport is None or self.closed:
            raise WireError("the connection is closed", started=False)
        self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Response:
    """An answer whose status and headers have arrived; the body is read from it."""

    __slots__ = ("_conn", "_done", "_pool", "headers", "status")

    def __init__(self, pool: Pool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self._done = False
        self.status = conn.status
        headers: dict[str, str] = {}
        for name, value in conn.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self.headers = headers

    def at_eof(self) -> bool:
        conn = self._conn
        return (conn.complete or conn.closed) and not conn.body

    def read_nowait(self) -> bytes:
        """The body bytes that have arrived and not been read."""
        return self._conn.take()

    async def readany(self) -> bytes:
        """The next body bytes, waiting for some; ``b""`` once the body has ended."""
        conn = self._conn
        while not conn.body:
            if conn.complete:
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()
        return conn.take()

    async def read(self) -> bytes:
        """The whole body, then the connection goes back to the pool."""
        conn = self._conn
        while not conn.complete:
            if conn.error is not None:
                self.close()
                raise conn.error
            await conn.wait()
        data = conn.take()
        self.release()
        return data

    def release(self) -> None:
        """Give the connection back if the body was read whole; else close it."""
        if self._done:
            return
        conn = self._conn
        if conn.complete and conn.keep_alive and not conn.closed and not conn.body:
            self._done = True
            self._pool._give_back(conn)
        else:
            self.close()

    def close(self) -> None:
        """Close the connection, unless it already went back to the pool."""
        if self._done:
            return
        self._done = True
        self._conn.abort()
        self._pool._forget(self._conn)


class Pool:
    """Keep-alive connections to one origin (``scheme://host:port`` of ``base_url``)."""

    def __init__(self, base_url: str, *, max_connections: int = 256, keepalive_s: float = 30.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        default = (parts.scheme == "https" and self.port == 443) or self.port == 80
        self.authority = self.host if default else f"{self.host}:{self.port}"
        self._max = max_connections
        self._keepalive_s = keepalive_s
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._all: set[_Connection] = set()

    def head(self, method: str, path: str, headers: dict[str, str]) -> bytes:
        """The request head for ``path``, without Content-Length (added per request)."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode("latin-1")

    async def send(self, head: bytes, body: bytes) -> Response:
        """Send a request (``head`` from :meth:`head`) and wait for the answer's headers."""
        data = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        conn = await self._acquire()
        try:
            return await self._exchange(conn, data)
        except WireError as exc:
            if not (conn.reused and not exc.started):
                raise
        # The server had closed the idle connection: it never saw this request.
        return await self._exchange(await self._connect(), data)

    async def _exchange(self, conn: _Connection, data: bytes) -> Response:
        try:
            conn.send(data)
            while not conn.headers_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait()
        except BaseException:
            conn.abort()
            self._forget(conn)
            raise
        return Response(self, conn)

    async def _acquire(self) -> _Connection:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recent: the least likely to be stale
            if conn.closed or now - conn.idle_since > self._keepalive_s:
                conn.abort()
                self._forget(conn)
                continue
            conn.reused = True
            return conn
        while self._open >= self._max:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            if self._idle:
                return await self._acquire()
        return await self._connect()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        self._open += 1
        try:
            _transport, conn = await loop.create_connection(
                lambda: _Connection(loop),
                self.host,
                self.port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        except BaseException:
            self._open -= 1
            self._notify()
            raise
        self._all.add(conn)
        return conn

    def _give_back(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._notify()

    def _forget(self, conn: _Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            self._open -= 1
            self._notify()

    def _notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        """Close every connection, idle or in use."""
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
        self._open = 0
        await asyncio.sleep(0)  # let the transports run their connection_lost
