"""The event bus on Redis Streams: one stream per topic, consumer groups, XACK, XAUTOCLAIM.

A topic is the stream of the same name (no prefix, so other producers can ``XADD`` to
it). A message is one entry with the fields ``v`` (the value), ``k`` (the key, when
there is one) and ``h`` (the headers as a JSON object, when there are any); an entry
written by someone else without ``v`` is read as the JSON object of its fields, so it
still reaches the consumer (and, if it cannot be used, the dead-letter topic).
``publish`` is one ``XADD … MAXLEN ~ max_len``; ``publish_many`` sends its XADDs in
one round trip. The approximate cap bounds memory: entries beyond it are trimmed, read
or not (``max_len=None``: no cap).

``subscribe`` creates the group at the start of the stream (``XGROUP CREATE … 0
MKSTREAM``; an existing group is kept), so a new group reads what is already there.
``fetch`` first takes over entries that members fetched and left unacknowledged for
``claim_idle_ms`` (``XAUTOCLAIM``; they come back with ``deliveries`` from ``XPENDING``,
2 or more), at most every ``min(1 s, claim_idle_ms / 4)`` unless a scan is unfinished,
then reads new entries (``XREADGROUP … >`` with ``COUNT``, and ``BLOCK`` when nothing
was taken over). ``claim_idle_ms`` must therefore be longer than a worker ever holds a
message, retries included. A member that dies keeps its entries pending under its name
until another member's fetch claims them; one that closes (``aclose``, or the bus's)
makes its pending entries idle at once (``XCLAIM … IDLE claim_idle_ms JUSTID``, which
does not count a delivery), so the next fetch of another member takes them. A stream
or group deleted under a subscription (``NOGROUP``, or ``UNBLOCKED`` during a wait) is
created again and the call repeated. ``ack`` is ``XACK``; entries stay in the stream
until trimmed. ``lag`` is the group's ``lag`` (entries not yet delivered, from ``XINFO
GROUPS``) plus its pending count. Redis 7 or later; on 6.2, ``lag`` counts the whole
stream instead.

All calls go through one connection pool, from :func:`interlock.store.redis.open_client`.
During a Redis outage the bus **fails closed**: every call raises (it keeps its own retry
semantics rather than :class:`interlock.store.redis.Outage`: publishers see the error,
and consumers retry with :class:`interlock.bus.retry.Backoff`, so nothing is lost).

A waiting fetch holds one pooled connection for its ``BLOCK``, so publishers and acks
use others and never queue behind it. The hot commands (XADD, XREADGROUP) are packed
here and their replies read unparsed, as :mod:`interlock.cache.redis` does: redis-py's
own packing and dispatch cost ~35 µs of CPU a command. Every call runs under
``asyncio.timeout`` (``timeout_s``; a fetch gets its wait on top) and redis-py does not
retry: a Redis error, a refused connection or a timeout is raised as
:class:`~interlock.bus.BusError`, which is retryable. URLs are logged with their
password masked.

This is the only bus module that imports ``redis`` (its exceptions; the client comes
from :mod:`interlock.store.redis`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import orjson
from redis.exceptions import AuthenticationError, NoPermissionError, RedisError, ResponseError

from interlock.bus import BusError
from interlock.bus.base import Message
from interlock.errors import ConfigError, describe
from interlock.settings import mask_url
from interlock.store.redis import check_url, close_client, open_client

if TYPE_CHECKING:
    import redis.asyncio

    from interlock.bus.redis_tail import RedisTail

__all__ = [
    "DEFAULT_CLAIM_IDLE_MS",
    "DEFAULT_MAX_LEN",
    "RedisBus",
    "RedisSubscription",
    "entry_message",
]

logger = logging.getLogger("interlock.bus")

DEFAULT_MAX_LEN = 1_000_000
DEFAULT_CLAIM_IDLE_MS = 30_000
DEFAULT_TIMEOUT_S = 5.0
MAX_RECLAIM_INTERVAL_S = 1.0
HANDBACK_PAGE = 1000

# asyncio.timeout raises the builtin TimeoutError, an OSError like a refused connection.
_FAILURES = (RedisError, OSError)
_START = b"0-0"

T = TypeVar("T")


class RedisBus:
    """An event bus on the Redis at ``url`` (``redis://``, ``rediss://`` or ``unix://``).

    ``max_len`` caps each stream approximately (``None``: no cap); ``claim_idle_ms`` is
    how long an entry stays with a member that fetched it and did not acknowledge it
    before another member's fetch takes it over; ``timeout_s`` bounds each call.
    """

    def __init__(
        self,
        url: str,
        *,
        max_len: int | None = DEFAULT_MAX_LEN,
        claim_idle_ms: int = DEFAULT_CLAIM_IDLE_MS,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if max_len is not None and max_len < 1:
            raise ConfigError(f"the Redis bus max_len must be at least 1, not {max_len}")
        if claim_idle_ms < 1:
            raise ConfigError(f"the Redis bus claim_idle_ms must be positive, not {claim_idle_ms}")
        if not timeout_s > 0:
            raise ConfigError(f"the Redis bus timeout must be positive, not {timeout_s}")
        check_url(url, "Redis bus")
        self.url = url
        self.max_len = max_len
        self.claim_idle_ms = claim_idle_ms
        self.timeout_s = timeout_s
        self._client: redis.asyncio.Redis | None = None
        # weak: a subscription dropped without aclose is a dead member, left to XAUTOCLAIM
        self._subscriptions: weakref.WeakSet[RedisSubscription] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"RedisBus({mask_url(self.url)!r}, claim_idle_ms={self.claim_idle_ms})"

    def _redis(self) -> redis.asyncio.Redis:
        client = self._client
        if client is None:
            # the caller retries a BusError with backoff (interlock.bus.retry)
            client = self._client = open_client(self.url, timeout_s=self.timeout_s)
        return client

    async def _call(self, op: str, call: Callable[[], Awaitable[T]], wait_s: float = 0.0) -> T:
        """``await call()`` under the timeout (plus ``wait_s``), errors as BusError."""
        try:
            async with asyncio.timeout(self.timeout_s + wait_s):
                return await call()
        except (AuthenticationError, NoPermissionError) as exc:
            raise ConfigError(
                f"redis bus {mask_url(self.url)}: {op} refused: authentication or permission "
                f"failed ({describe(exc, with_type=True)}); check the bus URL's user and password"
            ) from exc
        except ResponseError:
            raise  # the caller decides (NOGROUP, BUSYGROUP); _translate otherwise
        except _FAILURES as exc:
            raise BusError(
                f"redis bus {mask_url(self.url)}: {op} failed: {describe(exc, with_type=True)}"
            ) from exc

    def _translate(self, op: str, exc: ResponseError) -> BusError:
        return BusError(
            f"redis bus {mask_url(self.url)}: {op} failed: {describe(exc, with_type=True)}"
        )

    # -- publishing ------------------------------------------------------------------

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``XADD topic MAXLEN ~ max_len * v value [k key] [h headers]``.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        head, args = _xadd_head(topic, self.max_len)
        payload = _pack_xadd(head, args, value, key, orjson.dumps(headers) if headers else None)
        try:
            await self._send_packed("publish", payload, 1)
        except ResponseError as exc:
            raise self._translate("publish", exc) from exc

    async def publish_many(self, topic: str, items: Sequence[tuple[bytes | None, bytes]]) -> None:
        """One ``XADD`` per ``(key, value)``, in order, sent together in one round trip.

        When one fails (say, the key holds something else than a stream) the ones before
        it are stored: publishing again after the error may store those twice.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        if not items:
            return
        head, args = _xadd_head(topic, self.max_len)
        payload = b"".join([_pack_xadd(head, args, value, key, None) for key, value in items])
        try:
            await self._send_packed("publish_many", payload, len(items))
        except ResponseError as exc:
            raise self._translate("publish_many", exc) from exc

    async def _send_packed(
        self, op: str, payload: bytes, replies: int, wait_s: float = 0.0
    ) -> list[Any]:
        """Send ``replies`` packed commands on one pooled connection; every reply, in order.

        Packed here, a 500-entry publish_many costs ~4 ms of CPU instead of ~17 ms through
        a redis-py pipeline. An error reply is raised as :class:`ResponseError` (and the
        connection dropped: its other replies must reach no one); the caller translates it.
        """
        pool = self._redis().connection_pool

        async def round_trip() -> list[Any]:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.send_packed_command(payload, check_health=False)
                return [await conn.read_response(disable_decoding=True) for _ in range(replies)]
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            finally:
                await pool.release(conn)

        return await self._call(op, round_trip, wait_s)

    # -- consuming -------------------------------------------------------------------

    async def subscribe(self, topic: str, *, group: str, consumer: str) -> RedisSubscription:
        """Join ``group`` (created at the start of ``topic`` when missing) as ``consumer``.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        await self._create_group(topic, group)
        sub = RedisSubscription(self, topic, group, consumer)
        self._subscriptions.add(sub)
        return sub

    async def _create_group(self, topic: str, group: str) -> None:
        client = self._redis()
        try:
            await self._call(
                "create the group",
                lambda: client.xgroup_create(topic, group, id="0", mkstream=True),
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise self._translate("create the group", exc) from exc

    async def tail(self, topic: str, *, last: int) -> RedisTail:
        """The newest ``last`` entries (``XREVRANGE``) and what comes after (``XREAD``):
        no group is created, nor the stream.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        from interlock.bus.redis_tail import RedisTail

        return await RedisTail.open(self, topic, last)

    async def aclose(self) -> None:
        """Close the subscriptions made here (handing back what they hold) and the pool.

        A later call would open a new pool. A subscription that cannot hand back is
        logged; its entries are claimed after ``claim_idle_ms``.
        """
        for sub in list(self._subscriptions):
            try:
                await sub.aclose()
            except BusError as exc:
                logger.warning("redis bus: closing %r failed: %s", sub, exc)
        client, self._client = self._client, None
        if client is None:
            return
        await close_client(client, timeout_s=self.timeout_s, what="redis bus")

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class RedisSubscription:
    """``consumer`` in ``group`` on the stream ``topic``."""

    def __init__(self, bus: RedisBus, topic: str, group: str, consumer: str) -> None:
        self.topic = topic
        self.group = group
        self.consumer = consumer
        self._bus = bus
        self._topic_b, self._group_b = topic.encode(), group.encode()
        self._consumer_b = consumer.encode()
        self._cursor = _START
        self._next_reclaim_at = 0.0
        self._reclaim_interval_s = min(MAX_RECLAIM_INTERVAL_S, bus.claim_idle_ms / 4000)
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"RedisSubscription({self.topic!r}, group={self.group!r}, consumer={self.consumer!r})"
        )

    async def fetch(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Entries taken over from idle members first, then new ones (waiting ≤ timeout_s).

        Raises:
            BusError: Redis failed or did not answer in time.
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        if self._closed:
            return []
        got: list[Message] = []
        if time.monotonic() >= self._next_reclaim_at:
            got = await self._with_group("reclaim", lambda: self._reclaim(max_messages))
        if len(got) < max_messages:
            wait_s = timeout_s if not got else 0.0
            got += await self._with_group(
                "fetch", lambda: self._read(max_messages - len(got), wait_s)
            )
        if self._closed and got:  # closed while waiting: these go back at once
            await self._hand_back([m.handle for m in got])
            return []
        return got

    async def _with_group(
        self, op: str, call: Callable[[], Awaitable[list[Message]]]
    ) -> list[Message]:
        """``call()``; when the stream or group is gone, recreate it and call again.

        Redis says ``NOGROUP``, or ``UNBLOCKED`` to a read waiting when they went.
        """
        try:
            return await call()
        except ResponseError as exc:
            if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                raise self._bus._translate(op, exc) from exc
        logger.warning(
            "redis bus: group %r of stream %r was gone; created it again",
            self.group,
            self.topic,
        )
        await self._bus._create_group(self.topic, self.group)
        self._cursor = _START
        try:
            return await call()
        except ResponseError as exc:
            raise self._bus._translate(op, exc) from exc

    async def _read(self, count: int, wait_s: float) -> list[Message]:
        """``XREADGROUP GROUP g c COUNT n [BLOCK ms] STREAMS topic >``, parsed here."""
        args = [b"XREADGROUP", b"GROUP", self._group_b, self._consumer_b, b"COUNT", b"%d" % count]
        if wait_s > 0:
            args += [b"BLOCK", b"%d" % max(1, round(wait_s * 1000))]
        args += [b"STREAMS", self._topic_b, b">"]
        payload = b"*%d\r\n%s" % (len(args), b"".join(map(_bulk, args)))
        [reply] = await self._bus._send_packed("fetch", payload, 1, wait_s)
        if not reply:  # nil: nothing came within BLOCK
            return []
        # RESP2: [[stream, entries]]; RESP3 (redis-py's default from 8): {stream: entries}
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        message = self._message
        return [message(entry_id, fields, 1) for entry_id, fields in entries]

    async def _reclaim(self, count: int) -> list[Message]:
        """XAUTOCLAIM entries idle for claim_idle_ms, continuing the previous scan."""
        bus = self._bus
        client = bus._redis()
        reply: Any = await bus._call(
            "reclaim",
            lambda: client.xautoclaim(
                self.topic,
                self.group,
                self.consumer,
                min_idle_time=bus.claim_idle_ms,
                start_id=self._cursor,
                count=count,
            ),
        )
        self._cursor = reply[0]
        if self._cursor == _START:
            self._next_reclaim_at = time.monotonic() + self._reclaim_interval_s
        claimed = [(i, fields) for i, fields in reply[1] if fields is not None]
        if len(reply) > 2 and reply[2]:
            logger.warning(
                "redis bus: %d entries of stream %r pending in group %r were trimmed "
                "or deleted before they were acknowledged",
                len(reply[2]),
                self.topic,
                self.group,
            )
        if not claimed:
            return []
        pipe = client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(
                self.topic, self.group, entry_id, entry_id, 1, consumername=self.consumer
            )
        counts: list[Any] = await bus._call("reclaim", pipe.execute)
        messages = []
        for (entry_id, fields), found in zip(claimed, counts, strict=True):
            deliveries = int(found[0]["times_delivered"]) if found else 2
            messages.append(self._message(entry_id, fields, max(deliveries, 2)))
        logger.info(
            "redis bus: %s took over %d entries of stream %r left idle in group %r",
            self.consumer,
            len(messages),
            self.topic,
            self.group,
        )
        return messages

    def _message(
        self, entry_id: bytes, fields: list[bytes] | dict[bytes, bytes], deliveries: int
    ) -> Message:
        return entry_message(self.topic, entry_id, fields, deliveries)

    async def ack(self, messages: Sequence[Message]) -> None:
        """``XACK`` the messages' entries; acknowledging one twice does nothing.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        if not messages:
            return
        bus = self._bus
        client = bus._redis()
        ids = [m.handle if isinstance(m.handle, bytes) else m.id for m in messages]
        try:
            await bus._call("ack", lambda: client.xack(self.topic, self.group, *ids))
        except ResponseError as exc:
            raise bus._translate("ack", exc) from exc

    async def lag(self) -> int:
        """Entries the group has not been given yet, plus those given and not acknowledged.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``.
        """
        bus = self._bus
        pipe = bus._redis().pipeline(transaction=False)
        pipe.xlen(self.topic)
        pipe.xinfo_groups(self.topic)
        length, groups = await bus._call("lag", lambda: pipe.execute(raise_on_error=False))
        if isinstance(groups, ResponseError):
            if "no such key" in str(groups):
                return 0
            raise bus._translate("lag", groups)
        for info in groups:
            name = info["name"]
            if (name.decode() if isinstance(name, bytes) else name) != self.group:
                continue
            behind = info.get("lag")
            if behind is None:  # unknown after deletions, or Redis < 7: at most the stream
                behind = length
            return int(behind) + int(info["pending"])
        return int(length)  # the group is gone; recreated, it would read the whole stream

    async def aclose(self) -> None:
        """Leave the group: entries fetched and not acknowledged become claimable at once.

        Raises:
            BusError: Redis failed or did not answer within ``timeout_s``; the entries
                are then claimed after ``claim_idle_ms``, as a dead member's would be.
        """
        if self._closed:
            return
        self._closed = True
        bus = self._bus
        client = bus._redis()
        start: bytes | str = "-"
        while True:
            try:
                page: list[dict[str, Any]] = await bus._call(
                    "close",
                    functools.partial(
                        client.xpending_range,
                        self.topic,
                        self.group,
                        start,
                        "+",
                        HANDBACK_PAGE,
                        consumername=self.consumer,
                    ),
                )
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    return
                raise bus._translate("close", exc) from exc
            fresh = [p["message_id"] for p in page if p["time_since_delivered"] < bus.claim_idle_ms]
            if fresh:
                await self._hand_back(fresh)
            if len(page) < HANDBACK_PAGE:
                return
            start = b"(" + page[-1]["message_id"]

    async def _hand_back(self, ids: Sequence[bytes]) -> None:
        """Make ``ids`` (pending with this consumer) idle for claim_idle_ms: claimable now."""
        bus = self._bus
        client = bus._redis()
        try:
            await bus._call(
                "hand back",
                lambda: client.xclaim(
                    self.topic,
                    self.group,
                    self.consumer,
                    0,
                    list(ids),
                    idle=bus.claim_idle_ms,
                    justid=True,
                ),
            )
        except ResponseError as exc:
            if not str(exc).startswith("NOGROUP"):
                raise bus._translate("hand back", exc) from exc


def entry_message(
    topic: str, entry_id: bytes, fields: list[bytes] | dict[bytes, bytes], deliveries: int
) -> Message:
    """The message in one entry of ``topic``; ``fields`` flat as on the wire, or a dict."""
    if isinstance(fields, list):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    value = fields.get(b"v")
    if value is None:  # written by another producer: keep everything it wrote
        value = orjson.dumps(
            {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in fields.items()}
        )
    raw_headers = fields.get(b"h")
    headers: dict[str, str] = {}
    if raw_headers:
        try:
            decoded = orjson.loads(raw_headers)
        except orjson.JSONDecodeError:
            decoded = None
        if isinstance(decoded, dict):
            headers = {str(k): str(v) for k, v in decoded.items()}
    return Message(
        topic=topic,
        value=value,
        key=fields.get(b"k"),
        headers=headers,
        id=entry_id.decode(),
        deliveries=deliveries,
        handle=entry_id,
    )


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _xadd_head(topic: str, max_len: int | None) -> tuple[bytes, int]:
    """``XADD topic [MAXLEN ~ max_len] *`` in RESP bulk strings, and how many they are."""
    args = [b"XADD", topic.encode()]
    if max_len is not None:
        args += [b"MAXLEN", b"~", b"%d" % max_len]
    args.append(b"*")
    return b"".join(map(_bulk, args)), len(args)


def _pack_xadd(
    head: bytes, head_args: int, value: bytes, key: bytes | None, headers: bytes | None
) -> bytes:
    """One ``XADD`` of ``v value [k key] [h headers]`` after ``head``, in RESP."""
    parts = [b"", head, b"$1\r\nv\r\n", _bulk(value)]
    if key is not None:
        parts += [b"$1\r\nk\r\n", _bulk(key)]
    if headers is not None:
        parts += [b"$1\r\nh\r\n", _bulk(headers)]
    parts[0] = b"*%d\r\n" % (head_args + len(parts) - 2)
    return b"".join(parts)
