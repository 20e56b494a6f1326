"""What every model format provides: an inspection at registration and a predictor.

A *loader* knows one format. ``inspect`` reads an artifact once, when it is registered:
it proves the artifact loads and reads what the format carries (feature names, ranges,
the task). ``load`` returns a :class:`Predictor` that serving calls from its inference
threads, never from the event loop.

Predictors take either a float64 matrix ``[rows, features]`` in schema order
(``takes_rows`` false: every tensor format) or the rows as dicts (``takes_rows`` true:
the ``python`` format). They return one result per row: for binary classifiers the
positive-class probability, for multiclass a probability list, for regressors the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from interlock._core.formats import Inspection, ModelFormat, Task
from interlock._core.schema import FeatureSchema

__all__ = ["Inspection", "Loader", "ModelFormat", "Predictor", "Task", "as_matrix"]

Matrix = npt.NDArray[np.float64]


class Predictor(Protocol):
    @property
    def takes_rows(self) -> bool:
        """True when ``predict`` takes ``list[dict]`` rows instead of a matrix."""
        ...

    @property
    def accepts_missing(self) -> bool:
        """False when the model cannot take missing values (NaN): serving refuses them."""
        ...

    def predict(self, batch: Any) -> npt.NDArray[Any] | Sequence[Any]:
        """One result per row of ``batch``; called from an inference thread."""
        ...

    def close(self) -> None:
        """Release what the predictor holds."""
        ...


class Loader(Protocol):
    format: ModelFormat

    def inspect(self, path: Path, *, trusted: bool = False) -> Inspection:
        """Load ``path`` once to validate it; raise ModelFormatError / UnsafeArtifactError."""
        ...

    def load(
        self, path: Path, *, schema: FeatureSchema | None, threads: int = 1, trusted: bool = False
    ) -> Predictor:
        """A predictor for ``path``; ``threads`` caps native threads per call."""
        ...


def as_matrix(x: Any, width: int | None) -> Matrix:
    """``x`` as a C-contiguous float64 ``[rows, width]`` matrix, copied only when it must be."""
    if (
        type(x) is np.ndarray
        and x.dtype == np.float64
        and x.ndim == 2
        and x.flags.c_contiguous
        and (width is None or x.shape[1] == width)
    ):
        return x
    out = np.ascontiguousarray(x, dtype=np.float64)
    if out.ndim != 2 or (width is not None and out.shape[1] != width):
        raise ValueError(f"expected a [rows, {width}] matrix, got shape {out.shape}")
    return out
