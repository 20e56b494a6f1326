"""Which predictors take missing values: serving refuses nulls up front for the others."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from interlock.runtime.loaders import load_predictor
from tests.factories import Made, make_lightgbm, make_onnx, make_python, make_sklearn, make_xgboost


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (make_lightgbm, True),
        (make_xgboost, True),
        (make_python, True),
        (make_onnx, False),
        (lambda d: make_sklearn(d, "binary"), False),  # StandardScaler + LogisticRegression
        (lambda d: make_sklearn(d, "binary", estimator="hgb"), True),
    ],
)
def test_accepts_missing(tmp_path: Path, factory: Callable[[Path], Made], expected: bool) -> None:
    made = factory(tmp_path)
    predictor = load_predictor(made.format, made.path, schema=made.schema, trusted=made.trusted)
    assert predictor.accepts_missing is expected
