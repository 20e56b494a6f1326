"""The shared model factories: deterministic, quick, and honest about their natives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from interlock.runtime.base import Task
from interlock.runtime.loaders import inspect_artifact, load_predictor
from tests.factories import (
    COLORS,
    Made,
    make_lightgbm,
    make_onnx,
    make_python,
    make_sklearn,
    make_xgboost,
)

FACTORIES: dict[str, Callable[[Path], Made]] = {
    "lightgbm": lambda d: make_lightgbm(d, "multiclass", categorical=True),
    "xgboost": lambda d: make_xgboost(d, "multiclass", ubj=True),
    "onnx": lambda d: make_onnx(d, "binary", named=True),
    "sklearn": lambda d: make_sklearn(d, "multiclass", estimator="hgb"),
    "python": make_python,
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factories_are_deterministic(tmp_path: Path, name: str) -> None:
    # How quick they are is not asserted: on a loaded machine a wall-clock bound only flakes.
    factory = FACTORIES[name]
    first = factory(tmp_path / "a")
    second = factory(tmp_path / "b")

    x = first.rows(64)
    np.testing.assert_array_equal(first.native(x), second.native(x))
    np.testing.assert_array_equal(x, second.rows(64))
    assert first.schema == second.schema


def test_rows_are_contiguous_float64_and_reach_any_length(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "binary", categorical=True)

    x = made.rows(1500, missing=True)

    assert x.dtype == np.float64
    assert x.flags.c_contiguous
    assert x.shape == (1500, 6)
    assert 0.05 < np.isnan(x).mean() < 0.2
    codes = made.rows(100)[:, -1]
    assert set(np.unique(codes)) <= {0.0, 1.0, 2.0}


def test_lightgbm_categorical_native_is_lightgbm_on_pandas(tmp_path: Path) -> None:
    import pandas as pd

    made = make_lightgbm(tmp_path, "binary", categorical=True)
    x = made.rows(64, missing=True)
    frame = pd.DataFrame({f"x{i}": x[:, i] for i in range(5)})
    codes = np.where(np.isnan(x[:, 5]), -1, x[:, 5]).astype(int)
    frame["color"] = pd.Categorical.from_codes(codes, categories=list(COLORS))

    from_pandas = lgb.Booster(model_file=str(made.path)).predict(frame)

    np.testing.assert_array_equal(made.native(x), from_pandas)


def test_python_model_answers_its_rule(tmp_path: Path) -> None:
    made = make_python(tmp_path)
    predictor = load_predictor(made.format, made.path, schema=made.schema)

    got = predictor.predict(made.records(5))

    assert inspect_artifact(made.format, made.path).schema == made.schema
    assert made.task is Task.UNKNOWN
    np.testing.assert_allclose(got, made.native(made.rows(5)), rtol=0, atol=1e-12)
