"""A fake LLM upstream for tests and benchmarks: OpenAI's and Anthropic's APIs on loopback.

One server acts as many deployments: every path starts with a deployment's name, so a
gateway deployment's ``base_url`` is ``fake.base_url(name)`` = ``{url}/{name}/v1`` for
OpenAI, and ``fake.anthropic_url(name)`` = ``{url}/{name}`` for Anthropic (whose client
appends ``/v1/messages``). Each deployment answers::

    POST /{name}/v1/chat/completions   OpenAI chat completion; SSE with "stream": true
    POST /{name}/v1/embeddings         hashed bag-of-words vectors, float or base64
    GET  /{name}/v1/models             the OpenAI model list
    POST /{name}/v1/messages           Anthropic Messages API; SSE with "stream": true

Answers are deterministic. The text is ``"echo: " + the last user message`` (or a fault's
``text``) as words joined by single spaces, cut before the first stop sequence and after
``max_tokens`` words (finish ``length`` / ``max_tokens``). Tokens are words: the prompt
counts the words of every message (and Anthropic's ``system``) plus 3 per message, the
completion the words of the answer. With ``tools`` and a last user message ``call: REST``
the answer is one call of the first tool with arguments ``{"q": REST}``. Embeddings are
:func:`embed`: texts sharing most words are close, identical texts equal.

What a request meets is a :class:`Fault`: the next one of the deployment's
:meth:`~FakeUpstream.script` (consumed one per request, in arrival order), else the
deployment's :meth:`~FakeUpstream.set_default`, else the server's ``default`` (no fault).
A request the fake refuses on its own (a wrong key, a missing Anthropic header, a body it
cannot answer, an unknown path) gets its 4xx and consumes no fault.

Every request is counted, and kept as a :class:`Recorded` unless ``record=False`` (the
benchmark's choice: records grow without bound). The control methods take a lock and can
be called from any thread; the server runs on its own event loop in a daemon thread::

    with FakeUpstream() as fake:
        fake.script("d1", Fault(status=503), Fault(hang=True))

Another process drives it over HTTP: ``POST /_fake/script`` ``{"deployment", "faults"}``,
``POST /_fake/default`` ``{"deployment", "fault"}``, ``POST /_fake/require_key``
``{"deployment", "key"}``, ``POST /_fake/reset`` and ``GET /_fake/count?deployment=NAME``
(``&path_suffix=...``). ``python tests/llm/upstream.py --port P [--latency-ms X]`` serves
in the foreground (on uvloop when installed) and prints ``ready http://127.0.0.1:P`` once
listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import math
import re
import signal
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web

__all__ = ["DIMENSIONS", "FakeUpstream", "Fault", "Recorded", "embed"]

DIMENSIONS = 64
"""The embeddings' default dimension (a request's ``dimensions`` overrides it)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """What one request meets; the default, ``Fault()``, is a normal answer.

    ``hang`` never answers (the handler is released when the client leaves or the
    server stops); ``hold`` waits for :meth:`FakeUpstream.release` first. Otherwise
    ``latency_ms`` passes before anything is sent; then a ``status`` answers with an
    error in the route's shape (``error_body`` replaces it), ``malformed`` answers 200
    with a body that does not parse, and a normal answer uses ``text`` instead of the
    echo. For streams, ``first_token_delay_ms`` passes before the first content event
    (after OpenAI's role chunk, or Anthropic's ``message_start``, ``content_block_start``
    and ``ping``), ``chunk_delay_ms`` before each later event, and ``cut_after_chunks``
    closes the connection after that many SSE events, never sending the terminator
    (``[DONE]`` or ``message_stop``). ``retry_after`` is sent as the Retry-After header
    with whatever the answer is.
    """

    latency_ms: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    hang: bool = False
    hold: bool = False
    malformed: bool = False
    cut_after_chunks: int | None = None
    first_token_delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    text: str | None = None
    error_body: dict[str, Any] | None = None

    @classmethod
    def ok(cls) -> Fault:
        """A normal answer (useful in a script between faults)."""
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        """A fault from its JSON form (the control API); unknown fields are refused."""
        unknown = set(data) - _FAULT_FIELDS
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, with only the fields that differ from the default."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != f.default
        }


_FAULT_FIELDS = frozenset(f.name for f in fields(Fault))
_NO_FAULT = Fault()


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as it arrived: ``headers`` lower-cased, ``json`` None when not JSON."""

    path: str
    method: str
    headers: dict[str, str]
    json: Any
    at: float
    """``time.monotonic()`` at arrival."""


@dataclass(slots=True)
class _Deployment:
    script: deque[Fault] = field(default_factory=deque)
    default: Fault | None = None
    key: str | None = None
    records: list[Recorded] = field(default_factory=list)
    paths: Counter[str] = field(default_factory=Counter)
    total: int = 0


# -- embeddings ------------------------------------------------------------------------

_PUNCTUATION = re.compile(r"[^\w\s]")


@lru_cache(maxsize=65536)
def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def embed(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """The fake's embedding of ``text``: an L2-normalised hashed bag of words.

    Each lower-cased word, punctuation stripped, adds ±1.0 at ``blake2b(word) % dimensions``
    (the sign is bit 32 of the same hash). A text without words is the zero vector.
    """
    vector = [0.0] * dimensions
    for word in _PUNCTUATION.sub("", text.lower()).split():
        h = _word_hash(word)
        vector[h % dimensions] += -1.0 if (h >> 32) & 1 else 1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


def _base64_floats(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# -- answers ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Answer:
    words: list[str]
    finish: str  # stop | length | stop_sequence | tool
    stop_sequence: str | None
    tool: tuple[str, str] | None  # (tool name, arguments as JSON)
    prompt_tokens: int
    completion_tokens: int


_OPENAI_FINISH = {"stop": "stop", "length": "length", "stop_sequence": "stop", "tool": "tool_calls"}
_ANTHROPIC_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool": "tool_use",
}


def _text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def _answer(body: dict[str, Any], fault: Fault, *, anthropic: bool) -> _Answer:
    messages: list[dict[str, Any]] = body["messages"]
    prompt_tokens = sum(len(_text(m.get("content")).split()) + 3 for m in messages)
    system = _text(body.get("system")) if anthropic else ""
    if system:
        prompt_tokens += len(system.split()) + 3
    last = next(
        (_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )

    tools = body.get("tools")
    if (
        tools
        and isinstance(tools, list)
        and isinstance(tools[0], dict)
        and last.startswith("call:")
    ):
        spec = tools[0].get("function", tools[0])
        name = str(spec.get("name", "tool")) if isinstance(spec, dict) else "tool"
        query = last[len("call:") :].strip()
        arguments = orjson.dumps({"q": query}).decode()
        return _Answer([], "tool", None, (name, arguments), prompt_tokens, len(query.split()) + 1)

    text = fault.text if fault.text is not None else f"echo: {last}"
    finish, stop_sequence = "stop", None
    stops = body.get("stop_sequences" if anthropic else "stop")
    if isinstance(stops, str):
        stops = [stops]
    if isinstance(stops, list):
        hits = [(text.find(s), s) for s in stops if isinstance(s, str) and s and s in text]
        if hits:
            at, stop_sequence = min(hits)
            text, finish = text[:at], "stop_sequence"
    words = text.split()
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    if isinstance(limit, int) and 0 <= limit < len(words):
        words, finish, stop_sequence = words[:limit], "length", None
    return _Answer(words, finish, stop_sequence, None, prompt_tokens, len(words))


def _pieces(words: list[str]) -> list[str]:
    """The stream's deltas: each word with a space after it, except the last."""
    return [w + " " for w in words[:-1]] + words[-1:]


def _json_pieces(arguments: str, size: int = 8) -> list[str]:
    return [arguments[i : i + size] for i in range(0, len(arguments), size)]


# -- errors ----------------------------------------------------------------------------

_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
_JSON = "application/json"
_MALFORMED_JSON = b'{"choices": ['
_MALFORMED_EVENT = b'data: {"choices": [\n\n'


def _openai_error(status: int, message: str) -> dict[str, Any]:
    if status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error(
    status: int, message: str, *, anthropic: bool, headers: dict[str, str] | None = None
) -> web.Response:
    body = _anthropic_error(status, message) if anthropic else _openai_error(status, message)
    return web.Response(status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers)


def _invalid(kind: str, body: Any) -> str | None:
    """Why the fake cannot answer this body, or None when it can."""
    if kind == "models":
        return None
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    if kind == "embeddings":
        given = body.get("input")
        if isinstance(given, str) or (
            isinstance(given, list) and given and all(isinstance(t, str) for t in given)
        ):
            return None
        return "'input' must be a string or a non-empty list of strings"
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
        return "'messages' must be a non-empty list of objects"
    if kind == "messages" and not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    return None


# -- the server ------------------------------------------------------------------------

_ROUTES = {
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/embeddings"): "embeddings",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/messages"): "messages",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class FakeUpstream:
    """The fake upstream server; ``start()``/``stop()`` or ``with``, or ``serve()`` on a loop.

    ``port`` 0 takes a free port (read ``.port`` or ``.url`` after start). ``default`` is
    the fault for deployments without a default of their own (the CLI's ``--latency-ms``).
    ``models`` are the ids ``GET /{name}/v1/models`` lists.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        default: Fault | None = None,
        record: bool = True,
        models: Iterable[str] = ("fake-model",),
    ) -> None:
        self.port = port
        self._fallback = default or _NO_FAULT
        self._record = record
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in models
                ],
            }
        )
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._deployments: dict[str, _Deployment] = {}
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._released: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, deployment: str) -> str:
        """The OpenAI ``base_url`` of a deployment: ``{url}/{deployment}/v1``."""
        return f"{self.url}/{deployment}/v1"

    def anthropic_url(self, deployment: str) -> str:
        """The Anthropic base URL of a deployment: ``{url}/{deployment}``."""
        return f"{self.url}/{deployment}"

    # -- running -----------------------------------------------------------------------
    def start(self) -> Self:
        """Serve in a daemon thread on its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("the fake upstream is already running")
        self._ready.clear()
        self._failure = None
        self._thread = threading.Thread(target=self._run, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("the fake upstream did not start")
        if self._failure is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("the fake upstream did not start") from self._failure
        return self

    def stop(self) -> None:
        """Stop serving: hanging requests are released, open connections closed."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(self._request_stop)
        thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self.serve())
        except Exception as exc:  # reported by start(); after start there is no one to tell
            self._failure = exc
            self._ready.set()

    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve on the running loop until :meth:`stop` (or the CLI's signal)."""
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._closing = asyncio.Event()
        self._released = asyncio.Event()
        server = web.Server(self._handle, handler_cancellation=True, access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.port = int(runner.addresses[0][1])
            self._ready.set()
            if on_ready is not None:
                on_ready(self.url)
            await self._stop.wait()
        finally:
            self._closing.set()
            self._released.set()
            await runner.cleanup()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    # -- control -----------------------------------------------------------------------
    def _deployment(self, name: str) -> _Deployment:
        dep = self._deployments.get(name)
        if dep is None:
            dep = self._deployments[name] = _Deployment()
        return dep

    def script(self, deployment: str, *faults: Fault) -> None:
        """Queue faults for the deployment's next requests, one per request, in order."""
        with self._lock:
            self._deployment(deployment).script.extend(faults)

    def set_default(self, deployment: str, fault: Fault | None) -> None:
        """What the deployment's requests meet once its script is spent (None: no fault)."""
        with self._lock:
            self._deployment(deployment).default = fault

    def require_key(self, deployment: str, key: str | None) -> None:
        """Refuse the deployment's requests without this key (None: accept any)."""
        with self._lock:
            self._deployment(deployment).key = key

    def reset(self) -> None:
        """Forget every deployment's script, default, key, records and counts; hold again."""
        with self._lock:
            self._deployments.clear()
        self._call_soon(lambda released: released.clear())

    def release(self) -> None:
        """Let the requests held by ``Fault(hold=True)`` answer (and the next ones too,
        until :meth:`reset`)."""
        self._call_soon(lambda released: released.set())

    def _call_soon(self, fn: Callable[[asyncio.Event], None]) -> None:
        loop, released = self._loop, self._released
        if loop is not None and released is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(fn, released)

    def requests(self, deployment: str) -> list[Recorded]:
        """The deployment's requests so far, in arrival order (empty with record=False)."""
        with self._lock:
            dep = self._deployments.get(deployment)
            return list(dep.records) if dep else []

    def count(self, deployment: str, path_suffix: str | None = None) -> int:
        """How many requests the deployment received (whose path ends with the suffix)."""
        with self._lock:
            return self._count(deployment, path_suffix)

    def _count(self, deployment: str, path_suffix: str | None) -> int:
        dep = self._deployments.get(deployment)
        if dep is None:
            return 0
        if path_suffix is None:
            return dep.total
        return sum(n for path, n in dep.paths.items() if path.endswith(path_suffix))

    def wait_for_count(self, deployment: str, n: int, timeout: float = 5.0) -> bool:
        """Block until the deployment has received ``n`` requests; False on timeout."""
        with self._arrived:
            return self._arrived.wait_for(lambda: self._count(deployment, None) >= n, timeout)

    # -- requests ----------------------------------------------------------------------
    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        name, _, rest = path[1:].partition("/")
        rest = "/" + rest
        if name == "_fake":
            return await self._control(request, rest)
        kind = _ROUTES.get((request.method, rest))
        anthropic = rest == "/v1/messages"
        body: Any = None
        if request.body_exists:
            with contextlib.suppress(orjson.JSONDecodeError):
                body = orjson.loads(await request.read())
        headers = request.headers
        with self._lock:
            dep = self._deployment(name)
            dep.total += 1
            dep.paths[path] += 1
            if self._record:
                lowered = {k.lower(): v for k, v in headers.items()}
                dep.records.append(Recorded(path, request.method, lowered, body, time.monotonic()))
            self._arrived.notify_all()
            refusal = self._refusal(dep.key, kind, body, headers, anthropic)
            if refusal is not None:
                return refusal
            fault = dep.script.popleft() if dep.script else dep.default or self._fallback
        retry = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None

        if fault.hang:
            assert self._closing is not None
            await self._closing.wait()
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        if fault.hold:
            assert self._released is not None
            await self._released.wait()
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        if fault.status is not None:
            if fault.error_body is not None:
                return web.Response(
                    status=fault.status,
                    body=orjson.dumps(fault.error_body),
                    content_type=_JSON,
                    headers=retry,
                )
            return _error(fault.status, "injected fault", anthropic=anthropic, headers=retry)
        stream = kind in ("chat", "messages") and body.get("stream") is True
        if fault.malformed:
            if stream:
                return web.Response(
                    body=_MALFORMED_EVENT, headers={**_SSE_HEADERS, **(retry or {})}
                )
            return web.Response(body=_MALFORMED_JSON, content_type=_JSON, headers=retry)

        if kind == "models":
            return web.Response(body=self._models_body, content_type=_JSON, headers=retry)
        if kind == "embeddings":
            return web.Response(body=_embeddings(body), content_type=_JSON, headers=retry)
        answer = _answer(body, fault, anthropic=anthropic)
        number = next(self._ids)
        if kind == "messages":
            if stream:
                events, first = _anthropic_events(body, answer, number)
                return await _send(request, events, first, fault, retry)
            return web.Response(
                body=_anthropic_message(body, answer, number), content_type=_JSON, headers=retry
            )
        if stream:
            events, first = _openai_events(body, answer, number)
            return await _send(request, events, first, fault, retry)
        return web.Response(
            body=_openai_completion(body, answer, number), content_type=_JSON, headers=retry
        )

    @staticmethod
    def _refusal(
        key: str | None, kind: str | None, body: Any, headers: Any, anthropic: bool
    ) -> web.Response | None:
        """The answer to a request the fake refuses on its own, or None."""
        if kind is None:
            return _error(404, "unknown path", anthropic=False)
        if anthropic:
            given = headers.get("x-api-key")
            if not given:
                return _error(401, "x-api-key header is required", anthropic=True)
            if key is not None and given != key:
                return _error(401, "invalid x-api-key", anthropic=True)
            if not headers.get("anthropic-version"):
                return _error(400, "anthropic-version: header is required", anthropic=True)
        elif key is not None and headers.get("Authorization") != f"Bearer {key}":
            return _error(401, "Incorrect API key provided.", anthropic=False)
        reason = _invalid(kind, body)
        return None if reason is None else _error(400, reason, anthropic=anthropic)

    async def _control(self, request: web.BaseRequest, action: str) -> web.Response:
        try:
            if request.method == "GET" and action == "/count":
                query = request.query
                n = self.count(query["deployment"], query.get("path_suffix"))
                return web.Response(body=orjson.dumps({"count": n}), content_type=_JSON)
            if request.method != "POST":
                return web.Response(status=404)
            body: dict[str, Any] = orjson.loads(await request.read() or b"{}")
            if action == "/script":
                faults = [Fault.from_dict(f) for f in body.get("faults", [])]
                self.script(body["deployment"], *faults)
            elif action == "/default":
                given = body.get("fault")
                self.set_default(body["deployment"], Fault.from_dict(given) if given else None)
            elif action == "/require_key":
                self.require_key(body["deployment"], body.get("key"))
            elif action == "/reset":
                self.reset()
            else:
                return web.Response(status=404)
        except (KeyError, TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            return web.Response(
                status=400, body=orjson.dumps({"error": repr(exc)}), content_type=_JSON
            )
        return web.Response(body=b'{"ok":true}', content_type=_JSON)


# -- wire shapes -----------------------------------------------------------------------


def _embeddings(body: dict[str, Any]) -> bytes:
    given = body["input"]
    texts: list[str] = [given] if isinstance(given, str) else given
    dimensions = body.get("dimensions")
    if not (isinstance(dimensions, int) and 0 < dimensions <= 4096):
        dimensions = DIMENSIONS
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for i, text in enumerate(texts):
        vector = embed(text, dimensions)
        encoded: Any = _base64_floats(vector) if as_base64 else vector
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = sum(len(t.split()) for t in texts)
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": body.get("model", ""),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def _openai_usage(answer: _Answer) -> dict[str, int]:
    p, c = answer.prompt_tokens, answer.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _tool_call(answer: _Answer, number: int) -> dict[str, Any]:
    assert answer.tool is not None
    name, arguments = answer.tool
    return {
        "id": f"call_{number:012x}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def _openai_completion(body: dict[str, Any], answer: _Answer, number: int) -> bytes:
    message: dict[str, Any]
    if answer.tool is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(answer, number)]}
    else:
        message = {"role": "assistant", "content": " ".join(answer.words)}
    return orjson.dumps(
        {
            "id": f"chatcmpl-{number:012x}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", ""),
            "choices": [
                {"index": 0, "message": message, "finish_reason": _OPENAI_FINISH[answer.finish]}
            ],
            "usage": _openai_usage(answer),
        }
    )


def _openai_events(body: dict[str, Any], answer: _Answer, number: int) -> tuple[list[bytes], int]:
    """The SSE events of a streamed completion, and the index of the first content one."""
    created, model = int(time.time()), body.get("model", "")
    head = {"id": f"chatcmpl-{number:012x}", "object": "chat.completion.chunk"}
    prefix = b"data: " + orjson.dumps({**head, "created": created, "model": model})[:-1]
    open_delta, close_delta = b',"choices":[{"index":0,"delta":', b',"finish_reason":null}]}\n\n'

    def chunk(delta: dict[str, Any]) -> bytes:
        return prefix + open_delta + orjson.dumps(delta) + close_delta

    if answer.tool is not None:
        call = _tool_call(answer, number)
        arguments = call["function"]["arguments"]
        call["function"] = {"name": call["function"]["name"], "arguments": ""}
        events = [
            chunk({"role": "assistant", "content": None, "tool_calls": [{"index": 0, **call}]})
        ]
        events += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in _json_pieces(arguments)
        ]
    else:
        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": piece}) for piece in _pieces(answer.words)]
    finish = orjson.dumps(_OPENAI_FINISH[answer.finish])
    events.append(prefix + open_delta + b'{},"finish_reason":' + finish + b"}]}\n\n")
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        usage = orjson.dumps(_openai_usage(answer))
        events.append(prefix + b',"choices":[],"usage":' + usage + b"}\n\n")
    events.append(b"data: [DONE]\n\n")
    return events, 1


def _anthropic_content(answer: _Answer, number: int) -> dict[str, Any]:
    if answer.tool is not None:
        name, arguments = answer.tool
        return {
            "type": "tool_use",
            "id": f"toolu_{number:012x}",
            "name": name,
            "input": orjson.loads(arguments),
        }
    return {"type": "text", "text": " ".join(answer.words)}


def _anthropic_message(body: dict[str, Any], answer: _Answer, number: int) -> bytes:
    return orjson.dumps(
        {
            "id": f"msg_{number:012x}",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "content": [_anthropic_content(answer, number)],
            "stop_reason": _ANTHROPIC_STOP[answer.finish],
            "stop_sequence": answer.stop_sequence,
            "usage": {
                "input_tokens": answer.prompt_tokens,
                "output_tokens": answer.completion_tokens,
            },
        }
    )


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def _anthropic_events(
    body: dict[str, Any], answer: _Answer, number: int
) -> tuple[list[bytes], int]:
    """The SSE events of a streamed message, and the index of the first content one."""
    message = {
        "id": f"msg_{number:012x}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": 1},
    }
    block = _anthropic_content(answer, number)
    if answer.tool is not None:
        deltas = [
            {"type": "input_json_delta", "partial_json": piece}
            for piece in _json_pieces(answer.tool[1])
        ]
        block["input"] = {}
    else:
        deltas = [{"type": "text_delta", "text": piece} for piece in _pieces(answer.words)]
        block["text"] = ""
    events = [
        _event("message_start", {"type": "message_start", "message": message}),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": block},
        ),
        _event("ping", {"type": "ping"}),
    ]
    events += [
        _event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": d})
        for d in deltas
    ]
    events += [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": _ANTHROPIC_STOP[answer.finish],
                    "stop_sequence": answer.stop_sequence,
                },
                "usage": {"output_tokens": answer.completion_tokens},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return events, 3


async def _send(
    request: web.BaseRequest,
    events: Sequence[bytes],
    first: int,
    fault: Fault,
    retry: dict[str, str] | None,
) -> web.StreamResponse:
    """Stream the events with the fault's delays, or cut the connection after some."""
    response = web.StreamResponse(headers={**_SSE_HEADERS, **(retry or {})})
    cut = fault.cut_after_chunks
    end = len(events) if cut is None else max(0, min(cut, len(events) - 1))
    try:
        await response.prepare(request)
        if not (fault.chunk_delay_ms or fault.first_token_delay_ms):
            if end:
                await response.write(b"".join(events[:end]))
        else:
            for i in range(end):
                delay = fault.chunk_delay_ms if i else 0.0
                if i == first:
                    delay = max(delay, fault.first_token_delay_ms)
                if delay:
                    await asyncio.sleep(delay / 1000)
                await response.write(events[i])
    except ConnectionError:  # the client left; aiohttp ends the exchange quietly
        return response
    if cut is not None and request.transport is not None:
        # Flush what was written, then close without the chunked body's terminator.
        request.transport.close()
    return response


# -- command line ----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake LLM upstream on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="before every answer")
    parser.add_argument("--record", action="store_true", help="keep every request in memory")
    args = parser.parse_args(argv)
    fake = FakeUpstream(args.port, default=Fault(latency_ms=args.latency_ms), record=args.record)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fake._request_stop)
        await fake.serve(on_ready=lambda url: print(f"ready {url}", flush=True))

    try:
        import uvloop
    except ImportError:
        asyncio.run(run())
    else:
        uvloop.run(run())


if __name__ == "__main__":
    main()
