"""The one table from interlock's errors to HTTP statuses; domain code knows no HTTP."""

from __future__ import annotations

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

__all__ = ["status_for"]

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
