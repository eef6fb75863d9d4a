"""The online joiner worker: impressions + engagements -> labelled training examples.

Run it with::

    KAFKA_BOOTSTRAP_SERVERS=host:port python -m streams.joiner worker -l info --without-web

Workers with the same ``[joiner] app_id`` form one consumer group over the impressions
and engagements topics (co-partitioned: producers key both by impression id, and the
topics have the same partition count) and share their partitions. Each worker reads
batches of ``[joiner] batch_size`` records (or what arrived within ``batch_max_wait_s``)
and hands them to a :class:`streams.join_worker.JoinWorker`: every record is decoded with
:func:`engine.events.decode_any` and run through the :class:`streams.join.Join` of its
partition; examples go to ``[kafka] examples_topic`` (``TrainingExample`` JSON, keyed by
impression id), unjoinable clicks to ``late_clicks_topic`` (``SideClick`` JSON), and
anything that fails to decode or to process to ``dead_letters_topic`` as a
:class:`streams.join.DeadLetter` (reason, source topic/partition/offset, key and raw
bytes), and the stream goes on. The join's table, per partition, lives in Redis together
with the offsets it reflects (:mod:`streams.join_state`); see :mod:`streams.join_worker`
for why a crash neither loses nor double-counts a label.

Two drivers feed the same :class:`~streams.join_worker.JoinWorker` (``[joiner] driver``):

* ``"aiokafka"`` (default): an aiokafka consumer-group loop over ``getmany``
  (:func:`run_group`) that seeks every newly assigned partition to the offsets stored with
  its state, finishes one batch (broker acks, state commit) while it joins the next, and
  produces each batch's outputs as one producer batch per partition;
* ``"faust"``: a faust-streaming agent over ``stream.take_events`` (:func:`create_app`);
  faust's consumer commits the offsets of the events the worker reports done. faust hands
  records to its agents one at a time (its fetcher awaits two asyncio tasks per record),
  so a faust worker tops out near what a forwarding-only faust agent manages, about a
  fifth of the aiokafka driver (``bench/joiner_throughput.py`` measures all three).

The ``worker`` command creates missing topics first (faust does not create source topics,
and stops on a partition-count mismatch) and exits with a clear message on a wrong layout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

import faust
from prometheus_client import start_http_server

from engine.config import Settings, load_settings
from streams.group import PRODUCE_BATCH_BYTES, BatchPublisher, group_consumer, stop_on_signals
from streams.join_state import JoinStateStore
from streams.join_worker import JoinWorker

REPORT_EVERY_S = 5.0

log = logging.getLogger(__name__)


def _check_layout(settings: Settings) -> None:
    kafka = settings.kafka
    if kafka.impressions_partitions != kafka.engagements_partitions:
        raise ValueError(
            "[kafka] impressions_partitions and engagements_partitions must be equal for the "
            f"join (co-partitioned by impression id); got {kafka.impressions_partitions} and "
            f"{kafka.engagements_partitions}"
        )


def _state_store(settings: Settings, redis_client=None) -> JoinStateStore:
    if redis_client is None:
        from streams.redis_store import connect

        redis_client = connect(settings)
    return JoinStateStore(redis_client, f"{settings.joiner.state_prefix}:{settings.joiner.app_id}")


def _log_counts(worker: JoinWorker) -> None:
    log.info("joiner counts %s", json.dumps(dict(worker.counts), sort_keys=True))


def _serve_metrics(worker: JoinWorker, port: int) -> None:
    start_http_server(port, registry=worker.metrics.registry)
    log.info("metrics on :%d/metrics", port)


def create_app(settings: Settings, redis_client=None) -> faust.App:
    """The faust joiner app for ``settings`` (``app.worker`` is its :class:`JoinWorker`)."""
    kafka, cfg = settings.kafka, settings.joiner
    _check_layout(settings)
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

    def assignment() -> set[int]:
        return {tp.partition for tp in app.consumer.assignment() if tp.topic in worker.sources}

    async def publish(records):
        return [await app.producer.send(t, k, v, None, None, None) for t, k, v in records]

    worker = JoinWorker(settings, _state_store(settings, redis_client), publish, assignment)
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
            try:
                done = await worker.process([event.message for event in events])
            except Exception as exc:
                # the in-memory tables now hold a batch that is not in Redis, and faust
                # will not deliver its events again: stop, so that a restart replays them
                log.exception("joiner: batch failed; stopping the worker")
                worker.forget(list(worker.parts))
                await app.crash(exc)
                raise
            for message in done:
                message.ack(app.consumer)

    @app.timer(REPORT_EVERY_S)
    async def _report() -> None:
        _log_counts(worker)

    if cfg.metrics_port > 0:

        @app.task
        async def _metrics() -> None:
            _serve_metrics(worker, cfg.metrics_port)

    return app


async def run_group(settings: Settings, redis_client=None, stop: asyncio.Event | None = None):
    """The aiokafka driver: join batches until ``stop`` is set (or SIGTERM/SIGINT)."""
    from aiokafka import (
        AIOKafkaProducer,
        ConsumerRebalanceListener,
        TopicPartition,
    )
    from aiokafka.errors import KafkaError

    kafka, cfg = settings.kafka, settings.joiner
    _check_layout(settings)
    stop = stop or asyncio.Event()
    bootstrap = kafka.bootstrap_servers.strip()
    consumer = group_consumer(bootstrap, cfg)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=PRODUCE_BATCH_BYTES
    )

    def assignment() -> set[int]:
        return {tp.partition for tp in consumer.assignment()}

    publish = BatchPublisher(producer)
    worker = JoinWorker(settings, _state_store(settings, redis_client), publish, assignment)

    # the batch being finished (outputs acknowledged, state committed) while the next one
    # is fetched and joined; batches are finished one at a time, in order
    inflight: asyncio.Task | None = None

    async def settle() -> None:
        nonlocal inflight
        if inflight is None:
            return
        task, inflight = inflight, None
        offsets: dict = {}
        for record in await task:
            tp = TopicPartition(record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
        if offsets:
            # for lag monitoring only: on assignment the state's offsets win
            try:
                await consumer.commit(offsets)
            except KafkaError as exc:
                log.info("joiner: offset commit skipped (%r); state holds them", exc)

    class Rebalance(ConsumerRebalanceListener):
        async def on_partitions_revoked(self, revoked) -> None:
            await settle()
            worker.forget({tp.partition for tp in revoked})

        async def on_partitions_assigned(self, assigned) -> None:
            # take each partition over and start right after the offsets its state holds
            for tp in sorted(assigned):
                part, _ = await worker.partition(tp.partition)
                if tp.topic in part.offsets:
                    consumer.seek(tp, part.offsets[tp.topic] + 1)
            log.info(
                "joiner: assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned)
            )

    loop = asyncio.get_running_loop()
    stop_on_signals(stop)
    if cfg.metrics_port > 0:
        _serve_metrics(worker, cfg.metrics_port)
    await producer.start()
    consumer.subscribe([kafka.impressions_topic, kafka.engagements_topic], listener=Rebalance())
    await consumer.start()
    last_report = loop.time()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(
                timeout_ms=int(cfg.batch_max_wait_s * 1000), max_records=cfg.batch_size
            )
            records = [record for batch in fetched.values() for record in batch]
            joined = await worker.join(records) if records else None
            await settle()
            if joined is not None:
                inflight = asyncio.create_task(worker.finish(joined))
            if loop.time() - last_report >= REPORT_EVERY_S:
                last_report = loop.time()
                _log_counts(worker)
        await settle()
    finally:
        _log_counts(worker)
        await consumer.stop()
        await producer.stop()
    return worker


def _run_group_cli(settings: Settings, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m streams.joiner")
    parser.add_argument("command", choices=["worker"])
    parser.add_argument("-l", "--loglevel", default="warning")
    parser.add_argument("--without-web", action="store_true", help="accepted, as for faust")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s",
    )
    asyncio.run(run_group(settings))


def main() -> None:
    settings = load_settings()
    if not settings.kafka.bootstrap_servers.strip():
        sys.exit(
            "streams.joiner needs a broker: set KAFKA_BOOTSTRAP_SERVERS or "
            "[kafka] bootstrap_servers (start one with `adengine broker`)"
        )
    if settings.joiner.driver not in ("faust", "aiokafka"):
        sys.exit(
            "streams.joiner: [joiner] driver must be faust or aiokafka, "
            f"not {settings.joiner.driver!r}"
        )
    if "worker" in sys.argv[1:]:
        from streams.topics import TopicError, ensure_topics

        try:
            ensure_topics(settings.kafka.bootstrap_servers.strip(), settings)
        except TopicError as exc:
            sys.exit(f"streams.joiner: {exc}")
    if settings.joiner.driver == "aiokafka":
        _run_group_cli(settings, sys.argv[1:])
    else:
        create_app(settings).main()


if __name__ == "__main__":
    main()
