"""Ad serving funnel (auction.serving) with a real, briefly trained CtrModel, and its API."""

from __future__ import annotations

import random

import msgspec
import numpy as np
import pytest
from fastapi.testclient import TestClient

from auction.api import create_app
from auction.auth import OPERATOR, hash_key
from auction.campaigns import CampaignService
from auction.index import DIMENSIONS, request_values, targeting_values
from auction.serving import PRIOR_VERSION, AdServer, ad_fields
from engine.events import AdRequest, Impression, RequestContext, UserProfile, decode, encode
from engine.features import request_fields
from engine.replay import synthetic_model

NOW = 1_800_000_000.0
SALT = "test-salt"
OPERATOR_KEY = "op_test-operator-key"
COST = 2**4


@pytest.fixture(scope="module")
def model():
    return synthetic_model(3000)


def _campaign(bid, targeting=None, pricing="cpc", **extra):
    return {
        "name": "c",
        "daily_budget": 50.0,
        "total_budget": 500.0,
        "start_ts": NOW - 86400,
        "end_ts": NOW + 86400,
        "pricing": pricing,
        "bid": bid,
        "targeting": targeting or {},
        **extra,
    }


@pytest.fixture()
def catalog():
    """Campaigns with varied targeting; returns (service, {name: campaign_id})."""
    service = CampaignService(clock=lambda: NOW)
    adv = service.create_advertiser(OPERATOR, "adv").advertiser_id
    other = service.create_advertiser(OPERATOR, "other").advertiser_id
    specs = {
        "shoes": (adv, _campaign(1.0, {"query_terms": ["Shoes"], "regions": ["r01"]}), 2),
        "ios": (adv, _campaign(0.6, {"devices": ["ios"]}), 2),
        "any": (other, _campaign(0.3), 2),
        "cpm": (other, _campaign(20.0, {"interests": ["games"]}, pricing="cpm"), 1),
        "young": (adv, _campaign(2.0, {"age_buckets": ["18-24"]}), 1),
        "paused": (other, _campaign(5.0, status="paused"), 1),
        "expired": (other, _campaign(5.0, start_ts=NOW - 10, end_ts=NOW - 1), 1),
    }
    ids = {}
    categories = iter(["travel", "health", "games", "finance", "toys", "beauty", "auto"] * 3)
    for name, (owner, data, n_ads) in specs.items():
        cid = service.create_campaign(OPERATOR, data, advertiser_id=owner).campaign_id
        ids[name] = cid
        for _ in range(n_ads):
            ad = {"category": next(categories), "landing_domain": f"{name}.example"}
            service.create_ad(OPERATOR, cid, ad)
    return service, ids


def _requests(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = UserProfile(
            user_id=f"u{rng.randrange(50)}",
            age=rng.choice([20, 30, 50, None]),
            gender=rng.choice(["m", "f", None]),
            region=rng.choice(["r00", "r01", "r02", None]),
            interests=rng.sample(["games", "toys", "travel", "beauty"], rng.randrange(3)),
        )
        context = RequestContext(
            device=rng.choice(["ios", "android", None]), placement=rng.choice(["feed", "search"])
        )
        query = rng.choice(["red SHOES", "shoes", "games", ""])
        out.append(
            AdRequest(
                request_id=f"r{i}",
                ts=NOW + i,
                user=user,
                context=context,
                query=query,
                slots=rng.randint(1, 4),
            )
        )
    return out


def _source(model):
    scorer = model.export_scorer()
    return lambda: (model, scorer, 7)


def _targets(campaign, request) -> bool:
    """Independent targeting check (not through the index's bitsets)."""
    wanted, allowed = request_values(request), targeting_values(campaign.targeting)
    in_schedule = campaign.start_ts <= request.ts < campaign.end_ts
    return (
        campaign.status == "active"
        and in_schedule
        and all(not allowed[d] or allowed[d] & wanted[d] for d in DIMENSIONS)
    )


def test_served_ads_match_targeting_slots_and_prices(model, catalog):
    service, ids = catalog
    server = AdServer(service, _source(model), salt=SALT, top_k=4)
    served_campaigns = set()
    for request in _requests(300):
        response = server.serve(request, random.Random(1))
        assert response.model_available and response.model_version == "7"
        assert len(response.ads) <= request.slots
        assert response.scored <= 4
        assert [ad.position for ad in response.ads] == list(range(len(response.ads)))
        assert len({ad.ad_id for ad in response.ads}) == len(response.ads)
        for ad in response.ads:
            campaign = service.get_campaign(OPERATOR, ad.campaign_id)
            assert _targets(campaign, request), (ad.ad_id, request)
            assert ad.bid == campaign.bid and ad.pricing == campaign.pricing
            assert 0.0 <= ad.price <= ad.bid
            assert 0.0 < ad.pctr < 1.0
            imp = ad.impression
            assert imp.request_id == request.request_id and imp.ad_id == ad.ad_id
            assert imp.position == ad.position and imp.price == ad.price
            assert imp.model_version == "7" and len(imp.impression_id) == 32
            assert decode(encode(imp), Impression).impression_id == imp.impression_id
            served_campaigns.add(ad.campaign_id)
    assert ids["paused"] not in served_campaigns and ids["expired"] not in served_campaigns
    assert {ids[n] for n in ("shoes", "ios", "any", "cpm", "young")} <= served_campaigns


def test_impression_features_reproduce_exactly(model, catalog):
    service, _ = catalog
    source = _source(model)
    scorer = source()[1]
    server = AdServer(service, source, salt=SALT)
    checked = 0
    for request in _requests(60, seed=5):
        for served in server.serve(request, random.Random(2)).ads:
            ad = service.get_ad(OPERATOR, served.ad_id)
            merged = {
                **request_fields(request, SALT),
                **ad_fields(ad, model.pipeline.spec.fields),
            }
            batch = model.pipeline.transform_many([merged])
            features = served.features
            assert features.indices == batch.indices[0].tolist()
            assert features.values == batch.values[0].tolist()
            np.testing.assert_array_equal(np.array(features.dense), batch.dense[0])
            assert served.pctr == pytest.approx(
                float(model.predict_proba_many(batch, scorer)[0]), rel=1e-12
            )
            checked += 1
    assert checked > 20


class _BrokenScorer:
    def decision_function(self, indices, values):
        raise RuntimeError("scorer exploded")


class _NanScorer:
    def decision_function(self, indices, values):
        return np.full(len(indices), np.nan)


def _raising_source():
    raise RuntimeError("subscriber broken")


@pytest.mark.parametrize("kind", ["none", "source_raises", "scorer_raises", "nan"])
def test_model_unavailable_serves_on_prior(model, catalog, kind):
    service, _ = catalog
    source = {
        "none": lambda: None,
        "source_raises": _raising_source,
        "scorer_raises": lambda: (model, _BrokenScorer(), 3),
        "nan": lambda: (model, _NanScorer(), 3),
    }[kind]
    server = AdServer(service, source, salt=SALT, prior_ctr=0.03)
    total = 0
    for request in _requests(40, seed=9):
        response = server.serve(request, random.Random(0))
        assert response.model_available is False
        assert len(response.ads) <= request.slots
        for ad in response.ads:
            assert ad.pctr == 0.03 and ad.model_version == PRIOR_VERSION
            assert ad.features.indices == [] and ad.price <= ad.bid
            total += 1
    assert total > 0


def test_exhausted_budget_never_served(model, catalog):
    service, ids = catalog
    # "any" has nothing left; "cpm" has less than one impression's max charge (20/1000)
    remaining = {ids["any"]: 0.0, ids["cpm"]: 0.019}
    server = AdServer(
        service,
        _source(model),
        salt=SALT,
        remaining_budgets=lambda cids: {cid: remaining.get(cid, 100.0) for cid in cids},
    )
    served = set()
    for request in _requests(300, seed=3):
        response = server.serve(request, random.Random(0))
        assert response.budget_checked
        served |= {ad.campaign_id for ad in response.ads}
    assert ids["any"] not in served and ids["cpm"] not in served
    assert {ids["shoes"], ids["ios"], ids["young"]} <= served


def test_budget_lookup_failure_drops_campaign(model, catalog):
    service, ids = catalog

    def remaining(cids):
        if ids["any"] in cids:
            raise ConnectionError("redis down")
        return dict.fromkeys(cids, 100.0)

    server = AdServer(service, _source(model), salt=SALT, remaining_budgets=remaining)
    request = AdRequest(request_id="r", ts=NOW, user=UserProfile(user_id="u"), slots=4)
    response = server.serve(request, random.Random(0))
    assert response.budget_checked is False
    assert ids["any"] not in {ad.campaign_id for ad in response.ads}
    # a campaign missing from the answer is dropped alone, the others still serve
    partial = AdServer(
        service,
        _source(model),
        salt=SALT,
        remaining_budgets=lambda cids: {c: 100.0 for c in cids if c != ids["any"]},
    )
    served, checked = set(), set()
    for request in _requests(100, seed=3):
        response = partial.serve(request, random.Random(0))
        served |= {ad.campaign_id for ad in response.ads}
        checked.add(response.budget_checked)
    assert ids["any"] not in served and ids["shoes"] in served and False in checked


def test_throttle_and_top_k(model, catalog):
    service, ids = catalog
    throttled = AdServer(
        service,
        _source(model),
        salt=SALT,
        throttle=lambda cid: 1.0 if cid == ids["any"] else 0.0,
    )
    one = AdServer(service, _source(model), salt=SALT, top_k=1)
    for request in _requests(100, seed=4):
        response = throttled.serve(request, random.Random(0))
        assert ids["any"] not in {ad.campaign_id for ad in response.ads}
        cut = one.serve(request, random.Random(0))
        assert cut.scored <= 1 and len(cut.ads) <= 1


def test_no_match_returns_empty(model):
    service = CampaignService(clock=lambda: NOW)
    server = AdServer(service, _source(model), salt=SALT)
    request = AdRequest(request_id="r", ts=NOW, user=UserProfile(user_id="u"), slots=2)
    response = server.serve(request, random.Random(0))
    assert response.ads == [] and response.matched == 0 and response.model_available


# --------------------------------------------------------------------------- API


@pytest.fixture()
def api(model, catalog):
    service, ids = catalog
    server = AdServer(service, _source(model), salt=SALT)
    app = create_app(
        service, None, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST, ad_server=server
    )
    client = TestClient(app)
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    adv_id = service.list_advertisers(OPERATOR)[0].advertiser_id
    r = client.post(f"/v1/advertisers/{adv_id}/keys", headers=op)
    assert r.status_code == 201, r.text
    adv = {"Authorization": f"Bearer {r.json()['api_key']}"}
    return client, op, adv, service


REQUEST = {
    "request_id": "req-1",
    "ts": NOW,
    "user": {"user_id": "u1", "age": 21, "region": "r01", "interests": ["games"]},
    "context": {"device": "ios"},
    "query": "shoes",
    "slots": 3,
}


def test_api_serves_ad_request(api):
    client, op, _, service = api
    r = client.post("/v1/ad-requests", json=REQUEST, headers=op)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] == "req-1" and body["model_available"] is True
    assert 1 <= len(body["ads"]) <= 3
    request = msgspec.convert(REQUEST, AdRequest)
    for ad in body["ads"]:
        assert ad["price"] <= ad["bid"]
        assert _targets(service.get_campaign(OPERATOR, ad["campaign_id"]), request)
        imp = msgspec.convert(ad["impression"], Impression)
        assert imp.impression_id == ad["impression_id"] and len(imp.features.indices) > 0


def test_api_requires_operator_key(api):
    client, _, adv, _ = api
    assert client.post("/v1/ad-requests", json=REQUEST).status_code == 401
    assert client.post("/v1/ad-requests", json=REQUEST, headers=adv).status_code == 403


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**REQUEST, "user": {"user_id": "u1", "age": 300}}, "user.age"),
        ({k: v for k, v in REQUEST.items() if k != "slots"}, "slots"),
        ({**REQUEST, "user": {"age": 30}}, "user.user_id"),
        ({**REQUEST, "slots": 0}, "slots"),
    ],
)
def test_api_invalid_body_names_field(api, body, field):
    client, op, _, _ = api
    r = client.post("/v1/ad-requests", json=body, headers=op)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["field"] == field
    assert r.json()["detail"].startswith(f"{field}: ")


def test_api_malformed_json_and_unconfigured(api, catalog):
    client, op, _, _ = api
    r = client.post("/v1/ad-requests", content=b"{not json", headers=op)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "body"
    service, _ = catalog
    bare = TestClient(create_app(service, None, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST))
    assert bare.post("/v1/ad-requests", json=REQUEST, headers=op).status_code == 503
