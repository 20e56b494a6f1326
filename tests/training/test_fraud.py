"""The demo fraud model: trains fast, ranks well, loads in LightGBM, serves its samples."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from interlock._core.schema import FeatureType
from interlock.features.simulator import CATEGORIES, COUNTRIES, FEATURES
from interlock.training import fraud
from interlock.training.fraud import (
    MODEL_FILE,
    TrainedModel,
    average_precision,
    recall_at_fpr,
    roc_auc,
    to_frame,
    train_fraud_model,
)

N = 20_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedModel:
    return train_fraud_model(tmp_path_factory.mktemp("fraud"), n=N, seed=7)


def test_the_model_ranks_fraud_well_but_not_perfectly(trained: TrainedModel) -> None:
    metrics = trained.metrics
    assert 0.85 <= metrics["roc_auc"] <= 0.999
    assert 0.2 <= metrics["pr_auc"] < 1.0
    assert 0.0 < metrics["recall_at_1pct_fpr"] <= 1.0
    assert 0.005 <= metrics["fraud_rate"] <= 0.03
    assert metrics["n_train"] + metrics["n_valid"] + metrics["n_test"] == N
    assert metrics["n_test"] == N // 5
    assert all(isinstance(value, float) for value in metrics.values())


def test_the_model_file_loads_and_carries_the_categories(trained: TrainedModel) -> None:
    assert trained.path.name == MODEL_FILE
    text = trained.path.read_text()
    assert text.startswith("tree")
    line = next(ln for ln in text.splitlines() if ln.startswith("pandas_categorical:"))
    assert json.loads(line.removeprefix("pandas_categorical:")) == [
        list(CATEGORIES),
        list(COUNTRIES),
    ]
    booster = lgb.Booster(model_file=str(trained.path))
    assert booster.feature_name() == [f.name for f in FEATURES]


def test_sample_rows_are_requests_a_client_could_send(trained: TrainedModel) -> None:
    assert len(trained.sample) == len(trained.sample_labels) >= 3
    assert 1 in trained.sample_labels
    assert 0 in trained.sample_labels
    assert json.loads(json.dumps(trained.sample)) == trained.sample
    for row in trained.sample:
        assert list(row) == trained.schema.names
        for feature in trained.schema.features:
            value = row[feature.name]
            if feature.type is FeatureType.CATEGORY:
                assert value in (feature.categories or ())
            elif feature.type is FeatureType.BOOL:
                assert isinstance(value, bool)
            elif feature.type is FeatureType.INT:
                assert isinstance(value, int)
                assert not isinstance(value, bool)
            else:
                assert isinstance(value, float)


def test_the_model_scores_its_samples_with_probabilities(trained: TrainedModel) -> None:
    booster = lgb.Booster(model_file=str(trained.path))
    frame = to_frame(trained.sample)
    scores = np.asarray(booster.predict(frame))
    assert scores.shape == (len(trained.sample),)
    assert np.all((scores >= 0) & (scores <= 1))
    # a category the model never saw is a missing value, not an error
    odd = [{**trained.sample[0], "country": "ZZ"}]
    assert 0 <= booster.predict(to_frame(odd))[0] <= 1


def test_the_schema_records_categories_and_ranges(trained: TrainedModel) -> None:
    schema = trained.schema
    assert schema.names == [f.name for f in FEATURES]
    assert [f.type for f in schema.features] == [f.type for f in FEATURES]
    by_name = {f.name: f for f in schema.features}
    assert by_name["merchant_category"].categories == CATEGORIES
    assert by_name["country"].categories == COUNTRIES
    for feature in schema.features:
        if feature.type in (FeatureType.FLOAT, FeatureType.INT):
            assert feature.minimum is not None
            assert feature.maximum is not None
            assert feature.minimum <= feature.maximum
    assert by_name["hour"].minimum == 0
    assert by_name["hour"].maximum == 23
    assert by_name["tx_count_1h"].minimum == 1


def test_training_is_deterministic(tmp_path: Path) -> None:
    first = train_fraud_model(tmp_path / "a", n=4_000, seed=3)
    second = train_fraud_model(tmp_path / "b", n=4_000, seed=3)
    assert first.path.read_text() == second.path.read_text()
    assert first.sample == second.sample


def test_too_few_rows_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least"):
        train_fraud_model(tmp_path, n=500)


def test_metrics_on_a_known_example() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8])
    assert roc_auc(y, s) == pytest.approx(0.75)
    assert average_precision(y, s) == pytest.approx(0.8333333)
    assert recall_at_fpr(y, s, 0.0) == pytest.approx(0.5)
    assert recall_at_fpr(y, s, 0.5) == pytest.approx(1.0)
    assert np.isnan(roc_auc(np.zeros(3, dtype=np.int64), np.ones(3, dtype=np.float64)))


def test_roc_auc_matches_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.2).astype(np.int64)
    s = np.round(rng.random(300) + 0.3 * y, 1).astype(np.float64)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(y, s) == pytest.approx(pairs)


def test_all_lists_the_public_names() -> None:
    defined = {
        name
        for name, value in vars(fraud).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == fraud.__name__
    }
    assert defined <= set(fraud.__all__)
    assert all(hasattr(fraud, name) for name in fraud.__all__)
