"""The provider for OpenAI and every endpoint that speaks its API.

``base_url`` ends in ``/v1`` (``https://api.openai.com/v1``, a vLLM or Ollama server,
a proxy); chat completions go to ``{base_url}/chat/completions`` and embeddings to
``{base_url}/embeddings``. Bodies pass through as the client sent them, with ``model``
already set by the gateway: nothing is parsed into classes, only checked to be the
protocol's shape (``choices``, ``data``), so an upstream's extra fields reach the client.

A key goes out as ``Authorization: Bearer``, or for an Azure OpenAI host
(``*.azure.com``) as ``api-key``, with ``?api-version=`` when the deployment sets
``api_version``. A streamed call asks for ``stream_options.include_usage`` (on a copy
of the body) so that the last chunk carries the usage; an upstream that sends none
still streams, and the gateway estimates it. A stream must end with ``data: [DONE]``;
one that ends without it raises UpstreamError(kind="stream_cut") after the chunks that
came. An ``{"error": ...}`` event inside a stream raises an UpstreamError with its message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote, urlsplit

import orjson

from interlock.llm.providers._http import UpstreamClient, error_message
from interlock.llm.types import Chunk, Reply, Usage

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from types import TracebackType

    from interlock.errors import UpstreamError
    from interlock.llm.providers._http import SSEStream
    from interlock.settings import LLMDeployment

__all__ = ["OpenAIProvider"]

_DONE = b"[DONE]"
_USAGE_OPTION = {"include_usage": True}


class OpenAIProvider:
    """One deployment on an OpenAI-compatible endpoint; ``api_key`` may be None (local)."""

    def __init__(self, deployment: LLMDeployment, *, api_key: str | None) -> None:
        self.deployment = deployment.name
        base_url = deployment.base_url.rstrip("/")
        azure = (urlsplit(base_url).hostname or "").endswith(".azure.com")
        query = ""
        if azure and deployment.api_version:
            query = f"?api-version={quote(deployment.api_version)}"
        headers: dict[str, str] = {}
        if api_key:
            headers = {"api-key": api_key} if azure else {"Authorization": f"Bearer {api_key}"}
        self.base_url = base_url
        self._chat_url = f"{base_url}/chat/completions{query}"
        self._embeddings_url = f"{base_url}/embeddings{query}"
        self._http = UpstreamClient(deployment, headers=headers, secret=api_key)

    def __repr__(self) -> str:
        return f"OpenAIProvider({self.deployment!r}, base_url={self.base_url!r})"

    async def chat(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """A chat completion, as the upstream wrote it."""
        data = await self._http.post_json(self._chat_url, self._dumps(body), timeout_s)
        if type(data) is not dict or type(data.get("choices")) is not list:
            raise self._http.malformed(f"a chat completion without choices: {_excerpt(data)}")
        return Reply(data, Usage.from_openai(data.get("usage")))

    async def stream_chat(self, body: dict[str, Any], *, timeout_s: float) -> AsyncIterator[Chunk]:
        """The upstream's chunks as they come; close the iterator to drop the stream."""
        options = body.get("stream_options")
        request = {
            **body,
            "stream": True,
            "stream_options": {**options, **_USAGE_OPTION}
            if isinstance(options, dict)
            else _USAGE_OPTION,
        }
        stream = await self._http.open_stream(self._chat_url, self._dumps(request), timeout_s)
        try:
            async for data in stream:
                if data == _DONE:
                    await stream.finish()
                    return
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise stream.malformed(f"a stream event is not JSON: {data[:200]!r}") from None
                if type(chunk) is not dict:
                    raise stream.malformed(f"a stream event is not an object: {data[:200]!r}")
                if "error" in chunk and "choices" not in chunk:
                    raise _stream_error(stream, data)
                yield chunk
            raise stream.cut()
        finally:
            stream.close()

    async def embeddings(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """Embeddings, as the upstream wrote them (floats or base64, as the body asked)."""
        data = await self._http.post_json(self._embeddings_url, self._dumps(body), timeout_s)
        if type(data) is not dict or type(data.get("data")) is not list:
            raise self._http.malformed(f"an embeddings answer without data: {_excerpt(data)}")
        return Reply(data, Usage.from_openai(data.get("usage")))

    def _dumps(self, body: dict[str, Any]) -> bytes:
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError as exc:
            raise self._http.error(
                f"the request cannot be sent as JSON: {exc}",
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


def _stream_error(stream: SSEStream, data: bytes) -> UpstreamError:
    """An ``{"error": {...}}`` event: transient unless its code says a client's fault."""
    error = orjson.loads(data).get("error")
    code = error.get("code") if isinstance(error, dict) else None
    status = code if type(code) is int and 400 <= code < 600 else None
    transient = status is None or status in (408, 409, 429) or status >= 500
    return stream.error(
        f"the upstream failed mid-stream: {error_message(data)}", status=status, transient=transient
    )


def _excerpt(data: Any) -> str:
    return error_message(orjson.dumps(data))
