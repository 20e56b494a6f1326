"""Open Inference Protocol (V2) bodies: JSON, and Triton's binary tensor extension.

With the binary extension (what ``tritonclient`` sends by default) the body is a JSON
header of ``Inference-Header-Content-Length`` bytes followed by the raw tensors whose
``parameters.binary_data_size`` says how many bytes each takes, in input order. Answers
come back binary when the request asks for it (``binary_data`` on the output, or
``binary_data_output`` on the request).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from interlock.errors import FeatureError, MalformedInputError
from interlock.serving.decode import Tensor

__all__ = ["OUTPUT_NAME", "V2Request", "encode_response", "parse_request"]

OUTPUT_NAME = "predictions"

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


@dataclass(frozen=True, slots=True)
class V2Request:
    id: str | None
    inputs: list[Tensor]
    binary_output: bool


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedInputError(f"the body is not valid JSON: {exc}") from None


def _shape(name: str, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(type(d) is int and d >= 0 for d in raw):
        raise MalformedInputError(
            f"input {name!r}: 'shape' must be a list of non-negative integers"
        )
    return tuple(raw)


def _bytes_elements(name: str, buf: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos = 0
    while pos < len(buf):
        if pos + 4 > len(buf):
            raise MalformedInputError(f"input {name!r}: truncated BYTES element")
        (size,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if pos + size > len(buf):
            raise MalformedInputError(f"input {name!r}: truncated BYTES element")
        out.append(buf[pos : pos + size])
        pos += size
    return out


def _tensor(spec: Any, binary: memoryview | None, offset: int) -> tuple[Tensor, int]:
    if not isinstance(spec, dict):
        raise MalformedInputError("each entry of 'inputs' must be an object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise MalformedInputError("every input needs a 'name'")
    datatype = spec.get("datatype")
    if datatype != "BYTES" and datatype not in _DTYPES:
        raise MalformedInputError(f"input {name!r}: unsupported datatype {datatype!r}")
    shape = _shape(name, spec.get("shape"))
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    data: npt.NDArray[Any]
    if size is not None:
        if binary is None or type(size) is not int or offset + size > len(binary):
            raise MalformedInputError(f"input {name!r}: binary_data_size exceeds the body")
        chunk = binary[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            data = np.array(_bytes_elements(name, bytes(chunk)), dtype=object)
        else:
            dtype = _DTYPES[datatype]
            if size != count * dtype.itemsize:
                raise MalformedInputError(
                    f"input {name!r}: {size} bytes do not hold {count} {datatype} values"
                )
            data = np.frombuffer(chunk, dtype=dtype)
    else:
        raw = spec.get("data")
        if raw is None:
            raise MalformedInputError(f"input {name!r}: 'data' is missing")
        try:
            if datatype == "BYTES":
                data = np.array(raw, dtype=object).reshape(-1)
            else:
                inferred = np.asarray(raw)
                if inferred.dtype.kind not in "biuf" or (
                    datatype != "BOOL" and any(type(v) is bool for v in _flat_sample(raw))
                ):
                    raise ValueError("not numbers")
                data = inferred.astype(_DTYPES[datatype], copy=False).reshape(-1)
        except (ValueError, TypeError, OverflowError):
            raise FeatureError(
                f"input {name!r}: 'data' does not hold {datatype} values", feature=name
            ) from None
    if data.size != count:
        raise MalformedInputError(
            f"input {name!r}: shape {list(shape)} needs {count} values, got {data.size}"
        )
    return Tensor(name, datatype, shape, data.reshape(shape)), offset


def _flat_sample(raw: Any) -> list[Any]:
    """The first few scalars of a (nested) JSON list, enough to catch booleans cheaply."""
    while isinstance(raw, list) and raw and isinstance(raw[0], list):
        raw = raw[0]
    return raw[:8] if isinstance(raw, list) else [raw]


def parse_request(body: bytes, header_length: int | None) -> V2Request:
    """Parse a V2 inference request body (plain JSON, or JSON header + binary tensors)."""
    binary: memoryview | None = None
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise MalformedInputError("Inference-Header-Content-Length exceeds the body")
        binary = memoryview(body)[header_length:]
        body = body[:header_length]
    doc = _loads(body)
    if not isinstance(doc, dict):
        raise MalformedInputError("the body must be a JSON object with 'inputs'")
    inputs_raw = doc.get("inputs")
    if not isinstance(inputs_raw, list) or not inputs_raw:
        raise MalformedInputError("'inputs' must be a non-empty list of tensors")
    inputs: list[Tensor] = []
    offset = 0
    for spec in inputs_raw:
        tensor, offset = _tensor(spec, binary, offset)
        inputs.append(tensor)
    request_id = doc.get("id")
    params = doc.get("parameters")
    binary_output = bool(isinstance(params, dict) and params.get("binary_data_output"))
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise MalformedInputError("'outputs' must be a list")
        for out in outputs:
            name = out.get("name") if isinstance(out, dict) else None
            if name != OUTPUT_NAME:
                raise MalformedInputError(
                    f"unknown output {name!r}; this model has one output: {OUTPUT_NAME!r}"
                )
            out_params = out.get("parameters")
            binary_output = bool(isinstance(out_params, dict) and out_params.get("binary_data"))
    return V2Request(
        id=request_id if isinstance(request_id, str) else None,
        inputs=inputs,
        binary_output=binary_output,
    )


def _result_tensor(values: list[Any]) -> tuple[str, list[int], npt.NDArray[Any]]:
    first = values[0] if values else 0.0
    try:
        if isinstance(first, list):
            array = np.asarray(values, dtype=np.float64)
            return "FP64", list(array.shape), array
        if all(type(v) is bool for v in values):
            return "BOOL", [len(values)], np.asarray(values, dtype=bool)
        if all(type(v) is int for v in values):
            return "INT64", [len(values)], np.asarray(values, dtype=np.int64)
        if all(type(v) in (int, float) for v in values):
            return "FP64", [len(values)], np.asarray(values, dtype=np.float64)
    except (ValueError, OverflowError):
        pass
    texts = [v if isinstance(v, str) else orjson.dumps(v).decode() for v in values]
    return "BYTES", [len(values)], np.array(texts, dtype=object)


def encode_response(
    model: str, version: int, request: V2Request, values: list[Any], *, degraded: bool = False
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when the answer is binary."""
    datatype, shape, array = _result_tensor(values)
    head: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        head["id"] = request.id
    if degraded:
        head["parameters"] = {"degraded": True}
    output: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": datatype, "shape": shape}
    if not request.binary_output:
        output["data"] = array.reshape(-1).tolist()
        head["outputs"] = [output]
        return orjson.dumps(head), None
    if datatype == "BYTES":
        raw = b"".join(struct.pack("<I", len(b)) + b for b in (t.encode() for t in array.tolist()))
    else:
        raw = np.ascontiguousarray(array).tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    head["outputs"] = [output]
    header = orjson.dumps(head)
    return header + raw, len(header)
