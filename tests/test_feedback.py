"""Ad quality from hide and report feedback: counting in the billing worker
(auction.billing), qualities read by serving replicas (auction.feedback), and the
ranking that follows, against a real Redis and, end to end, a real broker."""

from __future__ import annotations

import random
import signal
import time
import uuid

import pytest
import redis

from auction.auction import quality_score
from auction.auth import OPERATOR
from auction.billing import Biller
from auction.campaigns import CampaignService
from auction.feedback import FeedbackQuality, catalogue_ads, feedback_key
from auction.serving import AdServer
from engine.config import load_settings
from engine.events import AdRequest, UserProfile, encode
from streams import redis_store
from tests.support import engagement, impression
from tests.test_billing import PARTITIONS, TS, Record, Scenario, Worker, wait

pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("redis") / "feedback.db"
    client = redis_store.embedded(path)
    yield client
    redis_store.close_embedded(path)


def own_connection(client) -> redis.Redis:
    """A connection of its own, as a separate serving replica has."""
    return redis.Redis.from_url(redis_store.socket_url(client))


def imp(iid: str, ad_id: str, ts: float = TS):
    return impression(iid, ts, ad_id=ad_id, price=0.5, pricing="cpc", bid=1.0)


def counters(client, prefix: str, ad_id: str) -> dict[str, int]:
    raw = client.hgetall(feedback_key(prefix, ad_id))
    return {k.decode(): int(v) for k, v in raw.items()}


def test_counts_are_exact_whatever_the_redeliveries_and_the_order(redis_client):
    run = uuid.uuid4().hex[:6]
    settings = load_settings(
        env={
            "ADENGINE_BILLING_STATE_PREFIX": f"test:{run}:billing:",
            "ADENGINE_BILLING_FEEDBACK_PREFIX": f"test:{run}:feedback:",
        }
    )
    prefix = settings.billing.feedback_prefix
    biller = Biller.from_settings(settings, redis_client)
    offsets = iter(range(10_000))

    def rec(event) -> Record:
        topic = "imps" if event.__class__.__name__ == "Impression" else "engs"
        return Record(topic, 0, next(offsets), event.impression_id.encode(), encode(event))

    hide = engagement("h1", "i1", TS + 1, "hide")
    events = [
        imp("i1", "a"),
        imp("i1", "a"),  # redelivered
        imp("i2", "a"),
        hide,
        hide,  # redelivered
        engagement("h1b", "i1", TS + 2, "hide"),  # a second hide of the same impression
        engagement("r1", "i1", TS + 3, "report"),  # a report counts besides the hide
        engagement("c1", "i1", TS + 3, "click"),  # clicks are not feedback
        # b's feedback comes before its impression: held, then counted with it
        engagement("h3", "i3", TS + 1, "hide"),
        engagement("r3", "i3", TS + 1, "report"),
        imp("i3", "b"),
        imp("i3", "b"),
        engagement("h3", "i3", TS + 1, "hide"),
        engagement("h9", "i9", TS + 1, "hide"),  # its impression never comes
    ]
    first = biller.process([rec(e) for e in events])
    assert first.error is None and not first.dead
    expected = {
        "a": {"impressions": 2, "hides": 1, "reports": 1},
        "b": {"impressions": 1, "hides": 1, "reports": 1},
    }
    assert {ad: counters(redis_client, prefix, ad) for ad in "ab"} == expected
    assert len(redis_client.keys(f"{prefix}*")) == 2  # h9 counted for no ad

    replay = biller.process([rec(e) for e in events])  # everything again, as after a crash
    assert replay.error is None
    assert {ad: counters(redis_client, prefix, ad) for ad in "ab"} == expected

    counts = {k: v for k, v in biller.counts.items() if k.startswith("feedback_")}
    assert counts == {
        "feedback_impression_counted": 3,
        "feedback_impression_duplicate": 2 + 5,
        "feedback_hide_counted": 2,  # h1 at once, h3 with i3
        "feedback_hide_held": 2,  # h3 and h9
        "feedback_hide_duplicate": 3 + 6,
        "feedback_report_counted": 2,
        "feedback_report_held": 1,
        "feedback_report_duplicate": 2,
    }
    registry = biller.metrics.registry
    sample = registry.get_sample_value
    assert sample("adengine_billing_feedback_total", {"kind": "hide", "outcome": "held"}) == 2


def test_qualities_are_the_smoothed_scores_of_the_counts_on_every_replica(redis_client):
    run = uuid.uuid4().hex[:6]
    settings = load_settings(
        env={
            "ADENGINE_BILLING_FEEDBACK_PREFIX": f"test:{run}:feedback:",
            "ADENGINE_AUCTION_QUALITY_PRIOR_STRENGTH": "200.0",
            "ADENGINE_AUCTION_QUALITY_REPORT_WEIGHT": "3.0",
        }
    )
    prefix = settings.billing.feedback_prefix
    counts = {
        "hidden": (1000, 150, 0),
        "reported": (1000, 10, 40),
        "fine": (5000, 10, 0),
        "new": (3, 3, 0),  # three hides in three shows, but the prior still weighs
    }
    for ad_id, (shown, hides, reports) in counts.items():
        redis_client.hset(
            feedback_key(prefix, ad_id),
            mapping={"impressions": shown, "hides": hides, "reports": reports},
        )
    ads = [*counts, "silent"]  # "silent": in the catalogue, never counted
    replicas = [
        FeedbackQuality.from_settings(own_connection(redis_client), lambda: ads, settings)
        for _ in range(2)
    ]
    replicas[1].chunk_size = 2  # several round trips: the same answer
    assert replicas[0].quality("hidden") == 1.0  # nothing read yet: the prior
    answers = [replica.refresh() for replica in replicas]
    assert answers[0] == answers[1]
    for ad_id, (shown, hides, reports) in counts.items():
        expected = quality_score(
            shown, hides, reports, prior_strength=200.0, report_weight=3.0
        )  # the other parameters: quality_score's defaults, as in the settings file
        assert replicas[0].quality(ad_id) == pytest.approx(expected)
    assert replicas[0].quality("hidden") < 0.5 and replicas[0].quality("reported") < 0.5
    assert replicas[0].quality("fine") == 1.0
    assert 0.5 < replicas[0].quality("new") < 1.0
    assert replicas[0].quality("silent") == 1.0 and replicas[0].quality("elsewhere") == 1.0


def poll(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_background_refresh_follows_the_counters_and_survives_failures(redis_client):
    prefix = f"test:{uuid.uuid4().hex[:6]}:feedback:"
    key = feedback_key(prefix, "x")
    available, failures = [True], []

    def catalogue() -> list[str]:
        if not available[0]:
            failures.append(1)
            raise RuntimeError("catalogue unavailable")
        return ["x"]

    quality = FeedbackQuality(redis_client, catalogue, interval_s=0.05, prefix=prefix).start()
    try:
        redis_client.hset(key, mapping={"impressions": 100, "hides": 90})
        hidden = quality_score(100, 90, 0)
        poll(lambda: quality.quality("x") == pytest.approx(hidden))
        available[0] = False  # refreshes now fail before reading: the last qualities stay
        poll(lambda: len(failures) >= 1)
        redis_client.hset(key, "impressions", 100_000)
        poll(lambda: len(failures) >= 3)
        assert quality.quality("x") == pytest.approx(hidden)
        available[0] = True  # the thread kept going: it reads the new counters
        poll(lambda: quality.quality("x") == 1.0)
    finally:
        quality.stop()


def test_the_served_app_ranks_on_the_qualities_it_reads(tmp_path):
    """``app_from_settings`` runs a :class:`FeedbackQuality` whose qualities the ad
    server applies; ``quality = false`` serves without one."""
    from fastapi.testclient import TestClient

    from auction.api import app_from_settings
    from auction.auth import hash_key

    key, cost = "op_test-feedback-operator-key", 2**4
    path = str(tmp_path / "redis.db")
    env = {
        "ADENGINE_REDIS_EMBEDDED_PATH": path,
        "ADENGINE_REDIS_URL": '""',
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(key, cost=cost),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(cost),
        "ADENGINE_AUCTION_QUALITY_INTERVAL_S": "0.05",
        "ADENGINE_AUCTION_PACING": "false",
        "ADENGINE_AUCTION_EXPLORATION": '"none"',
        "ADENGINE_AUCTION_NEW_AD_IMPRESSIONS": "0",
    }
    settings = load_settings(env=env)
    off = app_from_settings(load_settings(env={**env, "ADENGINE_AUCTION_QUALITY": "false"}))
    off.state.close()
    assert off.state.feedback is None
    app = app_from_settings(settings)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        client = TestClient(app)
        adv = client.post("/v1/advertisers", json={"name": "A"}, headers=auth).json()
        now = time.time()
        ad_ids = []
        for name in ("one", "two"):
            campaign = {
                "advertiser_id": adv["advertiser_id"], "name": name, "daily_budget": 100.0,
                "total_budget": 100.0, "start_ts": now - 60, "end_ts": now + 3600,
                "pricing": "cpc", "bid": 1.0,
            }  # fmt: skip
            cid = client.post("/v1/campaigns", json=campaign, headers=auth).json()["campaign_id"]
            ad = {"category": name, "landing_domain": "x.example"}
            ad_ids.append(client.post(f"/v1/campaigns/{cid}/ads", json=ad, headers=auth).json())
        first, second = sorted(ad["ad_id"] for ad in ad_ids)
        request = {"request_id": "r", "ts": now, "user": {"user_id": "u"}, "slots": 1}

        def served() -> str:
            body = client.post("/v1/ad-requests", json=request, headers=auth).json()
            return body["ads"][0]["ad_id"]

        assert served() == first  # equal scores: the first ad id
        feedback = app.state.feedback
        counts = {"impressions": 1000, "hides": 200, "reports": 20}
        feedback.redis.hset(feedback_key(settings.billing.feedback_prefix, first), mapping=counts)
        poll(lambda: feedback.quality(first) < 1.0)
        assert served() == second
    finally:
        app.state.close()
        redis_store.close_embedded(path)


# --------------------------------------------------------------------------- end to end


def test_an_ad_users_hide_loses_its_rank_to_an_otherwise_equal_ad(broker, redis_client, tmp_path):
    """Impressions, hides and reports go through the topics (each delivered twice, some
    hides before their impression) to a billing worker; a serving replica's qualities
    then demote the hidden ad below an ad with the same bid and pCTR."""
    sc = Scenario(broker, redis_client, "feedback")
    prefix = sc.settings.billing.feedback_prefix
    service = CampaignService(clock=lambda: TS)
    adv = service.create_advertiser(OPERATOR, "adv").advertiser_id
    ad_ids = []
    for name in ("one", "two"):
        data = {
            "name": name, "daily_budget": 100.0, "total_budget": 100.0, "start_ts": TS - 10,
            "end_ts": TS + 86400, "pricing": "cpc", "bid": 1.0,
        }  # fmt: skip
        cid = service.create_campaign(OPERATOR, data, advertiser_id=adv).campaign_id
        ad = service.create_ad(OPERATOR, cid, {"category": name, "landing_domain": "x.example"})
        ad_ids.append(ad.ad_id)
    hidden, clean = sorted(ad_ids)  # equal scores rank by ad id: ``hidden`` comes first
    quality = FeedbackQuality.from_settings(redis_client, catalogue_ads(service), sc.settings)
    server = AdServer(service, lambda: None, quality=quality.quality)

    def winner(n: int) -> tuple[str, float]:
        request = AdRequest(request_id=f"q{n}", ts=TS, user=UserProfile(user_id="u"), slots=1)
        (ad,) = server.serve(request, random.Random(n)).ads
        return ad.ad_id, ad.price

    quality.refresh()
    assert winner(0) == (hidden, 1.0)  # no feedback yet: the tie goes to ``hidden``

    items = []
    for k in range(200):
        for ad_id in (hidden, clean):
            iid = f"{ad_id}-{k}"
            shown = ("imp", iid, encode(imp(iid, ad_id, TS + k)), None)
            feedback = []
            if ad_id == hidden and k % 4 == 0:  # 50 hides, 10 reports
                feedback.append(("eng", iid, encode(engagement(f"h-{iid}", iid, TS, "hide")), None))
                if k % 20 == 0:
                    report = engagement(f"r-{iid}", iid, TS, "report")
                    feedback.append(("eng", iid, encode(report), None))
            if ad_id == clean and k % 10 == 0:
                click = engagement(f"c-{iid}", iid, TS + k + 1)
                feedback.append(("eng", iid, encode(click), None))
            ordered = feedback + [shown] if k % 8 == 0 else [shown, *feedback]
            items += [it for item in ordered for it in (item, item)]  # each delivered twice
    sentinel_ad = f"sentinel-{sc.run}"
    for p in range(PARTITIONS):  # one hide per partition: counted once both topics reach it
        iid = f"fb-sentinel-{sc.run}-{p}"
        items.append(("imp", iid, encode(imp(iid, sentinel_ad)), p))
        items.append(("eng", iid, encode(engagement(f"h-{iid}", iid, TS, "hide")), p))

    worker = Worker(sc.env, tmp_path / "worker.log")
    try:
        sc.produce(items)
        wait(
            lambda: counters(redis_client, prefix, sentinel_ad).get("hides") == PARTITIONS,
            90,
            [worker],
        )
    finally:
        worker.kill(signal.SIGTERM)
    assert counters(redis_client, prefix, hidden) == {
        "impressions": 200, "hides": 50, "reports": 10
    }  # fmt: skip
    assert counters(redis_client, prefix, clean) == {"impressions": 200}

    quality.refresh()
    demoted = quality_score(200, 50, 10)
    assert quality.quality(hidden) == pytest.approx(demoted) and demoted < 0.5
    assert quality.quality(clean) == 1.0
    # ``clean`` now wins and pays the least that keeps it above the demoted ad
    ad_id, price = winner(1)
    assert ad_id == clean and price == pytest.approx(demoted)
    other = FeedbackQuality.from_settings(
        own_connection(redis_client), catalogue_ads(service), sc.settings
    )
    assert other.refresh() == quality.qualities  # another replica serves the same qualities


def test_doctests():
    import doctest

    import auction.feedback

    assert doctest.testmod(auction.feedback).failed == 0
