"""What the consumer-group workers here (joiner, billing) set up the same way."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

PRODUCE_BATCH_BYTES = 512 * 1024  # max_batch_size of producers used with BatchPublisher


class GroupSettings(Protocol):
    app_id: str
    session_timeout_s: float
    heartbeat_interval_s: float
    batch_size: int


def group_consumer(bootstrap_servers: str, cfg: GroupSettings) -> AIOKafkaConsumer:
    """A consumer in group ``cfg.app_id`` that never commits on its own and, with no
    committed offsets, starts at the beginning. A killed member's partitions move on after
    ``session_timeout_s``: keep it short (seconds) so a restart resumes quickly."""
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=cfg.app_id,
        client_id=cfg.app_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(cfg.session_timeout_s * 1000),
        heartbeat_interval_ms=int(cfg.heartbeat_interval_s * 1000),
        rebalance_timeout_ms=int(cfg.session_timeout_s * 1000),
        max_poll_records=cfg.batch_size,
    )


def stop_on_signals(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGTERM or SIGINT (where the running loop can handle signals)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


class BatchPublisher:
    """``await publish(records)``: produce ``(topic, key, value)`` records in a few batches.

    Records are partitioned as the producer would (the default partitioner on the key) and
    appended to one batch per partition (:meth:`AIOKafkaProducer.create_batch`), instead
    of one ``send`` and one future per record, which costs more than joining the record.
    Returns the futures of the batches; all resolved means the broker has every record.
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self.producer = producer
        self.partitioner = DefaultPartitioner()
        self._partitions: dict[str, list[int]] = {}

    async def _partition(self, topic: str, key: bytes | None) -> int:
        partitions = self._partitions.get(topic)
        if partitions is None:
            partitions = self._partitions[topic] = sorted(await self.producer.partitions_for(topic))
        return self.partitioner(key, partitions, partitions)

    async def __call__(self, records: list[tuple[str, bytes | None, bytes]]) -> list:
        grouped: dict[tuple[str, int], list[tuple[bytes | None, bytes]]] = {}
        for topic, key, value in records:
            tp = (topic, await self._partition(topic, key))
            grouped.setdefault(tp, []).append((key, value))
        futures = []
        for (topic, partition), items in grouped.items():
            batch = self.producer.create_batch()
            for key, value in items:
                if batch.append(key=key, value=value, timestamp=None) is None:  # full
                    futures.append(
                        await self.producer.send_batch(batch, topic, partition=partition)
                    )
                    batch = self.producer.create_batch()
                    if batch.append(key=key, value=value, timestamp=None) is None:
                        raise ValueError(f"a record for {topic} exceeds the producer batch size")
            futures.append(await self.producer.send_batch(batch, topic, partition=partition))
        return futures
