"""Publish serving-side events (impressions, engagements) to their Kafka topics.

:class:`KafkaEventSink` is what ``POST /v1/events`` hands each accepted event to: both
kinds are keyed by impression id, so an impression and its clicks land on the same
partition number of the co-partitioned topics the joiner reads. The producer starts on
first use and waits for the broker's acknowledgement, so an accepted event is on the log.
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer

from engine.config import KafkaSettings


class KafkaEventSink:
    """``await sink(role, key, value)`` with role ``"impressions"`` or ``"engagements"``."""

    def __init__(self, bootstrap_servers: str, kafka: KafkaSettings):
        self.bootstrap_servers = bootstrap_servers
        self.topics = {
            "impressions": kafka.impressions_topic,
            "engagements": kafka.engagements_topic,
        }
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, acks="all")
                await producer.start()
                self._producer = producer
        return self._producer

    async def __call__(self, role: str, key: str, value: bytes) -> None:
        producer = await self._started()
        await producer.send_and_wait(self.topics[role], value, key=key.encode())

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
