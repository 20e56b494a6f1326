"""The ``onnx`` format: an ONNX model run by onnxruntime on the CPU.

Inputs. Either one tensor ``[N, F]`` of float or double (the matrix is cast to the
input's type), or one input per feature, each ``[N]`` or ``[N, 1]`` of float, double,
int64 or int32 (as skl2onnx writes for a list of initial types). Any other input layout
is refused at registration. An integer input cannot take a missing value: a NaN there
raises :class:`~interlock.errors.FeatureError`.

Schema. One input per feature names the features. Otherwise the names come from the
model's metadata, a ``metadata_props`` entry ``feature_names`` holding a JSON list or a
comma-separated string; without it the schema is None (the registry then asks for one)
and ``details["n_features"]`` says how many features the input takes, when it is fixed.

Outputs. A classifier converted by skl2onnx has a label output and a probabilities
output: a tensor ``[N, K]`` (``zipmap=False``) or a sequence of maps (ZipMap). The
probabilities output is the one whose type is a sequence of maps, else the first tensor
whose name contains ``prob``. With the ``onnx`` package installed, a ZipMap node is cut
from the graph at load so that onnxruntime returns the tensor under it (a ZipMap output
costs a Python dict per row); without it, the maps are read row by row. Binary (K = 2)
answers column 1, multiclass ``[N, K]``. A model without a probabilities output answers
its first output, squeezed to ``[N]`` when it is ``[N, 1]``; that is a regression when
the output has one value per row, else the task is unknown.

Sessions use the CPU provider with ``intra_op_num_threads=threads`` and
``inter_op_num_threads=1``; ``InferenceSession.run`` is thread-safe.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import FeatureError, ModelFormatError, PredictionError
from interlock.runtime.base import Inspection, ModelFormat, Predictor, Task, as_matrix
from interlock.runtime.loaders._messages import library_message

__all__ = ["LOADER", "OnnxLoader", "OnnxPredictor"]

Matrix = npt.NDArray[np.float64]


_FLOAT_TYPES: dict[str, type[np.floating[Any]]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
}
_INT_TYPES: dict[str, type[np.signedinteger[Any]]] = {
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


@dataclass(frozen=True, slots=True)
class _Column:
    """One model input fed from one column of the matrix."""

    name: str
    index: int
    dtype: type[np.generic]
    flat: bool  # the input is [N] rather than [N, 1]

    @property
    def integer(self) -> bool:
        return issubclass(self.dtype, np.integer)


@dataclass(frozen=True, slots=True)
class _Layout:
    """How the matrix becomes the model's inputs."""

    matrix: str | None  # the single [N, F] input, if that is the layout
    matrix_dtype: type[np.generic]
    columns: tuple[_Column, ...]
    n_features: int | None

    @property
    def names(self) -> list[str] | None:
        return [c.name for c in self.columns] if self.columns else None


@dataclass(frozen=True, slots=True)
class _Output:
    name: str
    probabilities: bool
    zipmap: bool


def _session(model: bytes, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 4  # errors come back as exceptions; no C++ lines on stderr
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _open(path: Path, threads: int) -> tuple[bytes, onnxruntime.InferenceSession]:
    if not path.is_file():
        raise ModelFormatError(f"{path.name}: no such file")
    raw = path.read_bytes()
    try:
        return raw, _session(raw, threads)
    except Exception as exc:  # onnxruntime's errors share no base class but Exception
        raise ModelFormatError(
            f"{path.name} is not an ONNX model onnxruntime can run: {library_message(exc, path)}"
        ) from exc


def _dim(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _layout(session: onnxruntime.InferenceSession, name: str) -> _Layout:
    inputs = session.get_inputs()
    if len(inputs) == 1 and len(inputs[0].shape) == 2:
        only = inputs[0]
        matrix_dtype = _FLOAT_TYPES.get(only.type)
        if matrix_dtype is None:
            raise ModelFormatError(
                f"{name}: input {only.name!r} is {only.type}; interlock feeds float or double"
            )
        return _Layout(only.name, matrix_dtype, (), _dim(only.shape[1]))
    columns: list[_Column] = []
    for index, item in enumerate(inputs):
        shape = list(item.shape)
        dtype: type[np.generic] | None = _FLOAT_TYPES.get(item.type) or _INT_TYPES.get(item.type)
        if dtype is None or not (len(shape) == 1 or (len(shape) == 2 and _dim(shape[1]) == 1)):
            raise ModelFormatError(
                f"{name}: input {item.name!r} is {item.type} {shape}; interlock feeds one "
                "[N, F] float/double tensor or one [N] / [N, 1] tensor per feature"
            )
        columns.append(_Column(item.name, index, dtype, flat=len(shape) == 1))
    return _Layout(None, np.float64, tuple(columns), len(columns))


def _pick_output(session: onnxruntime.InferenceSession) -> _Output:
    outputs = session.get_outputs()
    for item in outputs:
        if item.type.startswith("seq(map("):
            return _Output(item.name, probabilities=True, zipmap=True)
    for item in outputs:
        if "prob" in item.name.lower() and item.type in _FLOAT_TYPES:
            return _Output(item.name, probabilities=True, zipmap=False)
    return _Output(outputs[0].name, probabilities=False, zipmap=False)


def _without_zipmap(raw: bytes, output: str) -> tuple[bytes, str, list[Any]] | None:
    """The model with the ZipMap behind ``output`` cut out, the tensor now output, the labels.

    None when the ``onnx`` package is missing or no ZipMap produces ``output``.
    """
    try:
        import onnx
        import onnx.helper
    except ImportError:
        return None
    model = onnx.load_from_string(raw)
    graph = model.graph
    node = next((n for n in graph.node if n.op_type == "ZipMap" and output in n.output), None)
    if node is None:
        return None
    labels: list[Any] = []
    for attribute in node.attribute:
        if attribute.name == "classlabels_int64s":
            labels = [int(v) for v in attribute.ints]
        elif attribute.name == "classlabels_strings":
            labels = [v.decode() for v in attribute.strings]
    position = next(i for i, o in enumerate(graph.output) if o.name == output)
    graph.output.remove(graph.output[position])
    graph.output.insert(
        position, onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)
    )
    graph.node.remove(node)
    return model.SerializeToString(), node.input[0], labels


def _metadata_names(session: onnxruntime.InferenceSession, name: str) -> list[str] | None:
    text = session.get_modelmeta().custom_metadata_map.get("feature_names")
    if text is None:
        return None
    text = text.strip()
    if text.startswith("["):
        try:
            names = json.loads(text)
        except ValueError as exc:
            raise ModelFormatError(f"{name}: metadata feature_names is not JSON: {exc}") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ModelFormatError(f"{name}: metadata feature_names must list strings")
        return names
    return [part.strip() for part in text.split(",") if part.strip()]


def _feeder(layout: _Layout) -> Callable[[Matrix], dict[str, npt.NDArray[Any]]]:
    """A function from the float64 matrix to the session's input feed."""
    if layout.matrix is not None:
        name, dtype = layout.matrix, layout.matrix_dtype
        if dtype is np.float64:
            return lambda x: {name: x}
        return lambda x: {name: x.astype(dtype)}

    columns = layout.columns

    def feed(x: Matrix) -> dict[str, npt.NDArray[Any]]:
        out: dict[str, npt.NDArray[Any]] = {}
        for column in columns:
            values = x[:, column.index] if column.flat else x[:, column.index : column.index + 1]
            if column.integer and np.isnan(values).any():
                raise FeatureError(
                    f"feature {column.name!r} is missing; the ONNX model takes an integer there",
                    feature=column.name,
                )
            out[column.name] = np.ascontiguousarray(values, dtype=column.dtype)
        return out

    return feed


class OnnxPredictor:
    """Runs an ONNX session on the matrix; see the module docstring for the layouts."""

    takes_rows = False
    accepts_missing = False  # a graph computes on NaN without complaint: refuse it up front

    def __init__(
        self,
        session: onnxruntime.InferenceSession,
        *,
        layout: _Layout,
        output: _Output,
        n_features: int,
        classes: Sequence[Any] = (),
    ) -> None:
        self._session = session
        self._feed = _feeder(layout)
        self._outputs = [output.name]
        self._zipmap = output.zipmap
        self._probabilities = output.probabilities
        self._classes = list(classes)
        self._n_features = n_features
        self._column: int | None = None  # binary: which column is returned
        self._squeeze = False
        self._empty: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)

    def _raw(self, x: Matrix) -> Matrix:
        try:
            out = self._session.run(self._outputs, self._feed(x))[0]
        except FeatureError:
            raise
        except Exception as exc:  # onnxruntime's errors share no base class but Exception
            raise PredictionError(f"onnxruntime failed to predict: {library_message(exc)}") from exc
        if self._zipmap:
            classes = self._classes
            return np.array([[row[c] for c in classes] for row in out], dtype=np.float64)
        return np.asarray(out)

    def _settle(self, probe: Matrix) -> npt.NDArray[Any]:
        """Run ``probe`` once to learn the output's shape (and the ZipMap's classes)."""
        out = self._session.run(self._outputs, self._feed(probe))[0]
        if self._zipmap:
            if not self._classes:
                self._classes = list(out[0]) if len(out) else []
            out = np.array([[row[c] for c in self._classes] for row in out])
        out = np.asarray(out)
        if self._probabilities and out.ndim == 2 and out.shape[1] == 2:
            self._column = 1
        elif not self._probabilities and out.ndim == 2 and out.shape[1] == 1:
            self._squeeze = True
        elif out.ndim == 2:
            self._empty = np.empty((0, out.shape[1]), dtype=np.float64)
        return out

    def predict(self, batch: Matrix) -> Matrix:
        """Binary: positive-class probability ``[N]``; multiclass ``[N, K]``; else the output."""
        x = as_matrix(batch, self._n_features)
        if x.shape[0] == 0:
            return self._empty
        out = self._raw(x)
        if self._column is not None:
            return np.ascontiguousarray(out[:, self._column], dtype=np.float64)
        if self._squeeze:
            return np.ascontiguousarray(out[:, 0], dtype=np.float64)
        return np.asarray(out, dtype=np.float64)

    def close(self) -> None:
        """Nothing to free beyond the session, which goes with this object."""


def _task(output: _Output, probe_out: npt.NDArray[Any]) -> Task:
    width = probe_out.shape[1] if probe_out.ndim == 2 else 1
    if output.probabilities:
        if width == 2:
            return Task.BINARY
        return Task.MULTICLASS if width > 2 else Task.UNKNOWN
    numeric = np.issubdtype(probe_out.dtype, np.floating)
    return Task.REGRESSION if width == 1 and numeric else Task.UNKNOWN


class OnnxLoader:
    """Reads ONNX models.

    ``strip_zipmap`` (default True) cuts a ZipMap node from the graph when the ``onnx``
    package is installed; False keeps it and reads the maps in Python.
    """

    format = ModelFormat.ONNX

    def __init__(self, *, strip_zipmap: bool = True) -> None:
        self.strip_zipmap = strip_zipmap

    def _build(
        self, path: Path, schema: FeatureSchema | None, threads: int
    ) -> tuple[OnnxPredictor | None, FeatureSchema | None, Task, dict[str, Any]]:
        raw, session = _open(path, threads)
        layout = _layout(session, path.name)
        names = layout.names or _metadata_names(session, path.name)
        n_features = layout.n_features
        if names is not None and n_features is not None and len(names) != n_features:
            raise ModelFormatError(
                f"{path.name}: metadata names {len(names)} features but the input takes "
                f"{n_features}"
            )
        if n_features is None and names is not None:
            n_features = len(names)
        own_schema = None
        if names is not None:
            kinds = {c.name: c.integer for c in layout.columns}
            try:
                own_schema = FeatureSchema.of(
                    Feature(n, FeatureType.INT if kinds.get(n) else FeatureType.FLOAT)
                    for n in names
                )
            except ValueError as exc:
                raise ModelFormatError(f"{path.name}: feature names: {exc}") from exc
        if schema is not None:
            if n_features is not None and len(schema) != n_features:
                raise ModelFormatError(
                    f"{path.name} takes {n_features} features but the schema has {len(schema)}"
                )
            n_features = len(schema)

        output = _pick_output(session)
        details: dict[str, Any] = {
            "n_features": n_features,
            "inputs": [i.name for i in session.get_inputs()],
            "output": output.name,
        }
        classes: list[Any] = []
        if output.zipmap:
            stripped = _without_zipmap(raw, output.name) if self.strip_zipmap else None
            if stripped is not None:
                model, source, classes = stripped
                session = _session(model, threads)
                output = _Output(source, probabilities=True, zipmap=False)
            details["zipmap"] = "kept" if stripped is None else "removed"
        if n_features is None:
            return None, own_schema, Task.UNKNOWN, details
        predictor = OnnxPredictor(
            session, layout=layout, output=output, n_features=n_features, classes=classes
        )
        try:
            probe_out = predictor._settle(np.zeros((2, n_features), dtype=np.float64))
        except Exception as exc:  # onnxruntime's errors share no base class but Exception
            raise ModelFormatError(
                f"{path.name} failed on a probe row of zeros: {library_message(exc, path)}"
            ) from exc
        task = _task(output, probe_out)
        if output.probabilities and predictor._classes:
            details["classes"] = predictor._classes
        if task in (Task.BINARY, Task.MULTICLASS):
            details["n_classes"] = int(probe_out.shape[1])
        return predictor, own_schema, task, details

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        _, schema, task, details = self._build(path, None, 1)
        return Inspection(schema=schema, task=task, details=details)

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        predictor, _, _, _ = self._build(path, schema, max(1, threads))
        if predictor is None:
            raise ModelFormatError(
                f"{path.name} does not fix its number of features; register it with a schema"
            )
        return predictor


LOADER = OnnxLoader()
