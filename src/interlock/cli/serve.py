"""``interlock serve`` and ``interlock demo``."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from typing import Annotated, Any

import typer
import uvicorn

from interlock._core.logs import configure_logging
from interlock.app import create_app, open_registry
from interlock.cli._context import ConfigOption, settings_from, share_the_gil
from interlock.errors import ModelNotFoundError
from interlock.settings import Settings

__all__ = ["demo", "run_server", "serve"]

log = logging.getLogger("interlock")

HostOption = Annotated[str | None, typer.Option(help="Address to listen on.")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on.")]


def _server_overrides(host: str | None, port: int | None) -> dict[str, Any]:
    server = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    return {"server": server} if server else {}


def run_server(settings: Settings) -> None:
    """Serve until interrupted: uvloop and httptools, the app's own logs."""
    configure_logging(settings.log.level, settings.log.json_lines)
    share_the_gil(settings)
    _say_who_may_administer(settings)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        loop="uvloop",
        http="httptools",
        access_log=settings.server.access_log,
        log_config=None,
        timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


def _say_who_may_administer(settings: Settings) -> None:
    """One line when the admin API has no key: it then answers loopback clients only."""
    if settings.auth.admin_key is not None:
        return
    code = (
        "; code uploads stay refused until one is set" if settings.auth.allow_code_uploads else ""
    )
    log.warning(
        "the admin API is open to loopback clients only because no admin key is set "
        "(set auth.admin_key to reach it from elsewhere)" + code
    )


def serve(
    ctx: typer.Context,
    host: HostOption = None,
    port: PortOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve every registered model over HTTP (KServe V1, Open Inference Protocol V2)."""
    run_server(settings_from(ctx, config, **_server_overrides(host, port)))


async def _ensure_demo_model(settings: Settings) -> list[dict[str, Any]]:
    """Train and register ``fraud@champion`` unless it exists; return sample requests."""
    from interlock.training.fraud import train_fraud_model

    demo_dir = settings.home / "demo"
    sample_file = demo_dir / "sample.json"
    async with open_registry(settings) as registry:
        try:
            await registry.resolve("fraud")
            if sample_file.is_file():
                sample: list[dict[str, Any]] = json.loads(sample_file.read_text())
                return sample
        except ModelNotFoundError:
            pass
        typer.echo("Generating card transactions and training the demo fraud model…")
        trained = await asyncio.to_thread(train_fraud_model, demo_dir)
        version = await registry.register(
            "fraud",
            trained.path,
            "lightgbm",
            schema=trained.schema,
            metrics=trained.metrics,
            tags={"source": "interlock demo"},
            alias="champion",
        )
        sample_file.write_text(json.dumps(trained.sample, indent=2))
        auc = trained.metrics.get("roc_auc", float("nan"))
        typer.echo(f"Registered fraud version {version.version} as champion (ROC AUC {auc:.3f}).")
        return trained.sample


def demo(
    ctx: typer.Context,
    host: HostOption = None,
    port: PortOption = None,
    serve_after: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Serve after preparing the model.")
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Build the demo fraud model on first run, then serve it."""
    settings = settings_from(ctx, config, **_server_overrides(host, port))
    sample = asyncio.run(_ensure_demo_model(settings))
    url = f"http://{settings.server.host}:{settings.server.port}/v1/models/fraud:predict"
    body = json.dumps({"instances": sample[:1]})
    typer.echo("\nTry it:\n")
    typer.echo(f"  curl -s {url} -H 'content-type: application/json' -d {shlex.quote(body)}\n")
    typer.echo(f"Metrics: http://{settings.server.host}:{settings.server.port}/metrics")
    if serve_after:
        run_server(settings)
