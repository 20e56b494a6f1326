"""The lightgbm loader: what it reads from the model file, its C API path, its errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from interlock._core.schema import FeatureType
from interlock.errors import ModelFormatError, RuntimeLoadError
from interlock.runtime.base import Task
from interlock.runtime.loaders.lightgbm import LOADER, LightGBMPredictor
from tests.factories import COLORS, make_lightgbm


def _train(path: Path, params: dict[str, object], x: np.ndarray, y: np.ndarray, **kw: Any) -> Path:
    base = {"verbose": -1, "num_threads": 1, "seed": 1, "min_data_in_leaf": 5}
    booster = lgb.train({**base, **params}, lgb.Dataset(x, label=y, **kw), num_boost_round=3)
    booster.save_model(str(path))
    return path


def _load(path: Path, threads: int = 1) -> LightGBMPredictor:
    predictor = LOADER.load(path, schema=None, threads=threads)
    assert isinstance(predictor, LightGBMPredictor)
    return predictor


def test_categorical_encoding_reproduces_lightgbm_on_pandas(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "multiclass", categorical=True)
    booster = lgb.Booster(model_file=str(made.path))
    colors = ["red", "blue", "green", "purple", None, "red", "green", "blue"]
    frame = pd.DataFrame({f"x{i}": np.linspace(-1.5, 1.5, len(colors)) * (i + 1) for i in range(5)})
    frame["color"] = pd.Categorical(colors)  # its own category order, as a client's would be
    assert made.schema is not None
    categories = made.schema.features[-1].categories
    assert categories == COLORS
    codes = [categories.index(c) if c in categories else np.nan for c in colors]
    encoded = np.column_stack([frame.iloc[:, :5].to_numpy(), codes])

    from_pandas = booster.predict(frame)

    np.testing.assert_array_equal(made.native(encoded), from_pandas)
    np.testing.assert_array_equal(_load(made.path).predict(encoded), from_pandas)


def test_the_c_api_path_is_used_and_faster_paths_agree(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "binary")
    predictor = _load(made.path)
    x = made.rows(64, missing=True)

    assert predictor.uses_c_api
    np.testing.assert_array_equal(predictor.predict(x), made.native(x))
    np.testing.assert_array_equal(predictor.predict(x[:1]), made.native(x[:1]))


def test_threads_above_one_give_the_same_answers(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "multiclass")
    x = made.rows(256)

    np.testing.assert_array_equal(_load(made.path, threads=2).predict(x), made.native(x))


def test_closed_predictor_refuses_new_threads(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "binary")
    predictor = _load(made.path)
    predictor.close()

    assert not predictor.uses_c_api
    np.testing.assert_array_equal(predictor.predict(made.rows(1)), made.native(made.rows(1)))


def test_native_close_frees_thread_configs(tmp_path: Path) -> None:
    from interlock.runtime.loaders.lightgbm import _c_api

    made = make_lightgbm(tmp_path, "binary")
    native = _c_api(lgb.Booster(model_file=str(made.path)), 6, 1, 1)
    assert native is not None
    native.one(made.rows(1))
    native.close()

    with pytest.raises(RuntimeLoadError, match="closed"):
        native.one(made.rows(1))


def test_constant_feature_has_no_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    x[:, 2] = 4.0
    path = _train(
        tmp_path / "m.txt", {"objective": "regression"}, x, x[:, 0], feature_name=["a", "b", "k"]
    )

    schema = LOADER.inspect(path).schema

    assert schema is not None
    assert schema.features[0].minimum == x[:, 0].min()
    assert schema.features[2].minimum is None
    assert schema.features[2].maximum is None


def test_integer_coded_categorical_is_an_int_feature(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 3))
    x[:, 2] = rng.integers(0, 4, size=300)
    y = (x[:, 0] + (x[:, 2] == 3) > 0).astype(int)
    path = _train(
        tmp_path / "m.txt",
        {"objective": "binary", "min_data_per_group": 5},
        x,
        y,
        feature_name=["a", "b", "store"],
        categorical_feature=[2],
    )

    inspection = LOADER.inspect(path)

    assert inspection.schema is not None
    assert inspection.schema.features[2].type is FeatureType.INT
    assert inspection.details["categorical_features"] == ["store"]
    predictor = _load(path)
    np.testing.assert_array_equal(
        predictor.predict(np.ascontiguousarray(x[:10])),
        lgb.Booster(model_file=str(path)).predict(x[:10]),
    )


@pytest.mark.parametrize(
    ("objective", "task"),
    [
        ("multiclassova", Task.MULTICLASS),
        ("regression_l1", Task.REGRESSION),
        ("poisson", Task.REGRESSION),
        ("cross_entropy", Task.REGRESSION),
    ],
)
def test_objective_gives_the_task(tmp_path: Path, objective: str, task: Task) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    if task is Task.MULTICLASS:
        y = np.digitize(x[:, 0], [-0.5, 0.5])
        params: dict[str, object] = {"objective": objective, "num_class": 3}
    else:
        y = (x[:, 0] > 0).astype(float)
        params = {"objective": objective}
    path = _train(tmp_path / "m.txt", params, x, y)

    inspection = LOADER.inspect(path)

    assert inspection.task is task
    assert inspection.schema is not None
    assert inspection.schema.names == ["Column_0", "Column_1", "Column_2"]
    predictor = _load(path)
    np.testing.assert_array_equal(
        predictor.predict(np.ascontiguousarray(x[:5])),
        lgb.Booster(model_file=str(path)).predict(x[:5]),
    )


def test_custom_objective_is_unknown(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = x[:, 0]

    def squared(preds: np.ndarray, data: lgb.Dataset) -> tuple[np.ndarray, np.ndarray]:
        return preds - data.get_label(), np.ones_like(preds)

    path = _train(tmp_path / "m.txt", {"objective": squared}, x, y)

    assert LOADER.inspect(path).task is Task.UNKNOWN


def test_garbage_is_a_format_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt"
    path.write_text("this is not a model\n")

    with pytest.raises(ModelFormatError, match=r"broken\.txt"):
        LOADER.inspect(path)
    with pytest.raises(ModelFormatError, match=r"broken\.txt"):
        LOADER.load(path, schema=None)


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="no such file"):
        LOADER.inspect(tmp_path / "absent.txt")


def test_schema_of_another_width_is_refused(tmp_path: Path) -> None:
    made = make_lightgbm(tmp_path, "binary")
    other = make_lightgbm(tmp_path / "other", "binary", n_features=4)

    with pytest.raises(ModelFormatError, match="takes 6 features"):
        LOADER.load(made.path, schema=other.schema)


_INSPECT = """
import sys
from pathlib import Path
from interlock.errors import ModelFormatError
from interlock.runtime.loaders import inspect_artifact
try:
    inspect_artifact("lightgbm", Path(sys.argv[1]))
except ModelFormatError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("cut", "message"),
    [
        (0.5, "it is truncated or damaged: 'end of trees' is missing"),
        (0.999, "it is truncated or damaged: 'end of trees' is missing"),
        (None, "its header has no num_class"),
    ],
)
def test_a_truncated_or_damaged_file_is_refused_without_crashing(
    tmp_path: Path, cut: float | None, message: str
) -> None:
    """LightGBM segfaults on a model file cut inside its trees: the file is checked first.

    Run in a child process, so that a crash fails this test instead of ending pytest.
    """
    made = make_lightgbm(tmp_path, n_features=4)
    raw = made.path.read_bytes()
    damaged = tmp_path / "damaged.txt"
    if cut is None:
        damaged.write_bytes(raw.replace(b"num_class=", b"num_klass="))
    else:
        position = raw.index(b"end of trees") if cut > 0.99 else int(len(raw) * cut)
        damaged.write_bytes(raw[:position])

    result = subprocess.run(
        [sys.executable, "-c", _INSPECT, str(damaged)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"damaged.txt is not a LightGBM model file: {message}\n"
    assert "[LightGBM]" not in result.stderr + result.stdout
