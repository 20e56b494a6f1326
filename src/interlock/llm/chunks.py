"""A stream and a whole answer, each made from the other.

:func:`chunks_to_completion` assembles a streamed answer into a whole
``chat.completion`` so that it can be cached and later served to any request;
:func:`completion_to_chunks` replays a cached one as the chunks of a stream.
"""

from __future__ import annotations

import re
from typing import Any

from interlock.llm.types import Chunk

__all__ = ["WORDS_PER_CHUNK", "chunks_to_completion", "completion_to_chunks"]

WORDS_PER_CHUNK = 4
_WORDS = re.compile(r"\s*\S+|\s+")  # every character falls in exactly one match


def completion_to_chunks(completion: dict[str, Any]) -> list[Chunk]:
    """A whole ``chat.completion`` as the chunks of an OpenAI stream.

    Per choice: a role chunk (with ``content: ""`` when the answer has text), the text
    in pieces of ``WORDS_PER_CHUNK`` words (the logprobs ride on the first), the
    refusal, one chunk per tool call (whole arguments), and a chunk with the
    ``finish_reason``. Then, if the completion has ``usage``, a last chunk with
    ``choices: []`` and the usage, as OpenAI sends for ``include_usage``.
    """
    base: dict[str, Any] = {
        "id": completion.get("id"),
        "object": "chat.completion.chunk",
        "created": completion.get("created"),
        "model": completion.get("model"),
    }
    for name in ("system_fingerprint", "service_tier"):
        if completion.get(name) is not None:
            base[name] = completion[name]

    def chunk(index: int, delta: dict[str, Any], **extra: Any) -> Chunk:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**base, "choices": [{**choice, **extra}]}

    chunks: list[Chunk] = []
    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}
        content = message.get("content")
        first: dict[str, Any] = {"role": message.get("role", "assistant")}
        if isinstance(content, str):
            first["content"] = ""
        chunks.append(chunk(index, first))
        logprobs = choice.get("logprobs")
        words = _WORDS.findall(content) if isinstance(content, str) else []
        for start in range(0, len(words), WORDS_PER_CHUNK):
            piece = "".join(words[start : start + WORDS_PER_CHUNK])
            chunks.append(chunk(index, {"content": piece}, logprobs=logprobs))
            logprobs = None
        if message.get("refusal"):
            chunks.append(chunk(index, {"refusal": message["refusal"]}, logprobs=logprobs))
            logprobs = None
        for position, call in enumerate(message.get("tool_calls") or []):
            delta = {"tool_calls": [{"index": position, **call}]}
            chunks.append(chunk(index, delta))
        chunks.append(
            chunk(index, {}, logprobs=logprobs, finish_reason=choice.get("finish_reason"))
        )
    if completion.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return chunks


def chunks_to_completion(chunks: list[Chunk]) -> dict[str, Any]:
    """The ``chat.completion`` that a stream's chunks spell out.

    Text and refusals are joined; tool calls are assembled by their ``index`` (the
    ``id``, ``type`` and name from wherever they come, the arguments concatenated);
    the last ``finish_reason`` and the ``usage`` chunk are kept. A message's
    ``content`` is None when no chunk carried text, as in a tool-call answer.
    """
    head = chunks[0] if chunks else {}
    out: dict[str, Any] = {
        "id": head.get("id"),
        "object": "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
    }
    choices: dict[int, _Choice] = {}
    usage = None
    for chunk in chunks:
        for name in ("system_fingerprint", "service_tier"):
            if chunk.get(name) is not None and name not in out:
                out[name] = chunk[name]
        if chunk.get("usage") is not None:
            usage = chunk["usage"]
        for delta_choice in chunk.get("choices") or []:
            index = delta_choice.get("index", 0)
            choices.setdefault(index, _Choice()).add(delta_choice)
    out["choices"] = [choices[index].build(index) for index in sorted(choices)]
    if usage is not None:
        out["usage"] = usage
    return out


class _Choice:
    """One choice of a stream, as its deltas arrive."""

    def __init__(self) -> None:
        self.role = "assistant"
        self.content: list[str] | None = None
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list[Any] | None] | None = None
        self.finish_reason: str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta") or {}
        if delta.get("role"):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            if self.content is None:
                self.content = []
            self.content.append(delta["content"])
        if delta.get("refusal"):
            self.refusal.append(delta["refusal"])
        for call in delta.get("tool_calls") or []:
            self._add_call(call)
        logprobs = choice.get("logprobs")
        if logprobs:
            if self.logprobs is None:
                self.logprobs = {}
            for name, items in logprobs.items():
                known = self.logprobs.get(name)
                if items is None:
                    self.logprobs.setdefault(name, None)
                else:
                    self.logprobs[name] = [*(known or []), *items]
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]

    def _add_call(self, delta: dict[str, Any]) -> None:
        call = self.calls.setdefault(
            delta.get("index", len(self.calls)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if delta.get("id"):
            call["id"] = delta["id"]
        if delta.get("type"):
            call["type"] = delta["type"]
        function = delta.get("function") or {}
        call["function"]["name"] += function.get("name") or ""
        call["function"]["arguments"] += function.get("arguments") or ""

    def build(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {
            "role": self.role,
            "content": None if self.content is None else "".join(self.content),
        }
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        if self.calls:
            message["tool_calls"] = [self.calls[i] for i in sorted(self.calls)]
        return {
            "index": index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }
