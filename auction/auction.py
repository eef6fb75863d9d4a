"""Phase 3: a generalized second-price (GSP) auction over CPC and CPM ads.

Unit conventions
----------------
* Every ad is compared in **expected value per impression** (currency per shown ad):

  - CPC ad (``bid`` per click):        ``score = bid x pCTR x quality``
  - CPM ad (``bid`` per 1000 shows):   ``score = bid / 1000 x quality``

* ``quality`` is a multiplier in ``(0, 1]`` (see :func:`quality_score`) that demotes ads
  users hide or report; it scales the score, not the price unit.
* Prices and ``reserve`` are in each ad's **own pricing unit**: per click for CPC ads,
  per mille for CPM ads. ``reserve`` may be one number or one per ad.

Pricing
-------
Eligible ads (``bid >= reserve`` and ``score > 0``) are ranked by score, ties broken by
ad id (or index). The first ``slots`` win. Each winner pays the least it could have bid
and kept its rank: the bid whose score equals the next eligible ad's score,

* CPC: ``price = next_score / (pCTR x quality)``
* CPM: ``price = next_score x 1000 / quality``

then raised to the reserve and capped at its own bid (``reserve <= price <= bid``). With
no ad below it, a winner pays the reserve.

>>> winners = run_auction(bids=[2.0, 1.0, 3000.0], pctr=[0.05, 0.08, 0.0],
...                       quality=[1.0, 1.0, 0.5], pricing=["cpc", "cpc", "cpm"],
...                       reserve=[0.1, 0.1, 500.0], slots=2, ad_ids=["a", "b", "c"])
>>> [(w.ad_id, w.position, round(w.score, 4), round(w.price, 4)) for w in winners]
[('c', 0, 1.5, 500.0), ('a', 1, 0.1, 1.6)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Winner", "auction_scores", "quality_score", "run_auction"]

PER_MILLE = 1000.0


@dataclass(frozen=True)
class Winner:
    """One won slot. ``price`` is in the ad's pricing unit (per click or per mille)."""

    index: int  # position of the ad in the input arrays
    ad_id: str | None
    position: int  # 0 = best slot
    score: float  # expected value per impression
    price: float
    pricing: str
    bid: float


def auction_scores(bids, pctr, quality, pricing) -> np.ndarray:
    """Expected value per impression of each ad (see the unit conventions above).

    >>> auction_scores([1.0, 2000.0], [0.1, 0.5], [0.5, 1.0], ["cpc", "cpm"])
    array([0.05, 2.  ])
    """
    bids = np.asarray(bids, dtype=np.float64)
    pctr = np.asarray(pctr, dtype=np.float64)
    quality = np.asarray(quality, dtype=np.float64)
    is_cpm = np.asarray(pricing, dtype=object) == "cpm"
    return np.where(is_cpm, bids / PER_MILLE, bids * pctr) * quality


def run_auction(
    bids: Sequence[float],
    pctr: Sequence[float],
    quality: Sequence[float] | float,
    pricing: Sequence[str],
    reserve: Sequence[float] | float,
    slots: int,
    ad_ids: Sequence[str] | None = None,
) -> list[Winner]:
    """Rank ads by expected value per impression and price winners by GSP.

    Ties in score are broken by ``ad_ids`` (ascending) when given, else by index.
    """
    bids = np.asarray(bids, dtype=np.float64)
    n = len(bids)
    pctr = np.asarray(pctr, dtype=np.float64)
    quality = np.broadcast_to(np.asarray(quality, dtype=np.float64), (n,))
    kinds = np.asarray(pricing, dtype=object)
    reserve = np.broadcast_to(np.asarray(reserve, dtype=np.float64), (n,))
    if pctr.shape != (n,) or kinds.shape != (n,):
        raise ValueError("bids, pctr and pricing must have the same length")
    bad = set(kinds.tolist()) - {"cpc", "cpm"}
    if bad:
        raise ValueError(f"pricing must be 'cpc' or 'cpm', got {sorted(bad)}")
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if ad_ids is not None and len(ad_ids) != n:
        raise ValueError("ad_ids must have the same length as bids")

    scores = auction_scores(bids, pctr, quality, kinds)
    eligible = np.flatnonzero((bids >= reserve) & (scores > 0) & np.isfinite(scores))
    if ad_ids is None:
        tie = eligible
    else:
        tie = np.empty(len(eligible), dtype=np.int64)
        names = np.array([ad_ids[i] for i in eligible], dtype=object)
        tie[np.argsort(names, kind="stable")] = np.arange(len(eligible))
    ranked = eligible[np.lexsort((tie, -scores[eligible]))]

    winners = []
    for position, i in enumerate(ranked[:slots]):
        i = int(i)
        next_score = float(scores[ranked[position + 1]]) if position + 1 < len(ranked) else 0.0
        # Both formulas above equal bid x next_score / score (score is linear in the
        # bid); the ratio form avoids dividing by an underflowing pCTR x quality.
        price = float(bids[i]) * min(1.0, next_score / float(scores[i]))
        price = min(max(price, float(reserve[i])), float(bids[i]))
        winners.append(
            Winner(
                index=i,
                ad_id=None if ad_ids is None else ad_ids[i],
                position=position,
                score=float(scores[i]),
                price=price,
                pricing=str(kinds[i]),
                bid=float(bids[i]),
            )
        )
    return winners


def quality_score(
    impressions,
    hides,
    reports,
    prior_strength: float = 1000.0,
    prior_rate: float = 0.005,
    report_weight: float = 5.0,
    penalty: float = 50.0,
):
    """Quality multiplier in ``(0, 1]`` from smoothed negative feedback.

    The negative-feedback rate ``(hides + report_weight x reports) / impressions`` is
    smoothed with a Beta prior of mean ``prior_rate`` worth ``prior_strength``
    impressions (so new ads start at the prior), then mapped to

    ``min(1, (1 + penalty x prior_rate) / (1 + penalty x rate))``:

    1 for ads at or below the typical rate, falling towards 0 as the rate grows.
    Works elementwise on arrays.

    >>> round(quality_score(0, 0, 0), 3), round(quality_score(10_000, 50, 0), 3)
    (1.0, 1.0)
    >>> round(float(quality_score(10_000, 500, 100)), 3)
    0.224
    """
    impressions = np.asarray(impressions, dtype=np.float64)
    negatives = np.asarray(hides, dtype=np.float64) + report_weight * np.asarray(
        reports, dtype=np.float64
    )
    rate = (negatives + prior_strength * prior_rate) / (impressions + prior_strength)
    rate = np.clip(rate, 0.0, 1.0)
    out = np.minimum(1.0, (1.0 + penalty * prior_rate) / (1.0 + penalty * rate))
    return float(out) if out.ndim == 0 else out
