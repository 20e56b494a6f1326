"""Reading the registry: references, aliases, summaries and the routing table."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from interlock.errors import ModelNotFoundError, RegistryError
from interlock.registry import (
    ModelRouting,
    ModelSummary,
    Registry,
    describe_model,
    describe_version,
)
from tests.registry.sample_models import START

ModelFile = Callable[..., Path]


async def _three_versions(registry: Registry, model_file: ModelFile, name: str = "fraud") -> None:
    for _ in range(3):
        await registry.register(name, model_file(), "python")


async def test_bare_name_is_latest_until_a_champion_is_set(
    registry: Registry, model_file: ModelFile
) -> None:
    await _three_versions(registry, model_file)
    assert (await registry.resolve("fraud")).version == 3

    await registry.set_alias("fraud", "champion", 2)
    assert (await registry.resolve("fraud")).version == 2
    assert (await registry.resolve("fraud@latest")).version == 3
    assert (await registry.resolve("fraud@champion")).version == 2

    await registry.delete_alias("fraud", "champion")
    assert (await registry.resolve("fraud")).version == 3


async def test_explicit_versions(registry: Registry, model_file: ModelFile) -> None:
    await _three_versions(registry, model_file)
    await registry.set_alias("fraud", "champion", 3)
    assert (await registry.resolve("fraud", 1)).version == 1
    assert (await registry.resolve("fraud:2")).version == 2
    assert (await registry.resolve("fraud:2", 2)).version == 2
    assert (await registry.get_version("fraud", 3)).version == 3


async def test_alias_moves_atomically(registry: Registry, model_file: ModelFile) -> None:
    await _three_versions(registry, model_file)
    await registry.set_alias("fraud", "challenger", 1)
    await registry.set_alias("fraud", "challenger", 3)
    assert (await registry.resolve("fraud@challenger")).version == 3

    # Concurrent moves of one alias: every one succeeds, exactly one wins, no duplicates.
    await asyncio.gather(*(registry.set_alias("fraud", "blue", v) for v in (1, 2, 3, 1, 2, 3)))
    summary = await registry.get_model("fraud")
    assert set(summary.aliases) == {"blue", "challenger"}
    assert summary.aliases["blue"] in {1, 2, 3}


async def test_register_with_alias_moves_it(registry: Registry, model_file: ModelFile) -> None:
    await registry.register("fraud", model_file(), "python", alias="champion")
    await registry.register("fraud", model_file(), "python")
    assert (await registry.resolve("fraud")).version == 1
    await registry.register("fraud", model_file(), "python", alias="champion")
    assert (await registry.resolve("fraud")).version == 3


async def test_not_found_messages(registry: Registry, model_file: ModelFile) -> None:
    await registry.register("fraud", model_file(), "python")
    await registry.register("fraud", model_file(), "python")
    await registry.set_alias("fraud", "champion", 2)
    await registry.set_alias("fraud", "challenger", 1)

    cases = {
        "fraud@blue": "model 'fraud' has no alias 'blue' (aliases: challenger, champion)",
        "fraud:7": "model 'fraud' has no version 7 (versions: 1, 2)",
        "frod": "no model named 'frod' (did you mean 'fraud'?)",
        "zzz@champion": "no model named 'zzz'",
    }
    for ref, message in cases.items():
        with pytest.raises(ModelNotFoundError) as caught:
            await registry.resolve(ref)
        assert str(caught.value) == message

    with pytest.raises(ModelNotFoundError) as caught:
        await registry.get_version("fraud", 0)
    assert str(caught.value) == "model 'fraud' has no version 0 (versions: 1, 2)"
    with pytest.raises(ModelNotFoundError, match=r"^no model named 'nope'$"):
        await registry.get_model("nope")
    with pytest.raises(ModelNotFoundError, match=r"^no model named 'nope'$"):
        await registry.list_versions("nope")
    with pytest.raises(ModelNotFoundError) as caught:
        await registry.set_alias("fraud", "blue", 9)
    assert str(caught.value) == "model 'fraud' has no version 9 (versions: 1, 2)"
    with pytest.raises(ModelNotFoundError, match=r"^no model named 'nope'$"):
        await registry.set_alias("nope", "blue", 1)
    with pytest.raises(ModelNotFoundError) as caught:
        await registry.delete_alias("fraud", "blue")
    assert str(caught.value) == (
        "model 'fraud' has no alias 'blue' (aliases: challenger, champion)"
    )
    with pytest.raises(ModelNotFoundError, match=r"^no model named 'nope'$"):
        await registry.delete_alias("nope", "blue")


async def test_no_aliases_message(registry: Registry, model_file: ModelFile) -> None:
    await registry.register("fraud", model_file(), "python")
    with pytest.raises(ModelNotFoundError) as caught:
        await registry.resolve("fraud@champion")
    assert str(caught.value) == "model 'fraud' has no alias 'champion' (aliases: none)"


async def test_long_version_lists_are_shortened(registry: Registry, model_file: ModelFile) -> None:
    path = model_file()
    for _ in range(12):
        await registry.register("big", path, "python", allow_duplicate=True)
    with pytest.raises(ModelNotFoundError) as caught:
        await registry.resolve("big", 13)
    assert (
        str(caught.value)
        == "model 'big' has no version 13 (versions: 1, 2, 3, …, 12 (12 versions))"
    )


@pytest.mark.parametrize(
    ("ref", "version", "message"),
    [
        ("fraud@", None, "invalid model reference 'fraud@': use NAME, NAME@ALIAS or NAME:VERSION"),
        ("@blue", None, "invalid model reference '@blue': use NAME, NAME@ALIAS or NAME:VERSION"),
        (
            "fraud:x",
            None,
            "invalid model reference 'fraud:x': use NAME, NAME@ALIAS or NAME:VERSION",
        ),
        ("fraud@blue", 2, "'fraud@blue' names an alias; do not also give version 2"),
        ("fraud:1", 2, "'fraud:1' names a version; do not also give version 2"),
    ],
)
async def test_malformed_references(
    registry: Registry, ref: str, version: int | None, message: str
) -> None:
    with pytest.raises(RegistryError) as caught:
        await registry.resolve(ref, version)
    assert str(caught.value) == message
    assert not isinstance(caught.value, ModelNotFoundError)


@pytest.mark.parametrize(
    ("alias", "message"),
    [
        ("latest", "alias 'latest' is reserved: it always means the newest version"),
        ("bad alias", "invalid alias 'bad alias': use 1 to 128 letters"),
        ("a@b", "invalid alias 'a@b': use 1 to 128 letters"),
        ("", "invalid alias '': use 1 to 128 letters"),
    ],
)
async def test_alias_names_are_checked(
    registry: Registry, model_file: ModelFile, alias: str, message: str
) -> None:
    await registry.register("fraud", model_file(), "python")
    with pytest.raises(RegistryError, match=f"^{message}"):
        await registry.set_alias("fraud", alias, 1)
    with pytest.raises(RegistryError, match=f"^{message}"):
        await registry.register("fraud", model_file(), "python", alias=alias)
    assert (await registry.get_model("fraud")).versions == [1]


async def test_list_and_get_models(registry: Registry, model_file: ModelFile) -> None:
    assert await registry.list_models() == []
    await _three_versions(registry, model_file, "onboarding")  # at START + 0..2 s
    await registry.register("fraud", model_file(), "python", alias="champion")  # + 3 s
    await registry.set_alias("onboarding", "challenger", 1)

    fraud = ModelSummary(
        name="fraud",
        created_at=START + timedelta(seconds=3),
        versions=[1],
        aliases={"champion": 1},
        latest=1,
    )
    onboarding = ModelSummary(
        name="onboarding",
        created_at=START,
        versions=[1, 2, 3],
        aliases={"challenger": 1},
        latest=3,
    )
    assert await registry.list_models() == [fraud, onboarding]
    assert await registry.get_model("onboarding") == onboarding
    assert onboarding.routing == ModelRouting(latest=3, aliases={"challenger": 1})


async def test_routing_lists_every_model_in_one_table(
    registry: Registry, model_file: ModelFile
) -> None:
    assert await registry.routing() == {}
    await _three_versions(registry, model_file, "fraud")
    await registry.register("onboarding", model_file(), "python")
    await registry.set_alias("fraud", "champion", 2)
    await registry.set_alias("fraud", "challenger", 3)

    routing = await registry.routing()

    assert routing == {
        "fraud": ModelRouting(latest=3, aliases={"champion": 2, "challenger": 3}),
        "onboarding": ModelRouting(latest=1, aliases={}),
    }
    fraud, onboarding = routing["fraud"], routing["onboarding"]
    assert [fraud.version_for(a) for a in (None, "latest", "challenger", "blue")] == [2, 3, 3, None]
    assert [onboarding.version_for(a) for a in (None, "latest", "champion")] == [1, 1, None]


async def test_routing_sees_changes_made_through_another_registry(
    registry: Registry, database_url: str, tmp_path: Path, model_file: ModelFile
) -> None:
    """Two processes share one database: an alias moved by one is seen by the other."""
    from interlock._core.clock import SystemClock
    from interlock.runtime.loaders import inspect_artifact
    from interlock.store import ArtifactStore, Database

    await _three_versions(registry, model_file)
    async with Database(database_url) as other_db:
        other = Registry(
            other_db, ArtifactStore(tmp_path / "artifacts"), inspect_artifact, SystemClock()
        )
        await other.set_alias("fraud", "champion", 1)
        assert (await registry.routing())["fraud"].version_for(None) == 1
        await registry.set_alias("fraud", "champion", 3)
        assert (await other.routing())["fraud"].aliases == {"champion": 3}
        assert (await other.resolve("fraud")).version == 3


async def test_descriptions_are_json(registry: Registry, model_file: ModelFile) -> None:
    version = await registry.register(
        "fraud", model_file(), "python", metrics={"auc": 0.5}, tags={"t": "x"}, alias="champion"
    )
    summary = await registry.get_model("fraud")

    assert json.loads(json.dumps(describe_model(summary))) == {
        "name": "fraud",
        "created_at": "2025-01-02T03:04:05.678901+00:00",
        "versions": [1],
        "aliases": {"champion": 1},
        "latest": 1,
    }
    assert json.loads(json.dumps(describe_version(version))) == {
        "model": "fraud",
        "version": 1,
        "ref": "fraud:1",
        "format": "python",
        "task": "unknown",
        "artifact_sha256": version.artifact_sha256,
        "artifact_name": "model.py",
        "schema": [{"name": "a", "type": "float"}, {"name": "b", "type": "float"}],
        "metrics": {"auc": 0.5},
        "tags": {"t": "x"},
        "trusted": False,
        "created_at": "2025-01-02T03:04:05.678901+00:00",
    }
