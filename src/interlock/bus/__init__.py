"""The event bus: a port and its backends, picked by URL.

- :class:`EventBus`, :class:`Subscription`, :class:`Message`: the protocol the worker
  and the publishers depend on (:mod:`interlock.bus.base`).
- :func:`open_bus`: the backend for a URL; nothing is connected until first use.
- :class:`MemoryBus` on a :class:`MemoryBroker`: in the process, the embedded default.
- ``RedisBus`` (:mod:`interlock.bus.redis`, needs ``redis``), ``KafkaBus``
  (:mod:`interlock.bus.kafka`, needs ``aiokafka``) and ``NatsBus``
  (:mod:`interlock.bus.nats`, needs ``nats-py``): imported only when their URL is opened.
- :class:`BusError`: a backend failed (unreachable, timed out, refused); retryable.
- :mod:`interlock.bus.envelope`: the dead-letter payload.
- :mod:`interlock.bus.retry`: ``describe`` (error text that is never empty) and
  ``Backoff`` (capped exponential backoff with jitter, one warning per failure streak).
- ``bus.tail(topic, last=N)``: a topic's newest messages and what follows, read without
  a group or a durable consumer (``interlock events tail``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from interlock.bus.base import EventBus, Message, Subscription
from interlock.bus.memory import MemoryBroker, MemoryBus
from interlock.errors import BusError, ConfigError
from interlock.settings import BusSettings, mask_url

__all__ = [
    "BusError",
    "EventBus",
    "MemoryBroker",
    "MemoryBus",
    "Message",
    "Subscription",
    "bus_options",
    "open_bus",
]

_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})


def bus_options(settings: BusSettings) -> dict[str, Any]:
    """:func:`open_bus` options from ``[bus]`` for its URL's backend.

    ``redelivery_s`` ("a dead consumer's unacknowledged messages go to another member
    after this long") is Redis's claim idle time, NATS's ack wait and Kafka's session
    timeout; the ``kafka_*`` settings go to Kafka alone.
    """
    seconds = settings.redelivery_s
    scheme = urlsplit(settings.url).scheme.lower()
    if scheme in _REDIS_SCHEMES:
        return {"claim_idle_ms": int(seconds * 1000)}
    if scheme == "nats":
        return {"ack_wait_s": seconds}
    if scheme == "kafka":
        return {
            "session_timeout_s": seconds,
            "partitions": settings.kafka_partitions,
            "fetch_max_wait_ms": settings.kafka_fetch_wait_ms,
            "commit_interval_s": settings.kafka_commit_interval_ms / 1000.0,
        }
    return {}


def open_bus(url: str, **options: Any) -> EventBus:
    """The backend named by the scheme of ``url``, made with ``options``; not connected yet.

    ``memory://`` gives a :class:`MemoryBus` (``broker=`` to share one, ``max_len=``);
    ``redis://``, ``rediss://`` and ``unix://`` a ``RedisBus``; ``kafka://host:port[,…]``
    a ``KafkaBus``; ``nats://host:port`` a ``NatsBus``. ``options`` go to that class.

    Raises:
        ConfigError: the scheme is unknown, or its backend's package is not installed.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        return MemoryBus(**options)
    try:
        if scheme in _REDIS_SCHEMES:
            from interlock.bus.redis import RedisBus

            return RedisBus(url, **options)
        if scheme == "kafka":
            from interlock.bus.kafka import KafkaBus

            return KafkaBus(url, **options)
        if scheme == "nats":
            from interlock.bus.nats import NatsBus

            return NatsBus(url, **options)
    except ImportError as exc:
        extra = {"kafka": "kafka", "nats": "nats"}.get(scheme, "redis")
        raise ConfigError(
            f"bus URL {mask_url(url)} needs the {exc.name or extra} package: "
            f"pip install 'interlock[{extra}]'"
        ) from exc
    raise ConfigError(
        f"unknown bus URL scheme {scheme!r} in {mask_url(url)!r}: "
        "expected memory://, redis://host:port/db, kafka://host:port or nats://host:port"
    )
