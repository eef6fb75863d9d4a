"""Exploration and cold start (auction.exploration) and their wiring into AdServer."""

from __future__ import annotations

import doctest
import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import auction.exploration
from auction.auction import auction_scores, run_auction
from auction.auth import OPERATOR
from auction.campaigns import CampaignService
from auction.exploration import (
    Exploration,
    ExplorationSettings,
    ImpressionCounter,
    explore_auction,
    thompson_pctr,
)
from auction.serving import AdServer, ad_fields
from engine.config import load_settings
from engine.events import AdRequest, RequestContext, UserProfile
from engine.features import request_fields
from engine.replay import synthetic_model

NOW = 1_800_000_000.0
SALT = "test-salt"
Z = 4.5  # standard errors allowed by the statistical checks (two-sided p ~ 7e-6)


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= Z * math.sqrt(n * p * (1.0 - p))


def _factor(exploration: Exploration, bids, pctr, pricing, reserve, ad_ids):
    """What AdServer passes to the exploration for one auction (quality 1)."""
    bids, kinds = np.asarray(bids, dtype=np.float64), np.asarray(pricing, dtype=object)
    scores = auction_scores(bids, pctr, 1.0, kinds)
    eligible = (bids >= np.asarray(reserve)) & (scores > 0)
    impressions = exploration.counter.counts(ad_ids)
    return exploration.ranking_factor(
        np.asarray(pctr), impressions, eligible, kinds == "cpc", scores
    )


# --------------------------------------------------------------------------- Thompson


def _beta_variance_and_kurtosis(p: float, k: float) -> tuple[float, float]:
    a, b = p * k, (1.0 - p) * k
    var = a * b / ((a + b) ** 2 * (a + b + 1.0))
    excess = 6.0 * ((a - b) ** 2 * (a + b + 1.0) - a * b * (a + b + 2.0))
    excess /= a * b * (a + b + 2.0) * (a + b + 3.0)
    return var, excess


@pytest.mark.parametrize("p", [0.02, 0.3])
def test_thompson_draws_centred_on_pctr_with_spread_shrinking(p):
    rng = np.random.default_rng(7)
    n, prior = 40_000, 20.0
    stds = []
    for impressions in (0, 100, 1_000, 100_000):
        draws = thompson_pctr(np.full(n, p), np.full(n, impressions), prior, rng)
        var, excess = _beta_variance_and_kurtosis(p, prior + impressions)
        # mean: standard error sqrt(var / n); variance: var x sqrt((excess + 2) / n)
        assert abs(draws.mean() - p) <= Z * math.sqrt(var / n)
        assert abs(draws.var() - var) <= Z * var * math.sqrt((excess + 2.0) / n)
        assert draws.min() > 0.0 and draws.max() < 1.0
        stds.append(float(draws.std()))
    assert stds == sorted(stds, reverse=True)
    assert stds[-1] < stds[0] / 50  # 100,000 impressions: almost exactly the pCTR


def test_thompson_edges():
    rng = np.random.default_rng(0)
    out = thompson_pctr(np.array([0.0, 1.0, 1e-9]), np.zeros(3), 20.0, rng)
    assert out[0] == 0.0 and out[1] == 1.0 and out[2] > 0.0  # a positive pCTR stays positive


@pytest.mark.parametrize("policy", ["thompson", "epsilon"])
@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_exploration_slice_fraction(policy, fraction):
    exploration = Exploration(
        ExplorationSettings(policy=policy, fraction=fraction), rng=np.random.default_rng(11)
    )
    bids, pctr, pricing = [1.0, 1.0, 2.0], [0.05, 0.03, 0.01], ["cpc", "cpc", "cpc"]
    n = 20_000
    active = sum(
        _factor(exploration, bids, pctr, pricing, 0.01, ["a", "b", "c"]) is not None
        for _ in range(n)
    )
    assert _binomial_ok(active, n, fraction), active


def test_thompson_only_changes_cpc_ads():
    exploration = Exploration(ExplorationSettings("thompson", 1.0), rng=np.random.default_rng(1))
    for _ in range(50):
        factor = _factor(
            exploration,
            [1.0, 20.0, 1.0],
            [0.05, 0.05, 0.04],
            ["cpc", "cpm", "cpc"],
            0.01,
            ["a", "b", "c"],
        )
        assert factor[1] == 1.0 and factor[0] != 1.0 and factor[2] != 1.0


# --------------------------------------------------------------------------- epsilon-greedy


def test_epsilon_greedy_picks_a_non_top_ad_at_the_expected_rate():
    eps, n = 0.2, 20_000
    ids = ["a", "b", "c", "d", "e"]
    bids, pctr, pricing = [1.0] * 5, [0.05, 0.04, 0.03, 0.02, 0.01], ["cpc"] * 5
    exploration = Exploration(ExplorationSettings("epsilon", eps), rng=np.random.default_rng(3))
    wins = dict.fromkeys(ids, 0)
    for _ in range(n):
        factor = _factor(exploration, bids, pctr, pricing, 0.01, ids)
        if factor is None:
            winners, explored = run_auction(bids, pctr, 1.0, pricing, 0.01, 1, ids), [False]
        else:
            winners, explored = explore_auction(
                bids, pctr, 1.0, pricing, 0.01, 1, ids, factor=factor
            )
        (win,) = winners
        wins[win.ad_id] += 1
        assert explored == [win.ad_id != "a"]  # flagged exactly when the top ad lost
        assert win.price <= win.bid and win.price >= 0.01
    # a uniform pick among 5 on an epsilon of requests: 4/5 of them are not the top ad
    assert _binomial_ok(n - wins["a"], n, eps * 4 / 5), wins
    for ad in ids[1:]:
        assert _binomial_ok(wins[ad], n, eps / 5), wins


# --------------------------------------------------------------------------- auction


@st.composite
def explored_auctions(draw):
    n = draw(st.integers(0, 10))
    kinds = draw(st.lists(st.sampled_from(["cpc", "cpm"]), min_size=n, max_size=n))
    money = st.floats(0.01, 10.0)
    bids = [draw(money) * (1000.0 if kind == "cpm" else 1.0) for kind in kinds]
    # zero or a realistic pCTR: near float underflow the order of the products decides
    pctr = draw(st.lists(st.just(0.0) | st.floats(1e-6, 0.3), min_size=n, max_size=n))
    quality = draw(st.lists(st.floats(0.05, 1.0), min_size=n, max_size=n))
    reserve = [draw(st.floats(0.0, 2.0)) * (1000.0 if kind == "cpm" else 1.0) for kind in kinds]
    factor = draw(st.lists(st.floats(1e-3, 1e3), min_size=n, max_size=n))
    slots = draw(st.integers(0, 5))
    return bids, pctr, quality, kinds, reserve, slots, factor


@settings(max_examples=400, deadline=None)
@given(explored_auctions())
def test_pricing_invariants_hold_under_exploration(case):
    bids, pctr, quality, kinds, reserve, slots, factor = case
    ids = [f"ad{i:02d}" for i in range(len(bids))]
    winners, explored = explore_auction(
        bids, pctr, quality, kinds, reserve, slots, ids, factor=factor
    )
    scores = auction_scores(bids, pctr, quality, kinds)
    eligible = [i for i in range(len(bids)) if bids[i] >= reserve[i] and scores[i] > 0]
    # an independent ranking on score x factor, ties by ad id
    order = sorted(eligible, key=lambda i: (-(scores[i] * factor[i]), ids[i]))
    assert [w.index for w in winners] == order[:slots]
    assert [w.position for w in winners] == list(range(len(winners)))
    baseline = {
        w.index: w.position for w in run_auction(bids, pctr, quality, kinds, reserve, slots)
    }
    assert explored == [baseline.get(w.index) != w.position for w in winners]
    for w in winners:
        i = w.index
        assert reserve[i] <= w.price <= bids[i]
        assert w.score == pytest.approx(scores[i])  # the calibrated expected value
        # priced on calibrated scores against the ad ranked below, whatever the factors
        below = scores[order[w.position + 1]] if w.position + 1 < len(order) else 0.0
        expected = min(max(bids[i] * min(1.0, below / scores[i]), reserve[i]), bids[i])
        assert w.price == pytest.approx(expected, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(explored_auctions())
def test_unit_factor_is_the_plain_auction(case):
    bids, pctr, quality, kinds, reserve, slots, _ = case
    plain = run_auction(bids, pctr, quality, kinds, reserve, slots)
    same, explored = explore_auction(
        bids, pctr, quality, kinds, reserve, slots, factor=[1.0] * len(bids)
    )
    assert same == plain and not any(explored)


# --------------------------------------------------------------------------- serving


def _campaign(bid, pricing="cpc"):
    return {
        "name": "c",
        "daily_budget": 50.0,
        "total_budget": 500.0,
        "start_ts": NOW - 86400,
        "end_ts": NOW + 86400,
        "pricing": pricing,
        "bid": bid,
        "targeting": {},
    }


def _catalog(campaigns):
    """``{name: (bid, pricing, n_ads)}`` -> (service, {name: [ad ids]})."""
    service = CampaignService(clock=lambda: NOW)
    adv = service.create_advertiser(OPERATOR, "adv").advertiser_id
    categories = iter(["travel", "health", "games", "finance", "toys", "beauty", "auto"] * 5)
    ads = {}
    for name, (bid, pricing, n_ads) in campaigns.items():
        cid = service.create_campaign(OPERATOR, _campaign(bid, pricing), advertiser_id=adv)
        ads[name] = [
            service.create_ad(
                OPERATOR,
                cid.campaign_id,
                {"category": next(categories), "landing_domain": f"{name}.example"},
            ).ad_id
            for _ in range(n_ads)
        ]
    return service, ads


def _request(i, slots=1, rng=None):
    rng = rng or random.Random(i)
    return AdRequest(
        request_id=f"r{i}",
        ts=NOW + i,
        user=UserProfile(
            user_id=f"u{rng.randrange(50)}",
            age=rng.choice([20, 30, 50, None]),
            region=rng.choice(["r00", "r01", None]),
            interests=rng.sample(["games", "toys", "travel"], rng.randrange(3)),
        ),
        context=RequestContext(device=rng.choice(["ios", "android"])),
        query=rng.choice(["shoes", "games", ""]),
        slots=slots,
    )


def test_new_ad_with_low_pctr_is_served_only_when_boosted():
    service, ads = _catalog({"old": (1.0, "cpc", 1), "new": (1.0, "cpc", 1)})
    (old,), (new,) = ads["old"], ads["new"]
    pctr = {old: 0.03, new: 0.02}  # served on these priors (no model)
    counter = ImpressionCounter()
    counter.add([old] * 25)  # the old ad is established
    boosted = AdServer(
        service,
        lambda: None,
        prior_ctr=pctr.__getitem__,
        exploration=Exploration(
            ExplorationSettings(new_ad_boost=2.0, new_ad_impressions=25), counter=counter
        ),
    )
    plain = AdServer(service, lambda: None, prior_ctr=pctr.__getitem__)
    plain_served, boosted_served = [], []
    for i in range(100):
        (ad,) = plain.serve(_request(i)).ads
        assert not ad.impression.exploration
        plain_served.append(ad.ad_id)
        (ad,) = boosted.serve(_request(i)).ads
        boosted_served.append(ad.ad_id)
        assert ad.pctr == pctr[ad.ad_id] and ad.impression.pctr == pctr[ad.ad_id]
        assert 0.01 <= ad.price <= ad.bid
        assert ad.impression.exploration == (ad.ad_id == new)  # it beat a better ad
    assert new not in plain_served
    # 2 x 0.02 beats 0.03 until the new ad has its 25 impressions, then the old ad wins
    assert boosted_served == [new] * 25 + [old] * 75
    assert counter[new] == 25 and counter[old] == 25 + 75


def test_boost_shared_by_all_candidates_changes_nothing():
    service, ads = _catalog({"a": (1.0, "cpc", 2), "b": (0.7, "cpc", 2), "m": (30.0, "cpm", 1)})
    settings = ExplorationSettings(new_ad_boost=3.0, new_ad_impressions=10**9)
    boosted = AdServer(service, lambda: None, exploration=Exploration(settings))
    plain = AdServer(service, lambda: None)
    for i in range(30):
        request = _request(i, slots=3)
        assert _outcome(boosted.serve(request)) == _outcome(plain.serve(request))


@pytest.fixture(scope="module")
def model():
    return synthetic_model(2000)


def _outcome(response):
    return [
        (a.ad_id, a.position, a.price, a.pctr, a.score, a.impression.exploration)
        for a in response.ads
    ]


CATALOG = {
    "hi": (1.0, "cpc", 3),
    "mid": (0.8, "cpc", 3),
    "lo": (0.5, "cpc", 2),
    "m": (20.0, "cpm", 1),
}


def test_flag_set_exactly_where_exploration_changed_the_outcome(model):
    service, _ = _catalog(CATALOG)
    scorer = model.export_scorer()
    source = lambda: (model, scorer, 7)  # noqa: E731
    exploration = Exploration(ExplorationSettings("thompson", 1.0), rng=np.random.default_rng(5))
    explorer = AdServer(service, source, salt=SALT, exploration=exploration)
    plain = AdServer(service, source, salt=SALT)
    flagged = unflagged = 0
    served: dict[str, int] = {}
    for i in range(150):
        request = _request(i, slots=3)
        base = plain.serve(request).ads
        ads = explorer.serve(request).ads
        assert len(ads) == len(base) == 3
        for j, ad in enumerate(ads):
            changed = base[j].ad_id != ad.ad_id
            assert ad.impression.exploration == changed
            flagged += changed
            unflagged += not changed
            served[ad.ad_id] = served.get(ad.ad_id, 0) + 1
            assert 0.0 <= ad.price <= ad.bid
            # the logged pCTR is the model's, not the sampled one
            fields = {
                **request_fields(request, SALT),
                **ad_fields(service.get_ad(OPERATOR, ad.ad_id), model.pipeline.spec.fields),
            }
            batch = model.pipeline.transform_many([fields])
            assert ad.impression.pctr == ad.pctr
            assert ad.pctr == pytest.approx(model.predict_proba_many(batch, scorer)[0], rel=1e-12)
    assert flagged > 20 and unflagged > 20
    assert {ad: exploration.counter[ad] for ad in served} == served


@pytest.mark.parametrize(
    "settings",
    [
        ExplorationSettings(),  # policy "none", no boost
        ExplorationSettings("thompson", fraction=0.0),
        ExplorationSettings("epsilon", fraction=0.0, new_ad_boost=2.0, new_ad_impressions=0),
    ],
)
def test_exploration_off_is_the_baseline(model, settings):
    service, _ = _catalog(CATALOG)
    scorer = model.export_scorer()
    source = lambda: (model, scorer, 7)  # noqa: E731
    off = AdServer(service, source, salt=SALT, exploration=Exploration(settings))
    plain = AdServer(service, source, salt=SALT)
    for i in range(60):
        request = _request(i, slots=1 + i % 4)
        assert _outcome(off.serve(request)) == _outcome(plain.serve(request))


# --------------------------------------------------------------------------- settings


def test_settings_from_config():
    default = Exploration.from_settings(load_settings(env={}).auction)
    assert default is not None
    assert default.settings == ExplorationSettings("thompson", 0.05, 20.0, 1.5, 500)
    off = {"ADENGINE_AUCTION_EXPLORATION": "none", "ADENGINE_AUCTION_NEW_AD_BOOST": "1.0"}
    assert Exploration.from_settings(load_settings(env=off).auction) is None
    epsilon = {
        "ADENGINE_AUCTION_EXPLORATION": "epsilon",
        "ADENGINE_AUCTION_NEW_AD_IMPRESSIONS": "0",
    }
    chosen = Exploration.from_settings(load_settings(env=epsilon).auction)
    assert type(chosen.policy).__name__ == "EpsilonGreedy" and chosen.boost is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"policy": "ucb"},
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"new_ad_boost": 0.5},
        {"new_ad_boost": 11.0},
        {"new_ad_impressions": -1},
        {"prior_impressions": 0.0},
    ],
)
def test_invalid_settings_refused(kwargs):
    with pytest.raises(ValueError):
        ExplorationSettings(**kwargs)


def test_doctests():
    assert doctest.testmod(auction.exploration).failed == 0
