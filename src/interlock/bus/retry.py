"""Riding out a bus that fails: error text that is never empty, backoff, one warning.

- :func:`describe`: the text of an exception for a log line or an error message; never
  empty. It lives in :mod:`interlock.errors` (one for the whole package) and is
  re-exported here for the bus modules.
- :class:`RepeatFilter` and :func:`quiet_repeats`: a client library's own log lines
  (aiokafka logs every failed connection attempt) let through once per message per
  ``every_s``, so that an outage is a few lines, not one every 100 ms.
- :class:`Backoff`: capped exponential backoff with jitter ("equal jitter": attempt *n*
  waits a uniform draw in ``[d/2, d]``, ``d = min(max_s, first_s · 2ⁿ⁻¹)``), and the log
  of one failure streak: a warning with the cause at its first failure, nothing for
  the next ones, and one line when it recovers (how many failures, how long).

A caller retries what is retryable (``InterlockError.retryable``, such as
:class:`~interlock.errors.BusError`) and lets the rest (a
:class:`~interlock.errors.ConfigError`: a bad URL, a wrong password) go up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from interlock.errors import describe

__all__ = ["Backoff", "RepeatFilter", "describe", "quiet_repeats"]


class Backoff:
    """Delays between attempts at ``what`` and the log of each failure streak.

    ``failed(exc)`` counts a failure, logs the streak's first one as a warning (with
    the cause) and returns how long to wait; ``succeeded()`` ends a streak, logging
    the recovery once. ``wait(exc, stop)`` does both halves of a retry: count the
    failure, then sleep its delay unless ``stop`` is set first.
    """

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        first_s: float = 0.1,
        max_s: float = 10.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError("backoff delays must be positive, the first not above the cap")
        self.what = what
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0  # in the current streak
        self._logger = logger
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._since = 0.0

    def delay_s(self) -> float:
        """The wait after the current streak's latest failure, jittered."""
        cap = min(self.max_s, self.first_s * 2 ** max(0, self.failures - 1))
        return self._rng.uniform(cap / 2, cap)

    def failed(self, exc: BaseException) -> float:
        """Count ``exc``; warn if it starts a streak; how long to wait before retrying."""
        self.failures += 1
        if self.failures == 1:
            self._since = time.monotonic()
            self._logger.warning(
                "%s failed: %s; retrying with backoff (up to %.0f s apart)",
                self.what,
                describe(exc),
                self.max_s,
            )
        else:
            self._logger.debug("%s failed again: %s", self.what, describe(exc))
        return self.delay_s()

    def succeeded(self) -> None:
        """End the streak; say so once if there was one."""
        if self.failures:
            self._logger.info(
                "%s works again after %d failure(s) over %.1f s",
                self.what,
                self.failures,
                time.monotonic() - self._since,
            )
            self.failures = 0

    async def wait(self, exc: BaseException, stop: asyncio.Event | None = None) -> None:
        """Count ``exc`` (see :meth:`failed`), then sleep its delay or until ``stop``."""
        delay = self.failed(exc)
        if stop is None:
            await asyncio.sleep(delay)
            return
        try:
            async with asyncio.timeout(delay):
                await stop.wait()
        except TimeoutError:
            pass


class RepeatFilter(logging.Filter):
    """Lets each message (by its template and logger) through once per ``every_s``."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._seen: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.every_s:
            return False
        if len(self._seen) > 1000:  # templates are few; this only bounds a surprise
            self._seen.clear()
        self._seen[key] = now
        return True


_REPEATS = RepeatFilter()


def quiet_repeats(prefix: str) -> None:
    """Put the shared :class:`RepeatFilter` on every logger under ``prefix`` (once each).

    A filter on a logger sees only what is logged on it, so each existing logger of the
    library gets one; call this after the library is imported.
    """
    names = [
        n for n in logging.Logger.manager.loggerDict if n == prefix or n.startswith(prefix + ".")
    ]
    for name in [prefix, *names]:
        target = logging.getLogger(name)
        if _REPEATS not in target.filters:
            target.addFilter(_REPEATS)
