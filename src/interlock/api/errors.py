"""The one table from interlock's errors to HTTP statuses; domain code knows no HTTP.

:func:`validation_error` does the same for FastAPI's request validation errors, so the
admin routes answer bad input as the prediction routes do (README, "Bad input").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from interlock.errors import (
    AuthError,
    BudgetExceededError,
    DeadlineExceededError,
    FeatureError,
    InputError,
    InterlockError,
    ModelFormatError,
    ModelNotFoundError,
    OverloadedError,
    PayloadTooLargeError,
    PredictionError,
    RateLimitedError,
    RegistryError,
    RuntimeLoadError,
    StoreError,
    TrafficError,
    UnavailableError,
    UnsafeArtifactError,
    UpstreamError,
)

__all__ = ["status_for", "validation_error"]

# Most specific first: the first matching class decides.
_TABLE: tuple[tuple[type[InterlockError], int], ...] = (
    (PayloadTooLargeError, 413),
    (FeatureError, 422),
    (InputError, 400),
    (AuthError, 401),
    (ModelNotFoundError, 404),
    (UnsafeArtifactError, 422),
    (ModelFormatError, 422),
    (RegistryError, 409),
    (TrafficError, 422),
    (OverloadedError, 429),
    (RateLimitedError, 429),
    (BudgetExceededError, 429),
    (UnavailableError, 503),
    (DeadlineExceededError, 504),
    (RuntimeLoadError, 503),
    (StoreError, 503),
    (PredictionError, 500),
    (UpstreamError, 502),
)


def status_for(exc: InterlockError) -> int:
    for cls, status in _TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def validation_error(errors: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    """The status and message for FastAPI's validation errors: the first one, located.

    A body that is not JSON is a 400 ``the body is not valid JSON: …``, as on the
    prediction routes; anything else a 422 naming the field.
    """
    if not errors:
        return 422, "request: invalid request"
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        cause = str((first.get("ctx") or {}).get("error", "")) or str(first.get("msg", ""))
        at = f" at character {loc[-1]}" if len(loc) > 1 and isinstance(loc[-1], int) else ""
        return 400, f"the body is not valid JSON: {cause}{at}"
    where = ".".join(str(p) for p in loc if p != "body") or "request"
    return 422, f"{where}: {first.get('msg') or 'invalid value'}"
