"""The admin API against browsers and strangers: no web page, and no remote client of an
open server, can make interlock run code or change what it serves.

The requests below are shaped like the ones a browser sends for a cross-site form post or
a ``fetch`` without a preflight (``Origin``, ``Sec-Fetch-Site``, a form content type).
"""

from __future__ import annotations

import json
import pickle
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from interlock.app import build_components, create_app, start_components, stop_components
from tests.api.support import register, write_python_model
from tests.conftest import LiveServer
from tests.factories import make_lightgbm

ADMIN = {"authorization": "Bearer adm-key"}

# A python model that leaves a mark when its file runs.
MARKING_MODEL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")

class Model:
    features = ["x"]

    def predict(self, rows):
        return [1.0 for _ in rows]
"""


class _Marks:
    """A pickle that leaves a mark when it is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "ran"))


def marking_model(directory: Path) -> tuple[Path, Path]:
    marker = directory / "ran.txt"
    return write_python_model(directory, MARKING_MODEL.format(marker=str(marker))), marker


def browser_form_post(
    url: str, path: Path, fields: dict[str, str], origin: str = "https://evil.example"
) -> httpx.Response:
    """What a page at ``origin`` sends for an auto-submitted multipart form to ``url``."""
    headers = {
        "origin": origin,
        "referer": f"{origin}/",
        "sec-fetch-site": "cross-site",
        "sec-fetch-mode": "navigate",
        "sec-fetch-dest": "document",
        "user-agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0 Safari/537.36",
    }
    with path.open("rb") as handle:
        return httpx.post(
            url,
            files={"artifact": (path.name, handle, "text/x-python")},
            data=fields,
            headers=headers,
            timeout=10,
        )


def upload(
    http: httpx.Client, path: Path, fmt: str = "python", name: str = "calc", **fields: Any
) -> httpx.Response:
    headers = fields.pop("headers", None)
    with path.open("rb") as handle:
        return http.post(
            f"/admin/models/{name}/versions",
            files={"artifact": (path.name, handle)},
            data={"format": fmt, **fields},
            headers=headers,
        )


# -- code uploads ------------------------------------------------------------------------


def test_a_cross_site_form_post_of_a_python_artifact_is_refused_and_runs_nothing(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    server = server_factory(make_settings())
    model, marker = marking_model(tmp_path)
    url = f"{server.url}/admin/models/calc/versions"
    response = browser_form_post(url, model, {"format": "python"})
    assert response.status_code == 403, response.text
    assert "cross-site" in response.json()["error"]
    assert response.headers["x-request-id"]
    # An older browser sends Origin without Sec-Fetch-Site: refused all the same.
    with model.open("rb") as handle:
        response = httpx.post(
            url,
            files={"artifact": (model.name, handle)},
            data={"format": "python"},
            headers={"origin": "http://localhost:3000"},
        )
    assert response.status_code == 403, response.text
    assert "origin" in response.json()["error"].lower()
    assert not marker.exists()
    assert httpx.get(f"{server.url}/admin/models").json()["models"] == []


def _raw_request(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    """Send bytes as they are on the wire; the status and the body of the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(head.replace("\n", "\r\n").encode() + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_chromes_own_bytes_for_a_cross_site_form_post_are_refused(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    """``<form method=post enctype=multipart/form-data>`` submitted by a page elsewhere."""
    server = server_factory(make_settings())
    model, marker = marking_model(tmp_path)
    boundary = "----WebKitFormBoundaryq3xZ8mXyDkT0aB1c"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="format"\r\n\r\npython\r\n'
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="artifact"; filename="model.py"\r\n'
            "Content-Type: text/x-python\r\n\r\n"
        ).encode()
        + model.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    host = server.url.removeprefix("http://")
    head = (
        "POST /admin/models/calc/versions HTTP/1.1\n"
        f"Host: {host}\n"
        "Connection: close\n"
        f"Content-Length: {len(body)}\n"
        "Cache-Control: max-age=0\n"
        'sec-ch-ua: "Chromium";v="126", "Not.A/Brand";v="24"\n'
        "sec-ch-ua-mobile: ?0\n"
        "Origin: https://attacker.example\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\n"
        "Upgrade-Insecure-Requests: 1\n"
        "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0 Safari\n"
        "Accept: text/html,application/xhtml+xml,*/*;q=0.8\n"
        "Sec-Fetch-Site: cross-site\n"
        "Sec-Fetch-Mode: navigate\n"
        "Sec-Fetch-Dest: document\n"
        "Referer: https://attacker.example/\n"
        "Accept-Encoding: gzip, deflate, br\n"
        "\n"
    )
    status, answer = _raw_request(server.url, head, body)
    assert status == 403, answer
    assert b"cross-site" in answer
    assert not marker.exists()


@pytest.mark.parametrize(
    ("auth", "sent", "status", "says"),
    [
        ({}, {}, 403, "auth.admin_key"),
        ({"allow_code_uploads": True}, {}, 403, "auth.admin_key"),
        ({"admin_key": "adm-key"}, ADMIN, 403, "auth.allow_code_uploads"),
        ({"admin_key": "adm-key", "allow_code_uploads": True}, {}, 401, "key"),
    ],
)
def test_uploads_that_run_code_need_the_admin_key_and_the_setting(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
    auth: dict[str, Any],
    sent: dict[str, str],
    status: int,
    says: str,
) -> None:
    server = server_factory(make_settings(auth=auth))
    model, marker = marking_model(tmp_path)
    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(pickle.dumps(_Marks(marker)))
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for response in (
            upload(http, model, headers=sent),
            upload(http, pickled, "sklearn", trust="true", headers=sent),
        ):
            assert response.status_code == status, response.text
            assert says in response.json()["error"]
            assert response.headers["x-request-id"]
    assert not marker.exists()


def test_code_uploads_work_with_the_admin_key_once_enabled(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(
        auth={"admin_key": "adm-key", "allow_code_uploads": True},
        serving={"default_timeout_ms": 30_000},  # the first prediction starts a worker process
    )
    server = server_factory(settings)
    model, marker = marking_model(tmp_path)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        created = upload(http, model, alias="champion", headers=ADMIN)
        assert created.status_code == 201, created.text
        assert marker.exists()
        predicted = http.post(
            "/v1/models/calc:predict", json={"instances": [{"x": 1.0}]}, headers=ADMIN
        )
        assert predicted.json()["predictions"] == [1.0]


def test_artifacts_that_run_no_code_register_on_an_open_loopback_server(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    server = server_factory(make_settings())
    made = make_lightgbm(tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        created = upload(http, made.path, "lightgbm", alias="champion")
        assert created.status_code == 201, created.text
        assert created.json()["format"] == "lightgbm"


def test_the_cli_still_registers_python_models_on_the_operators_machine(
    tmp_path: Path, make_settings: Callable[..., Any]
) -> None:
    """The CLI runs as the operator, who can run the file anyway: no key, no setting."""
    model, marker = marking_model(tmp_path)
    version = register(make_settings(), "calc", model, "python")
    assert version.version == 1 and marker.exists()


# -- browsers: Origin, Sec-Fetch-Site, content types --------------------------------------


@pytest.fixture
def live(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> LiveServer:
    """An open server (no keys) with model ``calc`` at versions 1 and 2."""
    settings = make_settings()
    for version in (1, 2):
        path = write_python_model(tmp_path / f"v{version}", name="m.py")
        register(
            settings,
            "calc",
            path,
            "python",
            alias="champion" if version == 1 else None,
            allow_duplicate=True,
        )
    return server_factory(settings)


@pytest.mark.parametrize(
    "headers",
    [
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "https://evil.example"},
        {"origin": "null"},
        {"origin": "http://127.0.0.1:1", "sec-fetch-site": "same-origin"},
    ],
)
def test_cross_site_browser_requests_are_refused_on_every_admin_route(
    live: LiveServer, headers: dict[str, str]
) -> None:
    with httpx.Client(base_url=live.url, timeout=10, headers=headers) as http:
        for response in (
            http.get("/admin/models"),
            http.put("/admin/models/calc/aliases/champion", json={"version": 2}),
            http.delete("/admin/models/calc/aliases/champion"),
            http.put("/admin/models/calc/traffic", json={"weights": {"1": 50, "2": 50}}),
            http.post("/admin/models/calc/traffic/canary", json={"version": 2, "weight": 10}),
        ):
            assert response.status_code == 403, (response.request.url, response.text)
            assert response.json()["error"]
            assert response.headers["x-request-id"]
        # Nothing changed.
        assert httpx.get(f"{live.url}/admin/models/calc").json()["aliases"] == {"champion": 1}
        assert httpx.get(f"{live.url}/admin/models/calc/traffic").json()["policy"] is None


def test_same_origin_and_non_browser_requests_pass(live: LiveServer) -> None:
    host = live.url.removeprefix("http://")
    for headers in (
        {},
        {"sec-fetch-site": "none"},
        {"sec-fetch-site": "same-origin", "origin": live.url},
        {"origin": f"http://{host}"},
    ):
        response = httpx.put(
            f"{live.url}/admin/models/calc/aliases/champion",
            json={"version": 2},
            headers=headers,
        )
        assert response.status_code == 200, (headers, response.text)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (None, b'{"version": 2, "weight": 10}'),  # fetch() with a Blob body: no preflight
        ("text/plain", b'{"version": 2, "weight": 10}'),
        ("application/x-www-form-urlencoded", b"version=2&weight=10"),
        ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="v"'),
    ],
)
def test_json_routes_refuse_other_content_types(
    live: LiveServer, content_type: str | None, body: bytes
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    for method, path in (
        ("POST", "/admin/models/calc/traffic/canary"),
        ("PUT", "/admin/models/calc/traffic"),
        ("PUT", "/admin/models/calc/aliases/champion"),
    ):
        response = httpx.request(method, f"{live.url}{path}", content=body, headers=headers)
        assert response.status_code == 415, (method, path, response.text)
        assert "application/json" in response.json()["error"]
        assert response.headers["x-request-id"]
    assert httpx.get(f"{live.url}/admin/models/calc/traffic").json()["policy"] is None


def test_registration_takes_multipart_only(live: LiveServer) -> None:
    response = httpx.post(
        f"{live.url}/admin/models/calc/versions", json={"format": "lightgbm", "artifact": "x"}
    )
    assert response.status_code == 415, response.text
    assert "multipart/form-data" in response.json()["error"]


# -- errors look alike and carry x-request-id ---------------------------------------------


def test_malformed_json_to_admin_routes_is_a_400_as_the_readme_says(live: LiveServer) -> None:
    json_type = {"content-type": "application/json"}
    for method, path in (
        ("PUT", "/admin/models/calc/aliases/champion"),
        ("PUT", "/admin/models/calc/traffic"),
        ("POST", "/admin/models/calc/traffic/canary"),
    ):
        response = httpx.request(
            method,
            f"{live.url}{path}",
            content=b'{"version": ',
            headers={**json_type, "x-request-id": "mine-1"},
        )
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"].startswith("the body is not valid JSON: ")
        assert response.headers["x-request-id"] == "mine-1"


def test_the_readme_alias_example_works(live: LiveServer) -> None:
    """``curl -X PUT … -H 'content-type: application/json' -d '{"version": 2}'``."""
    response = httpx.put(
        f"{live.url}/admin/models/calc/aliases/champion",
        content=b'{"version": 2}',
        headers={"content-type": "application/json", "user-agent": "curl/8.5.0"},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"model": "calc", "alias": "champion", "version": 2}


def test_every_error_of_the_app_carries_a_request_id(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=10) as http:
        for response in (
            http.get("/admin/models/nope"),
            http.get("/no/such/route"),
            http.put("/admin/models/calc/aliases/champion", json={"version": "x"}),
            http.post("/v1/models/nope:predict", json={"instances": []}),
            http.get("/v2/models/nope"),
        ):
            assert response.status_code >= 400
            assert response.json()["error"]
            assert len(response.headers["x-request-id"]) >= 8, response.request.url
        echoed = http.get("/admin/models/nope", headers={"x-request-id": "trace-42"})
        assert echoed.headers["x-request-id"] == "trace-42"
        ok = http.get("/admin/models", headers={"x-request-id": "trace-43"})
        assert ok.headers["x-request-id"] == "trace-43"


# -- an open admin API answers loopback clients only --------------------------------------


@asynccontextmanager
async def asgi_client(
    settings: Any, client: tuple[str, int], host: str = "127.0.0.1:8000"
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, started, behind a transport that reports ``client`` as the peer."""
    parts = build_components(settings)
    await start_components(parts)
    try:
        transport = httpx.ASGITransport(app=create_app(settings, parts), client=client)
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{host}") as http:
            yield http
    finally:
        await stop_components(parts)


@pytest.mark.parametrize("peer", ["203.0.113.7", "10.0.0.5", "2001:db8::1"])
async def test_an_open_admin_api_refuses_remote_clients(
    make_settings: Callable[..., Any], peer: str
) -> None:
    settings = make_settings(server={"host": "0.0.0.0"})
    async with asgi_client(settings, (peer, 40000), host="192.0.2.10:8000") as http:
        for response in (
            await http.get("/admin/models"),
            await http.put("/admin/models/calc/traffic", json={"weights": {"1": 1}}),
        ):
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert "loopback" in error and "auth.admin_key" in error
        # Predictions, health and metrics are not admin routes.
        assert (await http.get("/v2/health/live")).status_code == 200


@pytest.mark.parametrize("peer", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_an_open_admin_api_answers_loopback_clients(
    make_settings: Callable[..., Any], peer: str
) -> None:
    async with asgi_client(make_settings(), (peer, 40000)) as http:
        assert (await http.get("/admin/models")).status_code == 200
    async with asgi_client(make_settings(), (peer, 40000), host="localhost:8000") as http:
        assert (await http.get("/admin/models")).status_code == 200


async def test_an_open_admin_api_refuses_a_foreign_host_name(
    make_settings: Callable[..., Any],
) -> None:
    """DNS rebinding: a page's own name resolving to 127.0.0.1 reaches loopback same-origin."""
    async with asgi_client(make_settings(), ("127.0.0.1", 40000), host="evil.example:8000") as http:
        response = await http.get("/admin/models", headers={"origin": "http://evil.example:8000"})
        assert response.status_code == 403, response.text
        assert "auth.admin_key" in response.json()["error"]


async def test_with_an_admin_key_remote_clients_are_served(
    make_settings: Callable[..., Any],
) -> None:
    settings = make_settings(auth={"admin_key": "adm-key"})
    async with asgi_client(settings, ("203.0.113.7", 40000), host="models.internal") as http:
        assert (await http.get("/admin/models")).status_code == 401
        assert (await http.get("/admin/models", headers=ADMIN)).status_code == 200


def test_the_startup_says_the_admin_api_is_open_to_loopback_only(tmp_path: Path) -> None:
    """``interlock serve`` logs one line about it; with an admin key, none."""
    from tests.api.serve_process import serve_until_ready

    lines = serve_until_ready(tmp_path / "open", {})
    about = [line for line in lines if "admin API" in line]
    assert len(about) == 1, lines
    assert "loopback" in about[0] and "no admin key" in about[0]
    lines = serve_until_ready(tmp_path / "keyed", {"INTERLOCK_AUTH__ADMIN_KEY": "adm-key"})
    assert not [line for line in lines if "admin API" in line], lines
    assert json.dumps(lines).count("adm-key") == 0
