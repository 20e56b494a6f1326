"""Train the demo fraud model: LightGBM on the simulated card-transaction stream.

:func:`train_fraud_model` simulates a stream (:mod:`interlock.features.simulator`),
splits it by time (the oldest 68% to train, the next 12% to stop early, the newest 20%
to measure), trains a binary LightGBM model on a pandas frame whose categorical
columns are ``category`` dtype, and saves it in LightGBM's text format. The saved model
carries ``pandas_categorical``, the category lists that map the strings a client sends
to the codes the trees split on.

Class imbalance is handled by weighting fraud by the square root of the class ratio:
it helps the trees find the rare class without pushing every score up as full
rebalancing would. Scores still rank rather than estimate a calibrated probability.

LightGBM runs on one native thread: on data this small a second thread gains little
alone and costs several times over when the machine's cores are busy.

The metrics are computed with numpy on the time-ordered holdout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped, unused-ignore]

from interlock._core.schema import Feature, FeatureSchema, FeatureType
from interlock.features.simulator import FEATURES, Transaction, simulate

__all__ = [
    "MODEL_FILE",
    "TrainedModel",
    "average_precision",
    "payload",
    "recall_at_fpr",
    "roc_auc",
    "to_frame",
    "train_fraud_model",
]

MODEL_FILE = "fraud-lightgbm.txt"
_SAMPLE_FRAUD, _SAMPLE_LEGIT = 2, 3

_Scores = npt.NDArray[np.float64]
_Labels = npt.NDArray[np.int64]
_Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class TrainedModel:
    """A trained fraud model: its file, its schema, how it did, example requests."""

    path: Path
    """The LightGBM text model file."""
    schema: FeatureSchema
    """Features in model order, with categories and the ranges training saw."""
    metrics: dict[str, float]
    """On the holdout: ``roc_auc``, ``pr_auc`` (average precision), ``recall_at_1pct_fpr``,
    ``fraud_rate``; and ``n_train``, ``n_valid`` (early stopping), ``n_test``,
    ``best_iteration``, ``train_seconds`` (simulation included)."""
    sample: list[dict[str, _Scalar]] = field(default_factory=list)
    """Holdout rows as request payloads (feature name to JSON value): the fraud scored
    highest first, then legitimate rows."""
    sample_labels: list[int] = field(default_factory=list)
    """The true label of each ``sample`` row."""


def train_fraud_model(out_dir: Path, *, n: int = 40_000, seed: int = 7) -> TrainedModel:
    """Simulate ``n`` transactions, train on the older ones, measure on the newest.

    Writes :data:`MODEL_FILE` into ``out_dir`` (created if missing). Blocking and
    CPU-bound (one native thread): call it from a worker thread or process.
    """
    if n < 2_000:
        raise ValueError("n must be at least 2000 for a meaningful time split")
    began = time.perf_counter()
    rows = simulate(n, seed=seed)
    frame = to_frame(rows)
    labels = np.array([row["is_fraud"] for row in rows], dtype=np.int64)
    n_test = n // 5
    n_fit = n - n_test
    n_valid = (n_fit * 3) // 20
    fit, valid, test = slice(0, n_fit - n_valid), slice(n_fit - n_valid, n_fit), slice(n_fit, n)
    positives = max(1, int(labels[fit].sum()))
    params = {
        "objective": "binary",
        "learning_rate": 0.05,
        "num_leaves": 31,
        "min_data_in_leaf": 40,
        "min_data_per_group": 50,
        "cat_smooth": 10.0,
        "feature_fraction": 0.9,
        "bagging_fraction": 0.8,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "scale_pos_weight": math.sqrt((len(labels[fit]) - positives) / positives),
        "metric": ["binary_logloss", "average_precision", "auc"],
        "first_metric_only": True,
        "num_threads": 1,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "verbosity": -1,
    }
    train_set = lgb.Dataset(frame.iloc[fit], label=labels[fit], free_raw_data=False)
    valid_set = lgb.Dataset(frame.iloc[valid], label=labels[valid], reference=train_set)
    booster = lgb.train(
        params,
        train_set,
        num_boost_round=500,
        valid_sets=[valid_set],
        callbacks=[lgb.early_stopping(50, first_metric_only=True, verbose=False)],
    )
    best = int(booster.best_iteration) or int(booster.current_iteration())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    booster.save_model(str(path), num_iteration=best)

    scores = np.asarray(booster.predict(frame.iloc[test], num_iteration=best), dtype=np.float64)
    y_test = labels[test]
    metrics = {
        "roc_auc": roc_auc(y_test, scores),
        "pr_auc": average_precision(y_test, scores),
        "recall_at_1pct_fpr": recall_at_fpr(y_test, scores, 0.01),
        "fraud_rate": float(y_test.mean()),
        "n_train": float(n_fit - n_valid),
        "n_valid": float(n_valid),
        "n_test": float(n_test),
        "best_iteration": float(best),
        "train_seconds": round(time.perf_counter() - began, 3),
    }
    picked = _pick_sample(rows[n_fit:], scores)
    return TrainedModel(
        path=path,
        schema=_schema(frame.iloc[: n_fit - n_valid]),
        metrics=metrics,
        sample=[payload(r) for r in picked],
        sample_labels=[r["is_fraud"] for r in picked],
    )


def to_frame(rows: list[Transaction] | list[dict[str, _Scalar]]) -> pd.DataFrame:
    """The model's input frame: :data:`FEATURES` columns, categories as ``category`` dtype.

    Each categorical column gets the simulator's full category list, in that order, so
    codes match the model's ``pandas_categorical`` whatever values the rows hold; a value
    outside the list becomes a missing value, as in serving.
    """
    columns: dict[str, pd.Series] = {}
    for feature in FEATURES:
        values = [row[feature.name] for row in rows]  # type: ignore[literal-required]
        if feature.categories is not None:
            known = set(feature.categories)
            values = [value if value in known else None for value in values]
        columns[feature.name] = pd.Series(values, dtype=_dtype(feature))
    return pd.DataFrame(columns)


def payload(row: Transaction) -> dict[str, _Scalar]:
    """The request a client would send for ``row``: feature name to JSON-safe value."""
    out: dict[str, _Scalar] = {}
    for feature in FEATURES:
        value = row[feature.name]  # type: ignore[literal-required]
        if feature.type is FeatureType.BOOL:
            out[feature.name] = bool(value)
        elif feature.type is FeatureType.INT:
            out[feature.name] = int(value)
        elif feature.type is FeatureType.FLOAT:
            out[feature.name] = float(value)
        else:
            out[feature.name] = str(value)
    return out


def _pick_sample(held_out: list[Transaction], scores: _Scores) -> list[Transaction]:
    """The fraud the model is surest of (one per category), then ordinary legit rows."""
    fraud: dict[str, Transaction] = {}
    for i in np.argsort(-scores, kind="stable"):
        row = held_out[i]
        if row["is_fraud"] and len(fraud) < _SAMPLE_FRAUD:
            fraud.setdefault(row["merchant_category"], row)
    legit = [row for row in held_out if not row["is_fraud"]][:_SAMPLE_LEGIT]
    return [*fraud.values(), *legit]


def _dtype(feature: Feature) -> object:
    if feature.type is FeatureType.CATEGORY:
        return pd.CategoricalDtype(categories=list(feature.categories or ()))
    return {FeatureType.FLOAT: "float64", FeatureType.INT: "int64", FeatureType.BOOL: "bool"}[
        feature.type
    ]


def _schema(train: pd.DataFrame) -> FeatureSchema:
    """:data:`FEATURES` with the value ranges seen in ``train``."""
    out = []
    for feature in FEATURES:
        if feature.type in (FeatureType.FLOAT, FeatureType.INT):
            column = train[feature.name]
            low, high = float(column.min()), float(column.max())
            out.append(Feature(feature.name, feature.type, minimum=low, maximum=high))
        else:
            out.append(feature)
    return FeatureSchema.of(out)


def _curve(y_true: _Labels, score: _Scores) -> tuple[_Scores, _Scores]:
    """False and true positives at each distinct score threshold, highest first."""
    order = np.argsort(-score, kind="mergesort")
    y, s = y_true[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last].astype(np.float64)
    return (last + 1) - tps, tps


def roc_auc(y_true: _Labels, score: _Scores) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes."""
    fps, tps = _curve(y_true, score)
    if len(tps) == 0 or tps[-1] == 0 or fps[-1] == 0:
        return math.nan
    fpr, tpr = np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def average_precision(y_true: _Labels, score: _Scores) -> float:
    """Average precision: precision summed over recall steps; NaN without positives."""
    fps, tps = _curve(y_true, score)
    if len(tps) == 0 or tps[-1] == 0:
        return math.nan
    recall = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(recall) * tps / (tps + fps)))


def recall_at_fpr(y_true: _Labels, score: _Scores, max_fpr: float) -> float:
    """The highest recall at a threshold whose false-positive rate is at most ``max_fpr``."""
    fps, tps = _curve(y_true, score)
    if len(tps) == 0 or tps[-1] == 0 or fps[-1] == 0:
        return math.nan
    ok = fps / fps[-1] <= max_fpr
    return float((tps[ok] / tps[-1]).max()) if ok.any() else 0.0
