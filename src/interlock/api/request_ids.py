"""Request ids for the routes served by the FastAPI app (admin, metadata, health, metrics).

The prediction and LLM routes set their own; this middleware gives every other answer
the same: the client's ``x-request-id`` when it is a sane token (up to 64 letters,
digits and ``._:-``), else a generated one, bound to the log records of the request and
echoed in the ``x-request-id`` response header, errors included.
"""

from __future__ import annotations

import re

from interlock._core.ids import new_request_id
from interlock._core.logs import request_id_var
from interlock.api.predict import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestIds", "request_id_of"]

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_HEADER = b"x-request-id"


def request_id_of(scope: Scope) -> str:
    """The client's request id when acceptable, else a new one."""
    for key, value in scope["headers"]:
        if key == _HEADER:
            rid: str = value.decode("latin-1")
            if _REQUEST_ID_OK.match(rid):
                return rid
            break
    return new_request_id()


class RequestIds:
    """ASGI middleware: one request id per HTTP request, in the logs and the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        rid = request_id_of(scope)
        header = (_HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(key.lower() == _HEADER for key, _ in headers):
                    headers.append(header)
                message["headers"] = headers
            await send(message)

        token = request_id_var.set(rid)
        try:
            await self._app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
