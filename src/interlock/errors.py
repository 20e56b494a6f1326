"""The exception tree of interlock.

Every error interlock raises on purpose derives from :class:`InterlockError`.
Domain errors know nothing of HTTP: ``interlock.api.errors`` maps them to
status codes at the edge.

    InterlockError
    ├── ConfigError                  settings that cannot be used
    ├── StoreError                   the metadata database or artifact store failed
    │   └── ArtifactIntegrityError   an artifact's bytes do not match its recorded sha256
    ├── RegistryError
    │   ├── ModelNotFoundError       no such model, alias or version
    │   ├── ModelFormatError         an artifact that its format cannot read
    │   └── UnsafeArtifactError      a pickle offered without --trust
    ├── RuntimeLoadError             a registered version could not be loaded or warmed
    ├── InputError                   what a client sent cannot be used
    │   ├── MalformedInputError      not JSON, or not the protocol's shape
    │   ├── PayloadTooLargeError     a body over the configured size
    │   └── FeatureError             a missing, extra or wrongly typed feature
    ├── PredictionError              the model raised while predicting
    ├── UnavailableError             no version can answer now (carries retry_after_s)
    │   ├── OverloadedError          a version's queue is full: shed, answer 429
    │   └── CircuitOpenError         a version's breaker is open
    ├── DeadlineExceededError        the request's deadline passed before it was answered
    ├── TrafficError                 a traffic policy that cannot be applied
    ├── CacheError                   the cache backend failed (callers fail open)
    ├── BusError                     the event bus failed (unreachable, timed out, refused)
    ├── UpstreamError                an LLM provider failed (status, transient, retry_after_s)
    ├── RateLimitedError             a tenant's or deployment's RPM/TPM is spent: 429
    ├── BudgetExceededError          a tenant's spending budget is spent: 429
    └── AuthError                    a missing or wrong key

:func:`describe` is the one way to turn any exception into text for a log line or an
error message: never empty, even for ``TimeoutError()``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ArtifactIntegrityError",
    "AuthError",
    "BudgetExceededError",
    "BusError",
    "CacheError",
    "CircuitOpenError",
    "ConfigError",
    "DeadlineExceededError",
    "FeatureError",
    "InputError",
    "InterlockError",
    "MalformedInputError",
    "ModelFormatError",
    "ModelNotFoundError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PredictionError",
    "RateLimitedError",
    "RegistryError",
    "RuntimeLoadError",
    "StoreError",
    "TrafficError",
    "UnavailableError",
    "UnsafeArtifactError",
    "UpstreamError",
    "describe",
]


class InterlockError(Exception):
    """Root of every error interlock raises on purpose."""

    retryable: ClassVar[bool] = False


class ConfigError(InterlockError):
    """The settings cannot be used as given."""


class StoreError(InterlockError):
    """The metadata database or the artifact store failed."""

    retryable = True


class ArtifactIntegrityError(StoreError):
    """An artifact's bytes do not match the sha256 recorded at registration."""

    retryable = False


class RegistryError(InterlockError):
    """A registry operation cannot be done."""


class ModelNotFoundError(RegistryError):
    """No model, alias or version answers to the given reference."""


class ModelFormatError(RegistryError):
    """The artifact cannot be read as the format it was registered with."""


class UnsafeArtifactError(RegistryError):
    """A pickle-based artifact was offered without explicit trust."""


class RuntimeLoadError(InterlockError):
    """A registered version could not be loaded or warmed up."""


class InputError(InterlockError):
    """What a client sent cannot be used; the message says what to fix."""


class MalformedInputError(InputError):
    """The body is not JSON, or not in the shape the protocol defines."""


class PayloadTooLargeError(InputError):
    """The body is larger than the configured maximum."""


class FeatureError(InputError):
    """A feature is missing, unexpected, or of the wrong type."""

    def __init__(self, message: str, *, feature: str | None = None, row: int | None = None):
        super().__init__(message)
        self.feature = feature
        self.row = row


class PredictionError(InterlockError):
    """The model raised while predicting."""

    retryable = True


class UnavailableError(InterlockError):
    """No version can answer now; ``retry_after_s`` says when trying again makes sense."""

    retryable = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OverloadedError(UnavailableError):
    """A version's bounded queue is full: the request is shed at once."""


class CircuitOpenError(UnavailableError):
    """A version's circuit breaker is open."""


class DeadlineExceededError(InterlockError):
    """The request's deadline passed before it was answered."""

    retryable = True


class TrafficError(InterlockError):
    """A traffic policy (weights, shadow, canary, fallback) that cannot be applied."""


class CacheError(InterlockError):
    """The cache backend failed; callers treat it as a miss and go on."""

    retryable = True


class AuthError(InterlockError):
    """A key is missing or wrong."""


class UpstreamError(InterlockError):
    """An LLM provider's call failed.

    ``status`` is the upstream's HTTP status (``None`` for a connect/read timeout, a broken
    connection or a body that is not the protocol's); ``kind`` names the failure
    (``http``, ``timeout``, ``connect``, ``malformed``, ``stream_cut``); ``transient``
    says whether another attempt may succeed (429, 408, 5xx, timeouts, broken or malformed
    bodies); ``retry_after_s`` is the upstream's Retry-After when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        kind: str = "http",
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.transient = transient
        self.retry_after_s = retry_after_s


class RateLimitedError(InterlockError):
    """A request/token limit is spent; ``retry_after_s`` says when it frees up.

    ``limit`` names the limit that refused (``tenant:NAME:rpm``, ``deployment:NAME:tpm``);
    ``headers`` are the ``x-ratelimit-*`` headers to send with the 429.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        limit: str = "",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.limit = limit
        self.headers = headers or {}


class BudgetExceededError(InterlockError):
    """A tenant has spent its daily or monthly budget; ``retry_after_s``: until it resets."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BusError(InterlockError):
    """The event bus failed: unreachable, timed out, or refused a command. Worth retrying."""

    retryable = True


def describe(exc: BaseException, *, with_type: bool = False) -> str:
    """The text of ``exc`` for a log line or an error message; never ``""``.

    ``str(exc)``, prefixed by the class name when ``with_type`` (``ConnectionError:
    refused``). When the exception says nothing (``str(TimeoutError())`` is ``""``)
    it is what the exception is: ``timed out (TimeoutError)``, or the class name.
    """
    text = str(exc).strip()
    name = type(exc).__name__
    if text:
        return f"{name}: {text}" if with_type else text
    if isinstance(exc, TimeoutError):
        return f"timed out ({name})"
    shown = repr(exc)
    return name if shown in (f"{name}()", name) else f"{name}: {shown}"
