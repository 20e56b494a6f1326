"""OpenAI's request bodies as the gateway reads them: TypedDicts over the wire's dicts.

Bodies stay plain dicts end to end (``orjson`` in and out; the gateway changes only
``model``). These types say which fields the gateway reads, and what it may find there
once admission has checked the body (:mod:`interlock.llm.admission`): ``model`` a
name and ``messages`` a non-empty list for a chat request, ``input`` present for an
embeddings request. Anything else is the client's as sent, so the code that reads a
field still checks its type (``temperature: "hot"`` is possible on the wire).
Fields the gateway does not read are passed through untouched and not listed.
"""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict

__all__ = ["ChatMessage", "ChatRequest", "EmbeddingsRequest", "StreamOptions", "TextPart"]


class TextPart(TypedDict):
    """One text part of a message's ``content`` list."""

    type: Literal["text"]
    text: str


class ChatMessage(TypedDict, total=False):
    role: Required[str]  # system | developer | user | assistant | tool
    content: str | list[TextPart | dict[str, Any]] | None
    name: str
    tool_calls: list[dict[str, Any]]
    tool_call_id: str
    refusal: str | None


class StreamOptions(TypedDict, total=False):
    include_usage: bool


class ChatRequest(TypedDict, total=False):
    """``POST /chat/completions``: the fields the gateway reads."""

    model: Required[str]
    messages: Required[list[ChatMessage]]
    stream: bool
    stream_options: StreamOptions
    temperature: float
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    n: int
    max_tokens: int
    max_completion_tokens: int
    user: str


class EmbeddingsRequest(TypedDict, total=False):
    """``POST /embeddings``: the fields the gateway reads."""

    model: Required[str]
    input: Required[str | list[str] | list[int] | list[list[int]]]
    dimensions: int
    encoding_format: Literal["float", "base64"]
    user: str
