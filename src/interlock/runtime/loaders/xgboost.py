"""The ``xgboost`` format: an XGBoost model saved as JSON or UBJSON (``save_model``).

The schema comes from ``feature_names`` and ``feature_types``: ``q``/``float`` → ``float``,
``int`` → ``int``, ``i`` (indicator) → ``bool``, ``c`` → ``category``. A categorical
feature gets its category strings when the model carries them (XGBoost ≥ 3.1 saves the
categories of a model trained on a DataFrame); otherwise it is typed ``int`` and the
client sends the code. A model trained without feature names has no schema
(``details["n_features"]`` says how many it takes; the registry then asks for one).

Objectives map to tasks as follows:

- ``binary:logistic`` → binary, the positive-class probability.
- ``multi:softprob`` → multiclass, probabilities ``[N, K]``.
- ``multi:softmax`` → multiclass as well. Its native output is the class label, but
  every multiclass model in interlock answers with probabilities, so the predictor asks
  for the margins and applies the softmax itself, which is what ``multi:softprob``
  does (in float64 here; XGBoost does it in float32). The label is the argmax.
- ``reg:*``, ``count:*``, ``survival:*``, ``rank:*`` → regression, the value.
- anything else (``binary:logitraw``, ``binary:hinge``, custom objectives) → unknown,
  with XGBoost's own output.

Prediction is ``inplace_predict`` without its Python wrapper. On a 10-tree model with
6 features and one thread, ``Booster.inplace_predict`` takes about 80 µs for one row, of
which about 50 µs are Python: type sniffing of the input, the JSON array interface and
config built with ``json.dumps`` on every call, and a new proxy DMatrix per call. The
predictor makes the same documented C API call (``XGBoosterPredictFromDense``) with the
config encoded once and a proxy DMatrix per inference thread, which brings one row to
about 25 µs. Like ``inplace_predict`` it is lock-free and safe from many threads
(XGBoost keeps the prediction buffer per thread; it is copied out before returning).
When the library handle is not where this module expects it, or the direct call does not
reproduce ``inplace_predict`` bit for bit on probe rows at load time, the predictor uses
``inplace_predict`` and logs a warning.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xgboost

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import ModelFormatError, PredictionError, RuntimeLoadError
from interlock.runtime.base import Inspection, ModelFormat, Predictor, Task, as_matrix
from interlock.runtime.loaders._messages import library_message

__all__ = ["LOADER", "XGBoostLoader", "XGBoostPredictor"]

_log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float64]


_TYPES = {
    "q": FeatureType.FLOAT,
    "float": FeatureType.FLOAT,
    "int": FeatureType.INT,
    "i": FeatureType.BOOL,
}
_REGRESSION_PREFIXES = ("reg:", "count:", "survival:", "rank:")

# XGBoosterPredictFromDense's config: "type" 0 is the value, 1 the margin; iteration
# 0..0 means every tree (inplace_predict's default).
_CONFIG = (
    '{"type": %d, "training": false, "iteration_begin": 0, "iteration_end": 0, '
    '"missing": NaN, "strict_shape": false, "cache_id": 0}'
)
_ARRAY = b'{"data":[%d,true],"shape":[%d,%d],"strides":null,"typestr":"<f8","version":3}'


def _message(exc: BaseException, path: Path | None = None) -> str:
    """XGBoost's message as one line: no source location, stack trace or directories."""
    return library_message(exc, path)


def _open(path: Path) -> xgboost.Booster:
    if not path.is_file():
        raise ModelFormatError(f"{path.name}: no such file")
    # From bytes, XGBoost tells JSON from UBJSON by content, whatever the file is called.
    raw = bytearray(path.read_bytes())
    try:
        return xgboost.Booster(model_file=raw)
    except (xgboost.core.XGBoostError, ValueError) as exc:
        raise ModelFormatError(
            f"{path.name} is not an XGBoost model: {_message(exc, path)}"
        ) from exc


def _saved_categories(booster: xgboost.Booster) -> dict[int, tuple[str, ...]]:
    """Category strings saved with the model (XGBoost ≥ 3.1), by feature index.

    They sit in the JSON model at ``gradient_booster.model.cats.enc``: per feature, either
    UTF-8 bytes with offsets (string categories) or the values (numeric categories).
    The layout is XGBoost's own, so anything unexpected yields no strings rather than an
    error; the feature is then typed ``int``.
    """
    try:
        model = json.loads(booster.save_raw("json"))
        encoded = model["learner"]["gradient_booster"]["model"]["cats"]["enc"]
        out: dict[int, tuple[str, ...]] = {}
        for index, enc in enumerate(encoded):
            values = enc.get("values") or []
            offsets = enc.get("offsets") or []
            if offsets:
                data = bytes(values)
                out[index] = tuple(
                    data[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets)
                )
            elif values:
                out[index] = tuple(str(v) for v in values)
        return out
    except (KeyError, TypeError, ValueError, AttributeError, xgboost.core.XGBoostError):
        return {}


def _describe(booster: xgboost.Booster) -> tuple[FeatureSchema | None, Task, dict[str, Any]]:
    config = json.loads(booster.save_config())
    learner = config["learner"]
    objective = str(learner["objective"]["name"])
    params = learner.get("learner_model_param", {})
    n_classes = int(params.get("num_class", 0) or 0)
    n_targets = int(params.get("num_target", 1) or 1)
    n_features = booster.num_features()
    details: dict[str, Any] = {"n_features": n_features, "objective": objective}
    details["n_trees"] = booster.num_boosted_rounds()
    if n_classes > 1:
        details["n_classes"] = n_classes
    if n_targets > 1:
        details["n_targets"] = n_targets

    if objective == "binary:logistic":
        task = Task.BINARY
    elif objective in ("multi:softprob", "multi:softmax"):
        task = Task.MULTICLASS
    elif objective.startswith(_REGRESSION_PREFIXES):
        task = Task.REGRESSION
    else:
        task = Task.UNKNOWN

    names = booster.feature_names
    if not names:
        return None, task, details
    types = booster.feature_types or ["float"] * len(names)
    saved = _saved_categories(booster) if "c" in types else {}
    features: list[Feature] = []
    categorical: list[str] = []
    for index, (name, code) in enumerate(zip(names, types, strict=True)):
        if code == "c":
            categorical.append(name)
            if index in saved:
                features.append(Feature(name, FeatureType.CATEGORY, categories=saved[index]))
            else:
                features.append(Feature(name, FeatureType.INT))
        elif code in _TYPES:
            features.append(Feature(name, _TYPES[code]))
        else:
            raise ModelFormatError(f"feature {name!r} has an unknown XGBoost type {code!r}")
    if categorical:
        details["categorical_features"] = categorical
    return FeatureSchema.of(features), task, details


class _CApi:
    """``XGBoosterPredictFromDense`` with a config made once and a proxy per thread."""

    def __init__(self, lib: Any, booster: xgboost.Booster, margin: bool) -> None:
        self._lib = lib
        self._booster = booster  # keeps the handle alive
        self._handle = booster.handle
        self._call = lib.XGBoosterPredictFromDense
        self._config = (_CONFIG % (1 if margin else 0)).encode()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._proxies: list[ctypes.c_void_p] = []
        self._closed = False

    def _error(self) -> str:
        message = self._lib.XGBGetLastError()
        raw = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
        return _message(Exception(raw))

    def _thread_state(self) -> tuple[Any, ...]:
        with self._lock:
            if self._closed:
                raise RuntimeLoadError("the XGBoost predictor is closed")
            proxy = ctypes.c_void_p()
            if self._lib.XGProxyDMatrixCreate(ctypes.byref(proxy)) != 0:
                raise PredictionError(f"XGBoost could not prepare a predictor: {self._error()}")
            self._proxies.append(proxy)
        shape = ctypes.POINTER(ctypes.c_uint64)()
        dims = ctypes.c_uint64()
        result = ctypes.POINTER(ctypes.c_float)()
        state = (
            proxy,
            shape,
            dims,
            result,
            ctypes.byref(shape),
            ctypes.byref(dims),
            ctypes.byref(result),
        )
        self._local.state = state
        return state

    def predict(self, x: Matrix) -> Matrix:
        """XGBoost's output for ``x``: ``[N]`` or ``[N, K]``, as float64."""
        try:
            proxy, shape, dims, result, shape_ref, dims_ref, result_ref = self._local.state
        except AttributeError:
            proxy, shape, dims, result, shape_ref, dims_ref, result_ref = self._thread_state()
        rows, width = x.shape
        array = _ARRAY % (x.ctypes.data, rows, width)
        rc = self._call(self._handle, array, self._config, proxy, shape_ref, dims_ref, result_ref)
        if rc != 0:
            raise PredictionError(f"XGBoost failed to predict: {self._error()}")
        if dims.value == 1:
            size = shape[0]
            out_shape: tuple[int, ...] = (size,)
        else:
            out_shape = tuple(shape[i] for i in range(dims.value))
            size = math.prod(out_shape)
        raw = ctypes.string_at(result, 4 * size)
        return np.frombuffer(raw, dtype=np.float32).astype(np.float64).reshape(out_shape)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proxies, self._proxies = self._proxies, []
            self._local = threading.local()
        for proxy in proxies:
            self._lib.XGDMatrixFree(proxy)

    def __del__(self) -> None:
        for proxy in getattr(self, "_proxies", ()):
            self._lib.XGDMatrixFree(proxy)


def _c_api(booster: xgboost.Booster, margin: bool) -> _CApi | None:
    lib = getattr(xgboost.core, "_LIB", None)
    handle = getattr(booster, "handle", None)
    if lib is None or not isinstance(handle, ctypes.c_void_p) or not handle.value:
        return None
    needed = ("XGBoosterPredictFromDense", "XGProxyDMatrixCreate", "XGDMatrixFree")
    try:
        if not all(getattr(lib, name, None) is not None for name in needed):
            return None
    except AttributeError:
        return None
    return _CApi(lib, booster, margin)


def _softmax(margin: Matrix) -> Matrix:
    shifted: Matrix = np.exp(margin - margin.max(axis=1, keepdims=True))
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


class XGBoostPredictor:
    """Predicts with an XGBoost booster; see the module docstring for the call path."""

    takes_rows = False
    accepts_missing = True

    def __init__(
        self, booster: xgboost.Booster, *, n_features: int, n_outputs: int, softmax: bool
    ) -> None:
        self._booster = booster
        self._n_features = n_features
        self._n_outputs = n_outputs
        self._softmax = softmax
        self._predict_type = "margin" if softmax else "value"
        self._native: _CApi | None = None

    @property
    def uses_c_api(self) -> bool:
        """True when predictions go through the C API directly, not ``inplace_predict``."""
        return self._native is not None

    def _enable_c_api(self, probe: Matrix) -> None:
        native = _c_api(self._booster, margin=self._softmax)
        if native is None:
            _log.warning("xgboost C API not reachable; using Booster.inplace_predict")
            return
        expected = self._public(probe)
        try:
            batch = native.predict(probe)
            rows = [native.predict(probe[i : i + 1]) for i in range(len(probe))]
        except PredictionError:
            native.close()
            raise
        if np.array_equal(batch, expected, equal_nan=True) and np.array_equal(
            np.concatenate(rows), expected, equal_nan=True
        ):
            self._native = native
        else:
            native.close()
            _log.warning("xgboost C API disagrees with inplace_predict; using inplace_predict")

    def _public(self, x: Matrix) -> Matrix:
        try:
            out = self._booster.inplace_predict(
                x, predict_type=self._predict_type, validate_features=False
            )
        except (xgboost.core.XGBoostError, ValueError) as exc:
            raise PredictionError(f"XGBoost failed to predict: {_message(exc)}") from exc
        return np.asarray(out, dtype=np.float64)

    def predict(self, batch: Matrix) -> Matrix:
        """Binary: positive-class probability ``[N]``; multiclass ``[N, K]``; else ``[N]``."""
        x = as_matrix(batch, self._n_features)
        if x.shape[0] == 0:
            empty = np.empty((0, self._n_outputs), dtype=np.float64)
            return empty if self._n_outputs > 1 else empty.reshape(0)
        native = self._native
        out = native.predict(x) if native is not None else self._public(x)
        return _softmax(out) if self._softmax else out

    def close(self) -> None:
        """Free the per-thread proxies; ``predict`` must not run concurrently."""
        native, self._native = self._native, None
        if native is not None:
            native.close()


def _probe_rows(width: int) -> Matrix:
    """Zeros, missing values, ones and twos (valid codes for categorical features)."""
    return np.ascontiguousarray(
        [[0.0] * width, [np.nan] * width, [1.0] * width, [2.0] * width], dtype=np.float64
    )


class XGBoostLoader:
    """Reads XGBoost JSON and UBJSON models."""

    format = ModelFormat.XGBOOST

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        schema, task, details = _describe(_open(path))
        return Inspection(schema=schema, task=task, details=details)

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        booster = _open(path)
        _, _, details = _describe(booster)
        n_features = int(details["n_features"])
        if schema is not None and len(schema) != n_features:
            raise ModelFormatError(
                f"{path.name} takes {n_features} features but the schema has {len(schema)}"
            )
        booster.set_param({"nthread": max(1, threads)})
        predictor = XGBoostPredictor(
            booster,
            n_features=n_features,
            n_outputs=int(details.get("n_classes", details.get("n_targets", 1))),
            softmax=details["objective"] == "multi:softmax",
        )
        predictor._enable_c_api(_probe_rows(n_features))
        return predictor


LOADER = XGBoostLoader()
