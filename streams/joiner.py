"""The online joiner: a faust-streaming worker turning impressions + engagements into examples.

Run it with::

    KAFKA_BOOTSTRAP_SERVERS=host:port python -m streams.joiner worker -l info --without-web

One agent consumes the impressions and engagements topics (co-partitioned: producers key
both by impression id, and the topics have the same partition count), decodes each record
with :func:`engine.events.decode_any` and runs it through :class:`streams.join.Join`,
whose store is a changelog-backed faust table (bytes keys and small msgpack values). The
join's outputs go to ``[kafka] examples_topic`` (``TrainingExample`` JSON, keyed by
impression id) and ``late_clicks_topic`` (``SideClick`` JSON); anything that fails to
decode or to process goes to ``dead_letters_topic`` as a :class:`streams.join.DeadLetter`
(reason, source topic/partition/offset, key and raw bytes), and the stream goes on.

Delivery is at-least-once: faust flushes the producer (examples *and* table changelog
writes) before it commits source offsets, so after a crash the events since the last
commit are processed again against a table that already holds some of their effects. The
join is idempotent for that (duplicate impressions/clicks are recognised from the table,
negatives are chosen by a keyed hash, ``example_id = impression_id``), so downstream
dedup by ``example_id`` sees every impression labelled once. faust does not create source
topics: the ``worker`` command runs :func:`streams.topics.ensure_topics` before starting.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import faust

from engine.calibration import NegativeDownsampler
from engine.config import Settings, load_settings
from engine.events import AdRequest, EventError, decode_any, encode
from streams.join import DeadLetter, Join

log = logging.getLogger(__name__)

TABLE_NAME = "join-state"
_MISSING = object()


class TableStore(MutableMapping[str, bytes]):
    """``str``-keyed view of a raw (bytes-keyed) faust table, as :class:`Join` wants it."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getitem__(self, key: str) -> bytes:
        return self.table[key.encode()]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.table.get(key.encode(), _MISSING)
        return default if value is _MISSING or value is None else value

    def __setitem__(self, key: str, value: bytes) -> None:
        self.table[key.encode()] = value

    def __delitem__(self, key: str) -> None:
        del self.table[key.encode()]

    def __iter__(self) -> Iterator[str]:
        for key in list(self.table.keys()):
            yield key.decode() if isinstance(key, bytes) else key

    def __len__(self) -> int:
        return len(self.table)

    def items(self):  # type: ignore[override]
        return [
            (k.decode() if isinstance(k, bytes) else k, v)
            for k, v in list(self.table.items())
            if v is not None
        ]


def create_app(settings: Settings) -> faust.App:
    """The joiner app for ``settings`` (also sets ``app.join``, ``app.adengine_topics``)."""
    kafka, cfg = settings.kafka, settings.joiner
    if kafka.impressions_partitions != kafka.engagements_partitions:
        raise ValueError(
            "[kafka] impressions_partitions and engagements_partitions must be equal for the "
            f"join (co-partitioned by impression id); got {kafka.impressions_partitions} and "
            f"{kafka.engagements_partitions}"
        )
    partitions = kafka.impressions_partitions
    bootstrap = kafka.bootstrap_servers.strip() or "localhost:9092"
    brokers = ";".join(f"kafka://{b.strip()}" for b in bootstrap.split(",") if b.strip())
    app = faust.App(
        cfg.app_id,
        broker=brokers,
        store="memory://",
        topic_partitions=partitions,
        topic_replication_factor=kafka.replication_factor,
        broker_session_timeout=cfg.session_timeout_s,
        broker_heartbeat_interval=cfg.heartbeat_interval_s,
        broker_rebalance_timeout=cfg.session_timeout_s,
        producer_max_batch_size=1,  # tansu: see streams.broker (wrong end offsets otherwise)
        table_standby_replicas=0,
        web_enabled=False,
        autodiscover=False,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
    source = app.topic(
        kafka.impressions_topic, kafka.engagements_topic, **raw, value_serializer="raw"
    )
    examples = app.topic(kafka.examples_topic, **raw, value_serializer="raw")
    late = app.topic(kafka.late_clicks_topic, **raw, value_serializer="raw")
    dead = app.topic(kafka.dead_letters_topic, **raw, value_serializer="raw")
    table = app.Table(
        TABLE_NAME,
        default=None,
        partitions=partitions,
        key_type=bytes,  # bytes key/value types make the changelog codec "raw"
        value_type=bytes,
    )
    join = Join(
        TableStore(table),
        window_s=cfg.window_s,
        grace_s=cfg.out_of_order_grace_s,
        downsampler=NegativeDownsampler(settings.calibration.negative_downsampling_rate),
    )
    app.join = join  # type: ignore[attr-defined]
    app.adengine_topics = {"examples": examples, "side": late, "dead": dead}  # type: ignore

    @app.on_partitions_assigned.connect
    async def _reindex(sender: Any, assigned: Any = None, **kwargs: Any) -> None:
        # partitions may come back with state another worker changed: rebuild lazily
        join.forget_partitions()
        log.info("joiner: assignment changed, expiry index will be rebuilt from the table")

    async def dead_letter(message: Any, reason: str) -> None:
        join.counts["malformed"] += 1
        log.warning(
            "dead letter %s[%s]@%s: %s", message.topic, message.partition, message.offset, reason
        )
        record = DeadLetter(
            reason=reason,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            key=message.key if isinstance(message.key, bytes) else None,
            raw=message.value if isinstance(message.value, bytes) else b"",
        )
        await dead.send(key=message.key, value=encode(record))

    @app.agent(source)
    async def join_events(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            try:
                record = decode_any(message.value)
            except EventError as exc:
                await dead_letter(message, str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - bad bytes must never stop the stream
                await dead_letter(message, f"undecodable: {exc!r}")
                continue
            if isinstance(record, AdRequest):
                await dead_letter(message, f"unexpected AdRequest on {message.topic}")
                continue
            if message.key != record.impression_id.encode():
                # co-partitioning needs both topics keyed by impression id: a click keyed
                # otherwise may sit on another worker than its impression (-> orphan)
                join.counts["misrouted"] += 1
                log.warning(
                    "%s[%s]@%s keyed %r, not by impression id %r",
                    message.topic,
                    message.partition,
                    message.offset,
                    message.key,
                    record.impression_id,
                )
            try:
                outputs = join.process(record, message.partition)
            except Exception as exc:  # noqa: BLE001
                log.exception("join failed on %s[%s]", message.topic, message.partition)
                await dead_letter(message, f"join failed: {exc!r}")
                continue
            for out in outputs:
                topic = examples if out.kind == "example" else late
                await topic.send(key=out.key.encode(), value=encode(out.record))

    @app.timer(5.0)
    async def _report() -> None:
        log.info("joiner counts %s", json.dumps(dict(join.counts), sort_keys=True))

    return app


settings = load_settings()
app = create_app(settings)


def main() -> None:
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
    app.main()


if __name__ == "__main__":
    main()
