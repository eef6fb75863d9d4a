"""auction.selection (phase 2) and auction.auction (GSP, quality): properties and examples."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import auction.auction
import auction.selection
from auction.auction import auction_scores, quality_score, run_auction
from auction.selection import top_k_by_prior

# --------------------------------------------------------------------------- selection


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([0.5, 1.0, 2.0]), st.sampled_from([0.0, 0.01, 0.02, 0.04])),
        max_size=30,
    ),
    st.integers(0, 35),
    st.randoms(use_true_random=False),
)
def test_top_k_matches_full_sort_and_ignores_order(rows, k, rnd):
    ids = [f"ad{i:02d}" for i in range(len(rows))]
    bids = {a: b for a, (b, _) in zip(ids, rows)}
    ctr = {a: c for a, (_, c) in zip(ids, rows)}
    expected = sorted(ids, key=lambda a: (-bids[a] * ctr[a], a))[:k]
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    assert top_k_by_prior(shuffled, bids, ctr, k) == expected
    aligned = top_k_by_prior(shuffled, [bids[a] for a in shuffled], [ctr[a] for a in shuffled], k)
    assert aligned == expected
    assert top_k_by_prior(set(ids), bids, ctr, k) == expected


def test_top_k_cpm_nan_and_errors():
    ids = ["a", "b", "c"]
    got = top_k_by_prior(
        ids, [1.0, 3000.0, 1.0], [0.01, 0.0, float("nan")], k=3, pricing=["cpc", "cpm", "cpc"]
    )
    assert got == ["b", "a", "c"]  # CPM: 3000 / 1000 = 3 per impression; NaN last
    assert top_k_by_prior([], [], [], k=3) == []
    with pytest.raises(ValueError):
        top_k_by_prior(ids, [1.0], [0.1, 0.1, 0.1], k=1)
    with pytest.raises(ValueError):
        top_k_by_prior(ids, [1.0] * 3, [0.1] * 3, k=-1)


# --------------------------------------------------------------------------- auction

money = st.floats(0.01, 10.0, allow_nan=False)


@st.composite
def auctions(draw):
    n = draw(st.integers(0, 12))
    kinds = draw(st.lists(st.sampled_from(["cpc", "cpm"]), min_size=n, max_size=n))
    bids = [
        draw(money) * (1000.0 if kind == "cpm" else 1.0) for kind in kinds
    ]  # CPM bids per mille
    pctr = draw(st.lists(st.floats(0.0, 0.3), min_size=n, max_size=n))
    quality = draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n))
    reserve = [draw(st.floats(0.0, 2.0)) * (1000.0 if kind == "cpm" else 1.0) for kind in kinds]
    slots = draw(st.integers(0, 5))
    return bids, pctr, quality, kinds, reserve, slots


@settings(max_examples=400, deadline=None)
@given(auctions())
def test_gsp_invariants(case):
    bids, pctr, quality, kinds, reserve, slots = case
    winners = run_auction(bids, pctr, quality, kinds, reserve, slots)
    scores = auction_scores(bids, pctr, quality, kinds)
    eligible = [i for i in range(len(bids)) if bids[i] >= reserve[i] and scores[i] > 0]
    assert len(winners) == min(slots, len(eligible))
    assert [w.position for w in winners] == list(range(len(winners)))
    won = [w.index for w in winners]
    assert len(set(won)) == len(won)
    # ranks sorted by score, and every loser that was eligible scores no higher
    assert all(a.score >= b.score for a, b in zip(winners, winners[1:]))
    losers = [i for i in eligible if i not in won]
    if winners and losers:
        assert max(scores[i] for i in losers) <= winners[-1].score
    for w in winners:
        assert w.index in eligible  # ads below the reserve never win
        assert reserve[w.index] <= w.price <= bids[w.index] + 1e-12
        assert w.score == pytest.approx(scores[w.index])


@settings(max_examples=300, deadline=None)
@given(auctions(), st.integers(0, 11), st.floats(1.0, 5.0))
def test_raising_a_bid_never_lowers_rank(case, who, factor):
    bids, pctr, quality, kinds, reserve, _ = case
    assume(who < len(bids))
    n = len(bids)

    def rank(b):
        winners = run_auction(b, pctr, quality, kinds, reserve, slots=n)
        order = [w.index for w in winners]
        return order.index(who) if who in order else n  # n = did not win

    raised = list(bids)
    raised[who] *= factor
    assert rank(raised) <= rank(bids)


@settings(max_examples=300, deadline=None)
@given(auctions())
def test_price_is_the_least_bid_keeping_the_rank(case):
    """Bidding the GSP price (if above the reserve) keeps the winner's slot; less loses it."""
    bids, pctr, quality, kinds, reserve, slots = case
    ids = [f"ad{i:02d}" for i in range(len(bids))]
    for w in run_auction(bids, pctr, quality, kinds, reserve, slots, ad_ids=ids):
        if w.price <= reserve[w.index] or w.price >= bids[w.index]:
            continue
        at_price = list(bids)
        at_price[w.index] = w.price * (1 + 1e-9)
        again = run_auction(at_price, pctr, quality, kinds, reserve, slots, ad_ids=ids)
        assert [x.index for x in again][w.position] == w.index
        below = list(bids)
        below[w.index] = w.price * (1 - 1e-6)
        again = run_auction(below, pctr, quality, kinds, reserve, slots, ad_ids=ids)
        assert w.index not in [x.index for x in again][: w.position + 1]


def test_cpc_vs_cpm_conversion():
    # CPC: 2.00 per click at 5% CTR = 0.10 per impression = a 100 CPM.
    # A CPM ad bidding 80 per mille = 0.08 per impression ranks below it.
    winners = run_auction(
        bids=[2.0, 80.0],
        pctr=[0.05, 0.9],
        quality=[1.0, 1.0],
        pricing=["cpc", "cpm"],
        reserve=[0.0, 0.0],
        slots=2,
        ad_ids=["cpc", "cpm"],
    )
    assert [w.ad_id for w in winners] == ["cpc", "cpm"]
    assert winners[0].score == pytest.approx(0.10)
    assert winners[1].score == pytest.approx(0.08)
    # CPC winner pays per click what matches 0.08 per impression: 0.08 / 0.05 = 1.6
    assert winners[0].price == pytest.approx(1.6)
    assert winners[0].pricing == "cpc"
    # the CPM ad's pCTR does not affect its score
    swapped = run_auction([2.0, 120.0], [0.05, 0.0], 1.0, ["cpc", "cpm"], 0.0, 1, ["cpc", "cpm"])
    assert swapped[0].ad_id == "cpm"
    assert swapped[0].price == pytest.approx(100.0)  # 0.10 per impression x 1000
    # quality scales the score and inflates the price per unit for a low-quality ad
    low = run_auction([2.0, 2.0], [0.05, 0.05], [1.0, 0.5], ["cpc"] * 2, 0.0, 1, ["a", "b"])
    assert low[0].ad_id == "a" and low[0].price == pytest.approx(1.0)


def test_reserve_and_ties():
    w = run_auction([1.0, 0.5], [0.1, 0.1], 1.0, ["cpc", "cpc"], reserve=0.6, slots=2)
    assert [x.index for x in w] == [0] and w[0].price == pytest.approx(0.6)
    tie = run_auction([1.0, 1.0], [0.1, 0.1], 1.0, ["cpc"] * 2, 0.0, 1, ad_ids=["z", "y"])
    assert tie[0].ad_id == "y" and tie[0].price == pytest.approx(1.0)
    assert run_auction([], [], 1.0, [], 0.0, 3) == []
    with pytest.raises(ValueError):
        run_auction([1.0], [0.1], 1.0, ["cpa"], 0.0, 1)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10**6),
    st.integers(0, 10**4),
    st.integers(0, 10**3),
    st.floats(1.0, 1e4),
)
def test_quality_score_bounds_and_monotone(imps, hides, reports, strength):
    q = quality_score(imps, hides, reports, prior_strength=strength)
    assert 0.0 < q <= 1.0
    assert quality_score(imps, hides + 10, reports, prior_strength=strength) <= q
    assert quality_score(imps, hides, reports + 1, prior_strength=strength) <= q


def test_quality_score_examples():
    assert quality_score(0, 0, 0) == 1.0  # new ad: the prior rate, no penalty
    assert quality_score(10**6, 0, 0) == 1.0
    assert quality_score(1000, 200, 50) < 0.2
    many = quality_score(np.array([100, 100]), np.array([0, 50]), np.array([0, 0]))
    assert many.shape == (2,) and many[0] > many[1]


def test_doctests():
    for module in (auction.auction, auction.selection):
        assert doctest.testmod(module).failed == 0
