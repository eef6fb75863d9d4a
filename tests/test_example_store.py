"""The hour-partitioned Parquet example store: round trip, dedup, window bounds, damage."""

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from engine.events import ScoredFeatures, TrainingExample
from streams.example_store import ExampleStore, parse_partition, partition_name

T0 = 1704067200.0  # 2024-01-01T00:00:00Z


def example(i: int, ts: float, label: int = 0, dense=None, weight: float = 1.0) -> TrainingExample:
    return TrainingExample(
        example_id=f"e{i}",
        impression_id=f"i{i}",
        label=label,
        weight=weight,
        features=ScoredFeatures(
            indices=[1, 2], values=[1.0, 1.0], dense=dense if dense is not None else [i, -i]
        ),
        impression_ts=ts,
        label_ts=ts + 5.0,
        model_version="t1.w1",
    )


def test_partition_names_are_utc_hours():
    assert partition_name(T0 + 5 * 3600 + 59.9) == "hour=2024-01-01T05"
    assert parse_partition("hour=2024-01-01T05") == T0 + 5 * 3600
    assert parse_partition("hour=garbage") is None
    assert parse_partition("other") is None


def test_round_trip_partitioned_by_hour(tmp_path):
    store = ExampleStore(tmp_path)
    examples = [example(i, T0 + i * 900.0, label=i % 2, weight=1.0 + i) for i in range(12)]
    written = store.append(examples)
    # 12 examples, 15 minutes apart: hours 0, 1, 2 -> one part file each.
    assert sorted(p.parent.name for p in written) == [
        "hour=2024-01-01T00",
        "hour=2024-01-01T01",
        "hour=2024-01-01T02",
    ]
    assert all(p.name.startswith("part-") and p.suffix == ".parquet" for p in written)
    assert not list(tmp_path.rglob("*.tmp"))  # temp files renamed away
    table = pq.read_table(written[0])
    assert table.column_names == [
        "example_id",
        "label",
        "weight",
        "impression_ts",
        "label_ts",
        "model_version",
        "dense",
    ]
    assert table["model_version"].to_pylist() == ["t1.w1"] * 4

    dense, y, weight = store.read_window(T0 + 3 * 3600, hours=3)
    assert dense.shape == (12, 2)
    np.testing.assert_array_equal(dense[:, 0], np.arange(12))
    np.testing.assert_array_equal(y, np.arange(12) % 2)
    np.testing.assert_array_equal(weight, 1.0 + np.arange(12))
    assert y.dtype == np.int64


def test_nan_dense_survives(tmp_path):
    store = ExampleStore(tmp_path)
    store.append([example(1, T0, dense=[None, 2.0]), example(2, T0 + 1, dense=[1.0, math.nan])])
    dense, _, _ = store.read_window(T0 + 10, hours=1)
    assert math.isnan(dense[0, 0]) and dense[0, 1] == 2.0
    assert dense[1, 0] == 1.0 and math.isnan(dense[1, 1])


def test_window_bounds_are_half_open(tmp_path):
    store = ExampleStore(tmp_path)
    end = T0 + 7200.0
    start = end - 1800.0  # half an hour: inside partition T01 only
    store.append(
        [
            example(1, start - 0.001),  # just before: out
            example(2, start),  # the start is in
            example(3, end - 0.001),  # in
            example(4, end),  # the end is out
            example(5, T0 + 10),  # an older partition: out
        ]
    )
    dense, y, _ = store.read_window(end, hours=0.5)
    assert dense[:, 0].tolist() == [2, 3]
    assert store.read_window(T0 - 1, hours=1)[0].shape[0] == 0  # nothing there at all


def test_duplicates_keep_the_first_copy(tmp_path):
    store = ExampleStore(tmp_path)
    store.append([example(1, T0 + 1, label=1, dense=[1.0, 1.0]), example(2, T0 + 2)])
    # At-least-once redelivery: the same ids again, in a later file (and once in-file).
    store.append(
        [
            example(1, T0 + 1, label=0, dense=[9.0, 9.0]),
            example(3, T0 + 3),
            example(3, T0 + 3, dense=[7.0, 7.0]),
        ]
    )
    dense, y, _ = store.read_window(T0 + 3600, hours=1)
    assert len(y) == 3
    assert store.duplicates == 2
    assert dense[:, 0].tolist() == [1.0, 2.0, 3.0]  # first copies, original order
    assert y.tolist() == [1, 0, 0]


def test_corrupt_and_partial_files_are_skipped_and_counted(tmp_path, caplog):
    store = ExampleStore(tmp_path)
    good = store.append([example(1, T0 + 1), example(2, T0 + 2)])[0]
    bad = store.append([example(3, T0 + 3)])[0]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated
    junk = good.parent / "part-99999999999999999999-junk.parquet"
    junk.write_bytes(b"not parquet at all")
    (good.parent / ".part-inflight.tmp").write_bytes(b"half")  # a writer's temp: ignored
    dense, y, _ = store.read_window(T0 + 3600, hours=1)
    assert dense[:, 0].tolist() == [1.0, 2.0]
    assert store.corrupt_files == 2
    assert set(store.corrupt_paths) == {bad, junk}
    assert "skipping unreadable part file" in caplog.text


def test_mixed_dense_widths_keep_the_newest(tmp_path):
    store = ExampleStore(tmp_path)
    store.append([example(1, T0 + 1, dense=[1.0, 2.0, 3.0])])
    store.append([example(2, T0 + 2, dense=[4.0, 5.0])])
    dense, y, _ = store.read_window(T0 + 3600, hours=1)
    assert dense.tolist() == [[4.0, 5.0]]


def test_prune_removes_whole_old_hours_only(tmp_path):
    store = ExampleStore(tmp_path)
    store.append([example(i, T0 + i * 3600.0 + 10) for i in range(4)])
    assert store.prune(T0 + 2 * 3600 + 5) == 2  # hours 0 and 1 are entirely older
    assert [name.name for _, name in store.partitions()] == [
        "hour=2024-01-01T02",
        "hour=2024-01-01T03",
    ]
    dense, _, _ = store.read_window(T0 + 5 * 3600, hours=5)
    assert dense[:, 0].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("hours", [1, 2.5])
def test_many_appends_read_back_in_order(tmp_path, hours):
    store = ExampleStore(tmp_path)
    for start in range(0, 400, 50):
        store.append([example(i, T0 + i * 20.0) for i in range(start, start + 50)])
    end = T0 + 400 * 20.0
    dense, _, _ = store.read_window(end, hours)
    expected = [i for i in range(400) if end - hours * 3600 <= T0 + i * 20.0 < end]
    assert dense[:, 0].tolist() == expected
