"""``/openapi.json`` describes the whole API, and schemathesis finds no server error in it.

The prediction and LLM routes are plain ASGI in front of FastAPI; their operations are
merged into FastAPI's document (``interlock.api.openapi``). The schemathesis run covers
every documented operation against a real server: the demo's fraud model (a small
training run) registered, the LLM gateway in front of the loopback fake upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from interlock._core.schema import FeatureSchema
from interlock.app import create_app
from interlock.training.fraud import train_fraud_model
from tests.api.support import register
from tests.conftest import LiveServer
from tests.llm.support import fake, llm_config, upstream
from tests.llm.upstream import FakeUpstream

__all__ = ["fake", "upstream"]  # fixtures

FAST_PATHS = {
    "/v1/models/{name}:predict": "post",
    "/v2/models/{name}/infer": "post",
    "/v2/models/{name}/versions/{version}/infer": "post",
}
LLM_PATHS = {
    "/llm/v1/chat/completions": "post",
    "/llm/v1/embeddings": "post",
    "/llm/v1/models": "get",
    "/llm/v1/usage": "get",
}
EXAMPLES_PER_STRATEGY = 8


@dataclass(frozen=True)
class Served:
    url: str
    sample: list[dict[str, Any]]  # requests the demo model answers
    schema: FeatureSchema


@pytest.fixture
def served(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
    fake: FakeUpstream,
) -> Served:
    trained = train_fraud_model(tmp_path / "demo", n=2000)
    settings = make_settings(llm=llm_config(fake))
    register(settings, "fraud", trained.path, "lightgbm", schema=trained.schema, alias="champion")
    server = server_factory(settings)
    return Served(server.url, trained.sample[:3], trained.schema)


_V2_DATATYPES = {"float": "FP64", "int": "INT64", "bool": "BOOL", "category": "BYTES"}


def _v2_body(served: Served) -> dict[str, Any]:
    """The demo sample as one tensor per feature."""
    rows = served.sample
    return {
        "inputs": [
            {
                "name": f.name,
                "datatype": _V2_DATATYPES[f.type.value],
                "shape": [len(rows)],
                "data": [row[f.name] for row in rows],
            }
            for f in served.schema.features
        ]
    }


def _strategies(operation: Any, served: Served) -> list[Any]:
    """Generated cases (valid and invalid), the real model's name, and real bodies."""
    # A generous deadline: a 504 from a generated 0.001 ms deadline is right, not a bug.
    headers = {"x-request-timeout-ms": "30000"}
    out = [
        operation.as_strategy(GenerationMode.POSITIVE, headers=headers),
        operation.as_strategy(GenerationMode.NEGATIVE, headers=headers),
    ]
    names = {p.name for p in operation.path_parameters}
    if "name" not in names or operation.path.startswith("/admin"):
        return out
    real = {"name": "fraud"}
    out.append(operation.as_strategy(headers=headers, path_parameters=real))
    if operation.path in FAST_PATHS:
        body = (
            {"instances": served.sample} if operation.path.startswith("/v1/") else _v2_body(served)
        )
        out.append(
            operation.as_strategy(
                headers=headers,
                path_parameters=real,
                body=body,
                media_type="application/json",
            )
        )
    return out


def _document(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/openapi.json", timeout=30)
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_the_document_describes_the_fast_routes(served: Served) -> None:
    document = _document(served.url)
    for path, method in {**FAST_PATHS, **LLM_PATHS}.items():
        assert method in document["paths"][path], path
    predict = document["paths"]["/v1/models/{name}:predict"]["post"]
    headers = {p["name"] for p in predict["parameters"] if p["in"] == "header"}
    assert {"x-request-timeout-ms", "x-interlock-route-key", "x-request-id"} <= headers
    assert predict["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/PredictRequest"
    }
    ok = predict["responses"]["200"]
    assert "x-interlock-model-version" in ok["headers"]
    for status in ("400", "404", "413", "422", "429", "503", "504"):
        error = predict["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}
    schemas = document["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    assert schemas["ChatCompletionRequest"]["properties"]["model"]["enum"] == ["gpt", "mini"]
    chat = document["paths"]["/llm/v1/chat/completions"]["post"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["responses"]["429"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/OpenAIError"
    }
    assert "403" in document["paths"]["/llm/v1/usage"]["get"]["responses"]


async def test_without_a_gateway_no_llm_route_is_described(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(auth={"client_keys": ["k-123"]})
    transport = httpx.ASGITransport(app=create_app(settings))
    async with httpx.AsyncClient(transport=transport, base_url="http://interlock") as http:
        document = (await http.get("/openapi.json")).json()
    assert set(FAST_PATHS) <= set(document["paths"])
    assert not [p for p in document["paths"] if p.startswith("/llm/")]
    assert "ChatCompletionRequest" not in document["components"]["schemas"]
    predict = document["paths"]["/v1/models/{name}:predict"]["post"]
    assert predict["security"] == [{"bearer": []}, {"apiKey": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_schemathesis_finds_no_server_error_in_the_whole_document(served: Served) -> None:
    schema = schemathesis.openapi.from_url(f"{served.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            strategies = _strategies(operation, served)

            @given(case=st.one_of(strategies))
            @settings(
                max_examples=EXAMPLES_PER_STRATEGY * len(strategies),
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call(base_url=served.url, session=session, timeout=60)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Exception as exc:  # collected: every operation is tried
                failures.append(f"{operation.label}: {exc}")
    assert operations >= len(FAST_PATHS) + len(LLM_PATHS) + 10
    assert not failures, "\n\n".join(failures)
