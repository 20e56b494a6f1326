"""The sklearn loader: trust rules for skops and pickles, feature names, DataFrame models."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from interlock.errors import ModelFormatError, PredictionError, UnsafeArtifactError
from interlock.runtime.base import Task
from interlock.runtime.loaders.sklearn import LOADER
from tests.factories import make_sklearn


@pytest.mark.parametrize("kind", ["pickle", "joblib"])
def test_pickles_need_trust(tmp_path: Path, kind: str) -> None:
    made = make_sklearn(tmp_path, "binary", kind)  # type: ignore[arg-type]

    with pytest.raises(UnsafeArtifactError, match=r"pickle can run arbitrary code.*--trust"):
        LOADER.inspect(made.path)
    with pytest.raises(UnsafeArtifactError):
        LOADER.load(made.path, schema=None)
    assert LOADER.inspect(made.path, trusted=True).details["artifact"] == "pickle"


def test_skops_with_an_untrusted_type_needs_trust(tmp_path: Path) -> None:
    made = make_sklearn(tmp_path, "binary", custom_step=True)
    x = made.rows(16)

    with pytest.raises(UnsafeArtifactError, match=r"tests\.factories\._shift.*--trust"):
        LOADER.inspect(made.path)

    predictor = LOADER.load(made.path, schema=None, trusted=True)
    np.testing.assert_allclose(predictor.predict(x), made.native(x), rtol=0, atol=1e-9)


def test_sklearn_classes_skops_lists_as_untrusted_are_accepted(tmp_path: Path) -> None:
    made = make_sklearn(tmp_path, "multiclass", estimator="hgb")

    details = LOADER.inspect(made.path).details

    assert any("TreePredictor" in name for name in details["trusted_types"])


def test_numpy_functions_are_not_trusted(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(50, 2))
    model = Pipeline([("io", FunctionTransformer(np.save)), ("model", LogisticRegression())])
    model.steps[-1][1].fit(x, x[:, 0] > 0)
    model.steps[0][1].fit(x)
    path = tmp_path / "m.skops"
    skops.io.dump(model, path)

    with pytest.raises(UnsafeArtifactError, match=r"numpy\..*save"):
        LOADER.inspect(path)


def test_named_model_takes_arrays_without_warnings(tmp_path: Path) -> None:
    # pytest turns warnings into errors: sklearn's "X does not have valid feature names"
    # would fail this test.
    made = make_sklearn(tmp_path, "regression", named=True, estimator="forest")
    predictor = LOADER.load(made.path, schema=made.schema, threads=1)
    x = made.rows(32)

    assert LOADER.inspect(made.path).schema == made.schema
    np.testing.assert_allclose(predictor.predict(x), made.native(x), rtol=0, atol=1e-9)


def test_column_selection_by_name_gets_a_dataframe(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(200, 3)), columns=["a", "b", "c"])
    y = (frame.a - frame.c > 0).astype(int)
    model = Pipeline(
        [
            ("cols", ColumnTransformer([("scale", StandardScaler(), ["c", "a"])])),
            ("model", LogisticRegression()),
        ]
    ).fit(frame, y)
    path = tmp_path / "m.skops"
    skops.io.dump(model, path)
    x = np.ascontiguousarray(rng.normal(size=(8, 3)))

    predictor = LOADER.load(path, schema=None)

    expected = model.predict_proba(pd.DataFrame(x, columns=["a", "b", "c"]))[:, 1]
    np.testing.assert_allclose(predictor.predict(x), expected, rtol=0, atol=1e-12)


def test_pandas_output_gets_a_dataframe(tmp_path: Path) -> None:
    made_frame = pd.DataFrame(np.random.default_rng(0).normal(size=(100, 2)), columns=["a", "b"])
    model = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression())])
    model.set_output(transform="pandas")
    model.fit(made_frame, made_frame.a > 0)
    path = tmp_path / "m.skops"
    skops.io.dump(model, path)
    x = np.ascontiguousarray(made_frame.to_numpy()[:5])

    got = LOADER.load(path, schema=None).predict(x)

    np.testing.assert_allclose(got, model.predict_proba(made_frame.iloc[:5])[:, 1], atol=1e-12)


def test_classifier_without_probabilities_answers_labels(tmp_path: Path) -> None:
    from sklearn.svm import LinearSVC

    x = np.random.default_rng(0).normal(size=(60, 2))
    model = LinearSVC().fit(x, np.where(x[:, 0] > 0, "yes", "no"))
    path = tmp_path / "m.skops"
    skops.io.dump(model, path)

    inspection = LOADER.inspect(path)
    got = LOADER.load(path, schema=None).predict(np.ascontiguousarray(x[:4]))

    assert inspection.task is Task.UNKNOWN
    assert list(got) == list(model.predict(x[:4]))


def test_model_that_rejects_missing_values_raises_a_prediction_error(tmp_path: Path) -> None:
    made = make_sklearn(tmp_path, "binary")
    predictor = LOADER.load(made.path, schema=made.schema)

    with pytest.raises(PredictionError, match="NaN"):
        predictor.predict(made.rows(4, missing=True))


def test_unknown_suffix_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"x")

    with pytest.raises(ModelFormatError, match=r"\.skops"):
        LOADER.inspect(path)


@pytest.mark.parametrize("name", ["broken.skops", "broken.pkl"])
def test_garbage_is_a_format_error_naming_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not a model at all")

    with pytest.raises(ModelFormatError, match=name.replace(".", r"\.")):
        LOADER.inspect(path, trusted=True)


def test_a_file_that_holds_no_estimator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"weights": [1, 2]}))

    with pytest.raises(ModelFormatError, match="not an estimator"):
        LOADER.inspect(path, trusted=True)


def test_an_unfitted_estimator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.skops"
    skops.io.dump(LogisticRegression(), path)

    with pytest.raises(ModelFormatError, match="not fitted"):
        LOADER.inspect(path)


def test_schema_of_another_width_is_refused(tmp_path: Path) -> None:
    made = make_sklearn(tmp_path, "binary")
    other = make_sklearn(tmp_path / "other", "binary", n_features=3)

    with pytest.raises(ModelFormatError, match="takes 6 features"):
        LOADER.load(made.path, schema=other.schema)
