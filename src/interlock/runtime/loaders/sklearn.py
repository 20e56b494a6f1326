"""The ``sklearn`` format: a fitted scikit-learn estimator or Pipeline.

Two kinds of artifact, told apart by the file's suffix:

- ``.skops`` (:mod:`skops.io`). Loading builds only the types it is told to trust:
  those skops trusts by default, plus the scikit-learn and numpy *classes* the file
  names (``sklearn.tree._tree.Tree`` and the like, which skops lists as untrusted).
  Functions are never trusted this way, not even numpy's: a ``FunctionTransformer``
  could call ``numpy.save`` on a path of the author's choosing. Any other type (a
  custom transformer, a function) raises :class:`~interlock.errors.UnsafeArtifactError`
  naming it, unless the artifact was registered as trusted.
- ``.pkl``, ``.pickle``, ``.joblib``: a pickle, read with joblib. Unpickling runs
  whatever code the file holds, so it is refused unless the artifact is trusted.

The registry records each artifact's sha256 and serving checks it before every load;
this module only loads.

The schema is ``feature_names_in_`` when the estimator was fitted on named columns,
all ``float``; otherwise None, with ``details["n_features"]`` from ``n_features_in_``.

Classifiers with ``predict_proba`` answer probabilities (binary: column 1, the
positive class; multiclass ``[N, K]`` in ``classes_`` order). Regressors answer
``predict``. Anything else answers ``predict`` with the task unknown.

scikit-learn validates its input on every call, which dominates small batches (about
90 µs for a LogisticRegression, 200 µs for a two-step Pipeline, per call); convert the
model to ONNX when that matters. An estimator fitted on a DataFrame would warn on every
array it is given, so the loader drops the recorded names from the fitted estimators
and feeds the array. A model that needs a DataFrame (a ColumnTransformer selecting
columns by name, or ``set_output(transform="pandas")``) gets one built per call, which
needs pandas and is slower; ``details["input"]`` says which. ``n_jobs`` of every
estimator that has one is set to ``threads``; estimators that size OpenMP pools
themselves (HistGradientBoosting) are not capped.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import skops.io
from sklearn.base import BaseEstimator, is_regressor
from sklearn.compose import ColumnTransformer
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from interlock._core.schema import Feature, FeatureSchema
from interlock.errors import ModelFormatError, PredictionError, UnsafeArtifactError
from interlock.runtime.base import Inspection, ModelFormat, Predictor, Task, as_matrix
from interlock.runtime.loaders._messages import library_message

__all__ = ["LOADER", "SklearnLoader", "SklearnPredictor"]

Matrix = npt.NDArray[np.float64]


_SKOPS_SUFFIXES = frozenset({".skops"})
_PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".joblib"})
_LIBRARY_ROOTS = frozenset({"sklearn", "numpy"})


def _is_library_class(name: str) -> bool:
    """True when ``name`` is a class defined under sklearn or numpy."""
    if name.split(".", 1)[0] not in _LIBRARY_ROOTS:
        return False
    module_name, _, attribute = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except (ImportError, ValueError):
        return False
    return isinstance(getattr(module, attribute, None), type)


def _load_skops(path: Path, trusted: bool) -> tuple[Any, list[str]]:
    try:
        untrusted = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # a damaged archive can fail in zipfile, json or skops
        raise ModelFormatError(
            f"{path.name} is not a skops file: {library_message(exc, path)}"
        ) from exc
    library = [name for name in untrusted if _is_library_class(name)]
    others = [name for name in untrusted if name not in library]
    if others and not trusted:
        raise UnsafeArtifactError(
            f"{path.name} holds types skops does not trust: {', '.join(others)}; loading "
            "them runs their code; re-register with --trust if you trust where it came from"
        )
    try:
        model = skops.io.load(path, trusted=untrusted if trusted else library)
    except Exception as exc:  # skops surfaces the failing type's own errors
        raise ModelFormatError(
            f"{path.name} could not be loaded by skops: {library_message(exc, path)}"
        ) from exc
    return model, untrusted


def _load_pickle(path: Path, trusted: bool) -> Any:
    if not trusted:
        raise UnsafeArtifactError(
            f"{path.name} is a pickle; pickle can run arbitrary code; re-register with "
            "--trust if you trust where it came from, or save the model with skops"
        )
    import joblib  # type: ignore[import-untyped]  # installed with scikit-learn

    try:
        return joblib.load(path)
    except Exception as exc:  # unpickling can raise anything
        raise ModelFormatError(
            f"{path.name} could not be unpickled: {library_message(exc, path)}"
        ) from exc


def _open(path: Path, trusted: bool) -> tuple[Any, dict[str, Any]]:
    if not path.is_file():
        raise ModelFormatError(f"{path.name}: no such file")
    suffix = path.suffix.lower()
    details: dict[str, Any] = {}
    if suffix in _SKOPS_SUFFIXES:
        model, untrusted = _load_skops(path, trusted)
        details["artifact"] = "skops"
        if untrusted:
            details["trusted_types"] = untrusted
    elif suffix in _PICKLE_SUFFIXES:
        model = _load_pickle(path, trusted)
        details["artifact"] = "pickle"
    else:
        allowed = ", ".join(sorted(_SKOPS_SUFFIXES | _PICKLE_SUFFIXES))
        raise ModelFormatError(f"{path.name}: a sklearn artifact is one of {allowed}")
    if not callable(getattr(model, "predict", None)):
        raise ModelFormatError(f"{path.name} holds a {type(model).__name__}, not an estimator")
    try:
        check_is_fitted(model)
    except (NotFittedError, TypeError) as exc:
        raise ModelFormatError(
            f"{path.name}: the estimator is not fitted: {library_message(exc, path)}"
        ) from exc
    return model, details


def _plain(value: Any) -> Any:
    """A class label as JSON can hold it."""
    if isinstance(value, np.generic):
        value = value.item()
    return value if isinstance(value, str | int | float | bool) else str(value)


def _describe(model: Any, details: dict[str, Any]) -> tuple[FeatureSchema | None, Task, str]:
    names = getattr(model, "feature_names_in_", None)
    n_features = getattr(model, "n_features_in_", None)
    details["n_features"] = None if n_features is None else int(n_features)
    details["estimator"] = type(model).__name__
    classes = getattr(model, "classes_", None)
    method = "predict"
    task = Task.REGRESSION if is_regressor(model) else Task.UNKNOWN
    if classes is not None and hasattr(model, "predict_proba") and len(classes) >= 2:
        method = "predict_proba"
        task = Task.BINARY if len(classes) == 2 else Task.MULTICLASS
        details["classes"] = [_plain(c) for c in classes]
        details["n_classes"] = len(classes)
    schema = None
    if names is not None:
        schema = FeatureSchema.of(Feature(str(name)) for name in names)
    return schema, task, method


def _estimators(root: Any) -> Iterator[Any]:
    """Every estimator reachable from ``root``, fitted sub-estimators included."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, BaseEstimator):
            yield item
            stack.extend(vars(item).values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, np.ndarray) and item.dtype == object:
            stack.extend(item.ravel().tolist())


def _needs_frame(model: Any) -> bool:
    """True when the model cannot take a plain array: name-based columns or pandas output."""
    for estimator in _estimators(model):
        config = getattr(estimator, "_sklearn_output_config", None) or {}
        if config.get("transform", "default") != "default":
            return True
        if isinstance(estimator, ColumnTransformer):
            specs = getattr(estimator, "transformers_", estimator.transformers)
            for _, _, columns in specs:
                if callable(columns) or isinstance(columns, str):
                    return True
                if isinstance(columns, list | tuple | np.ndarray) and any(
                    isinstance(c, str) for c in columns
                ):
                    return True
    return False


def _accepts_missing(model: Any) -> bool:
    """Whether every step takes NaN, by scikit-learn's own ``allow_nan`` tags.

    Composites (Pipeline, ColumnTransformer, FeatureUnion) report conservatively on their
    own, so their steps are asked instead; fitted internals are not looked into.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import FeatureUnion, Pipeline

    if isinstance(model, Pipeline):
        return all(_accepts_missing(step) for _, step in model.steps if step != "passthrough")
    if isinstance(model, ColumnTransformer):
        parts = [t for _, t, _ in model.transformers_ if t not in ("drop", "passthrough")]
        return all(_accepts_missing(t) for t in parts)
    if isinstance(model, FeatureUnion):
        return all(_accepts_missing(t) for _, t in model.transformer_list if t != "drop")
    try:
        return bool(model.__sklearn_tags__().input_tags.allow_nan)
    except AttributeError:  # no tags: let the model decide at predict time
        return True


class SklearnPredictor:
    """Calls ``predict_proba`` or ``predict`` on the matrix, or on a DataFrame of it."""

    takes_rows = False

    def __init__(
        self,
        call: Callable[[Any], Any],
        *,
        n_features: int | None,
        column: int | None,
        n_outputs: int = 1,
        frame: Callable[[Matrix], Any] | None = None,
        accepts_missing: bool = True,
    ) -> None:
        self.accepts_missing = accepts_missing
        self._call = call
        self._n_features = n_features
        self._column = column
        self._frame = frame
        self._empty = np.empty((0, n_outputs) if n_outputs > 1 else 0, dtype=np.float64)

    def predict(self, batch: Matrix) -> npt.NDArray[Any]:
        """Binary: positive-class probability ``[N]``; multiclass ``[N, K]``; else ``predict``."""
        x = as_matrix(batch, self._n_features)
        if x.shape[0] == 0:
            return self._empty
        try:
            out = self._call(x if self._frame is None else self._frame(x))
        except Exception as exc:  # scikit-learn and user code raise many types
            raise PredictionError(
                f"scikit-learn failed to predict: {library_message(exc)}"
            ) from exc
        if self._column is not None:
            return np.ascontiguousarray(out[:, self._column], dtype=np.float64)
        out = np.asarray(out)
        return out.astype(np.float64, copy=False) if out.dtype.kind in "biuf" else out

    def close(self) -> None:
        """Nothing to free beyond the model, which goes with this object."""


def _frame_builder(names: list[str], path: Path) -> Callable[[Matrix], Any]:
    try:
        import pandas as pd  # type: ignore[import-untyped]
    except ImportError as exc:
        raise ModelFormatError(
            f"{path.name} selects columns by name and needs pandas to be installed"
        ) from exc
    columns = pd.Index(names)
    return lambda x: pd.DataFrame(x, columns=columns, copy=False)


def _drop_names(model: Any) -> list[tuple[Any, Any]]:
    """Remove ``feature_names_in_`` from every fitted estimator; returns what to restore."""
    dropped: list[tuple[Any, Any]] = []
    for estimator in _estimators(model):
        if "feature_names_in_" in vars(estimator):
            dropped.append((estimator, estimator.feature_names_in_))
            del estimator.feature_names_in_
    return dropped


def _arrays_suffice(model: Any, method: str, names: list[str]) -> bool:
    """Drop the recorded names, and keep them dropped if the model then answers arrays.

    With pandas installed, a probe row must get the same answer as a DataFrame and no
    warning; without pandas there is nothing to compare with and arrays are used.
    """
    try:
        import pandas as pd
    except ImportError:
        _drop_names(model)
        return True
    probe = np.zeros((2, len(names)), dtype=np.float64)
    call = getattr(model, method)
    try:
        expected = call(pd.DataFrame(probe, columns=names))
    except Exception:  # a probe of zeros may not suit the model: trust the static check
        _drop_names(model)
        return True
    dropped = _drop_names(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            got = call(probe)
        except Exception:  # the array path fails where the DataFrame worked
            got = None
    if (
        got is not None
        and not caught
        and np.allclose(got, expected, rtol=1e-9, atol=1e-12, equal_nan=True)
    ):
        return True
    for estimator, value in dropped:
        estimator.feature_names_in_ = value
    return False


class SklearnLoader:
    """Reads skops files, and pickles when trusted."""

    format = ModelFormat.SKLEARN

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        model, details = _open(path, trusted)
        schema, task, _ = _describe(model, details)
        return Inspection(schema=schema, task=task, details=details)

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        model, details = _open(path, trusted)
        own_schema, task, method = _describe(model, details)
        n_features = details["n_features"]
        if schema is not None:
            if n_features is not None and len(schema) != n_features:
                raise ModelFormatError(
                    f"{path.name} takes {n_features} features but the schema has {len(schema)}"
                )
            n_features = len(schema)
        for estimator in _estimators(model):
            if "n_jobs" in vars(estimator):
                estimator.n_jobs = max(1, threads)
        frame = None
        if own_schema is not None:
            names = own_schema.names
            if _needs_frame(model) or not _arrays_suffice(model, method, names):
                frame = _frame_builder(names, path)
        details["input"] = "array" if frame is None else "dataframe"
        column = 1 if task is Task.BINARY else None
        return SklearnPredictor(
            getattr(model, method),
            n_features=n_features,
            column=column,
            n_outputs=int(details.get("n_classes", 1)) if task is Task.MULTICLASS else 1,
            frame=frame,
            accepts_missing=_accepts_missing(model),
        )


LOADER = SklearnLoader()
