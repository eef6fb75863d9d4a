"""Hot swap under load: two `adengine serve` replicas follow every published model version.

Two server processes share one (embedded) Redis. Client threads send ad requests to both
without pause while new versions are published with :class:`ModelPublisher`: new LR
weights, and once new trees (a new leaf space). Every request must succeed, and every
response must be served by exactly one published version: its pCTRs are recomputed from
the features logged on its impressions with that version's model as loaded from Redis,
so a request scored by one version's trees and another's weights would not match.
Versions only move forward on each client thread, and each replica serves each version.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from auction.auth import hash_key
from engine.config import load_settings
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
from engine.features import FeatureBatch
from engine.model import CtrModel
from engine.replay import spec_for
from streams import redis_store
from streams.publish import ModelPublisher

REPO = Path(__file__).resolve().parent.parent
OPERATOR_KEY = "op_test-hot-swap-operator-key"
COST = 1024  # cheap scrypt for tests
ENV = {"ADENGINE_FEATURES_BITS": "16", "ADENGINE_TREES_NUM_TREES": "8"}
REPLICAS = 2
THREADS_PER_REPLICA = 2
DEADLINE_S = 120.0  # generous bound for any one wait; never a timing assertion
CATEGORIES = ("travel", "health", "games", "finance", "toys")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, what: str, check=lambda: None) -> None:
    """Poll ``condition()`` until true; ``check()`` may raise to fail early."""
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        check()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Replica:
    """One ``adengine serve`` process on its own port."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", "--port", str(self.port)],
            env=env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> None:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def ad_request(i: int, now: float) -> dict[str, Any]:
    return {
        "request_id": f"hot-swap-{i}",
        "ts": now,
        "user": {"user_id": f"u{i % 97}", "age": 20 + i % 50, "region": "FR"},
        "context": {"device": ("ios", "android")[i % 2], "page_category": CATEGORIES[i % 5]},
        "slots": 1 + i % 3,
    }


def build_catalogue(client: httpx.Client, now: float) -> None:
    """3 advertisers, 6 campaigns, 60 ads, all matching every request of :func:`ad_request`."""

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = client.post(path, json=body)
        assert r.status_code == 201, r.text
        return r.json()

    advertisers = [post("/v1/advertisers", {"name": f"adv {a}"})["advertiser_id"] for a in range(3)]
    for c in range(6):
        campaign = post(
            "/v1/campaigns",
            {
                "advertiser_id": advertisers[c % 3],
                "name": f"campaign {c}",
                "daily_budget": 1e6,
                "total_budget": 1e7,
                "start_ts": now - 86400,
                "end_ts": now + 86400 * 30,
                "pricing": "cpc",
                "bid": 0.2 + 0.1 * c,
            },
        )
        for k in range(10):
            post(
                f"/v1/campaigns/{campaign['campaign_id']}/ads",
                {"category": CATEGORIES[(c + k) % 5], "landing_domain": f"{c}.example"},
            )


class Client(threading.Thread):
    """Sends ad requests back to back until stopped, recording every outcome in order."""

    def __init__(self, replica: int, base: str, now: float, seed: int):
        super().__init__(daemon=True)
        self.replica, self.base, self.now, self.seed = replica, base, now, seed
        self.stop_event = threading.Event()
        self.responses: list[dict[str, Any]] = []
        self.failures: list[str] = []

    def versions_seen(self) -> set[str]:
        return {r["model_version"] for r in list(self.responses)}

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        with httpx.Client(base_url=self.base, headers=headers, timeout=30) as client:
            i = self.seed
            while not self.stop_event.is_set():
                i += 1
                try:
                    r = client.post("/v1/ad-requests", json=ad_request(i, self.now))
                except httpx.HTTPError as exc:
                    self.failures.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200:
                    self.failures.append(f"request {i}: {r.status_code} {r.text[:300]}")
                    continue
                try:
                    self.responses.append(r.json())
                except ValueError as exc:
                    self.failures.append(f"request {i}: malformed body: {exc}")


@pytest.fixture
def redis_client(tmp_path):
    path = tmp_path / "redis" / "hot-swap.db"
    client = redis_store.embedded(path)
    yield client
    redis_store.close_embedded(path)


def expected_pctr(model: CtrModel, ad: dict[str, Any]) -> float:
    """The pCTR ``model`` gives the features logged on an ad's impression."""
    features = ad["impression"]["features"]
    dense = [np.nan if x is None else x for x in features["dense"]]
    batch = FeatureBatch(
        np.asarray([features["indices"]], dtype=np.int64),
        np.asarray([features["values"]], dtype=np.float64),
        np.asarray([dense], dtype=np.float64),
    )
    return float(model.predict_proba_many(batch)[0])


def test_replicas_swap_models_under_load_without_failing_a_request(tmp_path, redis_client):
    settings = load_settings(env=ENV)
    records = list(synthetic_log(4000, seed=5))
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    batch = model.pipeline.transform_many([r.fields for r in records])
    y = np.array([r.label for r in records])

    def learn(start: int, stop: int) -> None:
        for s in range(start, stop, 250):
            part, labels = batch[s : min(s + 250, stop)], y[s : min(s + 250, stop)]
            model.learn_many(part, labels)
            model.pipeline.observe(part, labels)

    publisher = ModelPublisher(redis_client, settings.redis.model_key, keep=10)
    published: dict[str, CtrModel] = {}  # version -> the model exactly as Redis holds it
    tree_versions: dict[str, int] = {}

    def publish() -> str:
        version = publisher.publish(model)
        loaded = publisher.load(version, settings).model
        published[str(version)] = loaded
        tree_versions[str(version)] = loaded.trees.version
        return str(version)

    model.set_trees(model.fit_trees(batch.dense[:1000], y[:1000], version=1))
    learn(0, 1000)
    first = publish()

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ADENGINE_")}
    base_env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    env = {
        **base_env,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), base_env.get("PYTHONPATH")) if p),
        "REDIS_URL": redis_store.socket_url(redis_client),
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(OPERATOR_KEY, cost=COST),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(COST),
        "ADENGINE_AUCTION_MODEL_POLL_S": "0.05",
    }
    replicas = [Replica(env, tmp_path / f"serve-{n}.log") for n in range(REPLICAS)]
    clients: list[Client] = []
    try:
        for replica in replicas:
            wait_for(replica.healthy, f"replica on {replica.port}", replica.alive)
        now = time.time()
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        for replica in replicas:
            with httpx.Client(base_url=replica.base, headers=headers, timeout=30) as http:
                build_catalogue(http, now)

                def serves_first(http=http) -> bool:
                    r = http.post("/v1/ad-requests", json=ad_request(0, now))
                    assert r.status_code == 200, r.text
                    return r.json()["model_version"] == first

                wait_for(serves_first, f"replica on {replica.port} to load version {first}")

        clients = [
            Client(n, replica.base, now, seed=1000 * (THREADS_PER_REPLICA * n + t))
            for n, replica in enumerate(replicas)
            for t in range(THREADS_PER_REPLICA)
        ]
        for client in clients:
            client.start()

        def healthy_so_far() -> None:
            for replica in replicas:
                replica.alive()
            for client in clients:
                assert not client.failures, client.failures[:5]

        wait_for(lambda: all(len(c.responses) >= 5 for c in clients), "first responses",
                 healthy_so_far)  # fmt: skip
        # New weights, new weights, new trees (a new leaf space) with new weights, new weights.
        steps = [(1000, 1500, False), (1500, 2000, False), (2000, 2500, True), (2500, 3000, False)]
        for start, stop, new_trees in steps:
            if new_trees:
                model.set_trees(model.fit_trees(batch.dense[1000:2500], y[1000:2500], version=2))
            learn(start, stop)
            version = publish()
            # every client thread, on every replica, sees the new version, then 20 more
            wait_for(lambda v=version: all(v in c.versions_seen() for c in clients),
                     f"every replica to serve version {version}", healthy_so_far)  # fmt: skip
            counts = [len(c.responses) for c in clients]
            wait_for(lambda counts=counts: all(len(c.responses) >= n + 20
                                               for c, n in zip(clients, counts)),
                     "more responses", healthy_so_far)  # fmt: skip
    finally:
        for client in clients:
            client.stop_event.set()
        for client in clients:
            client.join(60)
        codes = [replica.stop() for replica in replicas]

    assert codes == [0] * REPLICAS, [
        r.log_path.read_text(errors="replace")[-2000:] for r in replicas
    ]
    assert [tree_versions[v] for v in sorted(published, key=int)] == [1, 1, 1, 2, 2]
    for client in clients:
        assert not client.is_alive()
        assert client.failures == []

    # The check below has teeth: on one impression's features every version gives its own
    # pCTR, and so does a half-swapped model (the old weights with the new trees).
    sample_ad = clients[0].responses[0]["ads"][0]
    sample = {v: expected_pctr(m, sample_ad) for v, m in published.items()}
    half_swapped = publisher.load(3, settings).model
    half_swapped.set_trees(published["4"].trees)
    sample["3 with the trees of 4"] = expected_pctr(half_swapped, sample_ad)
    assert len(set(sample.values())) == len(sample), sample

    checked = 0
    for client in clients:
        assert len(client.responses) > 10
        order = []
        for response in client.responses:
            version = response["model_version"]
            assert version in published, f"served by unpublished version {version!r}"
            assert response["model_available"] is True
            assert response["budget_checked"] is True
            assert response["matched"] == 60 and 1 <= response["scored"] <= 60
            assert 1 <= len(response["ads"]) <= 3
            model_of_request = published[version]
            for ad in response["ads"]:
                impression = ad["impression"]
                assert ad["model_version"] == impression["model_version"] == version
                assert impression["request_id"] == response["request_id"]
                assert ad["pctr"] == impression["pctr"]
                # one model, whole: its trees and its weights, on the features logged
                assert expected_pctr(model_of_request, ad) == pytest.approx(ad["pctr"], rel=1e-9)
                checked += 1
            if not order or order[-1] != version:
                order.append(version)
        # versions move forward only, each one in turn, on every client thread
        assert order == sorted(order, key=int), order
        assert order[-1] == max(published, key=int)
        assert order == [v for v in sorted(published, key=int) if int(v) >= int(order[0])]
    assert checked > 0
    for n in range(REPLICAS):  # every replica served every version
        seen = set().union(*(c.versions_seen() for c in clients if c.replica == n))
        assert seen == set(published), (n, seen)
