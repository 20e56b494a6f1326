"""The provider for Anthropic's Messages API, translated to and from OpenAI's shape.

Requests go to ``{base_url}/v1/messages`` with ``x-api-key`` and ``anthropic-version``
(the deployment's ``api_version``, else ``2023-06-01``). The translation:

- request: ``system`` (and ``developer``) messages become ``system``; ``tool`` messages
  become ``tool_result`` blocks of a user turn (consecutive turns of one role merge);
  an assistant's ``tool_calls`` become ``tool_use`` blocks; ``image_url`` parts become
  image blocks (``data:`` URLs as base64). ``max_completion_tokens`` or ``max_tokens``
  (else 4096, Anthropic requires one), ``temperature``, ``top_p``, ``stop`` (as
  ``stop_sequences``), ``user`` (as ``metadata.user_id``), function ``tools`` (their
  ``parameters`` as ``input_schema``), ``tool_choice`` and ``parallel_tool_calls``
  carry over; parameters Anthropic lacks (penalties, ``seed``, ``logprobs``,
  ``response_format``…) are dropped. ``n`` above 1 is refused.
- answer: text blocks joined are the message's ``content``; ``tool_use`` blocks are its
  ``tool_calls`` (``arguments`` a JSON string); ``stop_reason`` maps to
  ``finish_reason`` (end_turn, stop_sequence → stop; max_tokens → length; tool_use →
  tool_calls; refusal → content_filter); input (with cache) and output tokens are the
  usage. ``id`` and ``model`` are the upstream's, ``created`` the local time.
- stream: a role chunk first, text deltas as content deltas, ``tool_use`` starts and
  ``input_json_delta`` as ``tool_calls`` deltas, the ``message_delta``'s stop reason
  as a finish chunk, and at ``message_stop`` a usage chunk with ``choices: []``. An
  ``error`` event raises UpstreamError with its type (overloaded and api errors are
  transient); a stream that ends before ``message_stop`` raises kind="stream_cut".

A request that cannot be translated (say, tool arguments that are not JSON) raises
UpstreamError(status=400, transient=False). Anthropic has no embeddings API: asking
for one raises the same.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Self

import orjson

from interlock.errors import UpstreamError
from interlock.llm.providers._http import UpstreamClient, error_message
from interlock.llm.types import Chunk, Reply, Usage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

    from interlock.llm.providers._http import SSEStream
    from interlock.settings import LLMDeployment

__all__ = ["DEFAULT_MAX_TOKENS", "DEFAULT_VERSION", "AnthropicProvider"]

DEFAULT_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096

_FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}


class _TranslationError(Exception):
    """A request that has no Anthropic equivalent."""


class AnthropicProvider:
    """One deployment on Anthropic's Messages API, spoken to in OpenAI's shape."""

    def __init__(self, deployment: LLMDeployment, *, api_key: str | None) -> None:
        self.deployment = deployment.name
        self.base_url = deployment.base_url.rstrip("/")
        self._model = deployment.model
        headers = {"anthropic-version": deployment.api_version or DEFAULT_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        self._url = f"{self.base_url}/v1/messages"
        self._http = UpstreamClient(deployment, headers=headers, secret=api_key)

    def __repr__(self) -> str:
        return f"AnthropicProvider({self.deployment!r}, base_url={self.base_url!r})"

    async def chat(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """A chat completion in OpenAI's shape."""
        payload = self._request(body, stream=False)
        data = await self._http.post_json(self._url, payload, timeout_s)
        if type(data) is not dict or type(data.get("content")) is not list:
            raise self._http.malformed(
                f"a message without content: {error_message(orjson.dumps(data))}"
            )
        return _completion(data, self._model)

    async def stream_chat(self, body: dict[str, Any], *, timeout_s: float) -> AsyncIterator[Chunk]:
        """OpenAI chunks as Anthropic's events come; close the iterator to drop the stream."""
        payload = self._request(body, stream=True)
        stream = await self._http.open_stream(self._url, payload, timeout_s)
        chunks = _Chunks(self._model)
        try:
            async for data in stream:
                try:
                    event = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise stream.malformed(f"a stream event is not JSON: {data[:200]!r}") from None
                if type(event) is not dict:
                    raise stream.malformed(f"a stream event is not an object: {data[:200]!r}")
                kind = event.get("type")
                if kind == "message_stop":
                    yield chunks.usage()
                    await stream.finish()
                    return
                if kind == "error":
                    raise _stream_error(stream, event, data)
                chunk = chunks.translate(kind, event)
                if chunk is not None:
                    yield chunk
            raise stream.cut()
        finally:
            stream.close()

    async def embeddings(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """Always fails: Anthropic has no embeddings API."""
        raise self._http.error(
            "Anthropic has no embeddings API", kind="http", status=400, transient=False
        )

    def _request(self, body: dict[str, Any], *, stream: bool) -> bytes:
        try:
            return orjson.dumps(_messages_request(body, stream=stream))
        except (_TranslationError, orjson.JSONEncodeError) as exc:
            raise self._http.error(
                f"the request has no Anthropic form: {exc}",
                kind="http",
                status=400,
                transient=False,
            ) from exc

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# -- OpenAI → Anthropic ---------------------------------------------------------------


def _messages_request(body: dict[str, Any], *, stream: bool) -> dict[str, Any]:
    """The Messages API request for an OpenAI chat completion request.

    Raises:
        _TranslationError: a message or parameter that has no Anthropic form.
    """
    n = body.get("n")
    if n is not None and n != 1:
        raise _TranslationError("Anthropic answers one choice only (n must be 1)")
    system: list[dict[str, Any]] = []
    messages: list[dict[str, Any]] = []
    for message in body.get("messages") or ():
        if not isinstance(message, dict):
            raise _TranslationError("a message is not an object")
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system += _text_blocks(content)
            continue
        if role == "user":
            blocks = _blocks(content)
        elif role == "assistant":
            blocks = [block for block in _blocks(content) if block.get("text") != ""]
            blocks += [_tool_use(call) for call in message.get("tool_calls") or ()]
        elif role == "tool":
            role = "user"
            blocks = [_tool_result(message)]
        else:
            raise _TranslationError(f"a message has an unknown role {role!r}")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += blocks
        else:
            messages.append({"role": role, "content": blocks})
    out: dict[str, Any] = {
        "model": body.get("model"),
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
        "messages": messages,
    }
    if system:
        plain = len(system) == 1 and len(system[0]) == 2  # just type and text
        out["system"] = system[0]["text"] if plain else system
    for name in ("temperature", "top_p"):
        if body.get(name) is not None:
            out[name] = body[name]
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if tools:
        out["tools"] = [_tool(tool) for tool in tools]
    choice = _tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and tools:
        out["tool_choice"] = choice
    if stream:
        out["stream"] = True
    return out


def _blocks(content: Any) -> list[dict[str, Any]]:
    """Anthropic content blocks for an OpenAI message's ``content``."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _TranslationError("a message's content is neither a string nor a list of parts")
    blocks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "refusal"):
            block: dict[str, Any] = {"type": "text", "text": part.get(kind) or ""}
        elif kind == "image_url":
            block = {"type": "image", "source": _image_source(part.get("image_url"))}
        else:
            raise _TranslationError(f"a content part of type {kind!r} has no Anthropic form")
        if "cache_control" in part:
            block["cache_control"] = part["cache_control"]
        blocks.append(block)
    return blocks


def _text_blocks(content: Any) -> list[dict[str, Any]]:
    blocks = _blocks(content)
    if any(block["type"] != "text" for block in blocks):
        raise _TranslationError("a system message may hold text only")
    return [block for block in blocks if block["text"]]


def _image_source(image: Any) -> dict[str, Any]:
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _TranslationError("an image_url part without a url")
    if not url.startswith("data:"):
        return {"type": "url", "url": url}
    header, sep, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64":
        raise _TranslationError("an image data URL that is not base64")
    return {"type": "base64", "media_type": media_type, "data": data}


def _tool_use(call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise _TranslationError("a tool call without a function")
    arguments = function.get("arguments") or "{}"
    try:
        tool_input = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError:
        raise _TranslationError(
            f"the arguments of tool call {call.get('id')!r} are not JSON"
        ) from None
    if not isinstance(tool_input, dict):
        raise _TranslationError(f"the arguments of tool call {call.get('id')!r} are not an object")
    return {
        "type": "tool_use",
        "id": call.get("id"),
        "name": function.get("name"),
        "input": tool_input,
    }


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    if isinstance(content, str):
        result["content"] = content
    elif content is not None:
        result["content"] = _blocks(content)
    return result


def _tool(tool: Any) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type", "function") != "function":
        raise _TranslationError("only function tools have an Anthropic form")
    out: dict[str, Any] = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    if choice is None:
        out: dict[str, Any] | None = {"type": "auto"} if parallel is False else None
    elif isinstance(choice, str):
        if choice not in _TOOL_CHOICE:
            raise _TranslationError(f"tool_choice {choice!r} has no Anthropic form")
        out = {"type": _TOOL_CHOICE[choice]}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise _TranslationError("tool_choice has no Anthropic form")
    if out is not None and parallel is False and out["type"] != "none":
        out["disable_parallel_tool_use"] = True
    return out


# -- Anthropic → OpenAI ---------------------------------------------------------------


def _completion(data: dict[str, Any], model: str) -> Reply:
    texts = []
    calls = []
    for block in data["content"]:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": orjson.dumps(block.get("input") or {}).decode(),
                    },
                }
            )
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    usage = _usage(data.get("usage"), Usage())
    body = {
        "id": data.get("id"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": data.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _FINISH.get(data.get("stop_reason") or "end_turn", "stop"),
            }
        ],
        "usage": _usage_body(usage),
    }
    return Reply(body, usage)


def _usage(raw: Any, usage: Usage) -> Usage:
    """``usage`` updated with what an Anthropic usage object holds (cache reads are input)."""
    if isinstance(raw, dict):
        if raw.get("input_tokens") is not None:
            usage.prompt_tokens = (
                int(raw.get("input_tokens") or 0)
                + int(raw.get("cache_creation_input_tokens") or 0)
                + int(raw.get("cache_read_input_tokens") or 0)
            )
        if raw.get("output_tokens") is not None:
            usage.completion_tokens = int(raw["output_tokens"])
    return usage


def _usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class _Chunks:
    """OpenAI chunks for the events of one Anthropic stream."""

    __slots__ = ("base", "tools", "usage_so_far")

    def __init__(self, model: str) -> None:
        self.base: dict[str, Any] = {
            "id": "",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
        }
        self.tools: dict[int, int] = {}  # content block index → tool call index
        self.usage_so_far = Usage()

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> Chunk:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {**self.base, "choices": [choice]}

    def translate(self, kind: Any, event: dict[str, Any]) -> Chunk | None:
        """The chunk for one event, or None for events that carry nothing for the client."""
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            delta_kind = delta.get("type")
            if delta_kind == "text_delta":
                return self._chunk({"content": delta.get("text") or ""})
            if delta_kind == "input_json_delta":
                index = self.tools.get(event.get("index", -1))
                if index is None:
                    return None
                call = {"index": index, "function": {"arguments": delta.get("partial_json") or ""}}
                return self._chunk({"tool_calls": [call]})
            return None  # thinking, signatures, citations
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            block_kind = block.get("type")
            if block_kind == "text":
                text = block.get("text")
                return self._chunk({"content": text}) if text else None
            if block_kind == "tool_use":
                index = self.tools[event.get("index", -1)] = len(self.tools)
                tool_input = block.get("input")
                arguments = orjson.dumps(tool_input).decode() if tool_input else ""
                call = {
                    "index": index,
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": arguments},
                }
                return self._chunk({"tool_calls": [call]})
            return None
        if kind == "message_start":
            message = event.get("message") or {}
            base = self.base
            base["id"] = message.get("id") or base["id"]
            base["model"] = message.get("model") or base["model"]
            _usage(message.get("usage"), self.usage_so_far)
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "message_delta":
            _usage(event.get("usage"), self.usage_so_far)
            reason = (event.get("delta") or {}).get("stop_reason")
            if reason is None:
                return None
            return self._chunk({}, _FINISH.get(reason, "stop"))
        return None  # ping, content_block_stop, events added later

    def usage(self) -> Chunk:
        return {**self.base, "choices": [], "usage": _usage_body(self.usage_so_far)}


def _stream_error(stream: SSEStream, event: dict[str, Any], data: bytes) -> UpstreamError:
    error = event.get("error")
    kind = error.get("type") if isinstance(error, dict) else None
    status = _ERROR_STATUS.get(kind) if isinstance(kind, str) else None
    transient = status is None or status in (408, 409, 429) or status >= 500
    return stream.error(
        f"the upstream failed mid-stream: {error_message(data)}", status=status, transient=transient
    )
