"""The admin API, and keys: admin routes need the admin key, predictions a client key."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.support import PYTHON_MODEL, register, write_python_model
from tests.conftest import LiveServer
from tests.factories import make_lightgbm

ROW = {"a": 1.0, "b": 2, "c": 0.5}
ADMIN = {"authorization": "Bearer adm-key"}
# Python artifacts run code: over HTTP they need the admin key and the setting.
CODE_UPLOADS = {"admin_key": "adm-key", "allow_code_uploads": True}


def upload(
    http: httpx.Client, name: str, path: Path, fmt: str = "python", **fields: str
) -> httpx.Response:
    with path.open("rb") as handle:
        return http.post(
            f"/admin/models/{name}/versions",
            files={"artifact": (path.name, handle)},
            data={"format": fmt, **fields},
        )


def test_register_alias_and_predict_over_http(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    # A python model loads in a worker process on first use: a generous deadline for it.
    settings = make_settings(auth=CODE_UPLOADS, serving={"default_timeout_ms": 30_000})
    server = server_factory(settings)
    model = write_python_model(tmp_path)
    doubled = write_python_model(
        tmp_path / "v2",
        PYTHON_MODEL.replace("return [", "return [2 * (").replace('r["c"] for', 'r["c"]) for'),
    )
    with httpx.Client(base_url=server.url, timeout=10, headers=ADMIN) as http:
        first = upload(http, "calc", model, metrics=json.dumps({"auc": 0.9}), alias="champion")
        assert first.status_code == 201, first.text
        created = first.json()
        assert created["version"] == 1 and created["format"] == "python"
        assert len(created["artifact_sha256"]) == 64
        assert [f["name"] for f in created["schema"]] == ["a", "b", "c"]

        second = upload(http, "calc", doubled)
        assert second.status_code == 201 and second.json()["version"] == 2

        listed = http.get("/admin/models").json()["models"]
        assert [(m["name"], m["versions"], m["aliases"]) for m in listed] == [
            ("calc", [1, 2], {"champion": 1})
        ]
        predict = {"instances": [ROW]}
        assert http.post("/v1/models/calc:predict", json=predict).json()["predictions"] == [4.5]
        assert http.post("/v1/models/calc@latest:predict", json=predict).json()["predictions"] == [
            9.0
        ]

        moved = http.put("/admin/models/calc/aliases/champion", json={"version": 2})
        assert moved.status_code == 200
        # The move answers once this node serves the new version.
        assert http.post("/v1/models/calc:predict", json=predict).json()["predictions"] == [9.0]

        shown = http.get("/admin/models/calc").json()
        assert shown["aliases"] == {"champion": 2}
        assert [d["version"] for d in shown["details"]] == [1, 2]
        assert shown["details"][0]["metrics"] == {"auc": 0.9}


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"format": "tensorflow"}, 422, "tensorflow"),
        ({"format": "lightgbm", "schema": "{bad"}, 400, "field 'schema' is not valid JSON"),
        ({}, 422, "format"),
    ],
)
def test_bad_registrations_say_what_is_wrong(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
    fields: dict[str, str],
    status: int,
    message: str,
) -> None:
    server = server_factory(make_settings())
    model = write_python_model(tmp_path)
    with httpx.Client(base_url=server.url, timeout=10) as http, model.open("rb") as handle:
        response = http.post(
            "/admin/models/calc/versions", files={"artifact": ("m.py", handle)}, data=fields
        )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_registration_refusals_and_their_overrides(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    server = server_factory(make_settings())
    model = make_lightgbm(tmp_path / "a").path
    fewer = make_lightgbm(tmp_path / "b", n_features=5).path
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert upload(http, "fraud", model, "lightgbm").status_code == 201

        same = upload(http, "fraud", model, "lightgbm")
        assert same.status_code == 409, same.text
        assert same.json()["error"].startswith("fraud: version 1 already has this artifact")
        again = upload(http, "fraud", model, "lightgbm", allow_duplicate="true")
        assert again.json()["version"] == 2

        breaking = upload(http, "fraud", fewer, "lightgbm")
        assert breaking.status_code == 409, breaking.text
        assert "feature 'x5' is gone" in breaking.json()["error"]
        forced = upload(http, "fraud", fewer, "lightgbm", force_schema="true")
        assert forced.json()["version"] == 3


def test_the_same_lightgbm_file_again_answers_the_same_clients(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    """Issue 11: v2 of the demo's file took floats where v1 took a bool, so half of a
    50/50 split answered 422 to the request the demo prints."""
    made = make_lightgbm(tmp_path / "m")
    assert made.schema is not None
    typed = [
        {"name": f.name, "type": {"x0": "int", "x1": "bool"}.get(f.name, "float")}
        for f in made.schema.features
    ]
    row = {f.name: 0.5 for f in made.schema.features} | {"x0": 2, "x1": True}
    server = server_factory(make_settings())
    with httpx.Client(base_url=server.url, timeout=10) as http:
        first = upload(http, "fraud", made.path, "lightgbm", schema=json.dumps(typed))
        assert first.status_code == 201, first.text
        second = upload(http, "fraud", made.path, "lightgbm", allow_duplicate="true")
        assert second.status_code == 201, second.text
        assert second.json()["schema"] == first.json()["schema"]

        answers = [
            http.post(f"/v1/models/{ref}:predict", json={"instances": [row]})
            for ref in ("fraud:1", "fraud:2")
        ]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["predictions"] == answers[1].json()["predictions"]


def test_moving_an_alias_to_a_missing_version_is_404(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings()
    register(settings, "calc", write_python_model(tmp_path), "python")
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = http.put("/admin/models/calc/aliases/champion", json={"version": 5})
        assert response.status_code == 404
        assert "no version 5" in response.json()["error"]
        response = http.put("/admin/models/calc/aliases/champion", json={"version": "x"})
        assert response.status_code == 422
        assert "version" in response.json()["error"]


def test_keys_guard_admin_and_predictions_when_configured(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    settings = make_settings(auth={**CODE_UPLOADS, "client_keys": ["cli-key"]})
    server = server_factory(settings)
    admin = {"authorization": "Bearer adm-key"}
    client = {"x-api-key": "cli-key"}
    predict = {"instances": [ROW]}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        model = write_python_model(tmp_path)
        assert upload(http, "calc", model).status_code == 401
        with model.open("rb") as handle:
            created = http.post(
                "/admin/models/calc/versions",
                files={"artifact": ("m.py", handle)},
                data={"format": "python"},
                headers=admin,
            )
        assert created.status_code == 201
        assert http.get("/admin/models", headers=client).status_code == 401

        denied = http.post("/v1/models/calc:predict", json=predict)
        assert denied.status_code == 401
        assert "Bearer" in denied.json()["error"]
        assert denied.headers["www-authenticate"] == "Bearer"
        wrong = http.post("/v1/models/calc:predict", json=predict, headers={"x-api-key": "no"})
        assert wrong.status_code == 401
        assert http.post("/v1/models/calc:predict", json=predict, headers=client).status_code == 200
        assert http.post("/v1/models/calc:predict", json=predict, headers=admin).status_code == 200
        assert http.get("/v2/models/calc", headers=client).status_code == 200
        assert http.get("/v2/models/calc").status_code == 401
        # Health and metrics stay open for probes and scrapers.
        assert http.get("/v2/health/ready").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_admin_and_predictions_are_open_in_the_embedded_default(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> None:
    """Open to loopback clients: the admin API without a key, predictions too."""
    settings = make_settings()
    register(settings, "calc", write_python_model(tmp_path), "python")
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert http.get("/admin/models").json()["models"][0]["name"] == "calc"
        predict = {"instances": [ROW]}
        assert http.post("/v1/models/calc:predict", json=predict).status_code == 200
