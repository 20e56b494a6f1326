"""The xgboost loader: schema and task from the model, softmax, its C API path, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from interlock.errors import ModelFormatError
from interlock.runtime.base import Task
from interlock.runtime.loaders.xgboost import LOADER, XGBoostPredictor
from tests.factories import COLORS, make_xgboost


def _load(path: Path, threads: int = 1) -> XGBoostPredictor:
    predictor = LOADER.load(path, schema=None, threads=threads)
    assert isinstance(predictor, XGBoostPredictor)
    return predictor


def test_softmax_models_answer_probabilities(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "multiclass", objective="multi:softmax")
    booster = xgb.Booster(model_file=str(made.path))
    x = made.rows(64, missing=True)
    margin = booster.predict(
        xgb.DMatrix(x, feature_names=booster.feature_names, feature_types=booster.feature_types),
        output_margin=True,
    ).astype(np.float64)
    expected = np.exp(margin - margin.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)

    got = _load(made.path).predict(x)

    assert LOADER.inspect(made.path).task is Task.MULTICLASS
    assert got.shape == (64, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got.argmax(axis=1), made.native(x))


def test_softmax_agrees_with_softprob_to_float32_precision(tmp_path: Path) -> None:
    softmax = make_xgboost(tmp_path / "a", "multiclass", objective="multi:softmax")
    softprob = make_xgboost(tmp_path / "b", "multiclass")
    x = softmax.rows(64)

    np.testing.assert_allclose(_load(softmax.path).predict(x), softprob.native(x), atol=1e-6)


def test_categories_saved_with_the_model_reproduce_pandas(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "binary", categorical=True, ubj=True)
    booster = xgb.Booster(model_file=str(made.path))
    colors = ["red", "blue", "green", None, "green", "red"]
    frame = pd.DataFrame({f"x{i}": np.linspace(-1, 1, len(colors)) * (i + 1) for i in range(5)})
    frame["color"] = pd.Categorical(colors, categories=list(COLORS))
    codes = [COLORS.index(c) if c is not None else np.nan for c in colors]
    encoded = np.column_stack([frame.iloc[:, :5].to_numpy(), codes])

    from_pandas = booster.predict(xgb.DMatrix(frame, enable_categorical=True))

    inspection = LOADER.inspect(made.path)
    assert inspection.schema == made.schema
    assert inspection.details["categorical_features"] == ["color"]
    np.testing.assert_array_equal(_load(made.path).predict(encoded), from_pandas)


def test_unnamed_model_has_no_schema_but_a_width(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "regression", named=False, n_features=4)

    inspection = LOADER.inspect(made.path)

    assert inspection.schema is None
    assert inspection.details["n_features"] == 4


@pytest.mark.parametrize("ubj", [False, True])
def test_the_file_name_does_not_matter(tmp_path: Path, ubj: bool) -> None:
    made = make_xgboost(tmp_path, "binary", ubj=ubj)
    bare = tmp_path / "artifact"
    shutil.copy(made.path, bare)
    x = made.rows(8)

    np.testing.assert_array_equal(_load(bare).predict(x), made.native(x))


def test_logitraw_answers_margins_with_the_task_unknown(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "binary", objective="binary:logitraw")
    x = made.rows(16)

    assert LOADER.inspect(made.path).task is Task.UNKNOWN
    np.testing.assert_array_equal(_load(made.path).predict(x), made.native(x))


def test_the_c_api_path_is_used(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "multiclass")
    predictor = _load(made.path, threads=2)
    x = made.rows(300, missing=True)

    assert predictor.uses_c_api
    np.testing.assert_array_equal(predictor.predict(x), made.native(x))


def test_closed_predictor_falls_back_to_inplace_predict(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "binary")
    predictor = _load(made.path)
    predictor.close()
    x = made.rows(4)

    assert not predictor.uses_c_api
    np.testing.assert_array_equal(predictor.predict(x), made.native(x))


def test_garbage_is_a_format_error_without_a_native_stack(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"learner": 3}')

    with pytest.raises(ModelFormatError, match=r"broken\.json") as caught:
        LOADER.inspect(path)
    assert "Stack trace" not in str(caught.value)


def test_schema_of_another_width_is_refused(tmp_path: Path) -> None:
    made = make_xgboost(tmp_path, "binary")
    other = make_xgboost(tmp_path / "other", "binary", n_features=3)

    with pytest.raises(ModelFormatError, match="takes 6 features"):
        LOADER.load(made.path, schema=other.schema)
