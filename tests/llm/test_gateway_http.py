"""The LLM gateway over HTTP, driven by the official openai SDK (its retries off).

Every test starts its own ``interlock serve`` (in a thread) in front of the module's fake
upstream, whose faults each test scripts. Deployments: ``gpt`` is d1 then d2 (latency
strategy: d1 first while both are unmeasured), with ``mini`` (d3) as its fallback.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import openai
import orjson
import pytest

from tests.llm.support import chat, client, deployment, fake, llm_config, upstream
from tests.llm.upstream import FakeUpstream, Fault

__all__ = ["fake", "upstream"]  # fixtures


@pytest.fixture
def serve(make_settings: Any, server_factory: Any, fake: FakeUpstream) -> Any:
    def start(**llm: Any) -> Any:
        return server_factory(make_settings(llm=llm_config(fake, **llm)))

    return start


# -- answers and headers ---------------------------------------------------------------------


def test_a_chat_completion_through_the_gateway(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    raw = chat(client(server.url), "what is the fraud rate")
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: what is the fraud rate"
    assert completion.usage.prompt_tokens == 5 + 3
    assert raw.headers["x-interlock-deployment"] == "d1"
    assert raw.headers["x-interlock-attempts"] == "1"
    assert raw.headers["x-interlock-cache"] == "miss"
    assert float(raw.headers["x-interlock-overhead-ms"]) >= 0
    sent = fake.requests("d1")[-1]
    assert sent.json["model"] == "up-d1"  # the deployment's upstream name replaces the alias


def test_models_lists_the_configured_names(serve: Any) -> None:
    server = serve()
    assert sorted(m.id for m in client(server.url).models.list()) == ["gpt", "mini"]


def test_an_unknown_model_is_a_404_naming_the_field(serve: Any) -> None:
    server = serve()
    with pytest.raises(openai.NotFoundError, match="model"):
        chat(client(server.url), model="nope")


def test_a_body_without_messages_is_a_400_naming_the_field(serve: Any) -> None:
    server = serve()
    response = httpx.post(f"{server.url}/llm/v1/chat/completions", json={"model": "gpt"})
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]


def test_another_method_on_an_llm_route_is_405_naming_the_one_allowed(serve: Any) -> None:
    server = serve()
    response = httpx.get(f"{server.url}/llm/v1/chat/completions")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert "GET" in response.json()["error"]["message"]
    assert httpx.post(f"{server.url}/llm/v1/nowhere").status_code == 404


def test_embeddings_through_the_gateway(serve: Any) -> None:
    server = serve()
    result = client(server.url).embeddings.create(model="gpt", input=["a b c", "a b c"])
    assert len(result.data) == 2
    assert result.data[0].embedding == result.data[1].embedding


# -- retries --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        Fault(status=500),
        Fault(status=503),
        Fault(status=408),
        Fault(status=429, retry_after="0"),
        Fault(malformed=True),
    ],
    ids=["500", "503", "408", "429", "malformed"],
)
def test_a_transient_failure_is_retried_on_the_same_deployment(
    serve: Any, fake: FakeUpstream, fault: Fault
) -> None:
    server = serve()
    fake.script("d1", fault)
    raw = chat(client(server.url))
    assert raw.parse().choices[0].message.content == "echo: hello there"
    assert raw.headers["x-interlock-deployment"] == "d1"
    assert raw.headers["x-interlock-attempts"] == "2"
    assert fake.count("d1") == 2


def test_a_timeout_is_retried_then_the_next_deployment_answers(
    serve: Any, fake: FakeUpstream
) -> None:
    server = serve(
        deployments=[
            deployment(fake, "d1", timeout_s=0.2),
            deployment(fake, "d2"),
            deployment(fake, "d3"),
        ]
    )
    fake.set_default("d1", Fault(hang=True))
    raw = chat(client(server.url))
    assert raw.headers["x-interlock-deployment"] == "d2"
    assert raw.headers["x-interlock-attempts"] == "3"  # two on d1, then d2
    assert fake.count("d1") == 2


def test_retry_after_is_honoured_before_the_retry(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    fake.script("d1", Fault(status=429, retry_after="1"))
    raw = chat(client(server.url))
    assert raw.headers["x-interlock-attempts"] == "2"
    first, second = fake.requests("d1")
    assert second.at - first.at >= 1.0  # waited as the upstream asked, not the 1-5 ms backoff


def test_a_retry_after_beyond_the_deadline_moves_on_at_once(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    fake.script("d1", Fault(status=429, retry_after="3600"))
    raw = chat(client(server.url))
    assert raw.headers["x-interlock-deployment"] == "d2"
    assert fake.count("d1") == 1


def test_a_client_error_from_the_upstream_is_not_retried(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    fake.script("d1", Fault(status=400, error_body={"error": {"message": "context too long"}}))
    with pytest.raises(openai.BadRequestError, match="context too long"):
        chat(client(server.url))
    assert fake.count("d1") == 1
    assert fake.count("d2") == 0


# -- fallbacks, breaker, last resorts -----------------------------------------------------------


def test_the_fallback_model_answers_when_every_deployment_fails(
    serve: Any, fake: FakeUpstream
) -> None:
    server = serve()
    fake.set_default("d1", Fault(status=500))
    fake.set_default("d2", Fault(status=502))
    raw = chat(client(server.url))
    assert raw.headers["x-interlock-deployment"] == "d3"
    assert raw.headers["x-interlock-model"] == "mini"
    assert raw.headers["x-interlock-attempts"] == "5"
    assert fake.requests("d3")[-1].json["model"] == "up-d3"


def test_an_open_breaker_skips_its_deployment(serve: Any, fake: FakeUpstream) -> None:
    server = serve(
        retry={"max_attempts": 1},
        models=[
            {"name": "gpt", "deployments": ["d1"], "fallbacks": ["mini"]},
            {"name": "mini", "deployments": ["d3"]},
        ],
    )
    fake.set_default("d1", Fault(status=500))
    sdk = client(server.url)
    for i in range(4):  # four failed calls: the window is full and all failed
        assert chat(sdk, f"question {i}").headers["x-interlock-deployment"] == "d3"
    assert fake.count("d1") == 4
    raw = chat(sdk, "question 5")
    assert raw.headers["x-interlock-deployment"] == "d3"
    assert raw.headers["x-interlock-attempts"] == "1"  # d1 was not even tried
    assert fake.count("d1") == 4
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'interlock_llm_breaker_state{deployment="d1"} 2.0' in metrics


def test_nothing_left_is_a_503_with_retry_after_not_a_hang(serve: Any, fake: FakeUpstream) -> None:
    server = serve(models=[{"name": "gpt", "deployments": ["d1"]}])
    fake.set_default("d1", Fault(status=500))
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client(server.url))
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"]
    assert "gpt" in caught.value.response.json()["error"]["message"]


def test_a_hanging_upstream_ends_at_the_request_deadline(serve: Any, fake: FakeUpstream) -> None:
    server = serve(models=[{"name": "gpt", "deployments": ["d1"]}])
    fake.set_default("d1", Fault(hang=True))
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client(server.url), extra_headers={"x-request-timeout-ms": "300"})
    assert caught.value.status_code in (503, 504)


def test_a_stale_answer_is_the_last_resort(serve: Any, fake: FakeUpstream) -> None:
    server = serve(models=[{"name": "gpt", "deployments": ["d1"]}])
    sdk = client(server.url)
    chat(sdk, "cached once")
    fake.set_default("d1", Fault(status=500))
    raw = chat(sdk, "cached once", extra_headers={"cache-control": "no-cache"})
    assert raw.headers["x-interlock-cache"] == "stale"
    assert raw.parse().choices[0].message.content == "echo: cached once"


# -- streams --------------------------------------------------------------------------------------


def _stream(sdk: openai.OpenAI, text: str = "one two three", **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    return sdk.chat.completions.with_raw_response.create(
        model="gpt", messages=[{"role": "user", "content": text}], stream=True, **kwargs
    )


def test_a_stream_relays_every_token_and_ends_with_usage(serve: Any) -> None:
    server = serve()
    raw = _stream(client(server.url))
    chunks = list(raw.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two three"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert raw.headers["x-interlock-deployment"] == "d1"


@pytest.mark.parametrize(
    "fault",
    [Fault(status=500), Fault(cut_after_chunks=1), Fault(malformed=True)],
    ids=["500", "cut-before-first-token", "malformed"],
)
def test_a_stream_falls_back_freely_before_its_first_token(
    serve: Any, fake: FakeUpstream, fault: Fault
) -> None:
    server = serve(retry={"max_attempts": 1})
    fake.script("d1", fault)
    raw = _stream(client(server.url))
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert text == "echo: one two three"
    assert raw.headers["x-interlock-deployment"] == "d2"


def test_a_stream_cut_after_its_first_token_ends_with_an_error_not_a_finish(
    serve: Any, fake: FakeUpstream
) -> None:
    server = serve(
        models=[
            {"name": "gpt", "deployments": ["d1", "d2"], "strategy": "weighted"},
            {"name": "mini", "deployments": ["d3"]},
        ],
        deployments=[
            deployment(fake, "d1"),
            deployment(fake, "d2", weight=1e-9),
            deployment(fake, "d3"),
        ],
    )
    fake.script("d1", Fault(cut_after_chunks=3))
    response = httpx.post(
        f"{server.url}/llm/v1/chat/completions",
        json={
            "model": "gpt",
            "stream": True,
            "temperature": 0,
            "messages": [{"role": "user", "content": "a b c d"}],
        },
    )
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] != "[DONE]"
    assert "error" in orjson.loads(events[-1])
    assert fake.count("d2") == 0  # no second answer spliced into the first
    with pytest.raises(openai.APIError):
        fake.script("d1", Fault(cut_after_chunks=3))
        list(_stream(client(server.url), "a b c d").parse())


def _calls(fake: FakeUpstream) -> int:
    return fake.count("d1") + fake.count("d2")


# -- cache -----------------------------------------------------------------------------------------


def test_an_identical_request_is_answered_from_the_cache(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    sdk = client(server.url)
    first = chat(sdk, "same question")
    second = chat(sdk, "same question")
    assert second.headers["x-interlock-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert _calls(fake) == 1


def test_sampled_requests_are_not_cached_unless_forced(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    sdk = client(server.url)
    chat(sdk, "creative", temperature=0.9)
    assert chat(sdk, "creative", temperature=0.9).headers["x-interlock-cache"] != "hit"
    assert _calls(fake) == 2
    forced = {"x-interlock-cache": "force"}
    chat(sdk, "creative", temperature=0.9, extra_headers=forced)
    hit = chat(sdk, "creative", temperature=0.9, extra_headers=forced)
    assert hit.headers["x-interlock-cache"] == "hit"


def test_cache_control_no_store_and_no_cache(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    sdk = client(server.url)
    chat(sdk, "private", extra_headers={"cache-control": "no-store"})
    assert chat(sdk, "private").headers["x-interlock-cache"] == "miss"  # nothing was stored
    assert (
        chat(sdk, "private", extra_headers={"cache-control": "no-cache"}).headers[
            "x-interlock-cache"
        ]
        == "miss"
    )  # stored, but not read
    assert _calls(fake) == 3


def test_a_cached_answer_replays_as_a_stream(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    sdk = client(server.url)
    chat(sdk, "one two three")  # answered: the same call now hits, at once, on this node
    raw = _stream(sdk)
    chunks = list(raw.parse())
    assert raw.headers["x-interlock-cache"] == "hit"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: one two three"
    )
    assert _calls(fake) == 1


def test_a_streamed_answer_is_cached_for_later_requests(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    sdk = client(server.url)
    list(_stream(sdk).parse())
    raw = chat(sdk, "one two three")
    assert raw.headers["x-interlock-cache"] == "hit"
    assert raw.parse().choices[0].message.content == "echo: one two three"


def test_identical_concurrent_requests_make_one_upstream_call(
    serve: Any, fake: FakeUpstream
) -> None:
    server = serve()
    fake.set_default("d1", Fault(latency_ms=300))
    sdk = client(server.url)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: chat(sdk, "popular").parse(), range(8)))
    assert {a.choices[0].message.content for a in answers} == {"echo: popular"}
    assert _calls(fake) == 1


def test_a_semantic_hit_answers_a_paraphrase(serve: Any, fake: FakeUpstream) -> None:
    server = serve(
        deployments=[deployment(fake, n) for n in ("d1", "d2", "d3", "emb")],
        models=[
            {"name": "gpt", "deployments": ["d1"], "semantic_cache": True},
            {"name": "embedder", "deployments": ["emb"]},
        ],
        cache={"semantic_embeddings": "embedder", "semantic_threshold": 0.8},
    )
    sdk = client(server.url)
    chat(sdk, "what is the fraud rate of card payments today")
    raw = chat(sdk, "what is the fraud rate of card payments today please")
    assert raw.headers["x-interlock-cache"] == "semantic"
    assert raw.parse().choices[0].message.content == (
        "echo: what is the fraud rate of card payments today"
    )
    unrelated = chat(sdk, "summarise the chargeback dashboard")
    assert unrelated.headers["x-interlock-cache"] == "miss"
    assert _calls(fake) == 2


# -- tenants, limits, budgets, usage --------------------------------------------------------------


@pytest.fixture
def tenant_keys(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    keys = {"dash": "key-dash-123", "batch": "key-batch-456"}
    monkeypatch.setenv("DASH_KEY", keys["dash"])
    monkeypatch.setenv("BATCH_KEY", keys["batch"])
    return keys


def _tenants(**dash: Any) -> list[dict[str, Any]]:
    return [
        {"name": "dash", "key_env": "DASH_KEY", **dash},
        {"name": "batch", "key_env": "BATCH_KEY"},
    ]


def test_tenants_need_a_valid_key(serve: Any, tenant_keys: dict[str, str]) -> None:
    server = serve(tenants=_tenants())
    with pytest.raises(openai.AuthenticationError):
        chat(client(server.url, "wrong"))
    assert chat(client(server.url, tenant_keys["dash"])).parse().choices


def test_the_request_over_a_tenant_rpm_is_the_first_refused(
    serve: Any, tenant_keys: dict[str, str]
) -> None:
    server = serve(tenants=_tenants(rpm=3))
    sdk = client(server.url, tenant_keys["dash"])
    for i in range(3):
        raw = chat(sdk, f"question {i}")
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    with pytest.raises(openai.RateLimitError) as caught:
        chat(sdk, "question 4")
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert chat(client(server.url, tenant_keys["batch"])).parse().choices  # others unaffected


def test_a_tenant_tpm_counts_prompt_and_max_tokens(serve: Any, tenant_keys: dict[str, str]) -> None:
    server = serve(tenants=_tenants(tpm=200))
    sdk = client(server.url, tenant_keys["dash"])
    chat(sdk, "short", max_tokens=150)  # reserves ~160, reconciled to ~10 afterwards
    with pytest.raises(openai.RateLimitError):
        chat(sdk, "short again", max_tokens=195)


def test_a_spent_daily_budget_refuses_before_the_call(
    serve: Any, fake: FakeUpstream, tenant_keys: dict[str, str]
) -> None:
    server = serve(tenants=_tenants(budget_usd_per_day=0.001))
    sdk = client(server.url, tenant_keys["dash"])
    chat(sdk, "one two three four five six")  # (9 + 7) prompt/1k·$1 + 7/1k·$2 > $0.001
    calls = fake.count("d1")
    with pytest.raises(openai.RateLimitError, match="budget"):
        for i in range(20):  # the spend is recorded behind the answer: a few may still pass
            chat(sdk, f"more {i}")
    assert fake.count("d1") - calls < 20


def test_usage_reports_tokens_cost_and_cache_savings(
    serve: Any, tenant_keys: dict[str, str]
) -> None:
    server = serve(tenants=_tenants())
    dash = client(server.url, tenant_keys["dash"])
    chat(dash, "alpha beta")
    chat(dash, "alpha beta")  # a cache hit
    chat(client(server.url, tenant_keys["batch"]), "gamma")
    mine = httpx.get(
        f"{server.url}/llm/v1/usage", headers={"authorization": f"Bearer {tenant_keys['dash']}"}
    ).json()
    assert mine["requests"] == 2
    assert mine["cache_hits"] == 1
    # prompt 2 words + 3 = 5 tokens at $1/1k, completion 3 words at $2/1k
    assert mine["total_cost_usd"] == pytest.approx(0.005 + 0.006)
    assert mine["saved_cost_usd"] == pytest.approx(0.011)
    assert set(mine["by_tenant"]) == {"dash"}


def test_a_tenant_asking_for_another_tenants_usage_is_refused(
    serve: Any, tenant_keys: dict[str, str]
) -> None:
    server = serve(tenants=_tenants())
    chat(client(server.url, tenant_keys["batch"]), "gamma")
    dash = {"authorization": f"Bearer {tenant_keys['dash']}"}
    response = httpx.get(f"{server.url}/llm/v1/usage?tenant=batch", headers=dash)
    assert response.status_code == 403, response.text
    assert "tenant" in response.json()["error"]["message"]
    own = httpx.get(f"{server.url}/llm/v1/usage?tenant=dash", headers=dash)
    assert own.status_code == 200  # naming oneself is allowed


def test_usage_names_the_deployment_that_refused_a_request(serve: Any, fake: FakeUpstream) -> None:
    server = serve()
    fake.script("d1", Fault(status=400, error_body={"error": {"message": "context too long"}}))
    with pytest.raises(openai.BadRequestError):
        chat(client(server.url))
    usage = httpx.get(f"{server.url}/llm/v1/usage").json()
    assert usage["errors"] == 1
    assert set(usage["by_deployment"]) == {"d1"}
    assert usage["by_deployment"]["d1"]["errors"] == 1


# -- Anthropic behind the OpenAI shape, and what /metrics shows --------------------------------


def _claude(fake: FakeUpstream) -> dict[str, Any]:
    return {
        "deployments": [
            {
                "name": "claude",
                "provider": "anthropic",
                "base_url": fake.anthropic_url("claude"),
                "api_key_env": "ANTHROPIC_TEST_KEY",
                "model": "claude-x",
            }
        ],
        "models": [{"name": "gpt", "deployments": ["claude"]}],
    }


def test_an_anthropic_deployment_answers_an_openai_client(
    serve: Any, fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "ak-1")
    server = serve(**_claude(fake))
    sdk = client(server.url)
    raw = chat(sdk, "bonjour tout le monde")
    assert raw.parse().choices[0].message.content == "echo: bonjour tout le monde"
    assert raw.headers["x-interlock-deployment"] == "claude"
    sent = fake.requests("claude")[-1]
    assert sent.path.endswith("/v1/messages")
    assert sent.headers["x-api-key"] == "ak-1"
    chunks = list(
        sdk.chat.completions.create(
            model="gpt",
            temperature=0,
            stream=True,
            messages=[{"role": "user", "content": "un deux"}],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: un deux"
    assert chunks[-1].usage is not None


def test_metrics_count_requests_tokens_cost_and_cache(serve: Any) -> None:
    server = serve(models=[{"name": "gpt", "deployments": ["d1"]}])
    sdk = client(server.url)
    misses = 1
    chat(sdk, "count me")
    while chat(sdk, "count me").headers["x-interlock-cache"] != "hit":  # stored behind
        misses += 1  # the answer: a request right after it may still miss
        assert misses < 5
    metrics = httpx.get(f"{server.url}/metrics").text
    requests = 'interlock_llm_requests_total{deployment="d1",model="gpt",status="ok",tenant=""}'
    assert f"{requests} {misses}.0" in metrics
    assert 'interlock_llm_cache_total{model="gpt",result="hit"} 1.0' in metrics
    prompt = 'interlock_llm_tokens_total{deployment="d1",kind="prompt",model="gpt"}'
    assert f"{prompt} {5 * misses}.0" in metrics
    assert "interlock_llm_cost_usd_total" in metrics
    assert "interlock_llm_overhead_seconds_bucket" in metrics


def test_a_deployment_at_its_own_rpm_is_skipped_not_refused(serve: Any, fake: FakeUpstream) -> None:
    server = serve(
        deployments=[
            deployment(fake, "d1", rpm=2),
            deployment(fake, "d2", weight=1e-9),  # d1 always comes first
            deployment(fake, "d3"),
        ],
        models=[{"name": "gpt", "deployments": ["d1", "d2"], "strategy": "weighted"}],
    )
    sdk = client(server.url)
    used = [chat(sdk, f"question {i}").headers["x-interlock-deployment"] for i in range(12)]
    assert used.count("d1") == 2  # the provider's quota is never exceeded
    assert fake.count("d1") == 2
    assert used.count("d2") == 10
