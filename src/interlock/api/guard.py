"""What keeps browsers and strangers away from the admin API (``/admin/…``).

Checked in this order, before routing, so every admin route (and any added later) gets
them:

1. **Cross-site browser requests: 403.** A page on another site can make the browser
   send a form post or a ``fetch`` without a CORS preflight, and ``127.0.0.1`` is no
   exception. Browsers say where a request comes from: ``Sec-Fetch-Site`` must be
   ``same-origin`` or ``none`` (typed by the user) when sent, and ``Origin``, when sent,
   must name the host the request is addressed to. Clients that are not browsers (the
   CLI, curl, SDKs) send neither.
2. **An open admin API answers loopback only: 403.** With no admin key, a client whose
   address is not a loopback address is refused, even if the server listens on
   ``0.0.0.0``; so is a request whose ``Host`` is not ``localhost`` or a loopback
   address, which a page whose own name resolves to 127.0.0.1 (DNS rebinding) would
   send. A request without a client address (a Unix socket) is local.
3. **Bodies of the expected type: 415.** ``POST``, ``PUT`` and ``PATCH`` carry
   ``application/json``, except registration, which is ``multipart/form-data``. A
   browser can send a form or plain text cross-site without a preflight, never JSON.

The admin key itself (401) is checked by the routes; uploads that run code have their
own rule in :mod:`interlock.api.admin`.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import orjson

from interlock.api.predict import ASGIApp, Receive, Scope, Send

__all__ = ["AdminGuard", "is_loopback"]

_PREFIX = "/admin"
_REGISTRATION = re.compile(r"^/admin/models/[^/]+/versions/?$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_SAFE_FETCH_SITES = frozenset({b"same-origin", b"none"})
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
_JSON_TYPES = ("application/json",)
_FORM_TYPES = ("multipart/form-data",)
_SET_KEY = "set auth.admin_key (INTERLOCK_AUTH__ADMIN_KEY) to reach it from elsewhere"


def is_loopback(host: str) -> bool:
    """True for a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x.y.z)."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _split_host(netloc: str) -> tuple[str, str]:
    """``host[:port]`` (IPv6 in brackets) into the host and the port, ``""`` if none."""
    if netloc.startswith("["):
        host, _, rest = netloc[1:].partition("]")
        return host, rest.removeprefix(":")
    host, _, port = netloc.partition(":")
    return host, port


def _normal_netloc(netloc: str, scheme: str) -> str:
    host, port = _split_host(netloc.lower())
    if port == _DEFAULT_PORTS.get(scheme):
        port = ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port}" if port else host


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key == name]


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


def _cross_site(scope: Scope) -> str | None:
    """Why a browser request comes from another site, or None."""
    for site in _header_values(scope, b"sec-fetch-site"):
        if site.strip().lower() not in _SAFE_FETCH_SITES:
            return (
                f"the admin API refuses cross-site browser requests (Sec-Fetch-Site: "
                f"{_text(site)}); use the CLI, curl or a page served by interlock itself"
            )
    origins = _header_values(scope, b"origin")
    if not origins:
        return None
    hosts = _header_values(scope, b"host")
    host = _text(hosts[0]).strip() if hosts else ""
    for raw in origins:
        origin = _text(raw).strip()
        parts = urlsplit(origin)
        if origin.lower() == "null" or not parts.scheme or not parts.netloc:
            return f"the admin API refuses browser requests from origin {origin!r}"
        scheme = parts.scheme.lower()
        if not host or _normal_netloc(parts.netloc, scheme) != _normal_netloc(host, scheme):
            return (
                f"the admin API refuses cross-site browser requests: origin {origin!r} "
                f"is not this server ({host or 'no Host header'})"
            )
    return None


def _not_loopback(scope: Scope) -> str | None:
    """Why a request may not use an admin API that has no key, or None."""
    client = scope.get("client")
    if client is not None and not is_loopback(str(client[0])):
        return (
            f"the admin API answers loopback clients only because no admin key is set "
            f"(this client is {client[0]}); {_SET_KEY}"
        )
    hosts = _header_values(scope, b"host")
    if hosts:
        host, _ = _split_host(_text(hosts[0]).strip().lower())
        if host != "localhost" and not is_loopback(host):
            return (
                f"the admin API answers loopback clients only because no admin key is set, "
                f"and only when addressed as localhost or a loopback address (not {host!r}); "
                f"{_SET_KEY}"
            )
    return None


def _wrong_content_type(scope: Scope) -> str | None:
    """Why the body's content type is not the route's, or None."""
    if scope["method"] not in _BODY_METHODS:
        return None
    expected = _FORM_TYPES if _REGISTRATION.match(scope["path"]) else _JSON_TYPES
    raw = _header_values(scope, b"content-type")
    sent = _text(raw[0]).partition(";")[0].strip().lower() if raw else ""
    if sent in expected or (expected is _JSON_TYPES and sent.endswith("+json")):
        return None
    return f"content-type must be {expected[0]}, got {sent or 'none'}"


async def _refuse(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class AdminGuard:
    """ASGI middleware applying the checks above to ``/admin`` paths.

    ``open_admin``: no admin key is configured, so admin routes answer loopback only.
    """

    def __init__(self, app: ASGIApp, *, open_admin: bool) -> None:
        self._app = app
        self._open = open_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == _PREFIX or path.startswith(_PREFIX + "/")):
            await self._app(scope, receive, send)
            return
        reason = _cross_site(scope)
        if reason is None and self._open:
            reason = _not_loopback(scope)
        if reason is not None:
            await _refuse(send, 403, reason)
            return
        reason = _wrong_content_type(scope)
        if reason is not None:
            await _refuse(send, 415, reason)
            return
        await self._app(scope, receive, send)
