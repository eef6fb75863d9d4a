"""POST /v1/events: validated events land on their Kafka topics, keyed by impression id."""

import asyncio
import uuid

from aiokafka import AIOKafkaConsumer, TopicPartition
from fastapi.testclient import TestClient

from auction.api import create_app
from auction.auth import hash_key
from auction.campaigns import CampaignService
from engine.config import load_settings
from engine.events import Engagement, Impression, ScoredFeatures, decode_any, encode
from streams.event_sink import KafkaEventSink
from streams.topics import ensure_topics

OPERATOR_KEY = "op_test-events-operator-key"
COST = 2**4
AUTH = {"Authorization": f"Bearer {OPERATOR_KEY}"}


def impression(iid: str) -> Impression:
    return Impression(
        impression_id=iid, request_id="r", ts=1.7e9, ad_id="a", campaign_id="c",
        advertiser_id="adv", position=0, price=0.2, model_version="t1.w1", exploration=False,
        pctr=0.05, features=ScoredFeatures(indices=[1, 2], values=[0.5, 0.5], dense=[1.0]),
    )  # fmt: skip


async def read_all(bootstrap: str, topic: str, partitions: int, expected: int):
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        out = []
        for _ in range(50):
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.partition, r.key.decode(), decode_any(r.value)) for r in records]
            if len(out) >= expected:
                break
        return out
    finally:
        await consumer.stop()


def test_events_are_validated_and_written_keyed_by_impression_id(broker):
    run = uuid.uuid4().hex[:6]
    env = {
        "ADENGINE_KAFKA_IMPRESSIONS_TOPIC": f"ev-{run}.impressions",
        "ADENGINE_KAFKA_ENGAGEMENTS_TOPIC": f"ev-{run}.engagements",
    }
    settings = load_settings(env=env)
    ensure_topics(broker.bootstrap_servers, settings)
    sink = KafkaEventSink(broker.bootstrap_servers, settings.kafka)
    app = create_app(
        CampaignService(), None, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST, event_sink=sink
    )
    click = Engagement(engagement_id="e1", impression_id="i1", ts=1.7e9 + 3, kind="click")
    batch = b"[" + encode(impression("i1")) + b"," + encode(click) + b"]"
    with TestClient(app) as client:
        r = client.post("/v1/events", content=batch, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json() == {"accepted": 2}
        single = client.post("/v1/events", content=encode(impression("i2")), headers=AUTH)
        assert single.json() == {"accepted": 1}

        # One bad event refuses the whole request, naming the field; nothing is written.
        bad_click = b'{"type":"Engagement","engagement_id":"e9","impression_id":"i9",'
        bad = client.post(
            "/v1/events", content=b"[" + bad_click + b'"ts":1.0,"kind":"like"}]', headers=AUTH
        )
        assert bad.status_code == 422 and "kind" in bad.json()["detail"]
        assert client.post("/v1/events", content=b"[]").status_code == 401

    kafka = settings.kafka
    imps = asyncio.run(
        read_all(broker.bootstrap_servers, kafka.impressions_topic, kafka.impressions_partitions, 2)
    )
    engs = asyncio.run(
        read_all(broker.bootstrap_servers, kafka.engagements_topic, kafka.engagements_partitions, 1)
    )
    assert sorted((key, event.impression_id) for _, key, event in imps) == [
        ("i1", "i1"),
        ("i2", "i2"),
    ]
    assert [(key, event) for _, key, event in engs] == [("i1", click)]
    # Co-partitioned: the click sits on the same partition number as its impression.
    assert {p for p, key, _ in imps if key == "i1"} == {p for p, _, _ in engs}


def test_events_without_a_stream_are_refused():
    app = create_app(CampaignService(), None, hash_key(OPERATOR_KEY, cost=COST), key_cost=COST)
    r = TestClient(app).post("/v1/events", content=encode(impression("i1")), headers=AUTH)
    assert r.status_code == 503
