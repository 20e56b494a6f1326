"""Read-only protocol routes: health, server and model metadata, Prometheus metrics.

KServe V1 (``GET /v1/models/{name}``) and the Open Inference Protocol
(``/v2/health/*``, ``/v2``, ``/v2/models/{name}[/versions/{v}][/ready]``), as
``tritonclient`` and KServe clients expect them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from interlock import __version__
from interlock.api.predict import check_key
from interlock.errors import ModelNotFoundError
from interlock.monitoring.metrics import ServingMetrics
from interlock.serving.decode import MATRIX_INPUT
from interlock.serving.models import LoadedModel, ModelManager

__all__ = ["build_inference_router"]

_V2_DATATYPE = {"float": "FP64", "int": "INT64", "bool": "BOOL", "category": "BYTES"}


def _metadata(loaded: LoadedModel, versions: list[int]) -> dict[str, Any]:
    schema = loaded.version.schema
    inputs: list[dict[str, Any]] = []
    if schema is not None:
        inputs.append({"name": MATRIX_INPUT, "datatype": "FP64", "shape": [-1, len(schema)]})
        inputs.extend(
            {"name": f.name, "datatype": _V2_DATATYPE[f.type.value], "shape": [-1]}
            for f in schema.features
        )
    return {
        "name": loaded.name,
        "versions": [str(v) for v in versions],
        "platform": str(loaded.version.format),
        "inputs": inputs,
        "outputs": [{"name": "predictions", "datatype": "FP64", "shape": [-1]}],
        "parameters": {
            "version": str(loaded.number),
            "task": loaded.version.task,
            "features": schema.to_list() if schema is not None else [],
        },
    }


def _version(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ModelNotFoundError(f"version {text!r} is not a version number")
    return int(text)


def build_inference_router(
    manager: ModelManager,
    metrics: ServingMetrics,
    versions_of: Any,
    client_keys: tuple[bytes, ...],
    failing_loops: Callable[[], Sequence[str]] | None = None,
) -> APIRouter:
    """``versions_of(name) -> list[int]`` lists a model's versions (from the registry).

    ``failing_loops()`` names the background loops failing now: while it names any, the
    process is not ready (503).
    """

    async def client(request: Request) -> None:
        check_key(dict(request.scope["headers"]), client_keys)

    router = APIRouter()
    guarded = APIRouter(dependencies=[Depends(client)])

    @router.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get(
        "/v2/health/ready",
        response_model=None,
        responses={503: {"description": "a background loop is failing; the body names it"}},
    )
    async def ready() -> dict[str, bool] | JSONResponse:
        failing = list(failing_loops()) if failing_loops is not None else []
        if not failing:
            return {"ready": True}
        return JSONResponse(
            {
                "ready": False,
                "failing_loops": failing,
                "error": f"not ready: background loop(s) failing: {', '.join(failing)};"
                " the log has the cause",
            },
            status_code=503,
        )

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @guarded.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "interlock", "version": __version__, "extensions": ["binary_tensor_data"]}

    async def _model(name: str, version: str | None, response: Response) -> LoadedModel:
        loaded = await manager.get(name, _version(version))
        response.headers["x-interlock-model-version"] = str(loaded.number)
        return loaded

    @guarded.get("/v1/models/{name}")
    async def v1_model(name: str, response: Response) -> dict[str, Any]:
        loaded = await _model(name, None, response)
        return {"name": name, "ready": True, "model_version": str(loaded.number)}

    @guarded.get("/v2/models/{name}")
    async def v2_model(name: str, response: Response) -> dict[str, Any]:
        loaded = await _model(name, None, response)
        return _metadata(loaded, await versions_of(loaded.name))

    @guarded.get("/v2/models/{name}/versions/{version}")
    async def v2_model_version(name: str, version: str, response: Response) -> dict[str, Any]:
        loaded = await _model(name, version, response)
        return _metadata(loaded, await versions_of(loaded.name))

    @guarded.get("/v2/models/{name}/ready")
    async def v2_ready(name: str, response: Response) -> dict[str, Any]:
        loaded = await _model(name, None, response)
        return {"name": name, "ready": True, "model_version": str(loaded.number)}

    @guarded.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_version_ready(name: str, version: str, response: Response) -> dict[str, Any]:
        loaded = await _model(name, version, response)
        return {"name": name, "ready": True, "model_version": str(loaded.number)}

    router.include_router(guarded)
    return router
