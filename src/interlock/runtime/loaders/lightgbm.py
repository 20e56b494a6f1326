"""The ``lightgbm`` format: a LightGBM model text file (``Booster.save_model``).

What the file carries becomes the schema: the feature names, the training range of each
numeric feature (``feature_infos``), and for a model trained on pandas categoricals the
category strings (``pandas_categorical``; a category's code is its index there, the
coding :mod:`interlock._core.schema` uses). A categorical feature trained on integer
codes has no strings in the file; it is typed ``int`` (the client sends the code) and
listed in ``details["categorical_features"]``.

The task comes from the objective: ``binary`` → binary, ``multiclass`` and
``multiclassova`` → multiclass, a custom objective → unknown, any other → regression.

Prediction calls LightGBM's C API directly, because ``Booster.predict`` spends most of
a small call in Python (measured on a 20-tree binary model, 6 features, 1 thread):

=========================================== ========= ==========
call                                         1 row     64 rows
=========================================== ========= ==========
``Booster.predict(x, num_threads=1)``        17.2 µs   30.0 µs
``LGBM_BoosterPredictForMat``                 9.1 µs   22.0 µs
``LGBM_BoosterPredictForMatSingleRowFast``    2.7 µs   —
=========================================== ========= ==========

One row goes through ``LGBM_BoosterPredictForMatSingleRowFast`` with one ``FastConfig``
per inference thread (LightGBM locks a shared ``FastConfig`` and recommends one per
thread), more rows through ``LGBM_BoosterPredictForMat`` with ``num_threads`` set. Both
are documented C API functions, reached through the library handle that the
``lightgbm`` package loads. When that handle is not where this module expects it, or
when the direct calls do not reproduce ``Booster.predict`` bit for bit on probe rows at
load time, the predictor falls back to ``Booster.predict`` and logs a warning.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import numpy.typing as npt

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import ModelFormatError, PredictionError, RuntimeLoadError
from interlock.runtime.base import Inspection, ModelFormat, Predictor, Task, as_matrix
from interlock.runtime.loaders._messages import library_message

__all__ = ["LOADER", "LightGBMLoader", "LightGBMPredictor"]

_log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float64]


# Constants from LightGBM's c_api.h.
_C_API_DTYPE_FLOAT64 = 1
_C_API_PREDICT_NORMAL = 0
_ROW_MAJOR = 1
_ALL_ITERATIONS = -1

_MULTICLASS_OBJECTIVES = frozenset({"multiclass", "multiclassova"})
_UNKNOWN_OBJECTIVES = frozenset({"", "custom", "none"})


_native_log = logging.getLogger(f"{__name__}.native")
_routed = False


def _route_native_log() -> None:
    """Send LightGBM's own log lines (``[LightGBM] [Fatal] …``) to logging, not stdout."""
    global _routed
    if not _routed:
        lightgbm.register_logger(_native_log, info_method_name="info")
        _routed = True


_TREE_SIZES = re.compile(rb"\ntree_sizes=([0-9 ]*)\r?\n")


def _damage(raw: bytes) -> str | None:
    """What is wrong with a model text file, checked before LightGBM reads it; or None.

    LightGBM prints its fatal errors to stderr itself (``[LightGBM] [Fatal] …``, with the
    file's path) before raising, and a file cut inside its trees crashes the process
    (it reads each tree at the offset ``tree_sizes`` gives). So the file's frame is
    checked here: the ``tree`` line, the header keys LightGBM requires, each tree where
    ``tree_sizes`` puts it, and the ``end of trees`` line.
    """
    if raw.split(b"\n", 1)[0].strip() != b"tree":
        return "it does not start with 'tree' (save it with Booster.save_model)"
    header_end = raw.find(b"\nTree=")
    header = raw[: header_end + 1] if header_end >= 0 else raw
    for key in (b"num_class", b"max_feature_idx"):
        if b"\n" + key + b"=" not in header:
            return f"its header has no {key.decode()}"
    end = raw.find(b"end of trees")
    if end < 0:
        return "it is truncated or damaged: 'end of trees' is missing"
    sizes = _TREE_SIZES.search(header)
    if sizes is not None and header_end >= 0:
        offset = header_end + 1
        for size in (int(s) for s in sizes.group(1).split()):
            if raw[offset : offset + 5] != b"Tree=":
                return "it is truncated or damaged: a tree is not where tree_sizes puts it"
            offset += size
        if offset > end:
            return "it is truncated or damaged: its trees overrun 'end of trees'"
    return None


def _open(path: Path) -> lightgbm.Booster:
    if not path.is_file():
        raise ModelFormatError(f"{path.name}: no such file")
    _route_native_log()
    problem = _damage(path.read_bytes())
    if problem is not None:
        raise ModelFormatError(f"{path.name} is not a LightGBM model file: {problem}")
    try:
        return lightgbm.Booster(model_file=str(path))
    except (lightgbm.basic.LightGBMError, OSError, ValueError) as exc:
        raise ModelFormatError(
            f"{path.name} is not a LightGBM model file: {library_message(exc, path)}"
        ) from exc


def _categorical_indices(booster: lightgbm.Booster, infos: dict[str, Any]) -> list[int]:
    """Indices of the features LightGBM splits on as categories."""
    names = booster.feature_name()
    found = {i for i, name in enumerate(names) if (infos.get(name) or {}).get("values")}
    declared = booster.params.get("categorical_feature")
    if isinstance(declared, list):
        found.update(i for i in declared if isinstance(i, int) and 0 <= i < len(names))
    return sorted(found)


def _describe(booster: lightgbm.Booster) -> tuple[FeatureSchema, Task, dict[str, Any]]:
    # One iteration is enough for the header fields and keeps the dump small.
    dump = booster.dump_model(num_iteration=1)
    names: list[str] = booster.feature_name()
    infos: dict[str, Any] = dump.get("feature_infos") or {}
    categorical = _categorical_indices(booster, infos)
    pandas_categorical = booster.pandas_categorical or []
    strings: dict[int, tuple[str, ...]] = {}
    details: dict[str, Any] = {"n_features": len(names)}
    if pandas_categorical and len(pandas_categorical) == len(categorical):
        strings = {
            index: tuple(str(c) for c in cats)
            for index, cats in zip(categorical, pandas_categorical, strict=True)
        }
    elif pandas_categorical:
        details["note"] = (
            f"pandas_categorical has {len(pandas_categorical)} columns but the model has "
            f"{len(categorical)} categorical features; category strings were not attached"
        )
    features: list[Feature] = []
    for index, name in enumerate(names):
        if index in strings:
            features.append(Feature(name, FeatureType.CATEGORY, categories=strings[index]))
        elif index in categorical:
            features.append(Feature(name, FeatureType.INT))
        else:
            info = infos.get(name) or {}
            low, high = info.get("min_value"), info.get("max_value")
            features.append(
                Feature(
                    name,
                    FeatureType.FLOAT,
                    minimum=None if low is None else float(low),
                    maximum=None if high is None else float(high),
                )
            )
    if categorical:
        details["categorical_features"] = [names[i] for i in categorical]

    objective = str(dump.get("objective") or "").split(" ", 1)[0]
    n_classes = int(dump.get("num_class") or 1)
    if objective == "binary":
        task = Task.BINARY
    elif objective in _MULTICLASS_OBJECTIVES:
        task = Task.MULTICLASS
    elif objective in _UNKNOWN_OBJECTIVES:
        task = Task.UNKNOWN
    else:
        task = Task.REGRESSION
    details["objective"] = objective or None
    if n_classes > 1:
        details["n_classes"] = n_classes
    details["n_trees"] = booster.num_trees()
    return FeatureSchema.of(features), task, details


class _CApi:
    """Direct calls into the LightGBM library for one booster.

    ``one`` and ``many`` may be called from any number of threads at once: each thread
    gets its own ``FastConfig`` for single rows, and ``LGBM_BoosterPredictForMat`` builds
    its predictor per call (as ``Booster.predict`` does).
    """

    def __init__(
        self, lib: Any, booster: lightgbm.Booster, n_features: int, n_outputs: int, threads: int
    ) -> None:
        self._lib = lib
        self._booster = booster  # keeps the handle alive
        self._handle: ctypes.c_void_p = booster._handle
        self._n_outputs = n_outputs
        self._params = f"num_threads={threads}".encode()
        self._single = lib.LGBM_BoosterPredictForMatSingleRowFast
        self._mat = lib.LGBM_BoosterPredictForMat
        self._c_f64 = ctypes.c_int(_C_API_DTYPE_FLOAT64)
        self._c_ncol = ctypes.c_int32(n_features)
        self._c_row_major = ctypes.c_int(_ROW_MAJOR)
        self._c_normal = ctypes.c_int(_C_API_PREDICT_NORMAL)
        self._c_start = ctypes.c_int(0)
        self._c_all = ctypes.c_int(_ALL_ITERATIONS)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._fast_configs: list[ctypes.c_void_p] = []
        self._closed = False

    def _error(self) -> str:
        message = self._lib.LGBM_GetLastError()
        return message.decode(errors="replace") if isinstance(message, bytes) else str(message)

    def _thread_state(self) -> tuple[ctypes.c_void_p, Any]:
        with self._lock:
            if self._closed:
                raise RuntimeLoadError("the LightGBM predictor is closed")
            config = ctypes.c_void_p()
            rc = self._lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                self._handle,
                self._c_normal,
                self._c_start,
                self._c_all,
                self._c_f64,
                self._c_ncol,
                ctypes.c_char_p(self._params),
                ctypes.byref(config),
            )
            if rc != 0:
                raise PredictionError(f"LightGBM could not prepare a predictor: {self._error()}")
            self._fast_configs.append(config)
        state = (config, ctypes.byref(ctypes.c_int64(0)))
        self._local.state = state
        return state

    def one(self, x: Matrix) -> Matrix:
        try:
            config, out_len = self._local.state
        except AttributeError:
            config, out_len = self._thread_state()
        out = np.empty(self._n_outputs, dtype=np.float64)
        rc = self._single(
            config, ctypes.c_void_p(x.ctypes.data), out_len, ctypes.c_void_p(out.ctypes.data)
        )
        if rc != 0:
            raise PredictionError(f"LightGBM failed to predict: {self._error()}")
        return out

    def many(self, x: Matrix) -> Matrix:
        rows = x.shape[0]
        out = np.empty(rows * self._n_outputs, dtype=np.float64)
        rc = self._mat(
            self._handle,
            ctypes.c_void_p(x.ctypes.data),
            self._c_f64,
            ctypes.c_int32(rows),
            self._c_ncol,
            self._c_row_major,
            self._c_normal,
            self._c_start,
            self._c_all,
            ctypes.c_char_p(self._params),
            ctypes.byref(ctypes.c_int64(0)),
            ctypes.c_void_p(out.ctypes.data),
        )
        if rc != 0:
            raise PredictionError(f"LightGBM failed to predict: {self._error()}")
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            configs, self._fast_configs = self._fast_configs, []
            self._local = threading.local()
        for config in configs:
            self._lib.LGBM_FastConfigFree(config)

    def __del__(self) -> None:
        # Free the FastConfigs while this object still holds the booster.
        for config in getattr(self, "_fast_configs", ()):
            self._lib.LGBM_FastConfigFree(config)


def _c_api(
    booster: lightgbm.Booster, n_features: int, n_outputs: int, threads: int
) -> _CApi | None:
    """The direct path, or None when this lightgbm build does not expose it as expected."""
    lib = getattr(lightgbm.basic, "_LIB", None)
    handle = getattr(booster, "_handle", None)
    needed = (
        "LGBM_BoosterPredictForMat",
        "LGBM_BoosterPredictForMatSingleRowFastInit",
        "LGBM_BoosterPredictForMatSingleRowFast",
        "LGBM_FastConfigFree",
        "LGBM_GetLastError",
    )
    if lib is None or not isinstance(handle, ctypes.c_void_p) or not handle.value:
        return None
    try:
        if not all(getattr(lib, name, None) is not None for name in needed):
            return None
    except AttributeError:  # ctypes raises it for a symbol the library lacks
        return None
    return _CApi(lib, booster, n_features, n_outputs, threads)


def _probe_rows(schema: FeatureSchema) -> Matrix:
    """A few rows that walk different paths: zeros, missing values, range ends, codes."""
    width = len(schema)
    low = [f.minimum if f.minimum is not None else -1.0 for f in schema.features]
    high = [f.maximum if f.maximum is not None else 1.0 for f in schema.features]
    codes = [float(len(f.categories) - 1) if f.categories else 1.0 for f in schema.features]
    return np.ascontiguousarray(
        [[0.0] * width, [np.nan] * width, low, high, codes], dtype=np.float64
    )


class LightGBMPredictor:
    """Predicts with a LightGBM booster; see the module docstring for the call path."""

    takes_rows = False
    accepts_missing = True

    def __init__(
        self, booster: lightgbm.Booster, *, n_features: int, n_outputs: int, threads: int
    ) -> None:
        self._booster = booster
        self._n_features = n_features
        self._n_outputs = n_outputs
        self._threads = threads
        self._native: _CApi | None = None

    @property
    def uses_c_api(self) -> bool:
        """True when predictions go through the C API directly, not ``Booster.predict``."""
        return self._native is not None

    def _enable_c_api(self, probe: Matrix) -> None:
        """Switch to the direct calls if they reproduce ``Booster.predict`` on ``probe``."""
        native = _c_api(self._booster, self._n_features, self._n_outputs, self._threads)
        if native is None:
            _log.warning("lightgbm C API not reachable; using Booster.predict")
            return
        expected = self._public(probe)
        try:
            batch = self._shape(native.many(probe), len(probe))
            rows = [self._shape(native.one(probe[i : i + 1]), 1) for i in range(len(probe))]
        except PredictionError:
            native.close()
            raise
        if np.array_equal(batch, expected, equal_nan=True) and np.array_equal(
            np.concatenate(rows), expected, equal_nan=True
        ):
            self._native = native
        else:
            native.close()
            _log.warning("lightgbm C API disagrees with Booster.predict; using Booster.predict")

    def _shape(self, flat: Matrix, rows: int) -> Matrix:
        return flat.reshape(rows, self._n_outputs) if self._n_outputs > 1 else flat

    def _public(self, x: Matrix) -> Matrix:
        try:
            out = self._booster.predict(x, num_threads=self._threads)
        except (lightgbm.basic.LightGBMError, ValueError) as exc:
            raise PredictionError(f"LightGBM failed to predict: {library_message(exc)}") from exc
        return np.asarray(out, dtype=np.float64)

    def predict(self, batch: Matrix) -> Matrix:
        """Binary: positive-class probability ``[N]``; multiclass ``[N, K]``; else ``[N]``."""
        x = as_matrix(batch, self._n_features)
        rows = x.shape[0]
        native = self._native
        if rows == 0:
            return self._shape(np.empty(0, dtype=np.float64), 0)
        if native is None:
            return self._public(x)
        out = native.one(x) if rows == 1 else native.many(x)
        return out.reshape(rows, self._n_outputs) if self._n_outputs > 1 else out

    def close(self) -> None:
        """Free the per-thread predictors; ``predict`` must not run concurrently."""
        native, self._native = self._native, None
        if native is not None:
            native.close()


class LightGBMLoader:
    """Reads LightGBM model text files."""

    format = ModelFormat.LIGHTGBM

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        schema, task, details = _describe(_open(path))
        return Inspection(schema=schema, task=task, details=details)

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        booster = _open(path)
        own_schema, _, details = _describe(booster)
        n_features = len(own_schema)
        if schema is not None and len(schema) != n_features:
            raise ModelFormatError(
                f"{path.name} takes {n_features} features but the schema has {len(schema)}"
            )
        predictor = LightGBMPredictor(
            booster,
            n_features=n_features,
            n_outputs=int(details.get("n_classes", 1)),
            threads=max(1, threads),
        )
        predictor._enable_c_api(_probe_rows(own_schema))
        return predictor


LOADER = LightGBMLoader()
