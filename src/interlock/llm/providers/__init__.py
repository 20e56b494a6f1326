"""The LLM gateway's upstreams: one :class:`~interlock.llm.types.Provider` per deployment.

:func:`make_provider` picks the class for ``deployment.provider`` (``openai`` for any
OpenAI-compatible endpoint, ``anthropic`` for the Messages API) and hands it the key the
caller resolved (the composition root takes it from
:meth:`~interlock.settings.LLMDeployment.api_key`). A provider opens its connections on
first use, inside the running loop, and closes them in ``aclose()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from interlock.llm.providers.anthropic import AnthropicProvider
from interlock.llm.providers.openai import OpenAIProvider

if TYPE_CHECKING:
    from pydantic import SecretStr

    from interlock.llm.types import Provider
    from interlock.settings import LLMDeployment

__all__ = ["AnthropicProvider", "OpenAIProvider", "make_provider"]


def make_provider(deployment: LLMDeployment, api_key: SecretStr | None = None) -> Provider:
    """The provider for ``deployment``, sending ``api_key`` when given."""
    key = api_key.get_secret_value() if api_key is not None else None
    if deployment.provider == "anthropic":
        return AnthropicProvider(deployment, api_key=key)
    return OpenAIProvider(deployment, api_key=key)
