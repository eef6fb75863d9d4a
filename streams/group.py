"""What every consumer-group worker here (joiner, billing) sets up the same way."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Protocol

from aiokafka import AIOKafkaConsumer


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
