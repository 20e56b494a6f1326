"""The dead-letter envelope: what is published when a message cannot be processed.

Nothing is dropped: a message the worker gives up on is wrapped whole, with why,
and published to the dead-letter topic (``ai.prediction.dead-letter``). The envelope
is one JSON object (:class:`DeadLetterEvent`, camelCase like the other events)::

    {"reason": "unknown model 'fraud-x'", "sourceTopic": "ai.prediction.requested",
     "messageId": "1718000000000-0", "key": "card-42", "keyBase64": "Y2FyZC00Mg==",
     "deliveries": 1, "timestamp": "2025-06-10T08:00:00.123+00:00",
     "headers": {}, "valueBase64": "eyJy…", "valueText": "{\\"r…"}

``valueBase64`` always holds the original bytes exactly; ``valueText`` holds them as
text too when they are valid UTF-8 (``null`` otherwise), for people reading the topic.
``key``/``keyBase64`` do the same for the key (both ``null`` without one).
``timestamp`` is when the message was dead-lettered, ISO 8601 in UTC, to the
millisecond. :func:`read_dead_letter` turns an envelope back into a
:class:`DeadLetter` with the original bytes.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict

import orjson

from interlock.bus.base import Message

__all__ = ["DeadLetter", "DeadLetterEvent", "dead_letter_payload", "read_dead_letter"]


class DeadLetterEvent(TypedDict):
    """The JSON object published to the dead-letter topic."""

    reason: str
    sourceTopic: str
    messageId: str
    key: str | None
    keyBase64: str | None
    deliveries: int
    timestamp: str
    headers: dict[str, str]
    valueBase64: str
    valueText: str | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A dead-letter envelope read back: the original message and why it was given up."""

    reason: str
    source_topic: str
    message_id: str
    value: bytes
    key: bytes | None
    deliveries: int
    timestamp: datetime
    headers: dict[str, str] = field(default_factory=dict)


def dead_letter_payload(
    message: Message, reason: str, source_topic: str, *, at: datetime | None = None
) -> bytes:
    """The envelope of ``message`` (read from ``source_topic``), given up for ``reason``.

    ``at`` is when it was given up (now by default); a naive datetime is taken as UTC.
    """
    when = at if at is not None else datetime.now(UTC)
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    key = message.key
    event: DeadLetterEvent = {
        "reason": reason,
        "sourceTopic": source_topic,
        "messageId": message.id,
        "key": _text(key) if key is not None else None,
        "keyBase64": base64.b64encode(key).decode("ascii") if key is not None else None,
        "deliveries": message.deliveries,
        "timestamp": when.isoformat(timespec="milliseconds"),
        "headers": dict(message.headers),
        "valueBase64": base64.b64encode(message.value).decode("ascii"),
        "valueText": _text(message.value),
    }
    return orjson.dumps(event)


def read_dead_letter(payload: bytes) -> DeadLetter:
    """The envelope in ``payload``, with the original bytes decoded.

    Raises:
        ValueError: ``payload`` is not a dead-letter envelope.
    """
    try:
        event = orjson.loads(payload)
        key_b64 = event["keyBase64"]
        timestamp = datetime.fromisoformat(event["timestamp"])
        return DeadLetter(
            reason=str(event["reason"]),
            source_topic=str(event["sourceTopic"]),
            message_id=str(event["messageId"]),
            value=base64.b64decode(event["valueBase64"], validate=True),
            key=base64.b64decode(key_b64, validate=True) if key_b64 is not None else None,
            deliveries=int(event["deliveries"]),
            timestamp=timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC),
            headers={str(k): str(v) for k, v in (event.get("headers") or {}).items()},
        )
    except (KeyError, TypeError, AttributeError, ValueError, binascii.Error) as exc:
        raise ValueError(f"not a dead-letter envelope: {exc}") from exc


def _text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
