"""Small trained models, one factory per format, for tests and benchmarks.

Each factory trains a deterministic model on synthetic data (a few hundred rows, a few
trees; well under a second once the library is imported), writes it into ``directory``
and returns a :class:`Made`. ``Made.native`` predicts with the format's own library in
that library's usual way, so a test can hold interlock's answers against it::

    from interlock.runtime.loaders import load_predictor
    from tests.factories import make_lightgbm

    made = make_lightgbm(tmp_path, task="multiclass")
    predictor = load_predictor(made.format, made.path, schema=made.schema)
    x = made.rows(64)
    np.testing.assert_allclose(predictor.predict(x), made.native(x), rtol=0, atol=1e-9)

Inputs follow the runtime's contract: a float64 C-contiguous matrix ``[rows, features]``
in schema order, missing values as NaN, a categorical feature as the index of its value
in the schema's ``categories``. ``Made.rows`` gives such a matrix, drawn from the same
distribution as the training data but not the training rows.

The library imports sit inside the factories, so importing this module costs nothing
and a test for one format does not need the others installed.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.runtime.base import Task

__all__ = [
    "COLORS",
    "Made",
    "TaskName",
    "make_lightgbm",
    "make_onnx",
    "make_python",
    "make_sklearn",
    "make_xgboost",
]

TaskName = Literal["binary", "multiclass", "regression"]

Array = npt.NDArray[Any]

#: The values of the categorical feature ``color``, in code order (pandas sorts them).
COLORS = ("blue", "green", "red")

_TRAIN_ROWS = 300
_HOLDOUT_ROWS = 512
_SEED = 20240611


@dataclass(frozen=True, slots=True, eq=False)
class Made:
    """A model written by a factory.

    ``path``: the artifact. ``format``: its interlock format name. ``schema``: what
    inspection should read from the artifact (None when the format does not carry
    names). ``native``: the library's own predictions for an input matrix, shaped as
    interlock answers (binary ``[N]``, multiclass ``[N, K]``, regression ``[N]``).
    ``task``: what inspection should report. ``n_features``: the matrix width.
    ``trusted``: whether loading needs ``trusted=True``. ``holdout``: the rows
    :meth:`rows` draws from. ``categorical``: indices of the category-coded columns.
    """

    path: Path
    format: str
    schema: FeatureSchema | None
    native: Callable[[Array], Array]
    task: Task
    n_features: int
    trusted: bool = False
    holdout: Array = field(repr=False, default_factory=lambda: np.empty((0, 0)))
    categorical: tuple[int, ...] = ()

    def rows(self, n: int, *, missing: bool = False) -> npt.NDArray[np.float64]:
        """``n`` input rows (float64, C-contiguous); ``missing`` blanks about 1 value in 8."""
        reps = -(-n // len(self.holdout))
        x = np.ascontiguousarray(np.tile(self.holdout, (reps, 1))[:n], dtype=np.float64)
        if missing:
            mask = np.random.default_rng(n).random(x.shape) < 0.125
            x[mask] = np.nan
        return x

    def records(self, n: int) -> list[dict[str, float]]:
        """``n`` rows as dicts keyed by feature name, for row-taking predictors."""
        if self.schema is None:
            raise ValueError("records need a schema")
        names = self.schema.names
        return [dict(zip(names, map(float, row), strict=True)) for row in self.rows(n)]


def _features(n_rows: int, n_features: int, seed: int) -> npt.NDArray[np.float64]:
    return np.random.default_rng(seed).normal(size=(n_rows, n_features))


def _labels(
    x: npt.NDArray[np.float64], task: TaskName, seed: int, codes: Array | None = None
) -> Array:
    """Labels from a linear score of the first features; color codes shift it too."""
    rng = np.random.default_rng(seed + 1)
    width = x.shape[1]
    score = x[:, 0] + 0.5 * x[:, 1 % width] - 0.25 * x[:, 2 % width]
    score = score + 0.3 * rng.normal(size=len(x))
    if codes is not None:
        score = score + np.array([-1.0, 0.0, 1.5])[codes]
    if task == "binary":
        return (score > 0).astype(np.int64)
    if task == "multiclass":
        return np.digitize(score, [-0.5, 0.5]).astype(np.int64)
    if task == "regression":
        return score
    raise ValueError(f"unknown task {task!r}")


def _task(task: TaskName) -> Task:
    return Task(task)


def _names(n_features: int) -> list[str]:
    return [f"x{i}" for i in range(n_features)]


def _with_colors(x: npt.NDArray[np.float64], seed: int) -> tuple[npt.NDArray[np.float64], Array]:
    """``x`` with its last column replaced by color codes 0..2; also the codes."""
    codes = np.random.default_rng(seed + 2).integers(0, len(COLORS), size=len(x))
    x = x.copy()
    x[:, -1] = codes
    return x, codes


def _frame(x: Array, names: Sequence[str], categorical: Sequence[int] = ()) -> Any:
    """A DataFrame of ``x``; categorical columns hold the color strings (code NaN → NaN)."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for i, name in enumerate(names):
        if i in categorical:
            codes = np.where(np.isnan(x[:, i]), -1, x[:, i]).astype(np.int64)
            columns[name] = pd.Categorical.from_codes(codes, categories=list(COLORS))
        else:
            columns[name] = x[:, i]
    return pd.DataFrame(columns)


# --- lightgbm ------------------------------------------------------------------------


def make_lightgbm(
    directory: Path,
    task: TaskName = "binary",
    n_features: int = 6,
    categorical: bool = False,
) -> Made:
    """A LightGBM model text file: 10 trees of 7 leaves (per class).

    Features are ``x0``, ``x1``, ...; the schema carries their training ranges. With
    ``categorical`` the last feature is ``color``, trained as a pandas categorical of
    :data:`COLORS`, so the file carries ``pandas_categorical`` and the feature's schema
    type is ``category``. ``native`` takes the encoded matrix and returns
    ``Booster.predict`` of it, which is what LightGBM answers for the DataFrame.
    """
    import lightgbm as lgb

    x = _features(_TRAIN_ROWS, n_features, _SEED)
    names = _names(n_features)
    cat_index: tuple[int, ...] = ()
    codes = None
    if categorical:
        names[-1] = "color"
        x, codes = _with_colors(x, _SEED)
        cat_index = (n_features - 1,)
    y = _labels(x, task, _SEED, codes)
    params: dict[str, Any] = {
        "objective": task,
        "num_leaves": 7,
        "learning_rate": 0.3,
        "min_data_in_leaf": 5,
        "min_data_per_group": 5,
        "cat_smooth": 1.0,
        "seed": 7,
        "deterministic": True,
        "num_threads": 1,
        "verbose": -1,
    }
    if task == "multiclass":
        params["num_class"] = 3
    if categorical:
        dataset = lgb.Dataset(_frame(x, names, cat_index), label=y)
    else:
        dataset = lgb.Dataset(x, label=y, feature_name=names)
    trained = lgb.train(params, dataset, num_boost_round=10)
    suffix = "-categorical" if categorical else ""
    path = Path(directory) / f"lightgbm-{task}{suffix}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    trained.save_model(str(path))

    booster = lgb.Booster(model_file=str(path))
    features = []
    for i, name in enumerate(names):
        if i in cat_index:
            features.append(Feature(name, FeatureType.CATEGORY, categories=COLORS))
        else:
            features.append(
                Feature(name, minimum=float(x[:, i].min()), maximum=float(x[:, i].max()))
            )
    holdout = _features(_HOLDOUT_ROWS, n_features, _SEED + 100)
    if categorical:
        holdout, _ = _with_colors(holdout, _SEED + 100)

    def native(rows: Array) -> Array:
        return np.asarray(booster.predict(rows))

    return Made(
        path=path,
        format="lightgbm",
        schema=FeatureSchema.of(features),
        native=native,
        task=_task(task),
        n_features=n_features,
        holdout=holdout,
        categorical=cat_index,
    )


# --- xgboost -------------------------------------------------------------------------

_XGB_OBJECTIVES = {
    "binary": "binary:logistic",
    "multiclass": "multi:softprob",
    "regression": "reg:squarederror",
}


def make_xgboost(
    directory: Path,
    task: TaskName = "binary",
    n_features: int = 6,
    ubj: bool = False,
    *,
    named: bool = True,
    categorical: bool = False,
    objective: str | None = None,
) -> Made:
    """An XGBoost model (JSON, or UBJSON with ``ubj``): 10 trees of depth 3 (per class).

    With ``named`` the model carries names ``x0``, ``x1``, ... and types: ``q`` for all
    but the last feature, ``int`` for the last (which holds small integers). Without it
    the schema is None. With ``categorical`` the last feature is ``color``, trained from
    a pandas categorical of :data:`COLORS`, so the model saves its categories.
    ``objective`` overrides the task's default (``multi:softmax``, for instance);
    ``native`` is then ``Booster.predict`` as XGBoost answers it (labels for softmax).
    """
    import xgboost as xgb

    x = _features(_TRAIN_ROWS, n_features, _SEED)
    names = _names(n_features)
    types = ["q"] * (n_features - 1) + ["int"]
    cat_index: tuple[int, ...] = ()
    codes = None
    if categorical:
        names[-1] = "color"
        types[-1] = "c"
        x, codes = _with_colors(x, _SEED)
        cat_index = (n_features - 1,)
    else:
        x[:, -1] = np.random.default_rng(_SEED + 3).integers(0, 5, size=len(x))
    y = _labels(x, task, _SEED, codes)
    chosen = objective or _XGB_OBJECTIVES[task]
    params: dict[str, Any] = {
        "objective": chosen,
        "max_depth": 3,
        "eta": 0.3,
        "nthread": 1,
        "seed": 7,
    }
    if task == "multiclass":
        params["num_class"] = 3
    if categorical:
        train = xgb.DMatrix(_frame(x, names, cat_index), label=y, enable_categorical=True)
    elif named:
        train = xgb.DMatrix(x, label=y, feature_names=names, feature_types=types)
    else:
        train = xgb.DMatrix(x, label=y)
    trained = xgb.train(params, train, num_boost_round=10)
    path = (
        Path(directory)
        / f"xgboost-{task}{'-categorical' if categorical else ''}.{'ubj' if ubj else 'json'}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    trained.save_model(str(path))

    booster = xgb.Booster(model_file=str(path))
    schema = None
    if named or categorical:
        kinds = {"q": FeatureType.FLOAT, "int": FeatureType.INT}
        schema = FeatureSchema.of(
            Feature(name, FeatureType.CATEGORY, categories=COLORS)
            if kind == "c"
            else Feature(name, kinds[kind])
            for name, kind in zip(names, types, strict=True)
        )
    holdout = _features(_HOLDOUT_ROWS, n_features, _SEED + 100)
    if categorical:
        holdout, _ = _with_colors(holdout, _SEED + 100)
    else:
        holdout[:, -1] = np.random.default_rng(_SEED + 103).integers(0, 5, size=len(holdout))

    def native(rows: Array) -> Array:
        matrix = xgb.DMatrix(
            rows,
            feature_names=booster.feature_names,
            feature_types=booster.feature_types,
            enable_categorical=categorical,
        )
        return np.asarray(booster.predict(matrix))

    if chosen in ("binary:logistic",):
        made_task = Task.BINARY
    elif chosen.startswith("multi:"):
        made_task = Task.MULTICLASS
    elif chosen.startswith("reg:"):
        made_task = Task.REGRESSION
    else:
        made_task = Task.UNKNOWN
    return Made(
        path=path,
        format="xgboost",
        schema=schema,
        native=native,
        task=made_task,
        n_features=n_features,
        holdout=holdout,
        categorical=cat_index,
    )


# --- sklearn models shared by the onnx and sklearn factories ------------------------


def _shift(x: Array) -> Array:
    """A step skops does not trust by default (a function of this module)."""
    return np.asarray(x) + 1.0


def _sklearn_model(task: TaskName, estimator: str = "linear", custom_step: bool = False) -> Any:
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    classify = task != "regression"
    if estimator == "linear":
        final: Any = LogisticRegression() if classify else Ridge()
    elif estimator == "hgb":
        cls = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        final = cls(max_iter=10, max_leaf_nodes=7, random_state=7)
    elif estimator == "forest":
        cls = RandomForestClassifier if classify else RandomForestRegressor
        final = cls(n_estimators=5, max_depth=4, random_state=7, n_jobs=2)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    steps: list[tuple[str, Any]] = [("scale", StandardScaler()), ("model", final)]
    if custom_step:
        steps.insert(0, ("shift", FunctionTransformer(_shift)))
    return Pipeline(steps)


def _probabilities(task: TaskName, proba: Array) -> Array:
    return proba[:, 1] if task == "binary" else proba


# --- onnx ----------------------------------------------------------------------------


def make_onnx(
    directory: Path,
    task: TaskName = "binary",
    n_features: int = 6,
    *,
    named: bool | Literal["json", "csv"] = False,
    zipmap: bool = True,
    per_feature: bool = False,
    dtype: Literal["float32", "float64"] = "float32",
) -> Made:
    """An ONNX model converted by skl2onnx from StandardScaler + LogisticRegression/Ridge.

    The input is one ``[N, F]`` tensor named ``input`` of ``dtype``, or with
    ``per_feature`` one ``[N, 1]`` tensor per feature named ``x0``, ``x1``, ... (which
    names the features). ``named`` writes the names into the model's metadata as
    ``feature_names`` (a JSON list; ``"csv"`` for a comma-separated string). Classifiers
    keep skl2onnx's ZipMap unless ``zipmap`` is False (needed for float64).
    ``native`` runs the model with ``InferenceSession.run`` (one intra-op thread).
    """
    import onnx
    import onnx.helper
    import onnxruntime as ort
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType

    classify = task != "regression"
    if dtype == "float64" and classify and zipmap:
        raise ValueError("skl2onnx's ZipMap takes float32 only; pass zipmap=False")
    x = _features(_TRAIN_ROWS, n_features, _SEED)
    y = _labels(x, task, _SEED)
    model = _sklearn_model(task).fit(x, y)
    names = _names(n_features)
    tensor = FloatTensorType if dtype == "float32" else DoubleTensorType
    if per_feature:
        inputs = [(name, tensor([None, 1])) for name in names]
    else:
        inputs = [("input", tensor([None, n_features]))]
    options = {id(model.steps[-1][1]): {"zipmap": False}} if classify and not zipmap else None
    converted = convert_sklearn(
        model, initial_types=inputs, options=options, target_opset={"": 17, "ai.onnx.ml": 3}
    )
    if named:
        text = ",".join(names) if named == "csv" else json.dumps(names)
        onnx.helper.set_model_props(converted, {"feature_names": text})
    parts = [task, "named" if named else "", "zipmap" if classify and zipmap else "", dtype]
    parts.append("columns" if per_feature else "")
    path = Path(directory) / ("onnx-" + "-".join(p for p in parts if p) + ".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converted.SerializeToString())

    # One thread: a default session keeps a spinning pool that slows the tests after it.
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    np_type = np.float32 if dtype == "float32" else np.float64

    def native(rows: Array) -> Array:
        if per_feature:
            feed = {
                n: np.ascontiguousarray(rows[:, i : i + 1], dtype=np_type)
                for i, n in enumerate(names)
            }
        else:
            feed = {"input": rows.astype(np_type)}
        outputs = session.run(None, feed)
        if not classify:
            return np.asarray(outputs[0])[:, 0]
        proba = outputs[1]
        if zipmap:
            proba = np.array([[row[k] for k in sorted(row)] for row in proba])
        return _probabilities(task, np.asarray(proba))

    schema = None
    if named or per_feature:
        schema = FeatureSchema.of(Feature(name) for name in names)
    return Made(
        path=path,
        format="onnx",
        schema=schema,
        native=native,
        task=_task(task),
        n_features=n_features,
        holdout=_features(_HOLDOUT_ROWS, n_features, _SEED + 100),
    )


# --- sklearn -------------------------------------------------------------------------


def make_sklearn(
    directory: Path,
    task: TaskName = "binary",
    kind: Literal["skops", "pickle", "joblib"] = "skops",
    named: bool = True,
    *,
    n_features: int = 6,
    estimator: Literal["linear", "hgb", "forest"] = "linear",
    custom_step: bool = False,
) -> Made:
    """A Pipeline (StandardScaler + an estimator) saved with skops, pickle or joblib.

    ``named`` fits on a DataFrame with columns ``x0``, ``x1``, ... so the estimator
    records ``feature_names_in_``; without it the schema is None. ``estimator`` picks
    LogisticRegression/Ridge (``linear``), HistGradientBoosting (``hgb``, whose trees
    skops lists as untrusted sklearn types) or a 5-tree RandomForest with ``n_jobs=2``.
    ``custom_step`` puts a FunctionTransformer of a function of this module first, a
    type skops does not trust, so the artifact needs trust to load. ``native`` is
    ``predict_proba`` (binary: column 1) or ``predict``, given a DataFrame when named.
    """
    x = _features(_TRAIN_ROWS, n_features, _SEED)
    y = _labels(x, task, _SEED)
    names = _names(n_features)
    model = _sklearn_model(task, estimator, custom_step)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # HistGradientBoosting's OpenMP pool, busy machines
        model.fit(_frame(x, names) if named else x, y)

    stem = (
        f"sklearn-{task}-{estimator}{'-named' if named else ''}{'-custom' if custom_step else ''}"
    )
    suffix = {"skops": ".skops", "pickle": ".pkl", "joblib": ".joblib"}[kind]
    path = Path(directory) / (stem + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "skops":
        import skops.io

        skops.io.dump(model, path)
    elif kind == "pickle":
        with path.open("wb") as out:
            pickle.dump(model, out)
    else:
        import joblib

        joblib.dump(model, path)

    def native(rows: Array) -> Array:
        data = _frame(rows, names) if named else rows
        if task == "regression":
            return np.asarray(model.predict(data))
        return _probabilities(task, np.asarray(model.predict_proba(data)))

    return Made(
        path=path,
        format="sklearn",
        schema=FeatureSchema.of(Feature(name) for name in names) if named else None,
        native=native,
        task=_task(task),
        n_features=n_features,
        trusted=kind != "skops" or custom_step,
        holdout=_features(_HOLDOUT_ROWS, n_features, _SEED + 100),
    )


# --- python --------------------------------------------------------------------------

_PYTHON_MODEL = '''\
"""A rule: a + 2b - c."""


class Model:
    features = ["a", "b", "c"]

    def predict(self, rows):
        return [row["a"] + 2 * row["b"] - row["c"] for row in rows]
'''


def make_python(directory: Path) -> Made:
    """A ``python`` format model file: features ``a``, ``b``, ``c``; answers a + 2b - c.

    Its predictor takes rows as dicts (``Made.records``); ``native`` takes the matrix.
    """
    path = Path(directory) / "rule.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_PYTHON_MODEL)

    def native(rows: Array) -> Array:
        return np.asarray(rows[:, 0] + 2 * rows[:, 1] - rows[:, 2])

    return Made(
        path=path,
        format="python",
        schema=FeatureSchema.of(Feature(name) for name in ("a", "b", "c")),
        native=native,
        task=Task.UNKNOWN,
        n_features=3,
        holdout=_features(_HOLDOUT_ROWS, 3, _SEED + 100),
    )
