"""A deterministic stream of card transactions, with labelled fraud.

The stream is what a card processor sees: cards with a home country, a spending level
and favourite merchants buy through the day (a local daily cycle, amounts log-normal
per merchant category), sometimes travel abroad, sometimes buy in short sprees. Into
it the simulator weaves fraud with the patterns fraud teams know:

- *card testing*: a burst of small ``digital_goods`` charges on one card within
  minutes, now and then followed by one large purchase;
- *account takeover*: a card suddenly used far abroad, often at night, for
  electronics, jewellery, travel or cash at high amounts;
- *new-card bust-out*: a card days old with many risky purchases within the hour;
- *stealth*: one or two ordinary-looking charges near home, which no model can tell apart.

Legitimate traffic overlaps every pattern (trips, in-app purchase bursts, shopping
sprees, new cards, night owls), so a good model ranks well but not perfectly.

The velocity features are computed from the stream itself: for a transaction at
time *t* they cover the same card's transactions in this stream with a timestamp in
``(t - window, t]``, the transaction itself included. A windowed aggregation over the
emitted stream reproduces them exactly. The same arguments always give the same stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import TypedDict

import numpy as np
import numpy.typing as npt

from interlock._core.schema import Feature, FeatureType

__all__ = ["CATEGORIES", "COUNTRIES", "FEATURES", "Transaction", "iter_transactions", "simulate"]

_Floats = npt.NDArray[np.float64]
_Ints = npt.NDArray[np.int64]

CATEGORIES = (
    "grocery", "fuel", "restaurants", "travel", "electronics",
    "digital_goods", "gambling", "jewelry", "atm", "pharmacy",
)  # fmt: skip
(_GROCERY, _FUEL, _RESTAURANTS, _TRAVEL, _ELECTRONICS,
 _DIGITAL, _GAMBLING, _JEWELRY, _ATM, _PHARMACY) = range(10)  # fmt: skip
_MEDIAN = np.array([35.0, 45.0, 28.0, 260.0, 140.0, 12.0, 40.0, 220.0, 80.0, 18.0])
_SIGMA = np.array([0.7, 0.4, 0.7, 0.9, 0.9, 0.9, 1.1, 0.9, 0.6, 0.7])
# Category mix by situation: night (0-5 h local), day, evening (18-23 h), abroad.
_MIX = np.array([
    [6, 10, 14, 3, 3, 34, 12, 0.3, 12, 3], [25, 13, 14, 4, 5, 11, 2, 1, 10, 9],
    [18, 8, 28, 3, 4, 17, 5, 0.5, 8, 4], [12, 7, 30, 17, 4, 4, 3, 2, 17, 4],
])  # fmt: skip
_MIX_CUM = np.cumsum(_MIX / _MIX.sum(axis=1, keepdims=True), axis=1)
_SITUATION = np.array([0] * 6 + [1] * 12 + [2] * 6)
# Relative activity per local hour.
_CYCLE = np.array([
    0.15, 0.08, 0.05, 0.04, 0.05, 0.1, 0.3, 0.6, 0.9, 1.0, 1.05, 1.15,
    1.35, 1.25, 1.05, 1.0, 1.05, 1.2, 1.4, 1.45, 1.25, 0.95, 0.6, 0.3,
])  # fmt: skip
_ACCEPT = _CYCLE / _CYCLE.max()

# code, latitude, longitude, UTC offset (s), weight as home, as trip, as fraud origin
_COUNTRY_TABLE = [
    ("US", 39.8, -98.6, -6 * 3600, 30, 12, 10), ("GB", 54.0, -2.0, 0, 12, 8, 6),
    ("DE", 51.2, 10.4, 3600, 12, 6, 4), ("FR", 46.6, 2.2, 3600, 9, 12, 4),
    ("ES", 40.4, -3.7, 3600, 6, 12, 3), ("IT", 42.8, 12.5, 3600, 6, 10, 3),
    ("NL", 52.1, 5.3, 3600, 4, 4, 4), ("IE", 53.4, -8.2, 0, 2, 3, 3),
    ("CA", 56.1, -106.3, -6 * 3600, 5, 4, 3), ("MX", 23.6, -102.5, -6 * 3600, 3, 6, 5),
    ("BR", -14.2, -51.9, -3 * 3600, 4, 3, 10), ("IN", 20.6, 79.0, 19_800, 4, 3, 8),
    ("TH", 15.9, 100.9, 7 * 3600, 0, 7, 7), ("AE", 23.4, 53.8, 4 * 3600, 0, 5, 6),
    ("NG", 9.1, 8.7, 3600, 1, 0, 10), ("RU", 61.5, 105.3, 3 * 3600, 1, 1, 8),
    ("LU", 49.8, 6.1, 3600, 1, 0, 3),
]  # fmt: skip
COUNTRIES = tuple(row[0] for row in _COUNTRY_TABLE)
_LAT = np.array([row[1] for row in _COUNTRY_TABLE])
_LON = np.array([row[2] for row in _COUNTRY_TABLE])
_OFFSET_S = np.array([row[3] for row in _COUNTRY_TABLE], dtype=np.int64)
_WEIGHTS = np.array([row[4:] for row in _COUNTRY_TABLE], dtype=np.float64)
_HOME_P, _TRIP_P, _FRAUD_P = _WEIGHTS.T / _WEIGHTS.sum(axis=0)[:, None]
_ONLINE = np.array([COUNTRIES.index(c) for c in ("IE", "LU", "NL", "US", "GB")])

_DAY_S, _US = 86_400, 1_000_000
_HOUR_US, _DAY_US = 3_600 * _US, _DAY_S * _US
_MERCHANTS = 400  # per category
_TX_PER_CARD_DAY = 1.0
# Fraud episodes (card testing, takeover, bust-out, stealth): probability, mean length.
_EPISODES = ((0.3, 7.35), (0.25, 3.0), (0.15, 6.0), (0.3, 1.6))
_TAKEOVER_MIX = ([_ELECTRONICS, _JEWELRY, _ATM, _TRAVEL, _GAMBLING], [0.4, 0.25, 0.15, 0.1, 0.1])
_BUST_OUT_MIX = ([_ELECTRONICS, _DIGITAL, _GAMBLING, _JEWELRY, _ATM], [0.35, 0.25, 0.2, 0.1, 0.1])
_EPISODE_P = np.array([p for p, _ in _EPISODES])
_EPISODE_LEN = sum(p * length for p, length in _EPISODES)
_DEFAULT_START = datetime(2025, 1, 6, tzinfo=UTC)

FEATURES: tuple[Feature, ...] = (
    Feature("amount", FeatureType.FLOAT, minimum=0.0),
    Feature("merchant_category", FeatureType.CATEGORY, categories=CATEGORIES),
    Feature("country", FeatureType.CATEGORY, categories=COUNTRIES),
    Feature("hour", FeatureType.INT, minimum=0.0, maximum=23.0),
    Feature("card_age_days", FeatureType.INT, minimum=0.0),
    Feature("tx_count_1h", FeatureType.INT, minimum=1.0),
    Feature("tx_count_24h", FeatureType.INT, minimum=1.0),
    Feature("amount_sum_24h", FeatureType.FLOAT, minimum=0.0),
    Feature("distinct_merchants_24h", FeatureType.INT, minimum=1.0),
    Feature("km_from_home", FeatureType.FLOAT, minimum=0.0),
    Feature("is_foreign", FeatureType.BOOL),
)
"""The model's features, in order: every field but ids, timestamp and label."""


class Transaction(TypedDict):
    """One card transaction as the stream carries it."""

    transaction_id: str
    card_id: str
    merchant_id: str
    timestamp: datetime  # UTC
    amount: float
    merchant_category: str
    country: str  # ISO 3166-1 alpha-2, where the merchant is
    hour: int  # local hour in ``country``
    card_age_days: int
    tx_count_1h: int
    tx_count_24h: int
    amount_sum_24h: float
    distinct_merchants_24h: int
    km_from_home: float
    is_foreign: bool
    is_fraud: int


# (time s, card, category, amount, country, lat, lon, merchant, fraud) of one event
_Event = tuple[float, int, int, float, int, float, float, int, int]


@dataclass(slots=True)
class _Cards:
    """Per-card state as parallel arrays, indexed by card number."""

    home: _Ints
    lat: _Floats
    lon: _Floats
    issued_s: _Floats
    weight: _Floats  # legitimate activity; 0 for cards only fraudsters use
    spend: _Floats
    away_until_s: _Floats
    away_to: _Ints

    @classmethod
    def new(cls, rng: np.random.Generator, count: int, issued_s: _Floats, legit: bool) -> _Cards:
        home = rng.choice(len(COUNTRIES), size=count, p=_HOME_P)
        weight = rng.lognormal(-0.32, 0.8, count) if legit else np.zeros(count)
        return cls(
            home=home,
            lat=_LAT[home] + rng.normal(0.0, 2.5, count),
            lon=_LON[home] + rng.normal(0.0, 4.0, count),
            issued_s=issued_s,
            weight=weight,
            spend=rng.lognormal(0.0, 0.35, count),
            away_until_s=np.full(count, -np.inf),
            away_to=home.copy(),
        )

    def extend(self, other: _Cards) -> range:
        first = len(self.home)
        for f in fields(self):
            setattr(self, f.name, np.concatenate([getattr(self, f.name), getattr(other, f.name)]))
        return range(first, len(self.home))


class _Simulator:
    """Makes one simulated day of events at a time, fraud and spill-over included."""

    def __init__(self, rng: np.random.Generator, cards: int, fraud_rate: float) -> None:
        self.rng = rng
        self.base_cards = cards
        self.fraud_odds = fraud_rate / (1.0 - fraud_rate)
        ages = np.where(
            rng.random(cards) < 0.06, rng.uniform(0, 30, cards), rng.lognormal(6.3, 0.8, cards)
        )
        self.cards = _Cards.new(rng, cards, -ages * _DAY_S, legit=True)
        self.pending: list[_Event] = []
        self.legit_total = 0
        self.fraud_total = 0

    def day(self, start_s: float) -> list[_Floats]:
        """Columns of all events in ``[start_s, start_s + 1 day)``, sorted by time."""
        rng, end_s = self.rng, start_s + _DAY_S
        issued = rng.poisson(0.002 * self.base_cards)
        self.cards.extend(_Cards.new(rng, issued, start_s - rng.uniform(0, _DAY_S, issued), True))
        self._trips(start_s)
        legit = self._legit(start_s)
        self.legit_total += len(legit[0]) + self._sprees(legit)
        self._fraud(start_s)
        now = [e for e in self.pending if e[0] < end_s]
        self.pending = [e for e in self.pending if e[0] >= end_s]
        extra = np.array(now, dtype=np.float64).reshape(-1, 9).T
        cols = [np.concatenate([a, b]) for a, b in zip(legit, extra, strict=True)]
        order = np.argsort(cols[0], kind="stable")
        return [c[order] for c in cols]

    def _trips(self, start_s: float) -> None:
        """Send some cards abroad for a few days: their owners travel."""
        cards, rng = self.cards, self.rng
        leave = (
            (cards.weight > 0)
            & (cards.away_until_s <= start_s)
            & (rng.random(len(cards.home)) < 0.006)
        )
        idx = np.flatnonzero(leave)
        dest = rng.choice(len(COUNTRIES), size=len(idx), p=_TRIP_P)
        dest = np.where(dest == cards.home[idx], (dest + 1) % len(COUNTRIES), dest)
        cards.away_to[idx] = dest
        cards.away_until_s[idx] = start_s + _DAY_S * (2 + rng.poisson(4, len(idx)))

    def _legit(self, start_s: float) -> list[_Floats]:
        """The day's ordinary purchases as columns (a Poisson process, thinned by hour)."""
        rng, cards = self.rng, self.cards
        p = cards.weight / cards.weight.sum()
        total = rng.poisson(cards.weight.sum() * _TX_PER_CARD_DAY / _ACCEPT.mean())
        card = rng.choice(len(p), size=total, p=p)
        t = start_s + rng.uniform(0, _DAY_S, total)
        away = (cards.away_until_s[card] > t) & (rng.random(total) < 0.85)
        country = np.where(away, cards.away_to[card], cards.home[card])
        hour = ((t.astype(np.int64) + _OFFSET_S[country]) % _DAY_S) // 3600
        keep = rng.random(total) < _ACCEPT[hour]
        card, t, away, country, hour = card[keep], t[keep], away[keep], country[keep], hour[keep]
        size = len(card)
        situation = np.where(away, 3, _SITUATION[hour])
        cat = (rng.random(size)[:, None] > _MIX_CUM[situation]).sum(axis=1).clip(0, 9)
        online = (cat == _DIGITAL) & ~away & (rng.random(size) < 0.2)
        country = np.where(online, rng.choice(_ONLINE, size), country)
        dist = np.where(
            rng.random(size) < 0.04, rng.uniform(80, 900, size), rng.exponential(6, size)
        )
        lat, lon = _around(rng, cards.lat[card], cards.lon[card], dist)
        foreign = country != cards.home[card]
        lat = np.where(foreign, _LAT[country] + rng.normal(0, 1.5, size) * ~online, lat)
        lon = np.where(foreign, _LON[country] + rng.normal(0, 1.5, size) * ~online, lon)
        amount = _amounts(rng, cat, cards.spend[card])
        favourite = (card * 7919 + cat * 104_729 + rng.integers(0, 3, size) * 31) % _MERCHANTS
        shop = np.where(rng.random(size) < 0.7, favourite, rng.integers(0, _MERCHANTS, size))
        merchant = cat * 1000 + shop
        floats = [t, card, cat, amount, country, lat, lon, merchant, np.zeros(size)]
        return [np.asarray(c, dtype=np.float64) for c in floats]

    def _sprees(self, legit: list[_Floats]) -> int:
        """Add legitimate bursts (in-app purchases, shopping) to ``pending``; their count."""
        rng, before = self.rng, len(self.pending)
        t, card, cat, _, country, lat, lon, merchant, _ = legit
        u = rng.random(len(t))
        apps = (cat == _DIGITAL) & (u < 0.12)
        shops = np.isin(cat, (_RESTAURANTS, _ELECTRONICS, _GROCERY, _JEWELRY)) & (u < 0.02)
        for i in np.flatnonzero(apps | shops):
            at, c = float(t[i]), int(card[i])
            for _ in range(2 + rng.poisson(3) if apps[i] else 1 + rng.poisson(2)):
                if apps[i]:
                    at += 20 + rng.exponential(200)
                    price = float(rng.choice([0.99, 1.99, 4.99, 9.99, 19.99]))
                    shop, kind = int(merchant[i]), _DIGITAL
                else:
                    at += 60 + rng.exponential(900)
                    kind = int(
                        rng.choice([_RESTAURANTS, _ELECTRONICS, _JEWELRY, _GROCERY, _PHARMACY])
                    )
                    price = float(_amounts(rng, np.array([kind]), self.cards.spend[[c]])[0])
                    shop = kind * 1000 + int(rng.integers(_MERCHANTS))
                spot = (float(lat[i]), float(lon[i]))
                self.pending.append((at, c, kind, price, int(country[i]), *spot, shop, 0))
        return len(self.pending) - before

    def _fraud(self, start_s: float) -> None:
        rng, cards = self.rng, self.cards
        due = max(0.0, self.fraud_odds * self.legit_total - self.fraud_total)
        victims = np.flatnonzero((cards.weight > 0) & (cards.issued_s <= start_s))
        expected = due / _EPISODE_LEN if len(victims) else 0.0
        for _ in range(int(expected + rng.random())):  # rounded at random: tracks the rate
            kind = int(rng.choice(4, p=_EPISODE_P))
            at = start_s + rng.uniform(0, _DAY_S)
            card = int(rng.choice(victims))
            if kind == 0:
                events = _card_testing(rng, cards, card, at)
            elif kind == 1:
                events = _takeover(rng, cards, card, start_s)
            elif kind == 2:
                fresh = cards.extend(
                    _Cards.new(rng, 1, np.array([at - rng.uniform(0, 5 * _DAY_S)]), False)
                )
                events = _bust_out(rng, cards, fresh[0], at)
            else:
                events = _stealth(rng, cards, card, at)
            self.fraud_total += len(events)
            self.pending.extend(events)


def _amounts(rng: np.random.Generator, cat: _Ints, spend: _Floats, scale: float = 1.0) -> _Floats:
    raw = rng.lognormal(np.log(_MEDIAN[cat] * scale), _SIGMA[cat]) * spend
    cash = np.maximum(20.0, np.round(raw / 20.0) * 20.0)
    return np.asarray(np.where(cat == _ATM, cash, np.maximum(0.5, np.round(raw, 2))), np.float64)


def _at_home(
    rng: np.random.Generator, cards: _Cards, card: int, at: float, cat: int, scale: float
) -> _Event:
    """A fraudulent charge that looks domestic: the card's home country, near home."""
    amount = float(_amounts(rng, np.array([cat]), cards.spend[[card]], scale)[0])
    shop = cat * 1000 + int(rng.integers(_MERCHANTS))
    return (at, card, cat, amount, int(cards.home[card]), *_near_home(rng, cards, card), shop, 1)


def _near_home(rng: np.random.Generator, cards: _Cards, card: int) -> tuple[float, float]:
    """A point a few km (exponential, mean 20) from the card's home."""
    lat, lon = _around(rng, cards.lat[[card]], cards.lon[[card]], rng.exponential(20, 1))
    return float(lat[0]), float(lon[0])


def _around(
    rng: np.random.Generator, lat: _Floats, lon: _Floats, km: _Floats
) -> tuple[_Floats, _Floats]:
    """Points ``km`` from (``lat``, ``lon``) in random directions (flat-earth offsets)."""
    bearing = rng.uniform(0, 2 * np.pi, len(km))
    north, east = km * np.cos(bearing) / 111.0, km * np.sin(bearing) / 111.0
    return lat + north, lon + east / np.cos(np.radians(lat))


def _card_testing(rng: np.random.Generator, cards: _Cards, card: int, at: float) -> list[_Event]:
    abroad = rng.random() < 0.5
    country = int(rng.choice(len(COUNTRIES), p=_FRAUD_P)) if abroad else int(cards.home[card])
    shops = _DIGITAL * 1000 + rng.integers(0, _MERCHANTS, 1 + rng.integers(3))
    events: list[_Event] = []
    for _ in range(min(20, 3 + rng.poisson(4))):
        amount = 1.0 if rng.random() < 0.5 else round(float(rng.uniform(0.5, 5.0)), 2)
        spot = (
            (float(_LAT[country]), float(_LON[country])) if abroad else _near_home(rng, cards, card)
        )
        events.append((at, card, _DIGITAL, amount, country, *spot, int(rng.choice(shops)), 1))
        at += 5 + rng.exponential(45)
    if rng.random() < 0.35:
        events.append(_at_home(rng, cards, card, at + rng.uniform(120, 1800), _ELECTRONICS, 3.0))
    return events


def _takeover(rng: np.random.Generator, cards: _Cards, card: int, start_s: float) -> list[_Event]:
    country = int(rng.choice(len(COUNTRIES), p=_FRAUD_P))
    if country == cards.home[card]:
        country = (country + 1) % len(COUNTRIES)
    local_s = rng.uniform(0, 6 * 3600) if rng.random() < 0.45 else rng.uniform(0, _DAY_S)
    at = start_s + float((local_s - _OFFSET_S[country]) % _DAY_S)
    events: list[_Event] = []
    for _ in range(1 + rng.poisson(2)):
        cat = int(rng.choice(_TAKEOVER_MIX[0], p=_TAKEOVER_MIX[1]))
        amount = float(_amounts(rng, np.array([cat]), np.ones(1), 2.2)[0])
        lat, lon = _LAT[country] + rng.normal(0, 1.5), _LON[country] + rng.normal(0, 1.5)
        shop = cat * 1000 + int(rng.integers(_MERCHANTS))
        events.append((at, card, cat, min(amount, 5000.0), country, lat, lon, shop, 1))
        at += 60 + rng.exponential(900)
    return events


def _stealth(rng: np.random.Generator, cards: _Cards, card: int, at: float) -> list[_Event]:
    events: list[_Event] = []
    for _ in range(1 + rng.poisson(0.6)):
        cat = int(rng.choice(10, p=_MIX[1] / _MIX[1].sum()))
        events.append(_at_home(rng, cards, card, at, cat, 1.8))
        at += rng.exponential(3 * 3600)
    return events


def _bust_out(rng: np.random.Generator, cards: _Cards, card: int, at: float) -> list[_Event]:
    events: list[_Event] = []
    for _ in range(3 + rng.poisson(3)):
        cat = int(rng.choice(_BUST_OUT_MIX[0], p=_BUST_OUT_MIX[1]))
        events.append(_at_home(rng, cards, card, at, cat, 1.5))
        at += 30 + rng.exponential(600)
    return events


def _km(lat1: _Floats, lon1: _Floats, lat2: _Floats, lon2: _Floats) -> _Floats:
    """Great-circle distance in km."""
    p1, p2, dl = np.radians(lat1), np.radians(lat2), np.radians(lon2 - lon1)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return np.asarray(2 * 6371.0 * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0))), np.float64)


def iter_transactions(
    n: int | None = None,
    *,
    seed: int = 7,
    cards: int | None = None,
    start: datetime | None = None,
    fraud_rate: float = 0.015,
) -> Iterator[Transaction]:
    """Yield transactions in time order: ``n`` of them, or without end when ``n`` is None.

    ``cards`` is the number of cards at the start (more are issued as days pass); by
    default one per 30 transactions, at least 100 (2,000 for an endless stream), so a
    stream spans about a month. ``start`` (timezone-aware, default 2025-01-06 UTC) is
    when the stream begins. ``fraud_rate`` is the share of fraudulent transactions.
    """
    if n is not None and n < 0:
        raise ValueError("n must be >= 0")
    if cards is not None and cards < 1:
        raise ValueError("cards must be >= 1")
    if not 0.0 <= fraud_rate < 0.5:
        raise ValueError("fraud_rate must be in [0, 0.5)")
    if start is not None and start.utcoffset() is None:
        raise ValueError("start must be timezone-aware")
    origin = _DEFAULT_START if start is None else start.astimezone(UTC)
    count = cards if cards is not None else 2000 if n is None else max(100, n // 30)
    sim = _Simulator(np.random.default_rng(seed), count, fraud_rate)
    history: dict[int, deque[tuple[int, float, int]]] = {}
    emitted, day = 0, 0
    while n is None or emitted < n:
        t_s, card, cat, amount, country, lat, lon, merchant, fraud = sim.day(day * float(_DAY_S))
        day += 1
        t_us = np.round(t_s.astype(np.float64) * _US).astype(np.int64)
        card, country, cat = card.astype(np.int64), country.astype(np.int64), cat.astype(np.int64)
        cs = sim.cards
        hour = ((t_us // _US + _OFFSET_S[country]) % _DAY_S) // 3600
        age = np.maximum(0, (t_us / _US - cs.issued_s[card]) // _DAY_S).astype(np.int64)
        km = np.round(
            _km(cs.lat[card], cs.lon[card], lat.astype(np.float64), lon.astype(np.float64)), 1
        )
        foreign = country != cs.home[card]
        rows = zip(
            t_us.tolist(), card.tolist(), cat.tolist(), amount.tolist(), country.tolist(),
            merchant.astype(np.int64).tolist(), fraud.astype(np.int64).tolist(),
            hour.tolist(), age.tolist(), km.tolist(), foreign.tolist(), strict=True,
        )  # fmt: skip
        for t, c, k, amt, co, m, f, h, a, dist, fo in rows:
            if n is not None and emitted >= n:
                return
            seen = history.setdefault(c, deque())
            seen.append((t, amt, m))
            while seen[0][0] <= t - _DAY_US:
                seen.popleft()
            yield Transaction(
                transaction_id=f"tx_{emitted:09d}",
                card_id=f"card_{c:06d}",
                merchant_id=f"m_{m:05d}",
                timestamp=origin + timedelta(microseconds=t),
                amount=amt,
                merchant_category=CATEGORIES[k],
                country=COUNTRIES[co],
                hour=h,
                card_age_days=a,
                tx_count_1h=sum(1 for e in seen if e[0] > t - _HOUR_US),
                tx_count_24h=len(seen),
                amount_sum_24h=round(sum(e[1] for e in seen), 2),
                distinct_merchants_24h=len({e[2] for e in seen}),
                km_from_home=dist,
                is_foreign=fo,
                is_fraud=f,
            )
            emitted += 1


def simulate(
    n: int,
    *,
    seed: int = 7,
    cards: int | None = None,
    start: datetime | None = None,
    fraud_rate: float = 0.015,
) -> list[Transaction]:
    """The first ``n`` transactions of :func:`iter_transactions` with these arguments."""
    return list(iter_transactions(n, seed=seed, cards=cards, start=start, fraud_rate=fraud_rate))
