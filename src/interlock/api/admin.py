"""The admin API: register models, move aliases, inspect the registry.

Every route needs the admin key when one is configured (``auth.admin_key``), sent as
``Authorization: Bearer <key>`` or ``x-api-key``; without one, the admin API answers
loopback clients only (:mod:`interlock.api.guard`). Moving an alias answers once this
node serves the new version; other nodes follow within ``serving.alias_refresh_s``.

Registering an artifact that runs code when it is loaded (the ``python`` format, or
``trust`` for a pickle) is refused (403) unless an admin key is configured *and*
``auth.allow_code_uploads`` is on: otherwise anyone who can reach the admin API could
run code in the server. The CLI, run by the operator on their own machine, is not bound
by this rule.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from pydantic import BaseModel, Field

from interlock._core.formats import ModelFormat
from interlock._core.schema import FeatureSchema
from interlock.api.predict import check_key
from interlock.errors import MalformedInputError
from interlock.registry import Registry, describe_model, describe_version
from interlock.serving.models import ModelManager
from interlock.serving.shadow import ShadowRunner

__all__ = ["build_admin_router", "check_code_upload"]


class _AliasMove(BaseModel):
    version: int = Field(ge=1, description="the version the alias points at")


def _json_field(name: str, raw: str | None) -> Any:
    if raw is None or raw == "":
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise MalformedInputError(f"field {name!r} is not valid JSON: {exc}") from None


def check_code_upload(
    fmt: str, trust: bool, *, admin_key_set: bool, allow_code_uploads: bool
) -> None:
    """Refuse (403) an upload that runs code unless the admin key and the setting allow it."""
    if fmt != ModelFormat.PYTHON.value and not trust:
        return
    missing = []
    if not admin_key_set:
        missing.append("auth.admin_key (INTERLOCK_AUTH__ADMIN_KEY)")
    if not allow_code_uploads:
        missing.append("auth.allow_code_uploads = true (INTERLOCK_AUTH__ALLOW_CODE_UPLOADS)")
    if not missing:
        return
    what = "a python artifact" if fmt == ModelFormat.PYTHON.value else "a trusted artifact"
    raise HTTPException(
        403,
        f"registering {what} runs its code in the server, so the admin API needs an admin "
        f"key and code uploads enabled: set {' and '.join(missing)}, or register it with "
        "'interlock models register' on the server's machine",
    )


def _save_upload(upload: UploadFile, directory: Path) -> Path:
    name = Path(upload.filename or "artifact").name or "artifact"
    target = directory / name
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out)
    return target


def build_admin_router(
    registry: Registry,
    manager: ModelManager,
    shadow: ShadowRunner,
    admin_keys: tuple[bytes, ...],
    *,
    allow_code_uploads: bool = False,
) -> APIRouter:
    async def admin(request: Request) -> None:
        check_key(dict(request.scope["headers"]), admin_keys)

    router = APIRouter(prefix="/admin", dependencies=[Depends(admin)], tags=["admin"])

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"models": [describe_model(m) for m in await registry.list_models()]}

    @router.get("/models/{name}")
    async def show_model(name: str) -> dict[str, Any]:
        summary = await registry.get_model(name)
        versions = await registry.list_versions(name)
        return {**describe_model(summary), "details": [describe_version(v) for v in versions]}

    @router.get("/models/{name}/versions/{version}")
    async def show_version(name: str, version: int) -> dict[str, Any]:
        return dict(describe_version(await registry.get_version(name, version)))

    @router.post("/models/{name}/versions", status_code=201)
    async def register(
        name: str,
        artifact: Annotated[UploadFile, File(description="the model file")],
        format: Annotated[str, Form(description="lightgbm, xgboost, onnx, sklearn or python")],
        alias: Annotated[str | None, Form()] = None,
        allow_duplicate: Annotated[
            bool, Form(description="register bytes a version already has, again")
        ] = False,
        force_schema: Annotated[
            bool, Form(description="register a schema that breaks current clients")
        ] = False,
        feature_schema: Annotated[
            str | None, Form(alias="schema", description="the feature schema as JSON")
        ] = None,
        metrics: Annotated[str | None, Form(description="a JSON object of numbers")] = None,
        tags: Annotated[str | None, Form(description="a JSON object of strings")] = None,
        trust: Annotated[
            bool, Form(description="allow a pickle artifact (it runs code when loaded)")
        ] = False,
    ) -> dict[str, Any]:
        check_code_upload(
            format,
            trust,
            admin_key_set=bool(admin_keys),
            allow_code_uploads=allow_code_uploads,
        )
        raw_schema = _json_field("schema", feature_schema)
        try:
            parsed = FeatureSchema.from_list(raw_schema) if raw_schema is not None else None
        except ValueError as exc:
            raise MalformedInputError(f"field 'schema': {exc}") from None
        with tempfile.TemporaryDirectory(prefix="interlock-upload-") as tmp:
            path = await asyncio.to_thread(_save_upload, artifact, Path(tmp))
            version = await registry.register(
                name,
                path,
                format,
                schema=parsed,
                metrics=_json_field("metrics", metrics),
                tags=_json_field("tags", tags),
                alias=alias,
                trusted=trust,
                allow_duplicate=allow_duplicate,
                force_schema=force_schema,
            )
        if alias is not None:
            await manager.refresh()
        return dict(describe_version(version))

    @router.put("/models/{name}/aliases/{alias}")
    async def move_alias(name: str, alias: str, body: _AliasMove) -> dict[str, Any]:
        await registry.set_alias(name, alias, body.version)
        await manager.refresh()
        return {"model": name, "alias": alias, "version": body.version}

    @router.get("/models/{name}/shadow")
    async def shadow_log(
        name: str,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        disagreements: Annotated[bool, Query(description="only differing answers")] = False,
    ) -> dict[str, Any]:
        """This node's newest shadow comparisons for ``name``, newest first."""
        await registry.get_model(name)
        entries = shadow.comparisons(name, limit=limit, disagreements_only=disagreements)
        return {"model": name, "comparisons": [e.to_dict() for e in entries]}

    @router.delete("/models/{name}/aliases/{alias}", status_code=204)
    async def delete_alias(name: str, alias: str) -> None:
        await registry.delete_alias(name, alias)
        await manager.refresh()

    return router
