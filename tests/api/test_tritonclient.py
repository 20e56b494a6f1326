"""NVIDIA's own ``tritonclient.http`` against interlock, binary tensors and JSON alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.api.support import register
from tests.conftest import LiveServer
from tests.factories import make_lightgbm


@pytest.fixture
def served(
    tmp_path: Path,
    make_settings: Callable[..., Any],
    server_factory: Callable[[Any], LiveServer],
) -> tuple[triton.InferenceServerClient, Any]:
    settings = make_settings()
    made = make_lightgbm(tmp_path / "m", "multiclass")
    register(settings, "fraud", made.path, "lightgbm", alias="champion")
    server = server_factory(settings)
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    return client, made


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])
def test_infer_equals_the_model(
    served: tuple[triton.InferenceServerClient, Any], binary_in: bool, binary_out: bool | None
) -> None:
    client, made = served
    x = made.rows(32)
    tensor = triton.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x, binary_data=binary_in)
    outputs = (
        None
        if binary_out is None
        else [triton.InferRequestedOutput("predictions", binary_data=binary_out)]
    )
    result = client.infer("fraud", [tensor], outputs=outputs, request_id="req-7")
    got = result.as_numpy("predictions")
    assert got is not None and got.shape == (32, 3)
    np.testing.assert_allclose(got, made.native(x), rtol=0, atol=1e-9)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "req-7"


def test_fp32_inputs_and_pinned_versions(served: tuple[triton.InferenceServerClient, Any]) -> None:
    client, made = served
    x = made.rows(4).astype(np.float32)
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = client.infer("fraud", [tensor], model_version="1").as_numpy("predictions")
    np.testing.assert_allclose(got, made.native(x.astype(np.float64)), rtol=0, atol=1e-9)


def test_health_and_metadata(served: tuple[triton.InferenceServerClient, Any]) -> None:
    client, _made = served
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("fraud")
    assert client.is_model_ready("fraud", model_version="1")
    assert not client.is_model_ready("nope")
    meta = client.get_model_metadata("fraud")
    assert meta["name"] == "fraud" and meta["versions"] == ["1"]
    assert meta["inputs"][0]["shape"] == [-1, 6]
    assert client.get_server_metadata()["name"] == "interlock"


def test_errors_reach_the_client_as_messages(
    served: tuple[triton.InferenceServerClient, Any],
) -> None:
    client, _made = served
    tensor = triton.InferInput("input", [2, 5], "FP64")
    tensor.set_data_from_numpy(np.zeros((2, 5)))
    with pytest.raises(InferenceServerException, match=r"does not match \[N, 6\]"):
        client.infer("fraud", [tensor])
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        client.infer("nope", [tensor])
