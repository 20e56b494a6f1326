"""``interlock models``: register, list, show, and move aliases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from interlock._core.schema import FeatureSchema
from interlock.app import open_registry
from interlock.cli._context import ConfigOption, settings_from
from interlock.errors import ConfigError
from interlock.registry import ModelVersion, Progress, describe_model, describe_version
from interlock.runtime.base import ModelFormat

__all__ = ["alias", "app", "list_models", "register", "show"]

app = typer.Typer(help="Manage the model registry.", no_args_is_help=True)


def _read_json(label: str, path: Path | None) -> Any:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {label} file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{label} file {path} is not valid JSON: {exc}") from None


def _schema(path: Path | None) -> FeatureSchema | None:
    raw = _read_json("schema", path)
    if raw is None:
        return None
    try:
        return FeatureSchema.from_list(raw)
    except ValueError as exc:
        raise ConfigError(f"schema file {path}: {exc}") from None


@contextmanager
def _progress() -> Iterator[Progress]:
    """Each step of a registration: a spinner on a terminal, else a line on stderr."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield lambda step: typer.echo(step, err=True)
        return
    last: list[str] = []
    with console.status("registering…") as status:

        def tell(step: str) -> None:
            last[:] = [step]
            status.update(step)

        yield tell
    if last and last[0].startswith("registered "):
        console.print(last[0])


@app.command("register")
def register(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name, e.g. fraud.")],
    path: Annotated[Path, typer.Argument(help="The model file.", exists=True, dir_okay=False)],
    format: Annotated[ModelFormat, typer.Option("--format", "-f", help="The artifact's format.")],
    alias: Annotated[str | None, typer.Option(help="Point this alias at the new version.")] = None,
    schema: Annotated[
        Path | None,
        typer.Option(
            help="JSON feature schema. Default: the model's current schema when the artifact "
            "takes the same features, else the artifact's own (names are required then)."
        ),
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="JSON object of metrics.")] = None,
    tags: Annotated[Path | None, typer.Option(help="JSON object of tags.")] = None,
    trust: Annotated[
        bool, typer.Option("--trust", help="Allow a pickle: it can run arbitrary code.")
    ] = False,
    force_schema: Annotated[
        bool,
        typer.Option(
            "--force-schema",
            help="Register a schema that breaks the current version's clients (a feature "
            "removed, renamed, added or moved, or a type narrowed).",
        ),
    ] = False,
    allow_duplicate: Annotated[
        bool,
        typer.Option(
            "--allow-duplicate", help="Register bytes a version of NAME already has, again."
        ),
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Register a new version of NAME and print its version number.

    The artifact is loaded and checked against its schema before the version exists;
    steps go to stderr, the version number to stdout.
    """
    settings = settings_from(ctx, config)
    parsed_schema = _schema(schema)
    parsed_metrics = _read_json("metrics", metrics)
    parsed_tags = _read_json("tags", tags)

    async def run(tell: Progress) -> Any:
        async with open_registry(settings) as registry:
            return await registry.register(
                name,
                path,
                format.value,
                schema=parsed_schema,
                metrics=parsed_metrics,
                tags=parsed_tags,
                alias=alias,
                trusted=trust,
                force_schema=force_schema,
                allow_duplicate=allow_duplicate,
                progress=tell,
            )

    with _progress() as tell:
        version = asyncio.run(run(tell))
    typer.echo(version.version)


@app.command("list")
def list_models(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """List the registered models with their versions and aliases."""
    settings = settings_from(ctx, config)

    async def run() -> list[Any]:
        async with open_registry(settings) as registry:
            return await registry.list_models()

    models = asyncio.run(run())
    if as_json:
        typer.echo(json.dumps([describe_model(m) for m in models], indent=2))
        return
    table = Table("model", "versions", "latest", "aliases")
    for m in models:
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted(m.aliases.items()))
        table.add_row(m.name, str(len(m.versions)), str(m.latest), aliases)
    Console().print(table)


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    config: ConfigOption = None,
) -> None:
    """Show a model's versions (format, sha256, metrics, aliases) and their schemas."""
    settings = settings_from(ctx, config)

    async def run() -> tuple[Any, list[Any]]:
        async with open_registry(settings) as registry:
            return await registry.get_model(name), await registry.list_versions(name)

    summary, versions = asyncio.run(run())
    if as_json:
        out = {**describe_model(summary), "details": [describe_version(v) for v in versions]}
        typer.echo(json.dumps(out, indent=2))
        return
    console = Console()
    aliases = ", ".join(f"{a}→{v}" for a, v in sorted(summary.aliases.items())) or "none"
    console.print(f"[bold]{summary.name}[/bold]  aliases: {aliases}")
    table = Table("version", "format", "task", "features", "metrics", "sha256", "created")
    for v in versions:
        metrics_text = ", ".join(f"{k}={val:.4g}" for k, val in sorted(v.metrics.items()))
        table.add_row(
            str(v.version),
            str(v.format),
            v.task,
            str(len(v.schema)) if v.schema is not None else "-",
            metrics_text,
            v.artifact_sha256[:12],
            v.created_at.isoformat(timespec="seconds"),
        )
    console.print(table)
    _print_schemas(console, versions)


def _print_schemas(console: Console, versions: list[ModelVersion]) -> None:
    """Each distinct schema once, newest first, with the versions that have it."""
    groups: dict[str, list[ModelVersion]] = {}
    for v in versions:
        groups.setdefault(json.dumps(v.schema.to_list(), sort_keys=True), []).append(v)
    for group in sorted(groups.values(), key=lambda g: -g[-1].version):
        numbers = ", ".join(str(v.version) for v in group)
        label = "version" if len(group) == 1 else "versions"
        table = Table(title=f"schema of {label} {numbers}", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("feature", no_wrap=True)
        table.add_column("type", no_wrap=True)
        table.add_column("range", no_wrap=True)
        table.add_column("categories")
        for position, feature in enumerate(group[-1].schema.features, start=1):
            low = "" if feature.minimum is None else f"{feature.minimum:.6g}"
            high = "" if feature.maximum is None else f"{feature.maximum:.6g}"
            cats = feature.categories or ()
            shown = ", ".join(cats[:6]) + (f", … ({len(cats)})" if len(cats) > 6 else "")
            table.add_row(
                str(position),
                feature.name,
                feature.type.value,
                f"{low}..{high}" if low or high else "",
                shown,
            )
        console.print(table)


@app.command("alias")
def alias(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Model name.")],
    alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="e.g. champion.")],
    version: Annotated[int, typer.Argument(help="The version the alias points at.", min=1)],
    config: ConfigOption = None,
) -> None:
    """Point ALIAS of NAME at VERSION; running servers follow within a second."""
    settings = settings_from(ctx, config)

    async def run() -> None:
        async with open_registry(settings) as registry:
            await registry.set_alias(name, alias_name, version)

    asyncio.run(run())
    typer.echo(f"{name}@{alias_name} → {version}")
