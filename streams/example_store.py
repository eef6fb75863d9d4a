"""The example store: labelled training examples as Parquet files partitioned by hour.

The GBDT refresh (:mod:`streams.refresh`) retrains LightGBM on the last K hours of
examples, so every :class:`~engine.events.TrainingExample` the trainer learns is also
appended here. Layout under ``directory`` (hive-style, one partition per UTC hour of
``impression_ts``)::

    hour=2024-01-01T05/part-<time_ns>-<pid>-<random>.parquet

Columns: ``example_id``, ``label``, ``weight``, ``impression_ts``, ``label_ts``,
``model_version`` and ``dense`` (``list<float64>``, NaN = missing). The sparse hashed
features are not stored: the GBDT only needs ``dense``, ``label`` (and ``weight``).

Writes are atomic: a part file is written under a hidden temporary name in its partition
directory, fsynced and renamed, so a reader never sees a half-written part file under its
final name. A file that is damaged anyway (disk fault, copy from elsewhere, a crash on a
filesystem without atomic rename) is skipped by :meth:`ExampleStore.read_window`, logged
and counted in :attr:`ExampleStore.corrupt_files`; the read goes on with the rest.

Duplicates: upstream delivery is at-least-once, so one ``example_id`` may be appended
more than once. :meth:`ExampleStore.read_window` keeps the first copy: partitions in hour
order, part files in name order (names start with the write time in nanoseconds), rows in
file order.

>>> import tempfile
>>> from engine.events import ScoredFeatures, TrainingExample
>>> store = ExampleStore(tempfile.mkdtemp())
>>> ex = TrainingExample(example_id="e1", impression_id="i1", label=1, weight=1.0,
...     features=ScoredFeatures(indices=[], values=[], dense=[0.5, 2.0]),
...     impression_ts=3600.0, label_ts=3601.0, model_version="t1.w1")
>>> _ = store.append([ex, ex])
>>> dense, y, weight = store.read_window(end_ts=7200.0, hours=1)
>>> dense.tolist(), y.tolist(), weight.tolist()
([[0.5, 2.0]], [1], [1.0])
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.events import TrainingExample

log = logging.getLogger("adengine.example_store")

HOUR = 3600.0
PARTITION_PREFIX = "hour="
HOUR_FORMAT = "%Y-%m-%dT%H"

SCHEMA = pa.schema(
    [
        ("example_id", pa.string()),
        ("label", pa.int8()),
        ("weight", pa.float64()),
        ("impression_ts", pa.float64()),
        ("label_ts", pa.float64()),
        ("model_version", pa.string()),
        ("dense", pa.list_(pa.float64())),
    ]
)
_READ_COLUMNS = ["example_id", "label", "weight", "impression_ts", "dense"]
READ_SCHEMA = pa.schema([SCHEMA.field(name) for name in _READ_COLUMNS])


def hour_start(ts: float) -> float:
    """Start (epoch seconds) of the UTC hour containing ``ts``."""
    return math.floor(ts / HOUR) * HOUR


def partition_name(ts: float) -> str:
    """``hour=YYYY-MM-DDTHH`` of the UTC hour containing ``ts``."""
    return PARTITION_PREFIX + datetime.fromtimestamp(hour_start(ts), UTC).strftime(HOUR_FORMAT)


def parse_partition(name: str) -> float | None:
    """Start of the hour a partition directory name stands for (None if not a partition)."""
    if not name.startswith(PARTITION_PREFIX):
        return None
    try:
        stamp = datetime.strptime(name[len(PARTITION_PREFIX) :], HOUR_FORMAT)
    except ValueError:
        return None
    return stamp.replace(tzinfo=UTC).timestamp()


class ExampleStore:
    """Append-only, hour-partitioned Parquet store of training examples."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.corrupt_files = 0  # part files skipped because they could not be read
        self.corrupt_paths: list[Path] = []
        self.duplicates = 0  # rows dropped as repeated example ids by the last read
        self._seq = 0

    # -- writing ------------------------------------------------------------------------------
    def append(self, examples: Iterable[TrainingExample]) -> list[Path]:
        """Write the examples, one new part file per hour touched; the files written."""
        by_hour: dict[float, list[TrainingExample]] = {}
        for example in examples:
            by_hour.setdefault(hour_start(example.impression_ts), []).append(example)
        written = []
        for start in sorted(by_hour):
            rows = by_hour[start]
            table = pa.table(
                {
                    "example_id": [e.example_id for e in rows],
                    "label": [e.label for e in rows],
                    "weight": [e.weight for e in rows],
                    "impression_ts": [e.impression_ts for e in rows],
                    "label_ts": [e.label_ts for e in rows],
                    "model_version": [e.model_version for e in rows],
                    "dense": [list(e.features.dense) for e in rows],
                },
                schema=SCHEMA,
            )
            written.append(self._write(partition_name(start), table))
        return written

    def _write(self, partition: str, table: pa.Table) -> Path:
        folder = self.directory / partition
        folder.mkdir(parents=True, exist_ok=True)
        self._seq += 1
        name = f"part-{time.time_ns():020d}-{self._seq:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final = folder / f"{name}.parquet"
        temp = folder / f".{name}.tmp"
        try:
            with open(temp, "wb") as handle:
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return final

    # -- reading ------------------------------------------------------------------------------
    def partitions(self) -> list[tuple[float, Path]]:
        """(hour start, directory) of every partition, oldest first."""
        found = []
        for entry in self.directory.iterdir():
            start = parse_partition(entry.name)
            if start is not None and entry.is_dir():
                found.append((start, entry))
        return sorted(found)

    def files(self, start_ts: float, end_ts: float) -> list[Path]:
        """Part files of the partitions overlapping ``[start_ts, end_ts)``, in read order."""
        out = []
        for start, folder in self.partitions():
            if start + HOUR > start_ts and start < end_ts:
                out += sorted(p for p in folder.glob("part-*.parquet") if p.is_file())
        return out

    def _read_file(self, path: Path) -> pa.Table | None:
        try:
            table = pq.read_table(path, columns=_READ_COLUMNS)
            return table.select(_READ_COLUMNS).cast(READ_SCHEMA)
        except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
            self.corrupt_files += 1
            self.corrupt_paths.append(path)
            log.warning("example store: skipping unreadable part file %s: %s", path, exc)
            return None

    def read_table(self, start_ts: float, end_ts: float) -> pa.Table:
        """Deduplicated rows with ``start_ts <= impression_ts < end_ts`` (read columns)."""
        tables = [t for t in map(self._read_file, self.files(start_ts, end_ts)) if t is not None]
        if not tables:
            return READ_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        ts = table["impression_ts"]
        table = table.filter(
            pc.and_(pc.greater_equal(ts, start_ts), pc.less(ts, end_ts))
        ).combine_chunks()
        ids = table["example_id"].to_numpy(zero_copy_only=False)
        _, first = np.unique(ids, return_index=True)
        self.duplicates = len(ids) - len(first)
        if self.duplicates:
            table = table.take(pa.array(np.sort(first)))
        return table

    def read_window(self, end_ts: float, hours: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(dense, y, weight)`` of the examples with impression_ts in the last ``hours``.

        The window is ``[end_ts - hours * 3600, end_ts)``. ``dense`` is ``(n, d)`` float64
        with NaN for missing values. Rows whose dense width differs from the newest row's
        (a feature-pipeline change inside the window) are dropped with a warning.
        """
        table = self.read_table(end_ts - hours * HOUR, end_ts)
        n = table.num_rows
        if n == 0:
            return np.empty((0, 0)), np.empty(0, dtype=np.int64), np.empty(0)
        dense_col = table["dense"]
        lengths = pc.list_value_length(dense_col).fill_null(0).to_numpy()
        width = int(lengths[-1])
        same = lengths == width
        if not same.all():
            log.warning(
                "example store: dropping %d rows whose dense width is not the newest (%d)",
                int((~same).sum()),
                width,
            )
            table = table.filter(pa.array(same))
            dense_col = table["dense"]
        flat = pc.list_flatten(dense_col).fill_null(math.nan).to_numpy(zero_copy_only=False)
        dense = np.asarray(flat, dtype=np.float64).reshape(table.num_rows, width)
        y = table["label"].to_numpy().astype(np.int64)
        weight = table["weight"].to_numpy().astype(np.float64)
        return dense, y, weight

    # -- retention ----------------------------------------------------------------------------
    def prune(self, older_than_ts: float) -> int:
        """Delete the partitions whose whole hour lies before ``older_than_ts``; how many."""
        removed = 0
        for start, folder in self.partitions():
            if start + HOUR <= older_than_ts:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
