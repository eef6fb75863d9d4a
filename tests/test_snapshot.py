import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.config import load_settings
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
from engine.model import CtrModel
from engine.replay import spec_for
from engine.snapshot import SnapshotError, SnapshotStore
from engine.trees import TreeModel

CHILD = textwrap.dedent(
    """
    import os, sys, time
    import numpy as np
    from engine.config import load_settings
    from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log
    from engine.model import CtrModel
    from engine.replay import spec_for
    from engine.snapshot import SnapshotStore
    from engine.trees import TreeModel

    settings = load_settings()
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    records = list(synthetic_log(3000, seed=3))
    batch = model.pipeline.transform_many([r.fields for r in records])
    y = np.array([r.label for r in records])
    model.set_trees(model.fit_trees(batch.dense[:1500], y[:1500], version=1))
    for start in range(0, 3000, 32):
        model.learn_many(batch[start:start + 32], y[start:start + 32])
        model.pipeline.observe(batch[start:start + 32], y[start:start + 32])
    model.snapshot(SnapshotStore(sys.argv[1]))
    final = model.pipeline.transform_many([r.fields for r in records])  # reads the counts
    np.save(sys.argv[2], model.predict_proba_many(final))
    print("ready", flush=True)
    time.sleep(600)
    """
)


def test_snapshot_kill_restore_predicts_identically(tmp_path):
    store_dir, expected = tmp_path / "store", tmp_path / "expected.npy"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_dir), str(expected)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    settings = load_settings()
    restored = CtrModel.restore(SnapshotStore(store_dir), settings)
    records = list(synthetic_log(3000, seed=3))
    batch = restored.pipeline.transform_many([r.fields for r in records])
    assert np.array_equal(restored.predict_proba_many(batch), np.load(expected))
    assert restored.trees is not None and restored.trees.version == 1
    assert restored.pipeline.counts is not None and restored.pipeline.counts.total_impressions


def trained_model(settings, rows=1200):
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    records = list(synthetic_log(rows, seed=5))
    batch = model.pipeline.transform_many([r.fields for r in records])
    y = np.array([r.label for r in records])
    model.set_trees(TreeModel.fit(batch.dense, y, settings.trees, 1))
    model.learn_many(batch, y)
    return model, batch


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_snapshot_is_refused_and_previous_kept(tmp_path, damage):
    settings = load_settings()
    store = SnapshotStore(tmp_path)
    model, batch = trained_model(settings)
    model.snapshot(store)
    before = model.predict_proba_many(batch)
    model.learn_many(batch, np.zeros(len(batch), dtype=int))
    newest = model.snapshot(store)

    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        newest.write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="truncated|checksum|not an adengine snapshot"):
        CtrModel.restore(store, settings)

    # The refused file changed nothing: the previous snapshot is intact and loadable.
    assert store.versions() == [1, 2]
    arrays, meta = store.load(1)
    assert meta["version"] == 1
    assert "weights_keys" in arrays
    newest.unlink()
    assert np.array_equal(CtrModel.restore(store, settings).predict_proba_many(batch), before)


def test_store_prunes_old_versions(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    for i in range(4):
        store.save({"x": np.array([i])}, {})
    assert store.versions() == [3, 4]
    arrays, meta = store.load_latest()
    assert meta["version"] == 4 and arrays["x"].tolist() == [3]
