"""The LLM gateway, in-process: the same routing, retries, limits and cache as ``/llm/v1``.

    from interlock.llm import open_gateway
    from interlock.settings import load_settings

    async with open_gateway(load_settings()) as gateway:
        result = await gateway.chat({"model": "gpt-4o", "messages": [...]})
        print(result.completion["choices"][0]["message"]["content"], result.info.deployment)
        stream = await gateway.stream({"model": "gpt-4o", "messages": [...]})
        async for chunk in stream:
            ...

Bodies and answers are OpenAI's JSON shapes as dicts. See :mod:`interlock.llm.gateway`.
"""

from __future__ import annotations

from interlock.llm.cache import CacheControl
from interlock.llm.factory import open_gateway
from interlock.llm.gateway import CallInfo, ChatResult, ChatStream, Gateway, StreamFailure, Tenant

__all__ = [
    "CacheControl",
    "CallInfo",
    "ChatResult",
    "ChatStream",
    "Gateway",
    "StreamFailure",
    "Tenant",
    "open_gateway",
]
