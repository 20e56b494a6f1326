"""Request decoding against a schema: every error names the row and the feature."""

from __future__ import annotations

import math

import numpy as np
import pytest

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.errors import FeatureError, MalformedInputError
from interlock.serving.decode import Decoder, Tensor

SCHEMA = FeatureSchema.of(
    [
        Feature("amount"),
        Feature("count", FeatureType.INT),
        Feature("foreign", FeatureType.BOOL),
        Feature("mcc", FeatureType.CATEGORY, categories=("grocery", "travel")),
    ]
)


def matrix(decoder: Decoder, rows: object) -> list[list[float]]:
    batch, n = decoder.rows(rows)
    assert n == len(batch)
    return [[v if not math.isnan(v) else -999.0 for v in row] for row in batch.tolist()]


def test_objects_and_lists_become_the_same_matrix_in_schema_order() -> None:
    decoder = Decoder(SCHEMA, takes_rows=False)
    as_objects = [{"mcc": "travel", "foreign": True, "count": 3, "amount": 12.5}]
    as_lists = [[12.5, 3, True, "travel"]]
    assert matrix(decoder, as_objects) == matrix(decoder, as_lists) == [[12.5, 3.0, 1.0, 1.0]]


def test_null_is_missing_and_an_unseen_category_is_missing() -> None:
    decoder = Decoder(SCHEMA, takes_rows=False)
    rows = [{"amount": None, "count": None, "foreign": False, "mcc": "casino"}]
    assert matrix(decoder, rows) == [[-999.0, -999.0, 0.0, -999.0]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"amount": 1.0, "count": 1, "foreign": True}], "row 0: feature 'mcc' is missing"),
        (
            [{"amount": 1.0, "count": 1, "foreign": True, "mcc": "travel", "x": 1}],
            "row 0: unexpected feature 'x'",
        ),
        (
            [
                {"amount": 1.0, "count": 1, "foreign": True, "mcc": "travel"},
                {"amount": "12", "count": 1, "foreign": True, "mcc": "travel"},
            ],
            "row 1: feature 'amount' must be a number, got string",
        ),
        (
            [{"amount": 1.0, "count": 1.5, "foreign": True, "mcc": "travel"}],
            "row 0: feature 'count' must be an integer, got number",
        ),
        (
            [{"amount": True, "count": 1, "foreign": True, "mcc": "travel"}],
            "row 0: feature 'amount' must be a number, got boolean",
        ),
        (
            [{"amount": 1.0, "count": 1, "foreign": "yes", "mcc": "travel"}],
            "row 0: feature 'foreign' must be true or false, got string",
        ),
        (
            [{"amount": 1.0, "count": 1, "foreign": True, "mcc": 3}],
            "row 0: feature 'mcc' must be a string, got number",
        ),
        ([[1.0, 2, True]], "row 0: has 3 values; the model takes 4"),
    ],
)
def test_bad_rows_name_the_row_and_the_feature(rows: object, message: str) -> None:
    with pytest.raises(FeatureError) as caught:
        Decoder(SCHEMA, takes_rows=False).rows(rows)
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("instances", [None, [], {}, "x", [1]])
def test_instances_must_be_a_list_of_rows(instances: object) -> None:
    with pytest.raises(MalformedInputError):
        Decoder(SCHEMA, takes_rows=False).rows(instances)


def test_row_models_get_the_rows_they_were_sent() -> None:
    decoder = Decoder(SCHEMA, takes_rows=True)
    batch, n = decoder.rows([[1.5, 2, False, "grocery"]])
    assert n == 1
    assert batch == [{"amount": 1.5, "count": 2, "foreign": False, "mcc": "grocery"}]


def test_one_matrix_tensor_or_one_tensor_per_feature() -> None:
    decoder = Decoder(SCHEMA, takes_rows=False)
    data = np.array([[1.0, 2.0, 1.0, 0.0], [3.0, 4.0, 0.0, 1.0]], dtype=np.float32)
    whole, n = decoder.tensors([Tensor("input", "FP32", (2, 4), data)])
    assert n == 2
    per_feature, _ = decoder.tensors(
        [
            Tensor("mcc", "BYTES", (2,), np.array([b"grocery", b"travel"], dtype=object)),
            Tensor("amount", "FP64", (2,), np.array([1.0, 3.0])),
            Tensor("count", "INT64", (2,), np.array([2, 4])),
            Tensor("foreign", "BOOL", (2,), np.array([True, False])),
        ]
    )
    assert whole.tolist() == per_feature.tolist()


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([Tensor("input", "FP32", (2, 3), np.zeros((2, 3)))], "shape [2, 3] does not match [N, 4]"),
        (
            [Tensor("input", "FP32", (1, 4), np.array([[1.0, 2.5, 1.0, 0.0]]))],
            "row 0: feature 'count' must be an integer",
        ),
        (
            [Tensor("input", "FP32", (1, 4), np.array([[1.0, 2.0, 3.0, 0.0]]))],
            "row 0: feature 'foreign' must be 0 or 1",
        ),
        (
            [
                Tensor("amount", "FP64", (1,), np.array([1.0])),
                Tensor("count", "INT64", (1,), np.array([1])),
                Tensor("foreign", "BOOL", (1,), np.array([True])),
            ],
            "input for feature 'mcc' is missing",
        ),
    ],
)
def test_bad_tensors_say_what_is_wrong(tensors: list[Tensor], message: str) -> None:
    with pytest.raises(FeatureError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Decoder(SCHEMA, takes_rows=False).tensors(tensors)
