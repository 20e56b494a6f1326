"""The transaction simulator: deterministic, well-formed, self-consistent, with fraud patterns."""

from __future__ import annotations

import inspect
import itertools
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from interlock._core.schema import FeatureType
from interlock.features import simulator
from interlock.features.simulator import (
    CATEGORIES,
    COUNTRIES,
    FEATURES,
    Transaction,
    iter_transactions,
    simulate,
)

N = 8_000


@pytest.fixture(scope="module")
def stream() -> list[Transaction]:
    return simulate(N, seed=11)


def _column(rows: list[Transaction], name: str) -> np.ndarray:
    return np.array([float(row[name]) for row in rows])  # type: ignore[literal-required]


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    assert simulate(2_000, seed=3) == simulate(2_000, seed=3)
    assert simulate(2_000, seed=3) != simulate(2_000, seed=4)


def test_the_endless_stream_starts_like_a_finite_one() -> None:
    endless = iter_transactions(seed=5, cards=150)
    assert list(itertools.islice(endless, 1_500)) == simulate(1_500, seed=5, cards=150)


def test_rows_are_well_formed(stream: list[Transaction]) -> None:
    assert len(stream) == N
    assert len({row["transaction_id"] for row in stream}) == N
    for row in stream:
        assert set(row) == Transaction.__required_keys__
        assert row["merchant_category"] in CATEGORIES
        assert row["country"] in COUNTRIES
        assert 0 <= row["hour"] <= 23
        assert row["amount"] > 0
        assert row["card_age_days"] >= 0
        assert row["km_from_home"] >= 0
        assert row["is_fraud"] in (0, 1)
        assert isinstance(row["is_foreign"], bool)


def test_timestamps_are_utc_and_in_order(stream: list[Transaction]) -> None:
    stamps = [row["timestamp"] for row in stream]
    assert all(ts.tzinfo is not None and ts.utcoffset() == timedelta(0) for ts in stamps)
    assert stamps == sorted(stamps)
    assert stamps[0] >= datetime(2025, 1, 6, tzinfo=UTC)
    # about a month of traffic, with a daily cycle: fewer transactions at night
    assert timedelta(days=15) < stamps[-1] - stamps[0] < timedelta(days=45)
    hours = _column(stream, "hour")
    assert np.mean((hours >= 1) & (hours <= 4)) < 0.5 * np.mean((hours >= 17) & (hours <= 20))


def test_start_is_honoured_and_must_be_aware() -> None:
    start = datetime(2030, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    first = simulate(1, start=start)[0]["timestamp"]
    assert first >= start
    assert first.utcoffset() == timedelta(0)
    with pytest.raises(ValueError, match="timezone-aware"):
        simulate(1, start=datetime(2030, 3, 1))


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 10, "cards": 0}, {"n": 10, "fraud_rate": 0.6}])
def test_bad_arguments_are_refused(kwargs: dict[str, int | float]) -> None:
    with pytest.raises(ValueError):
        simulate(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("rate", "low", "high"), [(0.015, 0.01, 0.02), (0.05, 0.04, 0.06)])
def test_fraud_rate_is_near_the_target(rate: float, low: float, high: float) -> None:
    labels = _column(simulate(N, seed=2, fraud_rate=rate), "is_fraud")
    assert low <= labels.mean() <= high


def test_no_fraud_when_the_rate_is_zero() -> None:
    assert not any(row["is_fraud"] for row in simulate(3_000, fraud_rate=0.0))


def test_velocity_features_match_the_stream_itself(stream: list[Transaction]) -> None:
    by_card: dict[str, list[Transaction]] = defaultdict(list)
    for row in stream:
        by_card[row["card_id"]].append(row)
    for rows in by_card.values():
        for i, row in enumerate(rows):
            now = row["timestamp"]
            day = [r for r in rows[: i + 1] if r["timestamp"] > now - timedelta(hours=24)]
            hour = [r for r in day if r["timestamp"] > now - timedelta(hours=1)]
            assert row["tx_count_1h"] == len(hour)
            assert row["tx_count_24h"] == len(day)
            assert row["amount_sum_24h"] == pytest.approx(sum(r["amount"] for r in day), abs=0.01)
            assert row["distinct_merchants_24h"] == len({r["merchant_id"] for r in day})


def test_card_age_and_home_country_are_stable_per_card(stream: list[Transaction]) -> None:
    by_card: dict[str, list[Transaction]] = defaultdict(list)
    for row in stream:
        by_card[row["card_id"]].append(row)
    for rows in by_card.values():
        ages = [r["card_age_days"] for r in rows]
        assert ages == sorted(ages)
        homes = {r["country"] for r in rows if not r["is_foreign"]}
        assert len(homes) <= 1


def test_fraud_follows_known_patterns(stream: list[Transaction]) -> None:
    fraud = np.array([row["is_fraud"] == 1 for row in stream])
    count_1h = _column(stream, "tx_count_1h")
    foreign = _column(stream, "is_foreign")
    age = _column(stream, "card_age_days")
    amount = _column(stream, "amount")
    hour = _column(stream, "hour")
    assert count_1h[fraud].mean() > 1.5 * count_1h[~fraud].mean()
    assert foreign[fraud].mean() > 3 * foreign[~fraud].mean()
    assert np.mean(age[fraud] <= 5) > 5 * np.mean(age[~fraud] <= 5)
    # account takeover: abroad, expensive goods or cash, more often at night
    takeover = np.array([row["merchant_category"] != "digital_goods" for row in stream])
    takeover &= foreign == 1
    assert np.median(amount[fraud & takeover]) > 2 * np.median(amount[~fraud & takeover])
    assert np.mean(hour[fraud & takeover] < 6) > 2 * np.mean(hour[~fraud] < 6)
    # card testing: five or more small digital charges on one card within ten minutes
    testing = [
        row
        for row in stream
        if row["is_fraud"] and row["merchant_category"] == "digital_goods" and row["amount"] <= 5
    ]
    by_card: dict[str, list[datetime]] = defaultdict(list)
    for row in testing:
        by_card[row["card_id"]].append(row["timestamp"])
    assert any(
        times[i + 4] - times[i] <= timedelta(minutes=10)
        for times in by_card.values()
        for i in range(len(times) - 4)
    )


def test_legitimate_traffic_overlaps_the_fraud_patterns(stream: list[Transaction]) -> None:
    fraud = np.array([row["is_fraud"] == 1 for row in stream])
    count_1h = _column(stream, "tx_count_1h")
    foreign = _column(stream, "is_foreign")
    age = _column(stream, "card_age_days")
    assert np.sum(~fraud & (count_1h >= 4)) > 20
    assert np.sum(~fraud & (foreign == 1)) > 100
    assert np.sum(~fraud & (age <= 5)) > 10
    assert np.sum(fraud & (count_1h == 1) & (foreign == 0)) > 5


def test_features_name_model_inputs_only() -> None:
    names = [f.name for f in FEATURES]
    assert len(set(names)) == len(names)
    assert set(names) <= Transaction.__required_keys__
    assert not {"transaction_id", "card_id", "merchant_id", "timestamp", "is_fraud"} & set(names)
    kinds = {f.name: f.type for f in FEATURES}
    assert kinds["merchant_category"] is FeatureType.CATEGORY
    assert kinds["is_foreign"] is FeatureType.BOOL
    assert kinds["tx_count_1h"] is FeatureType.INT
    assert kinds["amount"] is FeatureType.FLOAT
    cats = {f.name: f.categories for f in FEATURES if f.categories}
    assert cats == {"merchant_category": CATEGORIES, "country": COUNTRIES}


def test_all_lists_the_public_names() -> None:
    defined = {
        name
        for name, value in vars(simulator).items()
        if not name.startswith("_")
        and (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == simulator.__name__
    }
    assert defined <= set(simulator.__all__)
    assert all(hasattr(simulator, name) for name in simulator.__all__)
