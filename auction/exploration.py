"""Exploration and cold start: letting the auction rank ads the model is unsure about.

An auction that always ranks by the model's pCTR never shows an ad the model
underrates, so the model never learns otherwise; a new ad, scored on what the model
knows of similar ads, may never get the impressions that would teach it. Two remedies
multiply the **ranking score** (expected value per impression, ``bid x pCTR x quality``
for CPC ads) of some eligible candidates by a factor:

* an **exploration policy** on a slice of requests (``fraction``, e.g. 5%; the rest is
  pure exploitation):

  - :class:`ThompsonSampling` ranks each CPC candidate on a pCTR drawn from a Beta
    posterior whose mean is the model's pCTR and whose concentration is
    ``prior_impressions + impressions``: an ad seen little is uncertain and sometimes
    drawn high, an ad seen a lot ranks on almost exactly its pCTR. A CPM ad's value
    does not depend on its pCTR, so Thompson sampling leaves it alone;
  - :class:`EpsilonGreedy` puts one eligible candidate, drawn uniformly, in the top
    slot (the slice fraction is epsilon).

* a **new-ad boost** (:class:`NewAdBoost`) on every request: ads served fewer than
  ``new_ad_impressions`` times rank on ``new_ad_boost x`` their score (``1 <= boost <=``
  :data:`MAX_BOOST`), so a cold ad gets a few impressions to learn from.

Accounting. Exploration changes the **ranking** only. :func:`explore_auction` ranks on
the factored scores and prices every winner on the model's calibrated scores against
the ad ranked below it (the GSP formula of :mod:`auction.auction`), so nobody pays for
another ad's draw or boost, ``reserve <= price <= bid`` still holds, and an ad that
exploration lifted above better ads pays up to its bid, never more: cold-start traffic
is not a discount to game by recreating ads. The pCTR recorded on impressions stays the
model's: an impression says what the model predicted, not what a draw or boost ranked on.

An impression is flagged ``exploration=True`` when exploration **changed the outcome**:
the exploitation auction over the same candidates (model pCTR, no boost) would not have
shown that ad at that position (it was lifted into the slots, or moved by an ad that
was). A request in the slice whose ranking did not change yields unflagged impressions.

Impression counts come from an :class:`ImpressionCounter` updated as the server serves:
in process, per replica and approximate (ads returned, not confirmed shown; reset on
restart, when every ad looks new again: a boost shared by all candidates ranks as none).

>>> rng = np.random.default_rng(0)
>>> draws = thompson_pctr(np.full(20_000, 0.05), np.full(20_000, 1e5), 20.0, rng)
>>> bool(abs(draws.mean() - 0.05) < 1e-4), bool(draws.std() < 0.001)
(True, True)
>>> winners, explored = explore_auction(
...     bids=[1.0, 1.0], pctr=[0.04, 0.03], quality=1.0, pricing=["cpc", "cpc"],
...     reserve=0.01, slots=2, ad_ids=["old", "new"], factor=[1.0, 2.0])
>>> [(w.ad_id, w.position, round(w.price, 4)) for w in winners], explored
([('new', 0, 1.0), ('old', 1, 0.01)], [True, True])
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from auction.auction import Winner, auction_scores, run_auction

__all__ = [
    "MAX_BOOST",
    "MAX_FACTOR",
    "POLICIES",
    "Candidates",
    "EpsilonGreedy",
    "Exploration",
    "ExplorationSettings",
    "ImpressionCounter",
    "NewAdBoost",
    "ThompsonSampling",
    "explore_auction",
    "thompson_pctr",
]

POLICIES = ("none", "thompson", "epsilon")
MAX_BOOST = 10.0
"""Upper bound of ``new_ad_boost``: a boost only breaks near-ties with established ads."""
MAX_FACTOR = 1e12
"""Ranking factors are clipped to ``[1 / MAX_FACTOR, MAX_FACTOR]`` (finite, positive)."""

Policy = Literal["none", "thompson", "epsilon"]


@dataclass(frozen=True)
class ExplorationSettings:
    """What to explore and how much (the ``[auction]`` settings ``exploration*``, ``new_ad*``).

    >>> ExplorationSettings().enabled
    False
    >>> ExplorationSettings(policy="thompson", fraction=0.05).enabled
    True
    """

    policy: Policy = "none"
    fraction: float = 0.05  # share of requests in the exploration slice (epsilon, for "epsilon")
    prior_impressions: float = 20.0  # Beta concentration of an ad never served (Thompson)
    new_ad_boost: float = 1.0  # ranking-score multiplier of new ads; 1 = off
    new_ad_impressions: int = 0  # an ad is new until served this many times; 0 = off

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"exploration policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"exploration fraction must be within [0, 1], got {self.fraction}")
        if not self.prior_impressions > 0.0:
            raise ValueError(f"prior_impressions must be > 0, got {self.prior_impressions}")
        if not 1.0 <= self.new_ad_boost <= MAX_BOOST:
            raise ValueError(
                f"new_ad_boost must be within [1, {MAX_BOOST}], got {self.new_ad_boost}"
            )
        if self.new_ad_impressions < 0:
            raise ValueError(f"new_ad_impressions must be >= 0, got {self.new_ad_impressions}")

    @property
    def boosting(self) -> bool:
        return self.new_ad_boost > 1.0 and self.new_ad_impressions > 0

    @property
    def enabled(self) -> bool:
        return (self.policy != "none" and self.fraction > 0.0) or self.boosting


class ImpressionCounter:
    """How many times each ad was served by this process.

    Approximate and per replica: it counts ads returned by the server (not confirmed
    shown), starts at zero on every replica and restart, and is never shared. That is
    enough to tell an ad seen a handful of times from one seen thousands of times.

    >>> counter = ImpressionCounter()
    >>> counter.add(["a", "b", "a"])
    >>> counter["a"], counter.counts(["a", "b", "c"]).tolist()
    (2, [2.0, 1.0, 0.0])
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, ad_ids: Iterable[str]) -> None:
        with self._lock:
            counts = self._counts
            for ad_id in ad_ids:
                counts[ad_id] = counts.get(ad_id, 0) + 1

    def __getitem__(self, ad_id: str) -> int:
        return self._counts.get(ad_id, 0)

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self, ad_ids: Sequence[str]) -> np.ndarray:
        get = self._counts.get
        return np.fromiter((get(a, 0) for a in ad_ids), dtype=np.float64, count=len(ad_ids))


@dataclass(frozen=True)
class Candidates:
    """The scored candidates of one request, as aligned arrays."""

    pctr: np.ndarray  # the model's calibrated pCTR
    impressions: np.ndarray  # times served so far (ImpressionCounter)
    eligible: np.ndarray  # bool: bid >= reserve and a positive, finite score
    cpc: np.ndarray  # bool: priced per click (the score depends on the pCTR)
    score: np.ndarray  # ranking score before the policy (expected value x new-ad boost)


class ExplorationPolicy(Protocol):
    def multiplier(self, candidates: Candidates) -> np.ndarray | None:
        """Per-candidate factor on the ranking score, or ``None`` outside the slice."""
        ...


def thompson_pctr(
    pctr: np.ndarray, impressions: np.ndarray, prior_impressions: float, rng: np.random.Generator
) -> np.ndarray:
    """One draw per ad from ``Beta(p k, (1 - p) k)``, ``k = prior_impressions + impressions``.

    The draw's mean is ``p`` and its variance ``p (1 - p) / (k + 1)``: it shrinks as the
    ad is served. ``p`` of exactly 0 or 1 is returned as is; a draw is floored at
    ``1e-6 p`` so an ad with a positive pCTR stays eligible.
    """
    p = np.asarray(pctr, dtype=np.float64)
    k = prior_impressions + np.asarray(impressions, dtype=np.float64)
    out = p.copy()
    inside = (p > 0.0) & (p < 1.0)
    if inside.any():
        pi, ki = p[inside], k[inside]
        out[inside] = np.maximum(rng.beta(pi * ki, (1.0 - pi) * ki), 1e-6 * pi)
    return out


class ThompsonSampling:
    """On a ``fraction`` of requests, rank CPC ads on a pCTR drawn from their posterior."""

    def __init__(
        self,
        fraction: float = 0.05,
        prior_impressions: float = 20.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.fraction = fraction
        self.prior_impressions = prior_impressions
        self.rng = np.random.default_rng() if rng is None else rng

    def multiplier(self, candidates: Candidates) -> np.ndarray | None:
        if not self.rng.random() < self.fraction:
            return None
        c = candidates
        p = np.where(c.eligible & c.cpc, c.pctr, 0.0)  # drawing for eligible CPC ads only
        draws = thompson_pctr(p, c.impressions, self.prior_impressions, self.rng)
        safe = np.where(p > 0.0, p, 1.0)
        return np.where(p > 0.0, draws / safe, 1.0)


class EpsilonGreedy:
    """On a ``fraction`` (epsilon) of requests, one eligible ad drawn uniformly ranks first."""

    def __init__(self, fraction: float = 0.05, rng: np.random.Generator | None = None) -> None:
        self.fraction = fraction
        self.rng = np.random.default_rng() if rng is None else rng

    def multiplier(self, candidates: Candidates) -> np.ndarray | None:
        if not self.rng.random() < self.fraction:
            return None
        pool = np.flatnonzero(candidates.eligible)
        if len(pool) == 0:
            return None
        pick = int(pool[self.rng.integers(len(pool))])
        score = candidates.score
        top = float(np.max(score[candidates.eligible]))
        out = np.ones(len(score))
        out[pick] = min(max(1.0, 2.0 * top / float(score[pick])), MAX_FACTOR)
        return out


class NewAdBoost:
    """``boost`` for ads served fewer than ``impressions`` times, else 1.

    >>> NewAdBoost(2.0, impressions=100).multiplier(np.array([0.0, 99.0, 100.0])).tolist()
    [2.0, 2.0, 1.0]
    """

    def __init__(self, boost: float, impressions: int) -> None:
        if not 1.0 <= boost <= MAX_BOOST:
            raise ValueError(f"boost must be within [1, {MAX_BOOST}], got {boost}")
        self.boost = boost
        self.impressions = impressions

    def multiplier(self, impressions: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(impressions) < self.impressions, self.boost, 1.0)


class Exploration:
    """The exploration policy, new-ad boost and impression counter of one ad server.

    ``rng`` (a :class:`numpy.random.Generator`, thread-safe) drives the slice and the
    draws; pass a seeded one for reproducible serving.
    """

    def __init__(
        self,
        settings: ExplorationSettings,
        rng: np.random.Generator | None = None,
        counter: ImpressionCounter | None = None,
    ) -> None:
        self.settings = settings
        rng = np.random.default_rng() if rng is None else rng
        self.counter = ImpressionCounter() if counter is None else counter
        self.policy: ExplorationPolicy | None = None
        if settings.policy == "thompson" and settings.fraction > 0.0:
            self.policy = ThompsonSampling(settings.fraction, settings.prior_impressions, rng)
        elif settings.policy == "epsilon" and settings.fraction > 0.0:
            self.policy = EpsilonGreedy(settings.fraction, rng)
        self.boost = (
            NewAdBoost(settings.new_ad_boost, settings.new_ad_impressions)
            if settings.boosting
            else None
        )

    @classmethod
    def from_settings(
        cls, auction_settings, rng: np.random.Generator | None = None
    ) -> Exploration | None:
        """From :class:`engine.config.AuctionSettings`; ``None`` when nothing is enabled."""
        a = auction_settings
        settings = ExplorationSettings(
            policy=a.exploration,
            fraction=a.exploration_fraction,
            prior_impressions=a.exploration_prior_impressions,
            new_ad_boost=a.new_ad_boost,
            new_ad_impressions=a.new_ad_impressions,
        )
        return cls(settings, rng) if settings.enabled else None

    def ranking_factor(
        self,
        pctr: np.ndarray,
        impressions: np.ndarray,
        eligible: np.ndarray,
        cpc: np.ndarray,
        score: np.ndarray,
    ) -> np.ndarray | None:
        """Each candidate's ranking-score factor, or ``None`` for pure exploitation.

        ``score`` is the candidates' expected value per impression on the model's
        pCTR; see :class:`Candidates` for the other arrays.
        """
        factor = None
        if self.boost is not None:
            boost = np.where(eligible, self.boost.multiplier(impressions), 1.0)
            shared = boost[eligible]
            if len(shared) and shared.min() != shared.max():  # one boost for all ranks as none
                factor = boost
                score = score * boost
        if self.policy is not None:
            more = self.policy.multiplier(Candidates(pctr, impressions, eligible, cpc, score))
            if more is not None:
                factor = more if factor is None else factor * more
        return factor


def explore_auction(
    bids: Sequence[float],
    pctr: Sequence[float],
    quality: Sequence[float] | float,
    pricing: Sequence[str],
    reserve: Sequence[float] | float,
    slots: int,
    ad_ids: Sequence[str] | None = None,
    *,
    factor: Sequence[float],
) -> tuple[list[Winner], list[bool]]:
    """A GSP auction ranked on ``score x factor`` and priced on ``score``; winners and flags.

    Ads rank as :func:`~auction.auction.run_auction` ranks them with their quality
    multiplied by ``factor`` (positive: the eligible ads are the same). Each winner pays
    ``bid x min(1, s_next / s_own)`` on the calibrated scores ``s`` (the model's
    ``pctr``) of itself and of the ad ranked below it, raised to its reserve and capped
    at its bid; its ``score`` is its calibrated expected value. ``explored[j]`` says the
    exploitation auction would not have put that ad at that position. With a factor of
    1 the result equals :func:`~auction.auction.run_auction`'s.
    """
    n = len(bids)
    quality_ = np.broadcast_to(np.asarray(quality, dtype=np.float64), (n,))
    factor_ = np.clip(np.asarray(factor, dtype=np.float64), 1.0 / MAX_FACTOR, MAX_FACTOR)
    ranked = run_auction(bids, pctr, quality_ * factor_, pricing, reserve, slots + 1, ad_ids)
    baseline = run_auction(bids, pctr, quality_, pricing, reserve, slots, ad_ids)
    baseline_position = {w.index: w.position for w in baseline}
    scores = auction_scores(bids, pctr, quality_, np.asarray(pricing, dtype=object))
    reserve_ = np.broadcast_to(np.asarray(reserve, dtype=np.float64), (n,))
    winners, explored = [], []
    for position, win in enumerate(ranked[:slots]):
        own = float(scores[win.index])
        below = float(scores[ranked[position + 1].index]) if position + 1 < len(ranked) else 0.0
        price = win.bid * (min(1.0, below / own) if own > 0.0 else 1.0)
        price = min(max(price, float(reserve_[win.index])), win.bid)
        winners.append(dataclasses.replace(win, score=own, price=price))
        explored.append(baseline_position.get(win.index) != position)
    return winners, explored
