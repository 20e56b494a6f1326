"""What registration checks before a version exists: schema evolution, fit, duplicates.

Issue 11: a second version of a model must not silently change the schema its clients
send (items 5 and 6), must fit the model it describes, must not repeat the bytes of an
existing version by accident, and a refusal leaves nothing behind in the artifact store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import ModelFormatError, RegistryError
from interlock.registry import Registry
from tests.factories import make_lightgbm, make_onnx, make_sklearn, make_xgboost


def _files(registry: Registry) -> list[Path]:
    root = registry.artifacts.root
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _demo_like(made_schema: FeatureSchema) -> FeatureSchema:
    """The schema the demo registers: the artifact's names, some typed int and bool."""
    types = {"x0": FeatureType.INT, "x1": FeatureType.BOOL}
    return FeatureSchema.of(
        Feature(f.name, types.get(f.name, FeatureType.FLOAT)) for f in made_schema.features
    )


# -- item 5: a new version inherits the model's schema ---------------------------------


async def test_the_same_lightgbm_file_again_keeps_the_schema_of_v1(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "m")
    assert made.schema is not None
    first = await registry.register(
        "fraud", made.path, "lightgbm", schema=_demo_like(made.schema), alias="champion"
    )

    second = await registry.register("fraud", made.path, "lightgbm", allow_duplicate=True)

    assert second.schema == first.schema
    assert [f.type for f in second.schema.features][:3] == [
        FeatureType.INT,
        FeatureType.BOOL,
        FeatureType.FLOAT,
    ]


async def test_a_retrained_model_with_the_same_features_inherits_the_schema(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "a")
    assert made.schema is not None
    first = await registry.register("fraud", made.path, "lightgbm", schema=_demo_like(made.schema))
    retrained = make_lightgbm(tmp_path / "b", task="regression")

    second = await registry.register("fraud", retrained.path, "lightgbm")

    assert [(f.name, f.type) for f in second.schema.features] == [
        (f.name, f.type) for f in first.schema.features
    ]


async def test_a_nameless_artifact_inherits_the_schema_when_the_count_fits(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_xgboost(tmp_path / "a", named=False)
    schema = FeatureSchema.of(Feature(f"f{i}") for i in range(made.n_features))
    await registry.register("risk", made.path, "xgboost", schema=schema)
    again = make_xgboost(tmp_path / "b", named=False, task="regression")

    second = await registry.register("risk", again.path, "xgboost")

    assert second.schema == schema


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (
            ["x0", "x1", "x2", "x3", "x4"],
            "fraud: this schema would break clients of version 1: feature 'x5' is gone; "
            "pass --force-schema (API: force_schema) to register it anyway",
        ),
        (
            ["x0", "x1", "x2", "x3", "x4", "x5", "x6"],
            "fraud: this schema would break clients of version 1: feature 'x6' is new "
            "and clients do not send it; "
            "pass --force-schema (API: force_schema) to register it anyway",
        ),
    ],
)
async def test_a_schema_change_that_breaks_clients_is_refused_unless_forced(
    registry: Registry, features: list[str], message: str, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "a")
    await registry.register("fraud", made.path, "lightgbm")
    other = make_lightgbm(tmp_path / "b", n_features=len(features))
    before = _files(registry)

    with pytest.raises(RegistryError) as caught:
        await registry.register("fraud", other.path, "lightgbm")

    assert str(caught.value) == message
    assert _files(registry) == before
    forced = await registry.register("fraud", other.path, "lightgbm", force_schema=True)
    assert forced.version == 2
    assert len(forced.schema) == len(features)


async def test_narrowing_a_type_is_refused_widening_is_not(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "a")
    assert made.schema is not None
    await registry.register("fraud", made.path, "lightgbm", schema=_demo_like(made.schema))
    retrained = make_lightgbm(tmp_path / "b", task="regression")
    narrowed = FeatureSchema.of(
        Feature(f.name, FeatureType.BOOL if f.name == "x2" else f.type)
        for f in _demo_like(made.schema).features
    )

    with pytest.raises(RegistryError) as caught:
        await registry.register("fraud", retrained.path, "lightgbm", schema=narrowed)
    assert str(caught.value) == (
        "fraud: this schema would break clients of version 1: feature 'x2' changes from "
        "float to bool; pass --force-schema (API: force_schema) to register it anyway"
    )

    widened = FeatureSchema.of(
        Feature(f.name, FeatureType.FLOAT if f.name == "x0" else f.type)
        for f in _demo_like(made.schema).features
    )
    second = await registry.register("fraud", retrained.path, "lightgbm", schema=widened)
    assert second.schema.features[0].type is FeatureType.FLOAT


async def test_the_champions_schema_is_the_one_clients_use(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "a")
    assert made.schema is not None
    champion = await registry.register(
        "fraud", made.path, "lightgbm", schema=_demo_like(made.schema), alias="champion"
    )
    await registry.register(
        "fraud", make_lightgbm(tmp_path / "b", n_features=5).path, "lightgbm", force_schema=True
    )

    retrained = make_lightgbm(tmp_path / "c", task="regression")
    third = await registry.register("fraud", retrained.path, "lightgbm")

    assert third.schema.names == champion.schema.names
    assert third.schema.features[1].type is FeatureType.BOOL


# -- item 6: the schema must fit what the model takes -----------------------------------


def _nameless(kind: str, directory: Path) -> tuple[Path, str, int]:
    if kind == "onnx":
        made = make_onnx(directory, n_features=3)
    elif kind == "xgboost":
        made = make_xgboost(directory, n_features=3, named=False)
    else:
        made = make_sklearn(directory, n_features=3, named=False)
    return made.path, made.format, made.n_features


@pytest.mark.parametrize("kind", ["onnx", "xgboost", "sklearn"])
async def test_a_schema_the_model_cannot_take_is_refused_and_leaves_no_files(
    registry: Registry, tmp_path: Path, kind: str
) -> None:
    path, fmt, n_features = _nameless(kind, tmp_path / "m")
    schema = FeatureSchema.of(Feature(f"f{i}") for i in range(11))
    before = _files(registry)

    with pytest.raises(ModelFormatError) as caught:
        await registry.register("wide", path, fmt, schema=schema)

    assert str(caught.value) == (f"{path.name} takes {n_features} features but the schema has 11")
    assert await registry.list_models() == []
    assert _files(registry) == before


async def test_an_onnx_model_with_3_inputs_and_an_11_feature_schema_is_refused(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_onnx(tmp_path / "m", n_features=3, per_feature=True)
    schema = FeatureSchema.of(Feature(f"x{i}") for i in range(11))

    with pytest.raises(RegistryError, match="not in the artifact: x3, x4"):
        await registry.register("wide", made.path, "onnx", schema=schema)
    assert await registry.list_models() == []


# -- item 6: identical bytes ------------------------------------------------------------


async def test_identical_bytes_are_refused_naming_the_version(
    registry: Registry, tmp_path: Path
) -> None:
    made = make_lightgbm(tmp_path / "m")
    first = await registry.register("fraud", made.path, "lightgbm")
    files = _files(registry)

    with pytest.raises(RegistryError) as caught:
        await registry.register("fraud", made.path, "lightgbm")

    assert str(caught.value) == (
        f"fraud: version 1 already has this artifact (sha256 {first.artifact_sha256[:12]}); "
        "pass --allow-duplicate (API: allow_duplicate) to register the same bytes again"
    )
    assert _files(registry) == files
    assert (await registry.get_model("fraud")).versions == [1]
    again = await registry.register("fraud", made.path, "lightgbm", allow_duplicate=True)
    assert again.version == 2
    assert again.artifact_path == first.artifact_path
    # Another model may hold the same bytes.
    assert (await registry.register("other", made.path, "lightgbm")).version == 1


# -- item 6: failed registrations leave no files, and say one clean line ----------------


@pytest.mark.parametrize(
    ("fmt", "name"), [("lightgbm", "bad.txt"), ("xgboost", "bad.json"), ("onnx", "bad.onnx")]
)
async def test_a_broken_artifact_is_one_clean_line_and_leaves_no_files(
    registry: Registry,
    tmp_path: Path,
    fmt: str,
    name: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "upload" / name
    path.parent.mkdir()
    path.write_text("garbage, not a model\n")
    before = _files(registry)

    with caplog.at_level(logging.INFO, logger="interlock"), pytest.raises(ModelFormatError) as e:
        await registry.register("bad", path, fmt)

    message = str(e.value)
    assert message.startswith(f"{name} is not ")
    assert "\n" not in message
    assert str(registry.artifacts.root) not in message and str(tmp_path) not in message
    assert "[Fatal]" not in message and ".cc:" not in message
    out, err = capfd.readouterr()
    assert "[LightGBM]" not in out + err and "[Fatal]" not in out + err
    assert _files(registry) == before
    assert await registry.list_models() == []
    details = [r for r in caplog.records if r.name.startswith("interlock.registry")]
    assert details and "bad" in details[0].getMessage()
    if fmt != "lightgbm":  # refused before LightGBM was asked: there is nothing more to say
        assert details[0].exc_info is not None  # what the library said, for the log


async def test_a_python_model_that_fails_to_import_names_no_private_path(
    registry: Registry, model_file: Callable[..., Path]
) -> None:
    with pytest.raises(ModelFormatError) as caught:
        await registry.register("bad", model_file("class Model(:\n"), "python")

    assert str(caught.value) == (
        "model.py failed to import: SyntaxError: invalid syntax (model.py, line 1)"
    )
