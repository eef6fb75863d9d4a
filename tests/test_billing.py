"""The billing worker (auction.billing) against a real tansu broker and a real Redis.

Each scenario has its own topics, consumer group and Redis key prefixes. Workers are
``python -m auction.billing`` child processes. A scenario ends with one sentinel click per
partition of both topics: once every sentinel is charged, everything produced before them
has been consumed, so the exact set of charges can be compared with what is expected.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import msgspec
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from auction.auth import OPERATOR
from auction.billing import (
    Biller,
    Charge,
    NotBillable,
    _first_offsets,
    click_charge,
    impression_charge,
)
from auction.budget import BudgetLedger, budget_day
from auction.campaigns import CampaignService
from auction.serving import AdServer
from engine.config import load_settings
from engine.events import (
    AdRequest,
    Engagement,
    Impression,
    UserProfile,
    decode,
    encode,
)
from streams import redis_store
from streams.broker import free_port
from streams.join import DeadLetter
from streams.topics import ensure_topics
from tests.support import ChildProcess, engagement, impression

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 4
WINDOW = 100.0
TS = 1_800_000_000.0
DAY = budget_day(TS)
pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def redis_client(tmp_path_factory):
    path = tmp_path_factory.mktemp("redis") / "billing.db"
    client = redis_store.embedded(path)
    yield client
    redis_store.close_embedded(path)


class Scenario:
    """Topics, settings, ledger and worker environment of one scenario."""

    def __init__(self, broker, redis_client, tag: str) -> None:
        run = f"{tag}-{uuid.uuid4().hex[:6]}"
        self.run = run
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ADENGINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"
        }
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            REDIS_URL=redis_store.socket_url(redis_client),
            ADENGINE_BILLING_APP_ID=f"billing-{run}",
            ADENGINE_BILLING_STATE_PREFIX=f"test:{run}:billing:",
            ADENGINE_BILLING_FEEDBACK_PREFIX=f"test:{run}:feedback:",
            ADENGINE_BILLING_SESSION_TIMEOUT_S="3.0",
            ADENGINE_AUCTION_BUDGET_PREFIX=f"test:{run}:budget:",
            ADENGINE_JOINER_WINDOW_S=str(WINDOW),
            ADENGINE_KAFKA_IMPRESSIONS_PARTITIONS=str(PARTITIONS),
            ADENGINE_KAFKA_ENGAGEMENTS_PARTITIONS=str(PARTITIONS),
        )
        for role in ("impressions", "engagements", "dead_letters"):
            env[f"ADENGINE_KAFKA_{role.upper()}_TOPIC"] = f"{run}.{role}"
        self.env = env
        self.bootstrap = broker.bootstrap_servers
        self.settings = load_settings(env=env)
        ensure_topics(broker.bootstrap_servers, self.settings)
        self.ledger = BudgetLedger(redis_client, prefix=self.settings.auction.budget_prefix)
        self.ledger.set_budget("sentinel", daily=1000.0, total=1000.0)

    def produce(self, items) -> None:
        """``items``: (role "imp" | "eng", key, value bytes, partition or None) in order."""
        asyncio.run(_produce(self.bootstrap, self.settings, items))

    def sentinels(self) -> list:
        out = []
        for p in range(PARTITIONS):
            iid = f"sentinel-{p}"
            out.append(("imp", iid, encode(imp(iid, "sentinel", 0.5, "cpc", 1.0)), p))
            out.append(("eng", iid, encode(click(f"e-{iid}", iid)), p))
        return out

    def wait_for_sentinels(self, workers, timeout: float = 60.0) -> None:
        wanted = {f"sentinel-{p}:click" for p in range(PARTITIONS)}
        wait(lambda: wanted <= set(self.ledger.charge_ids("sentinel", DAY)), timeout, workers)

    def dead_letters(self, expected: int, timeout: float = 20.0) -> list[DeadLetter]:
        topic = self.settings.kafka.dead_letters_topic
        records = asyncio.run(_collect(self.bootstrap, topic, expected, timeout))
        return [decode(r.value, DeadLetter) for r in records]


class Worker(ChildProcess):
    """``python -m auction.billing`` as a child process logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, metrics_port: int = 0) -> None:
        env = {**env, "ADENGINE_BILLING_METRICS_PORT": str(metrics_port)}
        self.metrics_port = metrics_port
        super().__init__(["-m", "auction.billing", "-l", "info"], env, log_path)

    def counts(self) -> dict[str, int]:
        """The worker's last logged counts (a stopped worker logs its final ones)."""
        lines = [line for line in self.tail(400_000).splitlines() if "billing counts " in line]
        return json.loads(lines[-1].split("billing counts ", 1)[1]) if lines else {}

    def metrics(self) -> dict[tuple[str, tuple], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


def wait(predicate, timeout: float, workers=()) -> None:
    """Poll ``predicate`` until it holds; fail with the workers' logs at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out; worker logs:\n" + "\n---\n".join(w.tail() for w in workers))
        time.sleep(0.1)


def imp(iid, campaign, price, pricing="cpc", bid=1.0, ts=TS) -> Impression:
    return impression(
        iid, ts, campaign_id=campaign, advertiser_id="adv", price=price, pricing=pricing, bid=bid
    )


def click(eid, iid, ts=TS + 5.0, kind="click") -> Engagement:
    return engagement(eid, iid, ts, kind)


async def _produce(bootstrap, settings, items) -> None:
    from aiokafka import AIOKafkaProducer

    topics = {"imp": settings.kafka.impressions_topic, "eng": settings.kafka.engagements_topic}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0)
    await producer.start()
    try:
        for role, key, value, partition in items:
            await producer.send_and_wait(
                topics[role], value, key=key.encode() if key else None, partition=partition
            )
    finally:
        await producer.stop()


async def _collect(bootstrap, topic, expected, timeout):
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out = []
    try:
        tps = [TopicPartition(topic, p) for p in await consumer._client._wait_on_metadata(topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while len(out) < expected and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                out.extend(records)
    finally:
        await consumer.stop()
    return out


def metric(values, name, **labels) -> float:
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


# --------------------------------------------------------------------------- scenarios


def test_cpm_impressions_and_cpc_clicks_are_charged_exactly(broker, redis_client, tmp_path):
    sc = Scenario(broker, redis_client, "exact")
    cpm, cpc = f"cpm-{sc.run}", f"cpc-{sc.run}"
    sc.ledger.set_budget(cpm, daily=100.0, total=100.0)
    sc.ledger.set_budget(cpc, daily=100.0, total=100.0)
    items = [("imp", f"m{k}", encode(imp(f"m{k}", cpm, 2.5, "cpm", 4.0)), None) for k in range(10)]
    items.append(items[3])  # a re-delivered impression
    items.append(("eng", "m1", encode(click("e-m1", "m1")), None))  # clicks on CPM ads are free
    prices = {f"k{k}": round(0.5 + 0.05 * k, 2) for k in range(8)}
    items += [("imp", k, encode(imp(k, cpc, p)), None) for k, p in prices.items() if k != "k3"]
    items += [
        ("eng", "k0", encode(click("e-k0", "k0")), None),
        ("eng", "k1", encode(click("e-k1", "k1")), None),
        ("eng", "k1", encode(click("e-k1", "k1")), None),  # the same click delivered twice
        ("eng", "k2", encode(click("e-k2a", "k2")), None),
        ("eng", "k2", encode(click("e-k2b", "k2", ts=TS + 9)), None),  # a second click
        ("eng", "k4", encode(click("e-k4", "k4", ts=TS + WINDOW + 1)), None),  # too late
        ("eng", "k5", encode(click("h-k5", "k5", kind="hide")), None),
        ("eng", "k6", encode(click("r-k6", "k6", kind="report")), None),
    ]
    no_pricing = msgspec.structs.replace(imp("old", cpc, 0.5), pricing=None, bid=None)
    request = AdRequest(request_id="q", ts=TS, user=UserProfile(user_id="u"), slots=1)
    malformed = [
        ("imp", "bad-json", b"\xff not json", None),
        ("eng", "bad-field", b'{"type":"Engagement","engagement_id":"x"}', None),
        ("imp", "old", encode(no_pricing), None),
        ("imp", "greedy", encode(imp("greedy", cpc, 2.0, "cpc", 1.0)), None),
        ("imp", "q", encode(request), None),
        ("imp", "m0", encode(imp("m0", cpm, 3.0, "cpm", 4.0)), None),  # a reused impression id
    ]
    worker = Worker(sc.env, tmp_path / "worker.log", metrics_port=free_port("127.0.0.1"))
    try:
        # k3's click comes first: it is held until its impression arrives
        sc.produce([("eng", "k3", encode(click("e-k3", "k3")), None)])
        held = "adengine_billing_clicks_total"

        def clicks_held() -> bool:
            try:
                return metric(worker.metrics(), held, outcome="held") == 1
            except OSError:
                return False  # the exporter is not up yet

        wait(clicks_held, 60, [worker])
        sc.produce(items + malformed + [("imp", "k3", encode(imp("k3", cpc, prices["k3"])), None)])
        sc.produce(sc.sentinels())
        sc.wait_for_sentinels([worker])
        values = worker.metrics()
        dead = sc.dead_letters(len(malformed))
    finally:
        worker.kill(signal.SIGTERM)

    assert sc.ledger.charge_ids(cpm, DAY) == {f"m{k}": 0.0025 for k in range(10)}
    assert sc.ledger.charge_ids(cpc, DAY) == {
        f"{k}:click": prices[k] for k in ("k0", "k1", "k2", "k3")
    }
    assert sc.ledger.spend(cpm, DAY).daily_spent == 0.025
    assert sc.ledger.spend(cpc, DAY).daily_spent == 0.5 + 0.55 + 0.6 + 0.65
    assert sorted(d.key for d in dead) == [
        b"bad-field", b"bad-json", b"greedy", b"m0", b"old", b"q"
    ]  # fmt: skip
    reasons = {d.key: d.reason for d in dead}
    assert "pricing" in reasons[b"old"] and "exceeds bid" in reasons[b"greedy"]
    assert "AdRequest" in reasons[b"q"] and "Engagement" in reasons[b"bad-field"]
    assert "reused" in reasons[b"m0"]
    assert next(d for d in dead if d.key == b"bad-json").raw == b"\xff not json"

    total = "adengine_billing_charges_total"
    assert metric(values, total, status="accepted") == 10 + 4 + PARTITIONS
    # m3 again, and e-k1 again unless both deliveries were held before k1 came in (the two
    # topics are consumed independently): the order changes the path, never the charges
    assert metric(values, total, status="duplicate") in (1, 2)
    assert metric(values, "adengine_billing_spend_total") == pytest.approx(2.325 + 0.5 * PARTITIONS)
    assert metric(values, "adengine_billing_events_total", kind="malformed") == len(malformed)
    assert metric(values, "adengine_billing_events_total", kind="hide") == 1
    feedback = "adengine_billing_feedback_total"
    assert metric(values, feedback, kind="hide", outcome="counted") == 1
    assert metric(values, feedback, kind="report", outcome="counted") == 1
    assert metric(values, feedback, kind="impression", outcome="duplicate") == 1  # m3 again
    outcomes = {o: metric(values, held, outcome=o) for o in ("repeat", "late", "cpm")}
    assert outcomes == {"repeat": 1, "late": 1, "cpm": 1}
    assert metric(values, held, outcome="held") >= 1


def _stream(campaigns: dict[str, tuple[str, float]], n: int, seed: int):
    """``n`` impressions over ``campaigns`` ({id: (pricing, bid)}), ~30% of CPC ones clicked;
    returns the items and the expected charges {campaign: {charge id: amount}}."""
    rng = random.Random(seed)
    items, expected = [], {cid: {} for cid in campaigns}
    for k in range(n):
        cid = rng.choice(sorted(campaigns))
        pricing, bid = campaigns[cid]
        price = round(rng.uniform(0.5, 1.0) * bid, 3)  # whole micro-units per mille too
        iid = f"{cid}-i{k}"
        items.append(("imp", iid, encode(imp(iid, cid, price, pricing, bid, TS + k)), None))
        if pricing == "cpm":
            expected[cid][iid] = round(price / 1000, 6)
        elif rng.random() < 0.3:
            items.append(("eng", iid, encode(click(f"e-{iid}", iid, TS + k + 3)), None))
            expected[cid][f"{iid}:click"] = price
    return items, expected


def test_kill_9_mid_stream_then_restart_charges_every_billable_event_once(
    broker, redis_client, tmp_path
):
    sc = Scenario(broker, redis_client, "crash")
    campaigns = {f"cpc-{sc.run}": ("cpc", 1.0), f"cpm-{sc.run}": ("cpm", 5.0)}
    for cid in campaigns:
        sc.ledger.set_budget(cid, daily=1000.0, total=1000.0)
    items, expected = _stream(campaigns, 400, seed=3)
    half = len(items) // 2
    env = {**sc.env, "ADENGINE_BILLING_BATCH_SIZE": "10"}  # many small batches
    workers = [Worker(env, tmp_path / "worker1.log")]

    def charged() -> int:
        return sum(len(sc.ledger.charge_ids(cid, DAY)) for cid in campaigns)

    producer = threading.Thread(target=sc.produce, args=(items[:half],))
    try:
        producer.start()  # the worker bills while events keep coming
        wait(lambda: charged() >= 20, 60, workers)
        workers[0].kill(signal.SIGKILL)
        before = charged()
        producer.join(60)
        workers.append(Worker(env, tmp_path / "worker2.log"))
        sc.produce(items[half:] + sc.sentinels())
        sc.wait_for_sentinels(workers, timeout=90)
    finally:
        producer.join(60)
        for w in workers:
            w.kill(signal.SIGTERM)
    assert before < sum(len(v) for v in expected.values())  # the crash did interrupt
    redone = workers[1].counts().get("charge_duplicate", 0)
    print(f"crash: {before} charges before the kill, {redone} re-charged as duplicates")
    for cid in campaigns:
        charges = sc.ledger.charge_ids(cid, DAY)
        assert charges == pytest.approx(expected[cid])
        assert sc.ledger.spend(cid, DAY).daily_spent == pytest.approx(sum(charges.values()))


def test_two_workers_with_duplicates_never_exceed_a_daily_budget(broker, redis_client, tmp_path):
    """Two workers of one group charge one CPC and one CPM budget far smaller than demand,
    every event delivered twice, the second worker joining mid-stream (a rebalance)."""
    sc = Scenario(broker, redis_client, "budget")
    cpc, cpm = f"cpc-{sc.run}", f"cpm-{sc.run}"
    campaigns = {cpc: ("cpc", 1.0), cpm: ("cpm", 5.0)}
    budgets = {cpc: 12.0, cpm: 0.2}
    for cid, budget in budgets.items():
        sc.ledger.set_budget(cid, daily=budget, total=10 * budget)
    items, expected = _stream(campaigns, 300, seed=11)
    assert sum(expected[cpc].values()) > 2 * budgets[cpc]
    assert sum(expected[cpm].values()) > 2 * budgets[cpm]
    doubled = [it for item in items for it in (item, item)]
    half = len(doubled) // 10  # the rest once both workers hold partitions
    workers = [Worker(sc.env, tmp_path / "worker1.log")]
    try:
        sc.produce(doubled[:half])
        wait(lambda: len(sc.ledger.charge_ids(cpc, DAY)) >= 2, 60, workers)
        workers.append(Worker(sc.env, tmp_path / "worker2.log"))
        source = sc.settings.kafka.impressions_topic
        wait(lambda: all(source in w.assignment() for w in workers), 60, workers)
        sc.produce(doubled[half:] + sc.sentinels())
        sc.wait_for_sentinels(workers, timeout=90)
    finally:
        for w in workers:
            w.kill(signal.SIGTERM)
    assert all(w.counts().get("charge_accepted", 0) > 0 for w in workers)  # both charged
    for cid, budget in budgets.items():
        max_charge = campaigns[cid][1] / (1000 if campaigns[cid][0] == "cpm" else 1)
        charges = sc.ledger.charge_ids(cid, DAY)
        spent = sc.ledger.spend(cid, DAY).daily_spent
        # each accepted charge is a real billable event at its own price, charged once
        assert set(charges) <= set(expected[cid])
        assert all(charges[c] == pytest.approx(expected[cid][c]) for c in charges)
        assert spent == pytest.approx(sum(charges.values()))
        # never beyond the budget, and stopped only once it could not pay the largest charge
        assert spent <= budget
        assert budget - spent < max_charge


def test_serving_stops_once_billing_exhausts_the_budget(broker, redis_client, tmp_path):
    """AdServer + billing worker: served impressions and their clicks are charged until the
    campaign can no longer pay its bid; from then on the other campaign wins."""
    sc = Scenario(broker, redis_client, "serve")
    service = CampaignService(clock=lambda: TS)
    adv = service.create_advertiser(OPERATOR, "adv").advertiser_id
    ids = {}
    for name, bid, budget in (("rich", 1.0, 3.0), ("cheap", 0.8, 100.0)):
        data = {
            "name": name, "daily_budget": budget, "total_budget": budget, "start_ts": TS - 10,
            "end_ts": TS + 86400, "pricing": "cpc", "bid": bid,
        }  # fmt: skip
        ids[name] = cid = service.create_campaign(OPERATOR, data, advertiser_id=adv).campaign_id
        service.create_ad(OPERATOR, cid, {"category": name, "landing_domain": "x.example"})
        sc.ledger.set_budget(cid, daily=budget, total=budget)
    server = AdServer(
        service, lambda: None, remaining_budgets=lambda cids: sc.ledger.remaining_many(cids, DAY)
    )
    worker = Worker(sc.env, tmp_path / "worker.log")
    served = []
    try:
        for n in range(10):
            request = AdRequest(request_id=f"q{n}", ts=TS + n, user=UserProfile(user_id="u"),
                                slots=1)  # fmt: skip
            (ad,) = server.serve(request, random.Random(n)).ads
            if ad.campaign_id != ids["rich"]:
                break
            served.append(ad)
            impression = ad.impression
            assert (impression.pricing, impression.bid) == ("cpc", 1.0)
            iid = impression.impression_id
            sc.produce([
                ("imp", iid, encode(impression), None),
                ("eng", iid, encode(click(f"e-{iid}", iid, ts=TS + n + 1)), None),
            ])  # fmt: skip
            wait(lambda i=iid: f"{i}:click" in sc.ledger.charge_ids(ids["rich"], DAY), 60, [worker])
    finally:
        worker.kill(signal.SIGTERM)
    # GSP: the winner pays the runner-up's bid (equal prior pCTRs): 0.8 a click
    assert [ad.price for ad in served] == pytest.approx([0.8] * 3)
    spend = sc.ledger.spend(ids["rich"], DAY)
    assert spend.daily_spent == pytest.approx(2.4) and spend.daily_remaining < 1.0
    assert ad.campaign_id == ids["cheap"]  # the exhausted campaign is no longer served
    assert (
        server.serve(
            AdRequest(request_id="last", ts=TS + 20, user=UserProfile(user_id="u"), slots=1),
            random.Random(0),
        )
        .ads[0]
        .campaign_id
        == ids["cheap"]
    )


class Record:
    """A consumed record as the worker sees it (topic, partition, offset, key, value)."""

    def __init__(self, topic: str, partition: int, offset: int, key: bytes, value: bytes):
        self.topic, self.partition, self.offset = topic, partition, offset
        self.key, self.value = key, value


def test_a_redis_failure_stops_the_batch_and_the_retry_charges_each_event_once(redis_client):
    run = uuid.uuid4().hex[:6]
    settings = load_settings(
        env={
            "ADENGINE_BILLING_STATE_PREFIX": f"test:{run}:billing:",
            "ADENGINE_AUCTION_BUDGET_PREFIX": f"test:{run}:budget:",
        }
    )
    biller = Biller.from_settings(settings, redis_client)
    biller.ledger.set_budget("c", daily=10.0, total=10.0)
    records = []
    for k in range(6):
        iid = f"i{k}"
        records.append(Record("imps", k % 2, k, iid.encode(), encode(imp(iid, "c", 0.5))))
        records.append(Record("engs", k % 2, k, iid.encode(), encode(click(f"e{k}", iid))))
    real_charge, calls = biller.ledger.charge, []

    def flaky_charge(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise redis.ConnectionError("connection lost")
        return real_charge(*args, **kwargs)

    biller.ledger.charge = flaky_charge
    first = biller.process(records)
    assert isinstance(first.error, redis.ConnectionError)
    assert first.done == records[:5]  # stopped at the click whose charge failed
    assert _first_offsets(records[5:]) == {("engs", 0): 2, ("engs", 1): 3, ("imps", 0): 4,
                                           ("imps", 1): 3}  # fmt: skip
    # the worker re-reads from there (here: the whole batch, as after a crash)
    again = biller.process(records)
    assert again.error is None and again.done == records and not again.dead
    assert biller.ledger.charge_ids("c", DAY) == {f"i{k}:click": 0.5 for k in range(6)}
    # replayed: i0 and i1 (their impression finds the recorded click, then the click
    # itself) and e2, recorded before its charge failed and billed by i2's impression
    assert biller.counts["charge_accepted"] == 6 and biller.counts["charge_duplicate"] == 5


def test_charge_rules_and_events_from_before_pricing_was_logged():
    cpm = imp("m", "c", 2.5, "cpm", 4.0)
    assert impression_charge(cpm) == Charge("c", 0.0025, 0.004, DAY, "m")
    assert impression_charge(imp("k", "c", 0.7)) is None  # CPC: the click is billed
    charge, outcome = click_charge(imp("k", "c", 0.7), TS + WINDOW, WINDOW)
    assert outcome == "charged" and charge == Charge("c", 0.7, 1.0, DAY, "k:click")
    assert click_charge(imp("k", "c", 0.7), TS + WINDOW + 0.5, WINDOW) == (None, "late")
    assert click_charge(cpm, TS + 1, WINDOW) == (None, "cpm")
    # a click just after midnight is charged to the new day's budget
    midnight = (TS // 86400 + 1) * 86400
    late_night = imp("n", "c", 0.7, ts=midnight - 10)
    assert click_charge(late_night, midnight + 5, WINDOW)[0].day == budget_day(midnight)
    # an impression logged before pricing and bid were: decodes, but cannot be billed
    old = msgspec.json.decode(encode(cpm), type=dict)
    del old["pricing"], old["bid"]
    decoded = decode(msgspec.json.encode(old), Impression)
    assert (decoded.pricing, decoded.bid) == (None, None)
    with pytest.raises(NotBillable, match="pricing"):
        impression_charge(decoded)


def test_doctests():
    import doctest

    import auction.billing

    assert doctest.testmod(auction.billing).failed == 0
