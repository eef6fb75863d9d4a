"""The real Prometheus server (Debian's ``prometheus``) scraping live adengine processes.

``adengine serve``, the trainer, a joiner worker and a billing worker run as child
processes on one embedded broker and one embedded Redis; Prometheus scrapes them every
second. The test waits (against a deadline, polling Prometheus's HTTP API) until every
target is up and the counters equal what was sent, then evaluates every dashboard query
on the scraped data. Without the binary the test is skipped, except under ``CI=true``, where
``scripts/test.sh`` must have installed it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from auction.auth import hash_key
from auction.metrics import parse_model_version
from engine.config import load_settings
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
from engine.events import Engagement, Impression, ScoredFeatures, TrainingExample, encode
from engine.model import CtrModel
from engine.replay import spec_for
from streams import redis_store
from streams.broker import EmbeddedBroker, free_port
from streams.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DASHBOARDS = sorted((REPO / "configs" / "grafana" / "dashboards").glob("*.json"))
OPERATOR_KEY = "op_test-scrape-operator-key"
COST = 1024
N_EXAMPLES, N_IMPRESSIONS, N_CLICKS = 600, 40, 10
CPM_PRICE = 0.5  # per mille
# The billing worker, and the impression fields it charges by, when the project has them.
BILLING = (
    importlib.util.find_spec("auction.billing") is not None
    and "pricing" in Impression.__struct_fields__
)
COMPONENTS = ("api", "trainer", "joiner", "billing") if BILLING else ("api", "trainer", "joiner")
DEADLINE_S = 180.0
# Dashboard queries that may rightly be empty on a healthy system: no 5xx answered.
MAY_BE_EMPTY = ('status=~"5.."',)

pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


def require_prometheus() -> None:
    if os.path.exists(PROMETHEUS):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{PROMETHEUS} missing: CI must install Debian's prometheus (scripts/test.sh)")
    pytest.skip(f"{PROMETHEUS} missing: apt-get install --no-install-recommends prometheus")


class Child:
    """A child process logging to a file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def check(self) -> None:
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def wait_for(what: str, condition: Callable[[], Any], children: list[Child]) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail after the deadline."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        for child in children:
            child.check()
        try:
            value = condition()
        except httpx.TransportError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.name}\n{c.tail()}" for c in children)
            raise AssertionError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.25)


# --------------------------------------------------------------------------- traffic


def training_examples(settings, n: int) -> list[bytes]:
    """``n`` encoded TrainingExamples with features of the synthetic schema's pipeline."""
    records = list(synthetic_log(n, seed=11))
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    batch = model.pipeline.transform_many([r.fields for r in records])
    out = []
    for i, record in enumerate(records):
        dense = [None if math.isnan(v) else float(v) for v in batch.dense[i]]
        features = ScoredFeatures(
            indices=batch.indices[i].tolist(), values=batch.values[i].tolist(), dense=dense
        )
        example = TrainingExample(
            example_id=f"ex-{i}",
            impression_id=f"imp-{i}",
            label=record.label,
            weight=1.0,
            features=features,
            impression_ts=record.ts,
            label_ts=record.ts + 1.0,
            model_version="t0.w0",
        )
        out.append(encode(example))
    return out


def join_events(now: float, campaign_id: str) -> list[tuple[str, str, bytes]]:
    """CPM impressions, then clicks on the first ``N_CLICKS``: (role, key, value)."""
    events = []
    billable = {"pricing": "cpm", "bid": 1.0} if BILLING else {}
    for i in range(N_IMPRESSIONS):
        impression = Impression(
            impression_id=f"i{i}", request_id=f"r{i}", ts=now + i, ad_id="ad",
            campaign_id=campaign_id, advertiser_id="a", position=0, price=CPM_PRICE,
            model_version="m1", exploration=False, pctr=0.1,
            features=ScoredFeatures(indices=[1, 2], values=[1.0, 1.0], dense=[0.5]),
            **billable,
        )  # fmt: skip
        events.append(("impressions", impression.impression_id, encode(impression)))
    for i in range(N_CLICKS):
        click = Engagement(
            engagement_id=f"e{i}", impression_id=f"i{i}", ts=now + i + 2, kind="click"
        )
        events.append(("engagements", click.impression_id, encode(click)))
    return events


def produce(bootstrap: str, records: list[tuple[str, str | None, bytes]]) -> None:
    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0)
        await producer.start()
        try:
            futures = [
                await producer.send(topic, value, key=key.encode() if key else None)
                for topic, key, value in records
            ]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


# --------------------------------------------------------------------------- Prometheus


def prometheus_config(targets: dict[str, int]) -> str:
    jobs = "".join(
        f"  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        for job, port in targets.items()
    )
    return f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"


class PromAPI:
    def __init__(self, base: str) -> None:
        self.base = base

    def query(self, promql: str) -> list[dict]:
        r = httpx.get(f"{self.base}/api/v1/query", params={"query": promql}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (promql, body)
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def targets(self) -> list[dict]:
        return httpx.get(f"{self.base}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]


def dashboard_queries(rate_interval: str = "30s") -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables filled in) of every panel."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$__rate_interval", rate_interval)
                out.append((path.stem, panel["title"], expr.replace("$__range", "10m")))
    return out


def test_promtool_accepts_the_repository_config():
    require_prometheus()
    result = subprocess.run(
        [PROMTOOL, "check", "config", str(REPO / "configs" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- the scrape


def test_prometheus_scrapes_every_component(tmp_path):
    require_prometheus()
    tag = uuid.uuid4().hex[:8]
    ports = {job: free_port("127.0.0.1") for job in (*COMPONENTS, "prometheus")}
    base_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADENGINE_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")
    }
    overrides = {
        "PYTHONPATH": str(REPO),
        "ADENGINE_FEATURES_BITS": "16",
        "ADENGINE_REDIS_EMBEDDED_PATH": str(tmp_path / "redis" / "redis.db"),
        "ADENGINE_REDIS_MODEL_KEY": f"s{tag}:model",
        "ADENGINE_REFRESH_STORE_DIR": str(tmp_path / "examples"),
        "ADENGINE_TRAINER_APP_ID": f"trainer-{tag}",
        "ADENGINE_TRAINER_BATCH_SIZE": "64",
        "ADENGINE_TRAINER_MAX_WAIT_S": "0.1",
        "ADENGINE_TRAINER_PUBLISH_EVERY_EXAMPLES": "200",
        "ADENGINE_TRAINER_PUBLISH_EVERY_S": "1.0",
        "ADENGINE_TRAINER_METRICS_PORT": str(ports["trainer"]),
        "ADENGINE_JOINER_APP_ID": f"joiner-{tag}",
        "ADENGINE_JOINER_METRICS_PORT": str(ports["joiner"]),
        "ADENGINE_JOINER_STATE_PREFIX": f"s{tag}:joiner",
        "ADENGINE_BILLING_APP_ID": f"billing-{tag}",
        "ADENGINE_BILLING_METRICS_PORT": str(ports.get("billing", 0)),
        "ADENGINE_BILLING_STATE_PREFIX": f"s{tag}:billing:",
        "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(OPERATOR_KEY, cost=COST),
        "ADENGINE_AUCTION_KEY_SCRYPT_COST": str(COST),
        "ADENGINE_AUCTION_MODEL_POLL_S": "0.2",
    }
    for role in ("impressions", "engagements", "examples", "late_clicks", "dead_letters"):
        overrides[f"ADENGINE_KAFKA_{role.upper()}_TOPIC"] = f"s{tag}.{role}"
    overrides["ADENGINE_KAFKA_MODEL_UPDATES_TOPIC"] = f"s{tag}.model-updates"

    children: list[Child] = []
    with EmbeddedBroker() as broker:
        kafka_env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers}
        settings = load_settings(env={**overrides, **kafka_env})
        ensure_topics(broker.bootstrap_servers, settings)
        client = redis_store.connect(settings)  # one embedded Redis for every process
        env = {**base_env, **overrides, "REDIS_URL": redis_store.socket_url(client)}
        try:
            python = sys.executable
            children.append(
                Child("trainer", [python, "-m", "streams.trainer"], {**env, **kafka_env}, tmp_path)
            )
            joiner = [python, "-m", "streams.joiner", "worker", "-l", "info", "--without-web"]
            children.append(Child("joiner", joiner, {**env, **kafka_env}, tmp_path))
            if BILLING:
                billing = [python, "-m", "auction.billing", "-l", "info"]
                children.append(Child("billing", billing, {**env, **kafka_env}, tmp_path))
            serve = [python, "-m", "engine.cli", "serve", "--port", str(ports["api"])]
            children.append(Child("api", serve, env, tmp_path))  # in-memory catalogue
            config = tmp_path / "prometheus.yml"
            jobs = {f"adengine-{c}": ports[c] for c in COMPONENTS}
            config.write_text(prometheus_config(jobs))
            prom_argv = [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ]
            children.append(Child("prometheus", prom_argv, base_env, tmp_path))
            prom = PromAPI(f"http://127.0.0.1:{ports['prometheus']}")
            _exercise(prom, ports["api"], settings, children)
        finally:
            for child in reversed(children):
                child.stop()
            redis_store.close_embedded(overrides["ADENGINE_REDIS_EMBEDDED_PATH"])


def _exercise(prom: PromAPI, api_port: int, settings, children: list[Child]) -> None:
    kafka = settings.kafka
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{api_port}",
        headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
        timeout=10,
    )
    wait_for("the API", lambda: api.get("/healthz").status_code == 200, children)
    wait_for("Prometheus", lambda: httpx.get(f"{prom.base}/-/ready").status_code == 200, children)

    # a campaign with one ad (and its budget in Redis)
    now = time.time()
    adv = api.post("/v1/advertisers", json={"name": "adv"}).json()["advertiser_id"]
    campaign = {
        "advertiser_id": adv, "name": "c", "daily_budget": 100.0, "total_budget": 1000.0,
        "start_ts": now - 3600, "end_ts": now + 86400, "pricing": "cpc", "bid": 0.5,
    }  # fmt: skip
    r = api.post("/v1/campaigns", json=campaign)
    assert r.status_code == 201, r.text
    cid = r.json()["campaign_id"]
    ad = {"category": "shoes", "landing_domain": "x.example"}
    assert api.post(f"/v1/campaigns/{cid}/ads", json=ad).status_code == 201

    # traffic: examples for the trainer; impressions and clicks for the joiner and billing
    examples = training_examples(settings, N_EXAMPLES)
    produce(kafka.bootstrap_servers, [(kafka.examples_topic, None, e) for e in examples])
    events = join_events(time.time(), cid)
    topics = {"impressions": kafka.impressions_topic, "engagements": kafka.engagements_topic}
    produce(kafka.bootstrap_servers, [(topics[role], key, value) for role, key, value in events])

    # ad requests until the trainer's model serves them
    served = {"requests": 0, "ads": 0, "slots": 0, "prior": 0}
    pctrs: list[float] = []

    def request_ads() -> str | None:
        body = {"request_id": f"r{served['requests']}", "ts": time.time(), "slots": 2,
                "user": {"user_id": "u1"}}  # fmt: skip
        r = api.post("/v1/ad-requests", json=body)
        assert r.status_code == 200, r.text
        served["requests"] += 1
        served["slots"] += 2
        out = r.json()
        served["ads"] += len(out["ads"])
        pctrs.extend(ad["pctr"] for ad in out["ads"])
        served["prior"] += not out["model_available"]
        return out["model_version"] if out["model_available"] else None

    wait_for("the trainer's model to serve", request_ads, children)
    assert served["ads"] == served["requests"]  # one ad, one of two slots filled each time
    assert api.post("/v1/ad-requests", json={"slots": 0}).status_code == 422
    assert httpx.get(f"{api.base_url}/v1/campaigns").status_code == 401  # no key

    # every target up, one job per component
    def all_up() -> bool:
        targets = prom.targets()
        return len(targets) == len(COMPONENTS) and all(t["health"] == "up" for t in targets)

    wait_for("every target up", all_up, children)
    assert {t["labels"]["job"] for t in prom.targets()} == {f"adengine-{c}" for c in COMPONENTS}

    # more traffic while Prometheus watches, so that rates are defined
    versions = [request_ads() for _ in range(5)]
    assert all(versions)
    version = versions[-1]  # the gauges show the model of the last request

    # the scraped counters equal what was sent
    def equals(promql: str, expected: float) -> Callable[[], bool]:
        return lambda: prom.value(promql) == expected

    expectations = {
        "sum(adengine_trainer_examples_total)": N_EXAMPLES,
        'sum(adengine_joiner_events_total{outcome="impressions"})': N_IMPRESSIONS,
        'sum(adengine_joiner_events_total{outcome="clicks"})': N_CLICKS,
        **(
            {
                'sum(adengine_billing_events_total{kind="impression"})': N_IMPRESSIONS,
                'sum(adengine_billing_charges_total{status="accepted"})': N_IMPRESSIONS,
                'sum(adengine_billing_clicks_total{outcome="cpm"})': N_CLICKS,  # nothing to bill
            }
            if BILLING
            else {}
        ),
        "sum(adengine_serving_requests_total)": served["requests"],
        "sum(adengine_serving_slots_requested_total)": served["slots"],
        "sum(adengine_serving_slots_filled_total)": served["ads"],
        "sum(adengine_serving_pctr_count)": served["ads"],
        'sum(adengine_api_requests_total{route="/v1/ad-requests",status="200"})': served[
            "requests"
        ],
        'sum(adengine_api_requests_total{route="/v1/ad-requests",status="422"})': 1,
    }
    for promql, expected in expectations.items():
        wait_for(f"{promql} == {expected}", equals(promql, expected), children)

    def close_to(promql: str, expected: float) -> Callable[[], bool]:
        return lambda: prom.value(promql) == pytest.approx(expected, rel=1e-9)

    if BILLING:  # every CPM impression charged price / 1000 to the campaign's budget
        spend = N_IMPRESSIONS * CPM_PRICE / 1000
        wait_for("billed spend", close_to("sum(adengine_billing_spend_total)", spend), children)
    published = wait_for(
        "a published model", lambda: prom.value("max(adengine_trainer_model_version)"), children
    )
    assert published >= 1
    numbers = parse_model_version(version)
    gauges = {"model": "model", "trees": "tree", "weights": "weights"}
    assert numbers, f"unexpected served model version {version!r}"
    for key, number in numbers.items():
        gauge = f"max(adengine_serving_{gauges[key]}_version)"
        wait_for(f"{gauge} == {number}", equals(gauge, number), children)
    pctr_sum = close_to("sum(adengine_serving_pctr_sum)", sum(pctrs))
    wait_for("the sum of served pCTRs", pctr_sum, children)

    # panels compute what they say: one of two slots filled on every request
    queries: dict[tuple[str, str], str] = {}
    for board, title, expr in dashboard_queries(rate_interval="10m"):  # the whole test
        queries.setdefault((board, title), expr)  # a panel's first query
    fill = queries["serving", "Fill rate"]
    wait_for("a 50% fill rate", lambda: prom.value(fill) == pytest.approx(0.5), children)
    mean_pctr = prom.value(queries["serving", "Served pCTR"])
    assert min(pctrs) - 1e-9 <= mean_pctr <= max(pctrs) + 1e-9

    # requests answered before the first model was published fell back on the prior CTR
    fallbacks = "sum(adengine_serving_prior_fallbacks_total)"
    wait_for("prior fallbacks", equals(fallbacks, served["prior"]), children)

    # every dashboard query evaluates, and has data unless it may rightly be empty
    def empty_queries() -> list[str]:
        return [
            f"{board} / {title}: {expr}"
            for board, title, expr in dashboard_queries()
            if not prom.query(expr) and not any(s in expr for s in MAY_BE_EMPTY)
        ]

    assert dashboard_queries()
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = empty_queries()
        return not empty

    try:
        wait_for("data for every dashboard query", all_have_data, children)
    except AssertionError as exc:
        raise AssertionError("no data:\n" + "\n".join(empty)) from exc
