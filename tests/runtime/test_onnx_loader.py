"""The onnx loader: input layouts, metadata names, ZipMap handling, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import FeatureError, ModelFormatError
from interlock.runtime.base import Task
from interlock.runtime.loaders.onnx import LOADER, OnnxLoader
from tests.factories import make_onnx

F32 = onnx.TensorProto.FLOAT
I64 = onnx.TensorProto.INT64


def _save(path: Path, graph: onnx.GraphProto, **metadata: str) -> Path:
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)])
    model.ir_version = 8
    if metadata:
        oh.set_model_props(model, metadata)
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def _row_sum(path: Path, width: int | str, **metadata: str) -> Path:
    """y = sum of each row, [N, 1]; the input's width may be symbolic."""
    axes = oh.make_tensor("axes", I64, [1], [1])
    graph = oh.make_graph(
        [oh.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)],
        "row_sum",
        [oh.make_tensor_value_info("x", F32, ["N", width])],
        [oh.make_tensor_value_info("y", F32, ["N", 1])],
        initializer=[axes],
    )
    return _save(path, graph, **metadata)


def test_zipmap_kept_gives_the_same_answers(tmp_path: Path) -> None:
    made = make_onnx(tmp_path, "multiclass")
    loader = OnnxLoader(strip_zipmap=False)
    x = made.rows(64)

    inspection = loader.inspect(made.path)

    assert inspection.details["zipmap"] == "kept"
    assert inspection.details["classes"] == [0, 1, 2]
    np.testing.assert_array_equal(loader.load(made.path, schema=None).predict(x), made.native(x))
    assert LOADER.inspect(made.path).details["zipmap"] == "removed"


@pytest.mark.parametrize("style", ["json", "csv"])
def test_metadata_names_become_the_schema(tmp_path: Path, style: str) -> None:
    made = make_onnx(tmp_path, "binary", named=style)  # type: ignore[arg-type]

    schema = LOADER.inspect(made.path).schema

    assert schema == FeatureSchema.of(Feature(f"x{i}") for i in range(6))


def test_metadata_names_of_another_width_are_refused(tmp_path: Path) -> None:
    path = _row_sum(tmp_path / "m.onnx", 3, feature_names=json.dumps(["a", "b"]))

    with pytest.raises(ModelFormatError, match="metadata names 2 features"):
        LOADER.inspect(path)


def test_symbolic_width_needs_a_schema(tmp_path: Path) -> None:
    path = _row_sum(tmp_path / "m.onnx", "F")

    inspection = LOADER.inspect(path)

    assert inspection.schema is None
    assert inspection.details["n_features"] is None
    assert inspection.task is Task.UNKNOWN
    with pytest.raises(ModelFormatError, match="schema"):
        LOADER.load(path, schema=None)
    schema = FeatureSchema.of(Feature(n) for n in "abc")
    predictor = LOADER.load(path, schema=schema)
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.testing.assert_array_equal(predictor.predict(x), [3.0, 12.0])


def test_symbolic_width_with_metadata_names(tmp_path: Path) -> None:
    path = _row_sum(tmp_path / "m.onnx", "F", feature_names="a, b")

    inspection = LOADER.inspect(path)

    assert inspection.schema == FeatureSchema.of([Feature("a"), Feature("b")])
    assert inspection.task is Task.REGRESSION
    predictor = LOADER.load(path, schema=inspection.schema)
    np.testing.assert_array_equal(predictor.predict(np.array([[1.0, 2.0]])), [3.0])


def test_integer_inputs_per_feature(tmp_path: Path) -> None:
    graph = oh.make_graph(
        [
            oh.make_node("Cast", ["count"], ["count_f"], to=F32),
            oh.make_node("Add", ["count_f", "amount"], ["y"]),
        ],
        "mixed",
        [
            oh.make_tensor_value_info("count", I64, ["N", 1]),
            oh.make_tensor_value_info("amount", F32, ["N", 1]),
        ],
        [oh.make_tensor_value_info("y", F32, ["N", 1])],
    )
    path = _save(tmp_path / "m.onnx", graph)

    inspection = LOADER.inspect(path)
    predictor = LOADER.load(path, schema=inspection.schema)

    assert inspection.schema == FeatureSchema.of(
        [Feature("count", FeatureType.INT), Feature("amount")]
    )
    np.testing.assert_array_equal(predictor.predict(np.array([[2.0, 0.5], [3.0, 1.0]])), [2.5, 4.0])
    with pytest.raises(FeatureError, match="count") as caught:
        predictor.predict(np.array([[np.nan, 0.5]]))
    assert caught.value.feature == "count"


def test_string_input_is_refused(tmp_path: Path) -> None:
    graph = oh.make_graph(
        [oh.make_node("Identity", ["x"], ["y"])],
        "strings",
        [oh.make_tensor_value_info("x", onnx.TensorProto.STRING, ["N", 2])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.STRING, ["N", 2])],
    )
    path = _save(tmp_path / "m.onnx", graph)

    with pytest.raises(ModelFormatError, match="float or double"):
        LOADER.inspect(path)


def test_garbage_is_a_format_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x00not a protobuf")

    with pytest.raises(ModelFormatError, match=r"broken\.onnx"):
        LOADER.inspect(path)


def test_schema_of_another_width_is_refused(tmp_path: Path) -> None:
    made = make_onnx(tmp_path, "regression")

    with pytest.raises(ModelFormatError, match="takes 6 features"):
        LOADER.load(made.path, schema=FeatureSchema.of([Feature("a")]))


def test_threads_above_one_give_the_same_answers(tmp_path: Path) -> None:
    made = make_onnx(tmp_path, "multiclass", zipmap=False, dtype="float64")
    x = made.rows(256)

    predictor = LOADER.load(made.path, schema=None, threads=2)

    np.testing.assert_allclose(predictor.predict(x), made.native(x), rtol=0, atol=1e-12)
