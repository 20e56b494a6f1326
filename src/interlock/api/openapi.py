"""The OpenAPI document of the routes served in front of FastAPI.

``POST /v1/models/{name}:predict``, ``POST /v2/models/{name}[/versions/{v}]/infer``
(:class:`~interlock.api.predict.PredictionApp`) and ``/llm/v1/*``
(:class:`~interlock.api.llm.LLMApp`) are plain ASGI, so FastAPI never sees them. Their
operations are written here as OpenAPI fragments, with pydantic models that serve only
to generate the JSON schemas (requests never pass through them), and merged into
FastAPI's ``openapi()`` output by :func:`install_openapi`: ``/openapi.json`` and
``/docs`` describe the whole API while the fast paths stay as they are.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from interlock.serving.decode import MATRIX_INPUT

__all__ = [
    "ChatCompletion",
    "ChatCompletionRequest",
    "ChatMessage",
    "Embeddings",
    "EmbeddingsRequest",
    "ErrorBody",
    "InferInputTensor",
    "InferOutputTensor",
    "InferRequest",
    "InferRequestedOutput",
    "InferResponse",
    "ModelEntry",
    "ModelList",
    "OpenAIError",
    "OpenAIErrorDetail",
    "PredictRequest",
    "PredictResponse",
    "UsageSummary",
    "UsageTotals",
    "fast_route_paths",
    "install_openapi",
]

_REF = "#/components/schemas/{model}"

# -- schemas (generation only) -------------------------------------------------------------


class ErrorBody(BaseModel):
    """Every error of the prediction, metadata and admin routes."""

    error: str = Field(description="what went wrong, naming the field to fix; never empty")


class PredictRequest(BaseModel):
    """KServe V1: rows as objects keyed by feature name, or lists in schema order."""

    instances: list[dict[str, Any] | list[Any]] = Field(
        min_length=1, description="the rows; GET /v2/models/{name} lists the features"
    )


class PredictResponse(BaseModel):
    predictions: list[Any] = Field(description="one prediction per row, in order")
    model_name: str
    model_version: str = Field(description="the version that answered")
    degraded: bool | None = Field(
        None, description="true when a static fallback answered instead of the model"
    )


_DATATYPE = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


class InferInputTensor(BaseModel):
    name: str = Field(
        description=f"{MATRIX_INPUT!r} for one [N, F] tensor of every feature in schema "
        "order, else a feature's name (one tensor per feature, shape [N] or [N, 1])"
    )
    datatype: _DATATYPE
    shape: list[int] = Field(description="non-negative dimensions")
    data: list[Any] | None = Field(
        None, description="the values, flat or nested; absent with binary_data_size"
    )
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_size: the tensor's bytes after the JSON header"
    )


class InferRequestedOutput(BaseModel):
    name: Literal["predictions"]
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data: true answers the tensor in binary"
    )


class InferRequest(BaseModel):
    """The Open Inference Protocol request (JSON; Triton's binary extension also taken)."""

    id: str | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None
    parameters: dict[str, Any] | None = Field(
        None, description="binary_data_output: true answers every output in binary"
    )


class InferOutputTensor(BaseModel):
    name: Literal["predictions"]
    datatype: str
    shape: list[int]
    data: list[Any] | None = Field(None, description="absent when answered in binary")
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]
    parameters: dict[str, Any] | None = Field(None, description="degraded: true on a fallback")


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """The LLM routes' errors, in OpenAI's shape so that SDKs raise their usual exceptions."""

    error: OpenAIErrorDetail


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request; fields not listed are passed to the upstream."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="a model name the gateway serves (GET /llm/v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = Field(None, description="true answers server-sent events")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None


class ChatCompletion(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(description="a model name the gateway serves")
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None


class Embeddings(BaseModel):
    model_config = ConfigDict(extra="allow")

    object: Literal["list"]
    data: list[dict[str, Any]]
    model: str
    usage: dict[str, Any] | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class UsageTotals(BaseModel):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    total_cost_usd: float
    cache_hits: int
    saved_cost_usd: float
    errors: int = Field(description="calls whose status is not ok")


class UsageSummary(UsageTotals):
    by_tenant: dict[str, UsageTotals] = Field(description="'(open)': calls without a tenant")
    by_model: dict[str, UsageTotals]
    by_deployment: dict[str, UsageTotals] = Field(
        description="'(none)': calls no upstream answered (cache hits, refusals)"
    )
    since: str | None
    until: str | None


_MODELS: tuple[type[BaseModel], ...] = (
    ErrorBody,
    PredictRequest,
    PredictResponse,
    InferRequest,
    InferResponse,
    OpenAIError,
    ChatCompletionRequest,
    ChatCompletion,
    EmbeddingsRequest,
    Embeddings,
    ModelList,
    UsageSummary,
)


def _schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in _MODELS], ref_template=_REF)
    defs: dict[str, Any] = top.get("$defs", {})
    return defs


# -- parameters and responses --------------------------------------------------------------


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _header(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


_REQUEST_ID = _header(
    "x-request-id",
    "echoed in the answer and the logs; a new one is made when absent or not of this form",
    {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
)
_TIMEOUT = _header(
    "x-request-timeout-ms",
    "the request's deadline in milliseconds (a positive number); past it the answer is 504",
    {"type": "number", "exclusiveMinimum": 0},
)
_ROUTE_KEY = _header(
    "x-interlock-route-key",
    "a sticky key (a customer id): the same key meets the same version of an A/B split",
    {"type": "string"},
)
_PATH_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "a model: NAME, NAME@ALIAS or NAME:VERSION",
    "schema": {"type": "string"},
}
_PATH_VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "description": "a version number",
    "schema": {"type": "string"},
}


def _out_header(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "schema": schema or {"type": "string"}}


_RID_OUT = {"x-request-id": _out_header("the request's id (echoed, or made here)")}
_PREDICT_OUT = {
    **_RID_OUT,
    "x-interlock-model-version": _out_header("the version that answered"),
    "x-interlock-cache": _out_header("hit or miss, when the prediction cache is on"),
    "x-interlock-fallback": _out_header("which fallback answered, when one did"),
}
_RETRY_OUT = {
    **_RID_OUT,
    "retry-after": _out_header("seconds to wait before trying again", {"type": "integer"}),
}
_PREDICT_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "400": ("the body is not JSON or not the protocol's shape; the message names the field",
            _RID_OUT),
    "401": ("a client key is required or is not valid (when client keys are configured)",
            {**_RID_OUT, "www-authenticate": _out_header("Bearer")}),
    "404": ("no such model, alias or version", _RID_OUT),
    "409": ("the model reference is not NAME, NAME@ALIAS or NAME:VERSION", _RID_OUT),
    "413": ("the body is over server.max_body_bytes", _RID_OUT),
    "422": ("a feature is missing, extra or of the wrong type; the message names row and "
            "feature", _RID_OUT),
    "429": ("the version's queue is full: shed", _RETRY_OUT),
    "500": ("the model raised while predicting", _RID_OUT),
    "503": ("no version can answer now (loading, or its circuit is open)", _RETRY_OUT),
    "504": ("the deadline (x-request-timeout-ms, else serving.default_timeout_ms) passed",
            _RID_OUT),
}  # fmt: skip
_LLM_ERRORS: dict[str, tuple[str, dict[str, Any]]] = {
    "400": ("the body is not JSON, lacks a field, or the upstream refused it "
            "(code upstream_rejected)", _RID_OUT),
    "401": ("a tenant key is required or is not valid (when tenants are configured)",
            {**_RID_OUT, "www-authenticate": _out_header("Bearer")}),
    "404": ("no LLM model of that name is configured", _RID_OUT),
    "413": ("the body is over server.max_body_bytes", _RID_OUT),
    "429": ("a tenant's or deployment's RPM/TPM, or a tenant's budget, is spent",
            {**_RETRY_OUT, "x-ratelimit-remaining-requests": _out_header("OpenAI's")}),
    "502": ("an upstream failed in a way no retry could mend", _RID_OUT),
    "503": ("no deployment or fallback could answer", _RETRY_OUT),
    "504": ("the deadline (x-request-timeout-ms, else llm.retry.timeout_s) passed", _RID_OUT),
}  # fmt: skip


def _errors(table: dict[str, tuple[str, dict[str, Any]]], schema: str) -> dict[str, Any]:
    return {
        status: {
            "description": description,
            "headers": headers,
            "content": {"application/json": {"schema": _ref(schema)}},
        }
        for status, (description, headers) in table.items()
    }


def _json(schema: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(schema)}}


# -- operations ----------------------------------------------------------------------------


def _predict(client_auth: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": ["predictions"],
        "summary": "Predict (KServe V1)",
        "description": "Served by interlock's prediction fast path. An A/B split, shadow "
        "and canary apply to the model's default route; NAME@ALIAS and NAME:VERSION pin one.",
        "operationId": "predict_v1",
        "parameters": [_PATH_NAME, _TIMEOUT, _ROUTE_KEY, _REQUEST_ID],
        "requestBody": {"required": True, "content": _json("PredictRequest")},
        "responses": {
            "200": {
                "description": "one prediction per row",
                "headers": _PREDICT_OUT,
                "content": _json("PredictResponse"),
            },
            **_errors(_PREDICT_ERRORS, "ErrorBody"),
        },
    }
    if client_auth:
        operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return operation


def _infer(client_auth: bool, versioned: bool) -> dict[str, Any]:
    parameters = [_PATH_NAME, *([_PATH_VERSION] if versioned else [])]
    binary_length = _header(
        "inference-header-content-length",
        "with Triton's binary tensor extension: the length of the JSON header",
        {"type": "integer", "minimum": 0},
    )
    operation: dict[str, Any] = {
        "tags": ["predictions"],
        "summary": "Infer (Open Inference Protocol V2)" + (", one version" if versioned else ""),
        "description": f"Inputs: one [N, F] tensor named {MATRIX_INPUT!r} (features in "
        "schema order), or one tensor per feature. Triton's binary tensor extension is "
        "taken (application/octet-stream with inference-header-content-length) and "
        "answered when asked.",
        "operationId": "infer_v2_version" if versioned else "infer_v2",
        "parameters": [*parameters, binary_length, _TIMEOUT, _ROUTE_KEY, _REQUEST_ID],
        "requestBody": {
            "required": True,
            "content": {
                **_json("InferRequest"),
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                },
            },
        },
        "responses": {
            "200": {
                "description": "the 'predictions' output tensor",
                "headers": _PREDICT_OUT,
                "content": {
                    **_json("InferResponse"),
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                    },
                },
            },
            **_errors(_PREDICT_ERRORS, "ErrorBody"),
        },
    }
    if client_auth:
        operation["security"] = [{"bearer": []}, {"apiKey": []}]
    return operation


_LLM_OUT = {
    **_RID_OUT,
    "x-interlock-deployment": _out_header("the deployment that answered"),
    "x-interlock-attempts": _out_header("upstream attempts made", {"type": "integer"}),
    "x-interlock-cache": _out_header("hit, semantic, miss, stale, coalesced or off"),
    "x-interlock-overhead-ms": _out_header("the gateway's own time", {"type": "number"}),
    "x-interlock-model": _out_header("the fallback model that answered, when one did"),
}


def _llm_operation(
    summary: str, operation_id: str, *, auth: bool, body: str | None = None, **extra: Any
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "tags": ["llm"],
        "summary": summary,
        "operationId": operation_id,
        "parameters": [_REQUEST_ID],
        **extra,
    }
    if body is not None:
        operation["parameters"] = [_TIMEOUT, _REQUEST_ID]
        operation["requestBody"] = {"required": True, "content": _json(body)}
    operation["responses"] = {
        **operation.get("responses", {}),
        **_errors(_LLM_ERRORS, "OpenAIError"),
    }
    if auth:
        operation["security"] = [{"bearer": []}, {"apiKey": []}, {"azureApiKey": []}]
    return operation


def _llm_paths(auth: bool) -> dict[str, Any]:
    cache_headers = [
        _header("cache-control", "no-cache: skip reading the cache; no-store: skip writing it",
                {"type": "string"}),
        _header("x-interlock-cache", "force: cache even a sampled request",
                {"type": "string"}),
    ]  # fmt: skip
    chat = _llm_operation(
        "Chat completion (OpenAI)",
        "llm_chat_completions",
        auth=auth,
        body="ChatCompletionRequest",
        description="Any OpenAI SDK works with base_url=http://HOST:PORT/llm/v1. With "
        '"stream": true the answer is server-sent events, usage in the last chunk before '
        "[DONE]; a failure after the first token ends the stream with an error event.",
        responses={
            "200": {
                "description": "the completion, or its stream",
                "headers": _LLM_OUT,
                "content": {
                    **_json("ChatCompletion"),
                    "text/event-stream": {"schema": {"type": "string"}},
                },
            }
        },
    )
    chat["parameters"] = [*chat["parameters"], *cache_headers]
    embeddings = _llm_operation(
        "Embeddings (OpenAI)",
        "llm_embeddings",
        auth=auth,
        body="EmbeddingsRequest",
        responses={
            "200": {"description": "the vectors", "headers": _LLM_OUT,
                    "content": _json("Embeddings")},
        },
    )  # fmt: skip
    models = _llm_operation(
        "The LLM models served",
        "llm_models",
        auth=auth,
        responses={
            "200": {"description": "OpenAI's model list", "headers": _RID_OUT,
                    "content": _json("ModelList")},
        },
    )  # fmt: skip
    time_text = {"type": "string", "description": "an ISO date or time, or an age: 24h, 7d"}
    usage = _llm_operation(
        "Usage: tokens, cost and cache savings",
        "llm_usage",
        auth=auth,
        description="A tenant key sees its own usage (another tenant's is 403); the admin "
        "key, or an open gateway, sees everything. 404 when no database records usage.",
        responses={
            "200": {"description": "totals and breakdowns", "headers": _RID_OUT,
                    "content": _json("UsageSummary")},
            "403": {"description": "a tenant key asked for another tenant's usage",
                    "headers": _RID_OUT, "content": _json("OpenAIError")},
        },
    )  # fmt: skip
    usage["parameters"] = [
        *usage["parameters"],
        {"name": "since", "in": "query", "required": False, "schema": time_text},
        {"name": "until", "in": "query", "required": False, "schema": time_text},
        {"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
    ]
    return {
        "/llm/v1/chat/completions": {"post": chat},
        "/llm/v1/embeddings": {"post": embeddings},
        "/llm/v1/models": {"get": models},
        "/llm/v1/usage": {"get": usage},
    }


def fast_route_paths(
    *, client_auth: bool, llm_models: list[str] | None, llm_auth: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The paths and component schemas of the plain-ASGI routes.

    ``llm_models`` lists the gateway's model names (None: no gateway, no LLM paths); the
    request schemas' ``model`` field takes only those.
    """
    paths: dict[str, Any] = {
        "/v1/models/{name}:predict": {"post": _predict(client_auth)},
        "/v2/models/{name}/infer": {"post": _infer(client_auth, versioned=False)},
        "/v2/models/{name}/versions/{version}/infer": {"post": _infer(client_auth, True)},
    }
    schemas = _schemas()
    if llm_models is None:
        for name in ("OpenAIError", "OpenAIErrorDetail", "ChatMessage", "ChatCompletionRequest",
                     "ChatCompletion", "EmbeddingsRequest", "Embeddings", "ModelEntry",
                     "ModelList", "UsageTotals", "UsageSummary"):  # fmt: skip
            schemas.pop(name, None)
        return paths, schemas
    for name in ("ChatCompletionRequest", "EmbeddingsRequest"):
        schemas[name]["properties"]["model"]["enum"] = list(llm_models)
    paths.update(_llm_paths(llm_auth))
    return paths, schemas


_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "azureApiKey": {"type": "apiKey", "in": "header", "name": "api-key"},
}


def install_openapi(
    api: FastAPI, *, client_auth: bool, llm_models: list[str] | None, llm_auth: bool
) -> None:
    """Make ``api.openapi()`` (``/openapi.json``, ``/docs``) describe the fast routes too."""
    framework_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        document = framework_openapi()
        paths, schemas = fast_route_paths(
            client_auth=client_auth, llm_models=llm_models, llm_auth=llm_auth
        )
        components = document.setdefault("components", {})
        known = components.setdefault("schemas", {})
        clash = sorted(set(known) & set(schemas))
        if clash:
            raise RuntimeError(f"OpenAPI schema names defined twice: {', '.join(clash)}")
        known.update(schemas)
        components.setdefault("securitySchemes", {}).update(_SECURITY_SCHEMES)
        document["paths"] = {**paths, **document.get("paths", {})}
        api.openapi_schema = document
        return document

    api.openapi = openapi  # type: ignore[method-assign]
