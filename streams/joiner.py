"""The online joiner: a faust-streaming worker turning impressions + engagements into examples.

Run it with::

    KAFKA_BOOTSTRAP_SERVERS=host:port python -m streams.joiner worker -l info --without-web

One agent consumes the impressions and engagements topics (co-partitioned: producers key
both by impression id, and the topics have the same partition count) in batches
(``[joiner] batch_size`` events or ``batch_max_wait_s``). Each record is decoded with
:func:`engine.events.decode_any` and run through the :class:`streams.join.Join` of its
partition. The join's outputs go to ``[kafka] examples_topic`` (``TrainingExample`` JSON,
keyed by impression id) and ``late_clicks_topic`` (``SideClick`` JSON); anything that fails
to decode or to process goes to ``dead_letters_topic`` as a :class:`streams.join.DeadLetter`
(reason, source topic/partition/offset, key and raw bytes), and the stream goes on.

The table behind the join is :class:`streams.join_state.JoinStateStore`: per partition, the
join state keyed by impression id and the offsets it reflects, in Redis, written together
after every batch. A batch is finished in this order: outputs produced and acknowledged by
the broker, then state + offsets committed (fenced by the partition's epoch), then the
source records acknowledged to faust, which commits them to Kafka. So the Kafka offsets
never run ahead of the state, a restarted worker skips exactly the events its state
already holds, and a batch interrupted by a crash is joined again from the same state:
its outputs may repeat, with the same ``example_id``, and downstream drops duplicates by it.
A worker that lost a partition in a rebalance cannot overwrite the new owner's state.

faust does not create source topics: the ``worker`` command runs
:func:`streams.topics.ensure_topics` before starting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
import time
from collections import Counter
from typing import Any

import faust
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server
from prometheus_client import Counter as PromCounter

from engine.calibration import NegativeDownsampler
from engine.config import Settings, load_settings
from engine.events import AdRequest, EventError, decode_any, encode
from streams.join import COUNTERS, DeadLetter, Join
from streams.join_state import JoinStateStore, PartitionState

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


class JoinWorker:
    """Batches of source events -> join -> outputs, then state, then acks.

    Holds the :class:`PartitionState` of the partitions this worker owns and one
    :class:`Join` per partition (all sharing ``counts``). ``send(topic, key, value)``
    returns an awaitable that resolves once the broker has the record.
    """

    def __init__(self, settings: Settings, store: JoinStateStore, send, assignment) -> None:
        kafka, cfg = settings.kafka, settings.joiner
        self.store = store
        self.send = send
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

    async def _partition(self, p: int) -> tuple[PartitionState, Join]:
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
        """Join one batch of faust messages; returns the messages that may be acknowledged."""
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
            part, join = await self._partition(p)
            touched.setdefault(p, []).append(message)
            if part.applied(message.topic, message.offset):
                self.counts["replayed"] += 1
                continue
            part.offsets[message.topic] = message.offset
            outputs.extend(self._join_one(message, join))
        if outputs:
            pending = [await self.send(topic, key, value) for topic, key, value in outputs]
            await asyncio.gather(*pending)
        done: list[Any] = []
        for p, batch in touched.items():
            part = self.parts.get(p)
            if part is None:
                continue
            if await asyncio.to_thread(self.store.commit, part):
                self.metrics.commits.inc()
                done.extend(batch)
            else:
                self.metrics.fenced.inc()
                log.warning("joiner: partition %d was taken over; dropping this copy", p)
                self.forget([p])
        self._observe(time.perf_counter() - started)
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


def create_app(settings: Settings, redis_client=None) -> faust.App:
    """The joiner app for ``settings`` (also sets ``app.worker``, a :class:`JoinWorker`)."""
    kafka, cfg = settings.kafka, settings.joiner
    if kafka.impressions_partitions != kafka.engagements_partitions:
        raise ValueError(
            "[kafka] impressions_partitions and engagements_partitions must be equal for the "
            f"join (co-partitioned by impression id); got {kafka.impressions_partitions} and "
            f"{kafka.engagements_partitions}"
        )
    bootstrap = kafka.bootstrap_servers.strip() or "localhost:9092"
    brokers = ";".join(f"kafka://{b.strip()}" for b in bootstrap.split(",") if b.strip())
    app = faust.App(
        cfg.app_id,
        broker=brokers,
        store="memory://",
        topic_partitions=kafka.impressions_partitions,
        topic_replication_factor=kafka.replication_factor,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=cfg.heartbeat_interval_s,
        broker_rebalance_timeout=cfg.session_timeout_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
    source = app.topic(
        kafka.impressions_topic, kafka.engagements_topic, **raw, value_serializer="raw"
    )

    if redis_client is None:
        from streams.redis_store import connect

        redis_client = connect(settings)
    store = JoinStateStore(redis_client, f"{cfg.state_prefix}:{cfg.app_id}")

    def assignment() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic in worker.sources}

    async def send(topic: str, key: bytes | None, value: bytes):
        return await app.producer.send(topic, key, value, None, None, None)

    worker = JoinWorker(settings, store, send, assignment)
    app.worker = worker  # type: ignore[attr-defined]

    @app.on_partitions_revoked.connect
    async def _revoked(sender: Any, revoked: Any = None, **kwargs: Any) -> None:
        worker.forget({tp.partition for tp in revoked or ()})

    @app.agent(source)
    async def join_events(stream: Any) -> None:
        async for events in stream.take_events(cfg.batch_size, within=cfg.batch_max_wait_s):
            # hold one reference per message so that take_events' own ack after this
            # body does not let faust commit offsets of events whose state is not in
            # Redis yet (a batch that fails here is joined again after a restart)
            for event in events:
                event.message.incref()
            done = await worker.process([event.message for event in events])
            for message in done:
                message.ack(app.consumer)

    @app.timer(5.0)
    async def _report() -> None:
        log.info("joiner counts %s", json.dumps(dict(worker.counts), sort_keys=True))

    if cfg.metrics_port > 0:

        @app.task
        async def _metrics() -> None:
            start_http_server(cfg.metrics_port, registry=worker.metrics.registry)
            log.info("metrics on :%d/metrics", cfg.metrics_port)

    return app


def main() -> None:
    settings = load_settings()
    if not settings.kafka.bootstrap_servers.strip():
        sys.exit(
            "streams.joiner needs a broker: set KAFKA_BOOTSTRAP_SERVERS or "
            "[kafka] bootstrap_servers (start one with `adengine broker`)"
        )
    if "worker" in sys.argv[1:]:
        # faust does not create source topics, and stops on a partition-count mismatch:
        # create what is missing and fail with a clear message on a wrong layout
        from streams.topics import TopicError, ensure_topics

        try:
            ensure_topics(settings.kafka.bootstrap_servers.strip(), settings)
        except TopicError as exc:
            sys.exit(f"streams.joiner: {exc}")
    create_app(settings).main()


if __name__ == "__main__":
    main()
