"""V1 and V2 answers equal each model's own in-process predictions, for every format.

One real server on loopback holds a model per case; every request goes over HTTP and
every answer is held against the format's own library predicting the same rows.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.app import open_registry
from interlock.settings import load_settings
from tests.conftest import LiveServer
from tests.factories import (
    Made,
    make_lightgbm,
    make_onnx,
    make_python,
    make_sklearn,
    make_xgboost,
)

CASES: dict[str, Callable[[Path], Made]] = {
    "lightgbm-binary": lambda d: make_lightgbm(d, "binary"),
    "lightgbm-multiclass": lambda d: make_lightgbm(d, "multiclass"),
    "lightgbm-regression": lambda d: make_lightgbm(d, "regression"),
    "lightgbm-categorical": lambda d: make_lightgbm(d, "binary", categorical=True),
    "xgboost-binary": lambda d: make_xgboost(d, "binary"),
    "xgboost-multiclass": lambda d: make_xgboost(d, "multiclass"),
    "xgboost-regression": lambda d: make_xgboost(d, "regression"),
    "xgboost-ubj": lambda d: make_xgboost(d, "binary", ubj=True),
    "onnx-binary": lambda d: make_onnx(d, "binary"),
    "onnx-multiclass": lambda d: make_onnx(d, "multiclass"),
    "onnx-regression": lambda d: make_onnx(d, "regression"),
    "onnx-named": lambda d: make_onnx(d, "binary", named=True),
    "sklearn-binary": lambda d: make_sklearn(d, "binary"),
    "sklearn-multiclass": lambda d: make_sklearn(d, "multiclass"),
    "sklearn-regression": lambda d: make_sklearn(d, "regression"),
    "sklearn-pickle": lambda d: make_sklearn(d, "binary", kind="pickle"),
    "python": make_python,
}


def _schema(made: Made) -> FeatureSchema:
    return made.schema or FeatureSchema.of(Feature(f"x{i}") for i in range(made.n_features))


class Deployment:
    def __init__(self, server: LiveServer, made: dict[str, Made]) -> None:
        self.server = server
        self.made = made


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("protocols")
    # No prediction cache: a float32 model's cached single-row answer may differ from the
    # same row predicted in a batch in the last bit, and these tests compare to 1e-9.
    settings = load_settings(None, home=root / "home", cache={"enabled": False})
    made = {name: factory(root / name) for name, factory in CASES.items()}

    async def register_all() -> None:
        async with open_registry(settings) as registry:
            for name, m in made.items():
                await registry.register(
                    name,
                    m.path,
                    m.format,
                    schema=None if m.schema is not None else _schema(m),
                    trusted=m.trusted,
                    alias="champion",
                )

    asyncio.run(register_all())
    server = LiveServer(settings).start()
    try:
        yield Deployment(server, made)
    finally:
        server.stop()


def _instances(made: Made, x: np.ndarray) -> list[dict[str, Any]]:
    schema = _schema(made)
    rows = []
    for values in x.tolist():
        row: dict[str, Any] = {}
        for feature, value in zip(schema.features, values, strict=True):
            if math.isnan(value):
                row[feature.name] = None
            elif feature.type is FeatureType.CATEGORY:
                row[feature.name] = (feature.categories or ())[int(value)]
            else:
                row[feature.name] = value
        rows.append(row)
    return rows


def _close(got: Any, made: Made, x: np.ndarray) -> None:
    expected = np.asarray(made.native(x), dtype=np.float64)
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [1, 64])
def test_v1_rows_as_objects(deployment: Deployment, case: str, n: int) -> None:
    made = deployment.made[case]
    # Tree models take missing values (null); the others are covered below.
    x = made.rows(n, missing=made.format in ("lightgbm", "xgboost"))
    response = httpx.post(
        f"{deployment.server.url}/v1/models/{case}:predict",
        json={"instances": _instances(made, x)},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == case and body["model_version"] == "1"
    assert response.headers["x-interlock-model-version"] == "1"
    _close(body["predictions"], made, x)


@pytest.mark.parametrize("case", ["lightgbm-multiclass", "xgboost-binary", "python"])
def test_v1_rows_as_lists_in_schema_order(deployment: Deployment, case: str) -> None:
    made = deployment.made[case]
    x = made.rows(8)
    response = httpx.post(
        f"{deployment.server.url}/v1/models/{case}:predict", json={"instances": x.tolist()}
    )
    assert response.status_code == 200, response.text
    _close(response.json()["predictions"], made, x)


def _v2_output(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "1"
    (output,) = body["outputs"]
    assert output["name"] == "predictions"
    return np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_v2_one_matrix_tensor(deployment: Deployment, case: str, datatype: str) -> None:
    made = deployment.made[case]
    x = made.rows(16)
    if datatype == "FP32":
        x = x.astype(np.float32).astype(np.float64)  # what the model sees from FP32 data
    body = {
        "id": "r-1",
        "inputs": [{"name": "input", "datatype": datatype, "shape": list(x.shape),
                    "data": x.reshape(-1).tolist()}],
    }  # fmt: skip
    response = httpx.post(f"{deployment.server.url}/v2/models/{case}/infer", json=body)
    assert response.json()["id"] == "r-1"
    _close(_v2_output(response), made, x)


@pytest.mark.parametrize("case", ["lightgbm-categorical", "onnx-named", "sklearn-regression"])
def test_v2_one_tensor_per_feature(deployment: Deployment, case: str) -> None:
    made = deployment.made[case]
    x = made.rows(10)
    inputs = []
    for j, feature in enumerate(_schema(made).features):
        column = x[:, j]
        if feature.type is FeatureType.CATEGORY:
            data: list[Any] = [(feature.categories or ())[int(v)] for v in column]
            inputs.append({"name": feature.name, "datatype": "BYTES", "shape": [10], "data": data})
        else:
            inputs.append(
                {"name": feature.name, "datatype": "FP64", "shape": [10], "data": column.tolist()}
            )
    response = httpx.post(
        f"{deployment.server.url}/v2/models/{case}/versions/1/infer", json={"inputs": inputs}
    )
    _close(_v2_output(response), made, x)


def test_v2_metadata_describes_inputs_and_versions(deployment: Deployment) -> None:
    url = deployment.server.url
    meta = httpx.get(f"{url}/v2/models/lightgbm-categorical").json()
    assert meta["name"] == "lightgbm-categorical"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "lightgbm"
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP64", "shape": [-1, 6]}
    assert {"name": "color", "datatype": "BYTES", "shape": [-1]} in meta["inputs"]
    assert meta["outputs"] == [{"name": "predictions", "datatype": "FP64", "shape": [-1]}]
    assert httpx.get(f"{url}/v2/models/lightgbm-categorical/versions/1/ready").status_code == 200
    assert httpx.get(f"{url}/v2/models/nope/ready").status_code == 404
    assert httpx.get(f"{url}/v1/models/python").json() == {
        "name": "python",
        "ready": True,
        "model_version": "1",
    }
    server = httpx.get(f"{url}/v2").json()
    assert server["name"] == "interlock" and "binary_tensor_data" in server["extensions"]
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}


@pytest.mark.parametrize("case", ["sklearn-binary", "onnx-regression"])
def test_missing_values_are_a_422_for_models_that_cannot_take_them(
    deployment: Deployment, case: str
) -> None:
    made = deployment.made[case]
    x = made.rows(3)
    x[2, 1] = np.nan
    response = httpx.post(
        f"{deployment.server.url}/v1/models/{case}:predict",
        json={"instances": _instances(made, x)},
    )
    assert response.status_code == 422, response.text
    name = _schema(made).features[1].name
    assert response.json()["error"].startswith(
        f"row 2: feature {name!r} is missing (null or an unseen category) and this model"
    )
