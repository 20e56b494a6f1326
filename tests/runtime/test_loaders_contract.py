"""Every tensor format, every task: inspection, native-equal predictions, threads.

Each case is a factory from ``tests/factories.py``; the predictor interlock builds for
the artifact must answer what the format's own library answers, to 1e-9.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from interlock.runtime.base import Predictor
from interlock.runtime.loaders import get_loader, inspect_artifact, load_predictor
from tests.factories import Made, make_lightgbm, make_onnx, make_sklearn, make_xgboost

Factory = Callable[[Path], Made]

CASES: dict[str, Factory] = {
    "lightgbm-binary": lambda d: make_lightgbm(d, "binary"),
    "lightgbm-multiclass": lambda d: make_lightgbm(d, "multiclass"),
    "lightgbm-regression": lambda d: make_lightgbm(d, "regression"),
    "lightgbm-binary-categorical": lambda d: make_lightgbm(d, "binary", categorical=True),
    "lightgbm-multiclass-categorical": lambda d: make_lightgbm(d, "multiclass", categorical=True),
    "xgboost-binary": lambda d: make_xgboost(d, "binary"),
    "xgboost-multiclass": lambda d: make_xgboost(d, "multiclass"),
    "xgboost-regression-ubj": lambda d: make_xgboost(d, "regression", ubj=True),
    "xgboost-binary-unnamed": lambda d: make_xgboost(d, "binary", named=False),
    "xgboost-binary-categorical": lambda d: make_xgboost(d, "binary", categorical=True),
    "onnx-binary-zipmap": lambda d: make_onnx(d, "binary"),
    "onnx-binary-tensor": lambda d: make_onnx(d, "binary", zipmap=False),
    "onnx-multiclass-zipmap": lambda d: make_onnx(d, "multiclass", named=True),
    "onnx-multiclass-float64": lambda d: make_onnx(
        d, "multiclass", zipmap=False, dtype="float64", named="csv"
    ),
    "onnx-regression": lambda d: make_onnx(d, "regression"),
    "onnx-regression-columns": lambda d: make_onnx(d, "regression", per_feature=True),
    "onnx-binary-columns": lambda d: make_onnx(d, "binary", per_feature=True),
    "sklearn-binary": lambda d: make_sklearn(d, "binary"),
    "sklearn-multiclass-unnamed": lambda d: make_sklearn(d, "multiclass", named=False),
    "sklearn-regression": lambda d: make_sklearn(d, "regression"),
    "sklearn-binary-pickle": lambda d: make_sklearn(d, "binary", "pickle"),
    "sklearn-multiclass-hgb": lambda d: make_sklearn(d, "multiclass", estimator="hgb"),
    "sklearn-regression-forest-joblib": lambda d: make_sklearn(
        d, "regression", "joblib", estimator="forest"
    ),
    "sklearn-binary-custom-step": lambda d: make_sklearn(d, "binary", custom_step=True),
}

# Cases whose models take NaN as a missing value (LogisticRegression and Ridge do not).
TAKES_MISSING = {
    "lightgbm-binary",
    "lightgbm-multiclass",
    "lightgbm-regression",
    "lightgbm-binary-categorical",
    "lightgbm-multiclass-categorical",
    "xgboost-binary",
    "xgboost-multiclass",
    "xgboost-regression-ubj",
    "xgboost-binary-unnamed",
    "xgboost-binary-categorical",
    "sklearn-multiclass-hgb",
}


@pytest.fixture(params=sorted(CASES))
def made(request: pytest.FixtureRequest, tmp_path: Path) -> Made:
    return CASES[request.param](tmp_path)


def _load(made: Made, threads: int = 1) -> Predictor:
    return load_predictor(
        made.format, made.path, schema=made.schema, threads=threads, trusted=made.trusted
    )


def _expected_shape(made: Made, rows: int) -> tuple[int, ...]:
    return (rows, 3) if made.task.value == "multiclass" else (rows,)


def test_inspect_reads_schema_and_task(made: Made) -> None:
    inspection = inspect_artifact(made.format, made.path, trusted=made.trusted)

    assert inspection.schema == made.schema
    assert inspection.task == made.task
    assert inspection.details["n_features"] == made.n_features


@pytest.mark.parametrize("rows", [1, 2, 64])
def test_predictions_equal_native(made: Made, rows: int) -> None:
    predictor = _load(made)
    x = made.rows(rows)

    got = predictor.predict(x)

    assert predictor.takes_rows is False
    assert isinstance(got, np.ndarray)
    assert got.dtype == np.float64
    assert got.shape == _expected_shape(made, rows)
    np.testing.assert_allclose(got, made.native(x), rtol=0, atol=1e-9)
    predictor.close()


@pytest.mark.parametrize("case", sorted(TAKES_MISSING))
def test_missing_values_equal_native(tmp_path: Path, case: str) -> None:
    made = CASES[case](tmp_path)
    predictor = _load(made)
    x = made.rows(64, missing=True)

    np.testing.assert_allclose(predictor.predict(x), made.native(x), rtol=0, atol=1e-9)
    for i in range(8):
        np.testing.assert_allclose(
            predictor.predict(x[i : i + 1]), made.native(x[i : i + 1]), rtol=0, atol=1e-9
        )


def test_each_row_alone_equals_the_batch(made: Made) -> None:
    predictor = _load(made)
    x = made.rows(16)

    batch = predictor.predict(x)
    alone = np.concatenate([predictor.predict(x[i : i + 1]) for i in range(len(x))])

    # onnxruntime computes in float32 with kernels that vary with the batch size, so a
    # row may differ in its last float32 bit between a batch and alone (so does sess.run).
    atol = 1e-6 if made.format == "onnx" else 1e-12
    np.testing.assert_allclose(alone, batch, rtol=0, atol=atol)


def test_empty_batch_gives_no_results(made: Made) -> None:
    predictor = _load(made)

    got = np.asarray(predictor.predict(np.empty((0, made.n_features))))

    assert got.shape == _expected_shape(made, 0)


def test_input_that_is_not_c_contiguous_float64_is_accepted(made: Made) -> None:
    predictor = _load(made)
    x = made.rows(8)
    wider = np.zeros((8, made.n_features + 2))
    wider[:, 1:-1] = x

    expected = predictor.predict(x)

    np.testing.assert_allclose(predictor.predict(np.asfortranarray(x)), expected, atol=1e-9)
    np.testing.assert_allclose(predictor.predict(wider[:, 1:-1]), expected, atol=1e-9)
    np.testing.assert_allclose(predictor.predict(x.tolist()), expected, atol=1e-9)
    with pytest.raises(ValueError, match="matrix"):
        predictor.predict(np.zeros((2, made.n_features + 1)))


def test_concurrent_predictions_agree(made: Made) -> None:
    predictor = _load(made, threads=2)
    x = made.rows(64)
    expected = made.native(x)
    alone = [made.native(x[i : i + 1]) for i in range(len(x))]
    n_threads, rounds = 8, 40
    start = threading.Barrier(n_threads)

    def work(worker: int) -> list[tuple[int, Any]]:
        start.wait()
        out: list[tuple[int, Any]] = []
        for r in range(rounds):
            i = (worker * rounds + r) % len(x)
            out.append((i, predictor.predict(x[i : i + 1])))
            if r % 8 == 0:
                out.append((-1, predictor.predict(x)))
        return out

    with ThreadPoolExecutor(n_threads) as pool:
        results = [item for part in pool.map(work, range(n_threads)) for item in part]

    for i, got in results:
        want = expected if i < 0 else alone[i]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    predictor.close()


def test_close_is_idempotent(made: Made) -> None:
    predictor = _load(made)
    predictor.predict(made.rows(2))

    predictor.close()
    predictor.close()


@pytest.mark.parametrize("fmt", ["lightgbm", "xgboost", "onnx", "sklearn"])
def test_get_loader_gives_the_module_loader(fmt: str) -> None:
    import importlib

    module = importlib.import_module(f"interlock.runtime.loaders.{fmt}")

    loader = get_loader(fmt)

    assert loader is module.LOADER
    assert loader.format.value == fmt
    assert sorted(module.__all__) == sorted(
        name for name in module.__all__ if hasattr(module, name)
    )
