"""Every bad request gets its status and a message naming what to fix; none gets a 500."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.support import register, write_python_model
from tests.conftest import LiveServer

ROW = {"a": 1.0, "b": 2, "c": 0.5}


@pytest.fixture
def client(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> Iterator[httpx.Client]:
    settings = make_settings(server={"max_body_bytes": 4096})
    register(settings, "calc", write_python_model(tmp_path / "m"), "python", alias="champion")
    server = server_factory(settings)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def v1(
    http: httpx.Client, body: Any, model: str = "calc", raw: bytes | None = None
) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return http.post(
        f"/v1/models/{model}:predict", content=content, headers={"content-type": "application/json"}
    )


def test_a_good_request_for_reference(client: httpx.Client) -> None:
    response = v1(client, {"instances": [ROW]})
    assert response.status_code == 200
    assert response.json() == {"predictions": [4.5], "model_name": "calc", "model_version": "1"}
    assert response.headers["x-interlock-model-version"] == "1"
    assert len(response.headers["x-request-id"]) == 16


def test_a_client_request_id_is_echoed(client: httpx.Client) -> None:
    response = client.post(
        "/v1/models/calc:predict", json={"instances": [ROW]}, headers={"x-request-id": "abc-123"}
    )
    assert response.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("nope", "no model named 'nope'"),
        ("calc@blue", "has no alias 'blue'"),
    ],
)
def test_unknown_models_are_404(client: httpx.Client, model: str, message: str) -> None:
    response = v1(client, {"instances": [ROW]}, model=model)
    assert response.status_code == 404
    assert message in response.json()["error"]


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ([{"a": 1.0, "b": 2}], "row 0: feature 'c' is missing"),
        ([ROW, {**ROW, "d": 1}], "row 1: unexpected feature 'd'"),
        ([ROW, ROW, {**ROW, "b": "2"}], "row 2: feature 'b' must be an integer, got string"),
        ([{**ROW, "a": [1]}], "row 0: feature 'a' must be a number, got array"),
        ([[1.0, 2]], "row 0: has 2 values; the model takes 3 features"),
    ],
)
def test_bad_features_are_422_naming_feature_and_row(
    client: httpx.Client, instances: Any, message: str
) -> None:
    response = v1(client, {"instances": instances})
    assert response.status_code == 422
    assert response.json()["error"].startswith(message)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "JSON object with 'instances'"),
        (b'{"rows": []}', "JSON object with 'instances'"),
        (b'{"instances": []}', "non-empty list"),
        (b'{"instances": [1, 2]}', "row 0: must be an object or a list"),
        (b'{"instances": 5}', "non-empty list"),
        (b'{"instances": [{"a": NaN}]}', "not valid JSON"),
    ],
)
def test_malformed_bodies_are_400(client: httpx.Client, raw: bytes, message: str) -> None:
    response = v1(client, None, raw=raw)
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_body_over_the_limit_is_413(client: httpx.Client) -> None:
    response = v1(client, {"instances": [ROW] * 400})
    assert response.status_code == 413
    assert "4096-byte limit" in response.json()["error"]


def test_a_streamed_body_over_the_limit_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(400):
            yield json.dumps(ROW).encode() + b","
        yield json.dumps(ROW).encode() + b"]}"

    response = client.post("/v1/models/calc:predict", content=chunks())
    assert response.status_code == 413


def v2(http: httpx.Client, body: Any, path: str = "/v2/models/calc/infer") -> httpx.Response:
    return http.post(path, json=body)


def test_v2_good_request_for_reference(client: httpx.Client) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 0.5]}]}
    response = v2(client, body)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == [
        {"name": "predictions", "datatype": "FP64", "shape": [1], "data": [4.5]}
    ]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": []}, 400, "'inputs' must be a non-empty list"),
        ({"inputs": [{"name": "input", "datatype": "FP99", "shape": [1, 3], "data": [1, 2, 3]}]},
         400, "unsupported datatype 'FP99'"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2]}]},
         400, "needs 3 values, got 2"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]},
         422, "does not match [N, 3]"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": ["a", 2, 3]}]},
         422, "does not hold FP32 values"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": "1,3", "data": [1, 2, 3]}]},
         400, "'shape' must be a list"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},
                     {"name": "b", "datatype": "INT64", "shape": [1], "data": [1]}]},
         422, "input for feature 'c' is missing"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2.5, 3]}]},
         422, "feature 'b' must be an integer"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}],
          "outputs": [{"name": "scores"}]},
         400, "unknown output 'scores'"),
    ],
)  # fmt: skip
def test_v2_bad_requests(client: httpx.Client, body: Any, status: int, message: str) -> None:
    response = v2(client, body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_v2_unknown_version_is_404(client: httpx.Client) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert v2(client, body, "/v2/models/calc/versions/9/infer").status_code == 404
    assert v2(client, body, "/v2/models/calc/versions/x/infer").status_code == 404


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\xff\xfe",
        b"{" * 5000,
        b'{"instances": [{"a": 1e999, "b": 2, "c": 1}]}',
        b'{"instances": [[]]}',
        b'{"instances": [null]}',
        b'{"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 3], "data": [1, 2, 3]}]}',
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3], "data": [1, 2, 3]}]}',
        b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [[1, [2]], 3]}]}',
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3],'
        b' "parameters": {"binary_data_size": 12}}]}',
        b'{"inputs": [null]}',
        b'{"inputs": [{"name": "b", "datatype": "FP32", "shape": [1, 1, 1], "data": [1]},'
        b' {"name": "a", "datatype": "FP32", "shape": [1], "data": [1]},'
        b' {"name": "c", "datatype": "FP32", "shape": [1], "data": [1]}]}',
    ],
)
@pytest.mark.parametrize("path", ["/v1/models/calc:predict", "/v2/models/calc/infer"])
def test_nothing_a_client_sends_yields_a_500(client: httpx.Client, raw: bytes, path: str) -> None:
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]


@pytest.mark.parametrize(
    "path", ["/v1/models/calc:predict", "/v2/models/calc/infer", "/v2/models/calc/versions/1/infer"]
)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_another_method_on_a_prediction_route_is_405_allowing_post(
    client: httpx.Client, path: str, method: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert method in response.json()["error"]
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    "inputs",
    [
        [{"name": "features", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 0.5]}],
        [
            {"name": "a", "datatype": "FP64", "shape": [1], "data": [1]},
            {"name": "b", "datatype": "INT64", "shape": [1], "data": [2]},
            {"name": "c", "datatype": "FP64", "shape": [1], "data": [0.5]},
            {"name": "features", "datatype": "FP64", "shape": [1], "data": [0]},
        ],
    ],
    ids=["matrix", "per-feature"],
)
def test_a_v2_input_with_an_unknown_name_is_400_naming_it(
    client: httpx.Client, inputs: list[dict[str, Any]]
) -> None:
    response = v2(client, {"inputs": inputs})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "'features'" in error
    assert "'input'" in error  # what to send instead


@pytest.mark.parametrize("version", ["³", "١"])  # str.isdigit() holds for both
def test_a_version_of_unicode_digits_is_404_not_500(client: httpx.Client, version: str) -> None:
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]}
    responses = [
        v2(client, body, f"/v2/models/calc/versions/{version}/infer"),
        client.get(f"/v2/models/calc/versions/{version}"),
        client.get(f"/v2/models/calc/versions/{version}/ready"),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert "not a version number" in response.json()["error"]


def test_a_reference_to_a_version_of_unicode_digits_is_refused_not_a_500(
    client: httpx.Client,
) -> None:
    for response in (
        v1(client, {"instances": [ROW]}, model="calc:³"),
        client.get("/v1/models/calc:³"),
    ):
        assert 400 <= response.status_code < 500, response.text
        assert "invalid model reference 'calc:³'" in response.json()["error"]


def test_a_version_beyond_any_database_integer_is_404_not_500(client: httpx.Client) -> None:
    huge = "9" * 30
    body = {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]}
    responses = [
        v2(client, body, f"/v2/models/calc/versions/{huge}/infer"),
        v1(client, {"instances": [ROW]}, model=f"calc:{huge}"),
        client.get(f"/v2/models/calc/versions/{huge}"),
        client.get(f"/v1/models/calc:{huge}"),
        client.put("/admin/models/calc/aliases/blue", json={"version": int(huge)}),
    ]
    for response in responses:
        assert response.status_code == 404, response.text
        assert response.json()["error"]
