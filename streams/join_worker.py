"""The joiner's batch step, independent of the Kafka client that feeds it.

:class:`JoinWorker` takes a batch of source records (anything with ``topic``,
``partition``, ``offset``, ``key`` and ``value``: faust messages or aiokafka
``ConsumerRecord``), runs each through the :class:`streams.join.Join` of its partition,
publishes the outputs, waits for the broker to acknowledge them, and only then commits the
partitions' state together with the offsets it consumed
(:class:`streams.join_state.JoinStateStore`). It returns the records whose partitions
were committed: only those may be acknowledged to Kafka. So the Kafka offsets never run
ahead of the state, a restarted worker skips exactly the events its state already holds,
and a batch interrupted by a crash is joined again from the same state: its outputs may
repeat, with the same ``example_id``, and downstream drops duplicates by it. A worker
that lost a partition in a rebalance cannot overwrite the new owner's state (its commit
is refused, counted in ``adengine_joiner_fenced_total``, and its copy dropped).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter

from engine.calibration import NegativeDownsampler
from engine.config import Settings
from engine.events import AdRequest, EventError, decode_any, encode
from streams.join import COUNTERS, DeadLetter, Join
from streams.join_state import JoinStateStore, PartitionState, StateChanges

__all__ = ["JoinedBatch", "JoinWorker", "JoinerMetrics"]

log = logging.getLogger(__name__)


class JoinerMetrics:
    """Prometheus metrics of one joiner worker, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.events = PromCounter(
            "adengine_joiner_events",
            "Join outcomes by kind (see streams.join)",
            ["outcome"],
            registry=r,
        )
        for outcome in COUNTERS:
            self.events.labels(outcome)
        self.watermark_lag = Gauge(
            "adengine_joiner_watermark_lag_seconds",
            "Wall clock minus the event-time watermark, worst owned partition",
            registry=r,
        )
        self.pending = Gauge(
            "adengine_joiner_pending_impressions", "Impressions waiting for a label", registry=r
        )
        self.batch_seconds = Histogram(
            "adengine_joiner_batch_seconds",
            "Time to join, publish and commit one batch",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.commits = PromCounter("adengine_joiner_commits", "Partition state commits", registry=r)
        self.fenced = PromCounter(
            "adengine_joiner_fenced",
            "Commits refused because another worker took the partition over",
            registry=r,
        )
        self._exported: Counter[str] = Counter()

    def export_counts(self, counts: Counter[str]) -> None:
        """Add what ``counts`` gained since the last call to the outcome counter."""
        for outcome, value in counts.items():
            delta = value - self._exported[outcome]
            if delta > 0:
                self.events.labels(outcome).inc(delta)
                self._exported[outcome] = value


@dataclass
class JoinedBatch:
    """A batch joined in memory, its outputs handed to the producer, not yet committed."""

    records: dict[int, list[Any]]  # partition -> its records in the batch
    sent: list[Any]  # producer futures of the outputs
    changes: list[StateChanges]
    started: float


class JoinWorker:
    """Batches of source events -> join -> outputs, then state, then acks.

    Holds the :class:`PartitionState` of the partitions this worker owns and one
    :class:`Join` per partition (all sharing ``counts``). ``await publish(records)`` hands
    ``(topic, key, value)`` records to the producer and returns awaitables that resolve
    once the broker has them all.

    :meth:`process` is :meth:`join` then :meth:`finish`. A driver may instead run
    :meth:`finish` of one batch while it fetches and joins the next, provided it finishes
    batches one at a time and in order.
    """

    def __init__(self, settings: Settings, store: JoinStateStore, publish, assignment) -> None:
        kafka, cfg = settings.kafka, settings.joiner
        self.store = store
        self.publish = publish
        self.assignment = assignment  # () -> partitions this worker currently owns
        self.sources = (kafka.impressions_topic, kafka.engagements_topic)
        self.examples_topic = kafka.examples_topic
        self.side_topic = kafka.late_clicks_topic
        self.dead_topic = kafka.dead_letters_topic
        self.window_s = cfg.window_s
        self.grace_s = cfg.out_of_order_grace_s
        self.rate = settings.calibration.negative_downsampling_rate
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self.counts.update(replayed=0, not_owned=0)
        self.parts: dict[int, PartitionState] = {}
        self.joins: dict[int, Join] = {}
        self.metrics = JoinerMetrics()

    def forget(self, partitions) -> None:
        """Drop the in-memory copy of ``partitions`` (revoked, or refused at commit)."""
        for p in partitions:
            self.parts.pop(p, None)
            self.joins.pop(p, None)

    async def partition(self, p: int) -> tuple[PartitionState, Join]:
        """The state and join of partition ``p``, loaded from Redis (taken over) if needed."""
        part = self.parts.get(p)
        if part is None:
            part = await asyncio.to_thread(self.store.load, p)
            join = Join(
                part.state,
                window_s=self.window_s,
                grace_s=self.grace_s,
                downsampler=NegativeDownsampler(self.rate),
            )
            join.counts = self.counts
            self.parts[p], self.joins[p] = part, join
            log.info(
                "joiner: partition %d loaded (epoch %d, %d keys)", p, part.epoch, len(part.state)
            )
        return part, self.joins[p]

    async def process(self, messages: list[Any]) -> list[Any]:
        """Join one batch and finish it; returns the records that may be acknowledged."""
        return await self.finish(await self.join(messages))

    async def join(self, messages: list[Any]) -> JoinedBatch:
        """Join ``messages`` in memory and hand the outputs to the producer."""
        started = time.perf_counter()
        owned = self.assignment()
        self.forget([p for p in self.parts if p not in owned])
        outputs: list[tuple[str, bytes | None, bytes]] = []
        touched: dict[int, list[Any]] = {}
        for message in messages:
            p = message.partition
            if p not in owned:
                self.counts["not_owned"] += 1  # revoked mid-batch: the new owner joins it
                continue
            part, join = await self.partition(p)
            touched.setdefault(p, []).append(message)
            if part.applied(message.topic, message.offset):
                self.counts["replayed"] += 1
                continue
            part.offsets[message.topic] = message.offset
            outputs.extend(self._join_one(message, join))
        sent = await self.publish(outputs) if outputs else []
        changes = [self.parts[p].take_changes() for p in touched if p in self.parts]
        return JoinedBatch(touched, sent, changes, started)

    async def finish(self, batch: JoinedBatch) -> list[Any]:
        """Wait for the broker to have the outputs, then commit the state and offsets;
        returns the records of the partitions that were committed."""
        if batch.sent:
            await asyncio.gather(*batch.sent)
        done: list[Any] = []
        for changes in batch.changes:
            p = changes.partition
            if await asyncio.to_thread(self.store.commit, changes):
                self.metrics.commits.inc()
                done.extend(batch.records[p])
            else:
                self.metrics.fenced.inc()
                part = self.parts.get(p)
                if part is not None and part.epoch == changes.epoch:
                    log.warning("joiner: partition %d was taken over; dropping this copy", p)
                    self.forget([p])
        self._observe(time.perf_counter() - batch.started)
        return done

    def _join_one(self, message: Any, join: Join) -> list[tuple[str, bytes | None, bytes]]:
        try:
            record = decode_any(message.value)
        except EventError as exc:
            return [self._dead_letter(message, str(exc))]
        except Exception as exc:  # noqa: BLE001 - bad bytes must never stop the stream
            return [self._dead_letter(message, f"undecodable: {exc!r}")]
        if isinstance(record, AdRequest):
            return [self._dead_letter(message, f"unexpected AdRequest on {message.topic}")]
        if message.key != record.impression_id.encode():
            # co-partitioning needs both topics keyed by impression id: a click keyed
            # otherwise may sit on another worker than its impression (-> orphan)
            self.counts["misrouted"] += 1
            log.warning(
                "%s[%s]@%s keyed %r, not by impression id %r",
                message.topic,
                message.partition,
                message.offset,
                message.key,
                record.impression_id,
            )
        try:
            outs = join.process(record, message.partition)
        except Exception as exc:  # noqa: BLE001
            log.exception("join failed on %s[%s]", message.topic, message.partition)
            return [self._dead_letter(message, f"join failed: {exc!r}")]
        return [
            (
                self.examples_topic if out.kind == "example" else self.side_topic,
                out.key.encode(),
                encode(out.record),
            )
            for out in outs
        ]

    def _dead_letter(self, message: Any, reason: str) -> tuple[str, bytes | None, bytes]:
        self.counts["malformed"] += 1
        log.warning(
            "dead letter %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason
        )
        key = message.key if isinstance(message.key, bytes) else None
        record = DeadLetter(
            reason=reason,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=key,
            raw=message.value if isinstance(message.value, bytes) else b"",
        )
        return self.dead_topic, key, encode(record)

    def _observe(self, seconds: float) -> None:
        m = self.metrics
        m.batch_seconds.observe(seconds)
        m.export_counts(self.counts)
        m.pending.set(sum(join.pending_count() for join in self.joins.values()))
        marks = [self.joins[p].watermark(p) for p in self.joins]
        marks = [w for w in marks if math.isfinite(w)]
        m.watermark_lag.set(time.time() - min(marks) if marks else 0.0)
