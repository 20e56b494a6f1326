"""The LLM gateway's upstreams: one :class:`~interlock.llm.types.Provider` per deployment.

:func:`make_provider` picks the class for ``deployment.provider`` (``openai`` for any
OpenAI-compatible endpoint, ``anthropic`` for the Messages API) and hands it the key
from the variable ``api_key_env`` names. A provider opens its connections on first use,
inside the running loop, and closes them in ``aclose()``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from interlock.errors import ConfigError
from interlock.llm.providers.anthropic import AnthropicProvider
from interlock.llm.providers.openai import OpenAIProvider

if TYPE_CHECKING:
    from interlock.llm.types import Provider
    from interlock.settings import LLMDeployment

__all__ = ["AnthropicProvider", "OpenAIProvider", "make_provider"]


def make_provider(deployment: LLMDeployment) -> Provider:
    """The provider for ``deployment``, with its key read from ``api_key_env`` if set.

    Raises:
        ConfigError: ``api_key_env`` names a variable that is unset or empty.
    """
    api_key = None
    if deployment.api_key_env:
        api_key = os.environ.get(deployment.api_key_env, "").strip()
        if not api_key:
            raise ConfigError(
                f"LLM deployment {deployment.name!r} reads its key from "
                f"${deployment.api_key_env}, which is not set"
            )
    if deployment.provider == "anthropic":
        return AnthropicProvider(deployment, api_key=api_key)
    return OpenAIProvider(deployment, api_key=api_key)
