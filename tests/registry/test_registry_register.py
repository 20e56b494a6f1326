"""Registering versions: numbering, concurrency, schemas, metadata and artifacts."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import (
    ArtifactIntegrityError,
    ModelFormatError,
    RegistryError,
)
from interlock.registry import ModelVersion, Registry
from interlock.runtime.base import ModelFormat
from tests.registry.sample_models import NAMELESS_MODEL, START, SUM_MODEL

ModelFile = Callable[..., Path]


async def test_register_twice_gives_versions_1_and_2(
    registry: Registry, model_file: ModelFile
) -> None:
    first = await registry.register("fraud", model_file(SUM_MODEL), "python")
    second = await registry.register(
        "fraud", model_file(SUM_MODEL), ModelFormat.PYTHON, allow_duplicate=True
    )

    sha = hashlib.sha256(SUM_MODEL.encode()).hexdigest()
    path = registry.artifacts.root / "sha256" / sha[:2] / sha / "model.py"
    assert first == ModelVersion(
        model="fraud",
        version=1,
        format=ModelFormat.PYTHON,
        artifact_sha256=sha,
        artifact_path=path,
        schema=FeatureSchema.of([Feature("a"), Feature("b")]),
        task="unknown",
        metrics={},
        tags={},
        trusted=False,
        created_at=START,
    )
    assert second.version == 2
    assert second.created_at == START + timedelta(seconds=1)
    assert second.artifact_path == path  # same bytes, same blob
    assert await registry.get_version("fraud", 1) == first
    assert await registry.get_version("fraud", 2) == second
    assert await registry.list_versions("fraud") == [first, second]


async def test_concurrent_registrations_get_distinct_consecutive_versions(
    registry: Registry, model_file: ModelFile
) -> None:
    paths = [model_file(SUM_MODEL + f"\n# copy {i}\n") for i in range(10)]

    registered = await asyncio.gather(
        *(registry.register("fraud", path, "python") for path in paths)
    )

    assert sorted(v.version for v in registered) == list(range(1, 11))
    stored = await registry.list_versions("fraud")
    assert [v.version for v in stored] == list(range(1, 11))
    by_version = {v.version: v.artifact_sha256 for v in registered}
    assert {v.version: v.artifact_sha256 for v in stored} == by_version
    assert len(set(by_version.values())) == 10


async def test_concurrent_registrations_of_new_models(
    registry: Registry, model_file: ModelFile
) -> None:
    path = model_file()

    await asyncio.gather(
        *(registry.register(f"m{i % 3}", path, "python", allow_duplicate=True) for i in range(9))
    )

    routing = await registry.routing()
    assert {name: r.latest for name, r in routing.items()} == {"m0": 3, "m1": 3, "m2": 3}


async def test_metadata_round_trips(registry: Registry, model_file: ModelFile) -> None:
    registered = await registry.register(
        "fraud",
        model_file(),
        "python",
        metrics={"auc": 0.91, "rows": 1000},
        tags={"team": "risk", "note": "naïve ✓"},
        trusted=True,
        alias="champion",
    )

    assert registered.metrics == {"auc": 0.91, "rows": 1000.0}
    assert registered.tags == {"team": "risk", "note": "naïve ✓"}
    assert registered.trusted is True
    assert await registry.resolve("fraud") == registered
    assert (await registry.get_model("fraud")).aliases == {"champion": 1}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
async def test_non_finite_metrics_are_refused(
    registry: Registry, model_file: ModelFile, bad: float
) -> None:
    with pytest.raises(RegistryError, match=rf"fraud: metric 'auc' is {bad}; metrics must be"):
        await registry.register("fraud", model_file(), "python", metrics={"auc": bad})


async def test_metrics_and_tags_must_be_json_safe(
    registry: Registry, model_file: ModelFile
) -> None:
    with pytest.raises(RegistryError, match="metric 'auc' must be a number, got 'high'"):
        await registry.register("fraud", model_file(), "python", metrics={"auc": "high"})  # type: ignore[dict-item]
    with pytest.raises(RegistryError, match="metric 'ok' must be a number, got True"):
        await registry.register("fraud", model_file(), "python", metrics={"ok": True})
    with pytest.raises(RegistryError, match="tag 'owner' must be a string, got 3"):
        await registry.register("fraud", model_file(), "python", tags={"owner": 3})  # type: ignore[dict-item]
    with pytest.raises(RegistryError, match="no model named 'fraud'"):
        await registry.get_model("fraud")


@pytest.mark.parametrize(
    "name", ["", "-fraud", "fr aud", "fraud@blue", "fraud:1", "a/b", "x" * 129, "é"]
)
async def test_invalid_names_are_refused(
    registry: Registry, model_file: ModelFile, name: str
) -> None:
    with pytest.raises(RegistryError, match=rf"invalid model name {name!r}: use 1 to 128"):
        await registry.register(name, model_file(), "python")


async def test_valid_name_edge_cases(registry: Registry, model_file: ModelFile) -> None:
    for name in ["a", "Fraud.v2_final-3", "9" + "x" * 127]:
        assert (await registry.register(name, model_file(), "python")).version == 1


async def test_inspected_schema_is_used(registry: Registry, model_file: ModelFile) -> None:
    registered = await registry.register("fraud", model_file(), "python")
    assert registered.schema.names == ["a", "b"]


async def test_explicit_schema_fills_ranges_categories_and_narrows_types(
    registry: Registry, model_file: ModelFile
) -> None:
    explicit = FeatureSchema.of(
        [Feature("a", FeatureType.INT, minimum=0, maximum=10), Feature("b", maximum=5.5)]
    )
    registered = await registry.register("fraud", model_file(), "python", schema=explicit)
    assert registered.schema == explicit
    assert (await registry.resolve("fraud")).schema == explicit


async def test_explicit_schema_keeps_the_artifacts_own_facts(
    registry: Registry, model_file: ModelFile
) -> None:
    source = """\
class Model:
    features = [
        {"name": "a", "type": "category", "categories": ["x", "y"]},
        {"name": "b", "type": "int", "min": 1},
    ]

    def predict(self, rows):
        return [0 for _ in rows]
"""
    explicit = FeatureSchema.of(
        [
            Feature("a", FeatureType.CATEGORY, categories=("z",)),
            Feature("b", FeatureType.FLOAT, minimum=-1, maximum=9),
        ]
    )
    registered = await registry.register("cats", model_file(source), "python", schema=explicit)
    assert registered.schema == FeatureSchema.of(
        [
            Feature("a", FeatureType.CATEGORY, categories=("x", "y")),
            Feature("b", FeatureType.INT, minimum=1, maximum=9),
        ]
    )


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (
            ["a", "c"],
            "fraud: the schema given does not match the artifact's features "
            "(missing from the schema given: b; not in the artifact: c)",
        ),
        (
            ["a"],
            "fraud: the schema given does not match the artifact's features "
            "(missing from the schema given: b)",
        ),
        (
            ["b", "a"],
            "fraud: the schema given lists the artifact's features in another order: "
            "feature 1 is 'a' in the artifact but 'b' in the schema",
        ),
    ],
)
async def test_explicit_schema_must_match_the_artifact(
    registry: Registry, model_file: ModelFile, names: list[str], message: str
) -> None:
    explicit = FeatureSchema.of(Feature(n) for n in names)
    with pytest.raises(RegistryError) as caught:
        await registry.register("fraud", model_file(), "python", schema=explicit)
    assert str(caught.value) == message


async def test_category_cannot_replace_a_numeric_feature(
    registry: Registry, model_file: ModelFile
) -> None:
    explicit = FeatureSchema.of([Feature("a", FeatureType.CATEGORY), Feature("b")])
    with pytest.raises(RegistryError) as caught:
        await registry.register("fraud", model_file(), "python", schema=explicit)
    assert str(caught.value) == (
        "fraud: feature 'a' is float in the artifact but category in the schema given"
    )


async def test_explicit_schema_when_the_artifact_has_none(
    registry: Registry, model_file: ModelFile
) -> None:
    explicit = FeatureSchema.of([Feature("x"), Feature("y", FeatureType.BOOL)])
    registered = await registry.register(
        "rules", model_file(NAMELESS_MODEL), "python", schema=explicit
    )
    assert registered.schema == explicit


async def test_no_schema_at_all_is_an_error(registry: Registry, model_file: ModelFile) -> None:
    with pytest.raises(RegistryError) as caught:
        await registry.register("rules", model_file(NAMELESS_MODEL), "python")
    assert str(caught.value) == (
        "rules: this python artifact carries no feature names; pass --schema FILE"
    )
    assert await registry.list_models() == []


async def test_inspection_errors_propagate(registry: Registry, model_file: ModelFile) -> None:
    with pytest.raises(ModelFormatError, match="must define class Model"):
        await registry.register("bad", model_file("x = 1\n"), "python")
    with pytest.raises(ModelFormatError, match=r"a python model is a \.py file"):
        await registry.register("bad", model_file(name="model.txt"), "python")
    with pytest.raises(ModelFormatError, match="unknown format 'pickle'; use one of: lightgbm"):
        await registry.register("bad", model_file(), "pickle")
    assert await registry.list_models() == []


async def test_missing_artifact_file(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"fraud: .*nope\.py is not a file"):
        await registry.register("fraud", tmp_path / "nope.py", "python")


async def test_artifact_is_stored_by_content_and_verified(
    registry: Registry, model_file: ModelFile
) -> None:
    source = model_file(SUM_MODEL)
    registered = await registry.register("fraud", source, "python")
    source.write_text("changed after registration\n")  # the stored copy is independent

    assert registered.artifact_path.read_text() == SUM_MODEL
    await registry.verify(registered)

    registered.artifact_path.write_text(SUM_MODEL + "# tampered\n")
    with pytest.raises(ArtifactIntegrityError, match=r"but .* was registered"):
        await registry.verify(registered)
