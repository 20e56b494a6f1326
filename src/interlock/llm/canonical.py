"""What makes two LLM requests the same question: the canonical request of the cache key.

A body is made canonical by leaving out :data:`IGNORED_FIELDS` (what does not change
the answer) and making equal spellings one: ``n: 1`` is dropped, integral sampling
parameters (``temperature: 0``) count as floats, and a message content made of one plain
text part equals that text as a string. :func:`semantic_query` is the part of a request
the semantic cache compares by meaning, and the context the rest must match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import orjson

from interlock.llm.wire import ChatRequest

__all__ = ["IGNORED_FIELDS", "canonical_request", "sampled", "semantic_query"]

IGNORED_FIELDS = frozenset(
    {
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    }
)
"""Request fields that do not change the answer, left out of the key."""

_FLOAT_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty")


def canonical_request(body: Mapping[str, object]) -> dict[str, object]:
    """``body`` as hashed for the key: ignored fields out, equal spellings made one."""
    out = {name: value for name, value in body.items() if name not in IGNORED_FIELDS}
    if out.get("n") == 1:
        del out["n"]
    for name in _FLOAT_FIELDS:
        value = out.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    messages = out.get("messages")
    if isinstance(messages, list):
        out["messages"] = [_canonical_message(message) for message in messages]
    return out


def _canonical_message(message: object) -> object:
    if isinstance(message, dict):
        content = message.get("content")
        if (
            isinstance(content, list)
            and len(content) == 1
            and isinstance(content[0], dict)
            and content[0].keys() == {"type", "text"}
            and content[0]["type"] == "text"
        ):
            return {**message, "content": content[0]["text"]}
    return message


def sampled(body: ChatRequest) -> bool:
    """Whether the answer is drawn at random: temperature absent (default 1) or above 0."""
    temperature = body.get("temperature")
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        return temperature > 0
    return True


def semantic_query(body: ChatRequest) -> tuple[str, int] | None:
    """The text to embed and the context tag, or None when the request has no such text.

    The text is the last message's, when that is the user's and only text. The
    context is a hash of the canonical request with that message's content blanked.
    """
    canonical = canonical_request(body)
    messages = canonical.get("messages")
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    text = _text_of(last.get("content"))
    if text is None or not text.strip():
        return None
    rest = {**canonical, "messages": [*messages[:-1], {**last, "content": None}]}
    try:
        digest = hashlib.sha256(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)).digest()
    except orjson.JSONEncodeError:
        return None
    return text, int.from_bytes(digest[:8], "big", signed=True)


def _text_of(content: object) -> str | None:
    """A message content as plain text; None if it holds anything else (an image, say)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return None
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            return None
        text = part.get("text")
        if not isinstance(text, str):
            return None
        texts.append(text)
    return "\n".join(texts)
