"""The event bus on NATS JetStream, through nats-py: durable pull consumers, explicit acks.

Each topic is one stream holding one subject, the topic itself; the stream is named
after the topic with ``.`` turned into ``_`` (stream names cannot hold dots):
``ai.prediction.requested`` is stored in the stream ``ai_prediction_requested``. A
topic is 1+ dot-separated tokens of ``A-Z a-z 0-9 _ -`` (no wildcards). The stream is
created on first use with the bus's ``storage`` (``"file"`` or ``"memory"``) and
retention limits (``max_age_s``, ``max_bytes``, ``max_msgs``; the oldest go first);
one that exists is used as it is, as long as it holds the topic's subject.

:meth:`NatsBus.publish` is ``js.publish``: it returns once the stream has stored the
message. ``publish_many`` sends them all in order with ``publish_async``, at most
``max_in_flight`` unacknowledged, then awaits every acknowledgement. NATS messages
have no key: it travels base64-encoded in the ``Interlock-Key`` header.

A group is a durable pull consumer named after it (explicit ack, ``ack_wait_s``,
``max_ack_pending``, from the start of the stream); every member of the group binds
to the same durable, and JetStream spreads the messages among their fetches.
:meth:`NatsSubscription.fetch` pulls up to ``max_messages``: what is there comes at
once, else the first that arrives within ``timeout_s`` and whatever came with it.
``deliveries`` is JetStream's ``num_delivered``. :meth:`NatsSubscription.ack` acks
each message and then flushes, so the server has the acks when it returns. A message
fetched and not acknowledged is delivered again ``ack_wait_s`` after its delivery
(this is how a dead member's messages reach the others), and at once when its member
closes: :meth:`NatsSubscription.aclose` naks what it still holds. ``lag`` is the
consumer's ``num_pending + num_ack_pending``: not yet delivered plus not yet acked.

Every call to the server is bounded by ``timeout_s``. This is the only module that
imports ``nats``; the connection is made on first use, inside the running loop, and
reconnects by itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from interlock.bus import BusError
from interlock.bus.base import Message
from interlock.bus.retry import describe
from interlock.errors import ConfigError
from interlock.settings import mask_url

if TYPE_CHECKING:
    from interlock.bus.nats_tail import NatsTail

__all__ = ["KEY_HEADER", "NatsBus", "NatsSubscription", "servers", "stream_name"]

logger = logging.getLogger("interlock.bus")

KEY_HEADER = "Interlock-Key"
DEFAULT_PORT = 4222
_TOPIC = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_DURABLE = re.compile(r"^[A-Za-z0-9_-]+$")
# What a failing server or connection raises: nats' own errors and timeouts.
_FAILURES = (nats.errors.Error, TimeoutError, OSError)
_RECONNECT_WAIT_S = 0.5


def stream_name(topic: str) -> str:
    """The stream holding ``topic``: ``ai.prediction.requested`` → ``ai_prediction_requested``."""
    if len(topic) > 255 or not _TOPIC.match(topic):
        raise ConfigError(
            f"invalid NATS topic {topic!r}: use dot-separated tokens of A-Z a-z 0-9 _ -"
        )
    return topic.replace(".", "_")


def servers(url: str) -> list[str]:
    """``nats://[user:pass@]h1:p1,h2:p2`` → one URL per server, credentials on each."""
    parts = urlsplit(url)
    if parts.scheme not in ("nats", "tls") or not parts.netloc:
        raise ConfigError(f"a NATS bus URL looks like nats://host:port, not {mask_url(url)!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"a NATS bus URL takes only host:port pairs: {mask_url(url)!r}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    out = []
    for hostport in hosts.split(","):
        host, sep, port = hostport.rpartition(":")
        if not sep:
            host, port = hostport, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"bad host:port {hostport!r} in the NATS bus URL")
        out.append(f"{parts.scheme}://{userinfo + '@' if userinfo else ''}{host}:{port}")
    return out


class NatsBus:
    """A connection to the NATS servers at ``url`` (``nats://host:port[,host:port]``).

    Streams this bus creates get ``storage``, ``replicas`` and the retention limits
    ``max_age_s``, ``max_bytes`` and ``max_msgs`` (None: unlimited). Durables it
    creates get ``ack_wait_s`` (how long a delivered message may stay unacknowledged
    before it is delivered again) and ``max_ack_pending`` (how many may, for the whole
    group). ``max_in_flight`` bounds the unacknowledged publishes of ``publish_many``;
    ``timeout_s`` bounds every call.
    """

    def __init__(
        self,
        url: str,
        *,
        client_id: str = "interlock",
        storage: Literal["file", "memory"] = "file",
        replicas: int = 1,
        max_age_s: float | None = None,
        max_bytes: int | None = None,
        max_msgs: int | None = None,
        ack_wait_s: float = 30.0,
        max_ack_pending: int = 100_000,
        max_in_flight: int = 4096,
        timeout_s: float = 10.0,
    ) -> None:
        self._servers = servers(url)
        if storage not in ("file", "memory"):
            raise ConfigError(f"NATS stream storage is 'file' or 'memory', not {storage!r}")
        if not ack_wait_s > 0 or not timeout_s > 0:
            raise ConfigError("NATS ack_wait_s and timeout_s must be positive")
        if replicas < 1 or max_ack_pending < 1 or max_in_flight < 1:
            raise ConfigError("NATS replicas, max_ack_pending and max_in_flight must be ≥ 1")
        self.url = url
        self.client_id = client_id
        self.storage = storage
        self.replicas = replicas
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.max_msgs = max_msgs
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.max_in_flight = max_in_flight
        self.timeout_s = timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._connect_lock = asyncio.Lock()
        self._stream_lock = asyncio.Lock()
        self._async_ready = False
        self._async_lock = asyncio.Lock()
        self._streams: set[str] = set()
        self._subscriptions: set[NatsSubscription] = set()
        self._closed = False
        self._connecting = False
        self._last_error: Exception | None = None
        self._error_logged = False

    def __repr__(self) -> str:
        return f"NatsBus({mask_url(self.url)!r})"

    # -- the connection --------------------------------------------------------------

    async def _jetstream(self) -> JetStreamContext:
        """The JetStream context, connecting on first use."""
        if self._js is None:
            async with self._connect_lock:
                if self._closed:
                    raise BusError(f"{self!r} is closed")
                if self._js is None:
                    nc = await self._connect()
                    self._nc = nc
                    self._js = nc.jetstream(
                        timeout=self.timeout_s, publish_async_max_pending=self.max_in_flight
                    )
        return self._js

    async def _connect(self) -> Client:
        """A connected client, or BusError (ConfigError for refused credentials).

        nats-py retries a first connection forever when reconnects are unbounded: here
        each server is tried twice, then the error is raised for the caller to retry
        with its own backoff (or give up at its deadline). Once connected, the client
        reconnects by itself, forever.
        """
        nc = Client()
        self._connecting, self._last_error = True, None
        try:
            async with asyncio.timeout(self.timeout_s + 2 * _RECONNECT_WAIT_S):
                await nc.connect(
                    self._servers,
                    name=self.client_id,
                    connect_timeout=max(1, round(self.timeout_s)),
                    allow_reconnect=True,
                    max_reconnect_attempts=1,
                    reconnect_time_wait=_RECONNECT_WAIT_S,  # type: ignore[arg-type]
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
        except (*_FAILURES, nats.errors.NoServersError) as exc:
            cause = self._last_error or exc
            with contextlib.suppress(*_FAILURES):
                await nc.close()
            if _refused_credentials(cause):
                raise ConfigError(
                    f"NATS at {mask_url(self.url)} refused the credentials: {describe(cause)}"
                ) from exc
            raise BusError(
                f"cannot connect to NATS at {mask_url(self.url)}: {describe(cause)}"
            ) from exc
        finally:
            self._connecting = False
        nc.options["max_reconnect_attempts"] = -1  # connected: reconnect forever from here
        return nc

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        if self._connecting or self._error_logged:
            return  # the caller reports a failed connection; one warning per outage
        self._error_logged = True
        logger.warning("nats %s: %s", mask_url(self.url), describe(exc))

    async def _on_disconnected(self) -> None:
        if self._closed or self._connecting:
            return
        logger.warning("nats %s: disconnected; reconnecting", mask_url(self.url))

    async def _on_reconnected(self) -> None:
        self._error_logged = False
        logger.info("nats %s: reconnected", mask_url(self.url))

    async def flush(self) -> None:
        """Wait until the server has processed everything sent on this connection."""
        if self._nc is None:
            return
        try:
            await self._nc.flush(timeout=max(1, round(self.timeout_s)))
        except _FAILURES as exc:
            raise BusError(
                f"cannot flush to NATS at {mask_url(self.url)}: {describe(exc)}"
            ) from exc

    async def ensure_stream(self, topic: str) -> str:
        """The name of ``topic``'s stream, created with this bus's settings if missing."""
        name = stream_name(topic)
        if name in self._streams:
            return name
        js = await self._jetstream()
        async with self._stream_lock:
            if name in self._streams:
                return name
            try:
                try:
                    info = await js.stream_info(name)
                except nats.js.errors.NotFoundError:
                    try:
                        info = await js.add_stream(self._stream_config(name, topic))
                    except nats.js.errors.BadRequestError:  # made meanwhile by another
                        info = await js.stream_info(name)
            except _FAILURES as exc:
                raise BusError(f"cannot create the NATS stream {name!r}: {describe(exc)}") from exc
            subjects = info.config.subjects or []
            if topic not in subjects:
                raise ConfigError(
                    f"the NATS stream {name!r} exists for {subjects}, not for the topic {topic!r}"
                )
            self._streams.add(name)
            return name

    def _stream_config(self, name: str, topic: str) -> StreamConfig:
        return StreamConfig(
            name=name,
            subjects=[topic],
            storage=StorageType.FILE if self.storage == "file" else StorageType.MEMORY,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            num_replicas=self.replicas,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            max_msgs=self.max_msgs,
        )

    # -- the EventBus protocol -------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Publish one message; returns once the stream has stored it."""
        stream = await self.ensure_stream(topic)
        js = await self._jetstream()
        try:
            await js.publish(topic, value, headers=_headers(key, headers))
        except _FAILURES as exc:
            raise BusError(
                f"cannot publish to the NATS stream {stream!r}: {describe(exc)}"
            ) from exc

    async def publish_many(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        """Send every message in order, then wait until the stream has stored them all."""
        if not items:
            return
        stream = await self.ensure_stream(topic)
        js = await self._jetstream()
        acks: list[asyncio.Future[PubAck]] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                start = 0
                if not self._async_ready:  # publish_async sets itself up on first use
                    async with self._async_lock:
                        key, value = items[0]
                        acks.append(
                            await js.publish_async(topic, value, headers=_headers(key, None))
                        )
                        self._async_ready, start = True, 1
                for key, value in items[start:]:
                    acks.append(await js.publish_async(topic, value, headers=_headers(key, None)))
                await asyncio.gather(*acks)
        except _FAILURES as exc:
            raise BusError(
                f"cannot publish to the NATS stream {stream!r}: {describe(exc)}"
            ) from exc
        finally:
            for ack in acks:
                ack.cancel()  # returns its slot of max_in_flight if it never came

    async def subscribe(self, topic: str, *, group: str, consumer: str) -> NatsSubscription:
        """Bind to the durable named ``group`` on ``topic``'s stream, made if missing."""
        if len(group) > 255 or not _DURABLE.match(group):
            raise ConfigError(f"invalid NATS group name {group!r}: use A-Z a-z 0-9 _ -")
        stream = await self.ensure_stream(topic)
        js = await self._jetstream()
        config = ConsumerConfig(
            durable_name=group,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=topic,
        )
        try:
            try:
                pull = await js.pull_subscribe(topic, durable=group, stream=stream, config=config)
            except nats.js.errors.BadRequestError:  # another member made it meanwhile
                pull = await js.pull_subscribe_bind(durable=group, stream=stream)
        except _FAILURES as exc:
            raise BusError(
                f"cannot join the NATS group {group!r} on {stream!r}: {describe(exc)}"
            ) from exc
        subscription = NatsSubscription(self, topic, group, consumer, pull)
        self._subscriptions.add(subscription)
        return subscription

    async def tail(self, topic: str, *, last: int) -> NatsTail:
        """The newest ``last`` messages of ``topic`` and what comes after, read by
        sequence: no consumer is created, nor the stream."""
        from interlock.bus.nats_tail import NatsTail

        return await NatsTail.open(self, topic, last)

    async def aclose(self) -> None:
        """Close every subscription (naking what it holds), flush, and disconnect."""
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        async with self._connect_lock:
            self._closed = True
            nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await nc.flush(timeout=max(1, round(self.timeout_s)))
            except _FAILURES as exc:
                logger.info("nats %s: flush on close failed: %s", mask_url(self.url), describe(exc))
            await nc.close()

    async def __aenter__(self) -> Self:
        await self._jetstream()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class NatsSubscription:
    """A member of ``group`` on ``topic``: a pull subscription bound to the durable."""

    def __init__(
        self,
        bus: NatsBus,
        topic: str,
        group: str,
        consumer: str,
        pull: JetStreamContext.PullSubscription,
    ) -> None:
        self.topic = topic
        self.group = group
        self.consumer = consumer
        self._bus = bus
        self._pull = pull
        self._held: dict[int, Msg] = {}  # stream sequence → fetched, not yet acked
        self._closed = False

    def __repr__(self) -> str:
        return f"NatsSubscription(topic={self.topic!r}, group={self.group!r})"

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages``: at once if any are there, else the first to come."""
        if self._closed:
            raise BusError(f"{self!r} is closed")
        try:
            msgs = await self._pull.fetch(max_messages, timeout=max(timeout_s, 0.001))
        except TimeoutError:  # nats' own timeouts derive from it: nothing came
            return []
        except nats.errors.Error as exc:
            raise BusError(
                f"cannot fetch from the NATS group {self.group!r}: {describe(exc)}"
            ) from exc
        out = []
        for msg in msgs:
            meta = msg.metadata
            seq = meta.sequence.stream
            self._held[seq] = msg
            headers = dict(msg.headers) if msg.headers else {}
            key = _key(headers.pop(KEY_HEADER, None))
            out.append(
                Message(
                    topic=msg.subject,
                    value=msg.data,
                    key=key,
                    headers=headers,
                    id=str(seq),
                    deliveries=meta.num_delivered,
                    handle=msg,
                )
            )
        return out

    async def ack(self, messages: Sequence[Message]) -> None:
        """Ack each message, then flush: the server has the acks when this returns."""
        if not messages:
            return
        try:
            for message in messages:
                msg: Msg = message.handle
                self._held.pop(msg.metadata.sequence.stream, None)
                with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                    await msg.ack()
        except nats.errors.Error as exc:
            raise BusError(f"cannot ack in the NATS group {self.group!r}: {describe(exc)}") from exc
        await self._bus.flush()

    async def lag(self) -> int:
        """The durable's messages not yet delivered plus those delivered and not acked."""
        try:
            info = await self._pull.consumer_info()
        except _FAILURES as exc:
            raise BusError(f"cannot read the NATS group {self.group!r}: {describe(exc)}") from exc
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def aclose(self) -> None:
        """Nak what this member holds (the others get it at once), then unsubscribe."""
        if self._closed:
            return
        self._closed = True
        self._bus._subscriptions.discard(self)
        held, self._held = list(self._held.values()), {}
        try:
            for msg in held:
                with contextlib.suppress(nats.errors.MsgAlreadyAckdError):
                    await msg.nak()
            await self._pull.unsubscribe()
            await self._bus.flush()
        except (*_FAILURES, BusError) as exc:
            logger.info("nats group %s: close was not clean (%s)", self.group, describe(exc))


def _refused_credentials(exc: BaseException) -> bool:
    """Whether the server refused who we said we are (raised as a plain error at connect)."""
    if isinstance(exc, nats.errors.AuthorizationError | nats.errors.InvalidUserCredentialsError):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def _headers(key: bytes | None, headers: dict[str, str] | None) -> dict[str, str] | None:
    if key is None:
        return dict(headers) if headers else None
    out = dict(headers) if headers else {}
    out[KEY_HEADER] = base64.b64encode(key).decode()
    return out


def _key(header: str | None) -> bytes | None:
    if header is None:
        return None
    try:
        return base64.b64decode(header, validate=True)
    except (binascii.Error, ValueError):
        return header.encode()  # not ours: keep it as it came
