"""What the parts of the LLM gateway pass to each other.

Requests and answers keep the OpenAI wire shape as plain dicts (``orjson`` in and out):
the gateway changes little of a body (the ``model``, ``stream_options``), so parsing it
into classes and back would only cost time. A provider that speaks another protocol
(Anthropic's Messages API) translates to and from this shape at its edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["Chunk", "Provider", "Reply", "Usage"]

Chunk = dict[str, Any]
"""One ``chat.completion.chunk`` object of an OpenAI stream."""


@dataclass(slots=True)
class Usage:
    """Tokens of one call, as the upstream counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_openai(cls, usage: dict[str, Any] | None) -> Usage:
        if not usage:
            return cls()
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))


@dataclass(slots=True)
class Reply:
    """A whole answer from a provider in the OpenAI shape (chat completion or embeddings)."""

    body: dict[str, Any]
    usage: Usage = field(default_factory=Usage)


class Provider(Protocol):
    """One deployment's upstream: it sends a request and returns the OpenAI shape.

    ``body`` is the client's request with ``model`` already set to the upstream's model
    name. Every failure is an :class:`~interlock.errors.UpstreamError` whose ``transient``
    says whether another attempt may succeed; nothing else escapes (cancellation aside).
    ``timeout_s`` bounds the whole call, or for a stream each wait for the next chunk.
    """

    deployment: str

    async def chat(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """A non-streamed chat completion."""
        ...

    def stream_chat(self, body: dict[str, Any], *, timeout_s: float) -> AsyncIterator[Chunk]:
        """The chunks of a streamed chat completion, in order; the last one has ``usage``.

        A stream that ends without its terminator (``[DONE]`` for OpenAI,
        ``message_stop`` for Anthropic) raises UpstreamError(kind="stream_cut").
        """
        ...

    async def embeddings(self, body: dict[str, Any], *, timeout_s: float) -> Reply:
        """An embeddings call (``input`` a string or a list of strings)."""
        ...

    async def aclose(self) -> None:
        """Close the connections."""
        ...
