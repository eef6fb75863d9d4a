"""The online trainer: examples topic -> mini-batches -> learner -> published snapshots.

``python -m streams.trainer`` (settings from :func:`engine.config.load_settings`) runs one
trainer until SIGTERM/SIGINT. It

1. resumes from the newest intact snapshot in Redis (:mod:`streams.publish`): the model
   *and* the state published with it, i.e. the next offset of every examples partition,
   the recently seen example ids, the stall guard and the running metrics; with nothing
   published yet it starts a fresh model (``--schema``, default ``synthetic``) at the
   beginning of every partition;
2. consumes the examples topic in mini-batches of ``[trainer] batch_size`` records, or
   fewer once the first record of a batch has waited ``max_wait_s``;
3. per record: decodes a :class:`~engine.events.TrainingExample` (undecodable or
   misshapen records go to the dead-letter topic with a reason), drops duplicates by
   ``example_id`` (:class:`~streams.trainer_state.SeenIds`), and applies the stall guard
   (:class:`~streams.trainer_state.StallGuard`: during a click outage negatives are not
   learnt);
4. scores the batch before learning it (progressive validation: NE, log loss,
   calibration), then ``CtrModel.learn_many`` on a :class:`~engine.features.FeatureBatch`
   of the *logged* features (the GBDT leaves come from the model's current trees applied
   to the logged dense values) and updates the counting features;
5. every ``publish_every_examples`` records or ``publish_every_s`` seconds publishes the
   model with the offsets, dedup and guard state in one Redis transaction, then sends
   ``{"version": ...}`` to the model-updates topic;
6. feeds the GBDT refresh (:mod:`streams.refresh`): the examples the LR learnt (not the
   duplicates, dead letters or the non-clicks paused by the stall guard) are buffered and
   appended to the :class:`~streams.example_store.ExampleStore` at ``[refresh] store_dir``
   just before each publish;
7. moves the model onto new GBDT versions: between mini-batches, every
   ``tree_check_every_s`` seconds (default 5) and at once on a model-updates message with
   ``"kind": "trees"``, and once after :meth:`Trainer.restore`, it compares
   :meth:`TreePublisher.latest_version <streams.refresh.TreePublisher.latest_version>`
   with the model's tree version (0 without trees). A newer version is loaded and, unless
   it fails to load (:class:`~streams.refresh.TreeLoadError`) or its ``n_features`` is not
   the dense width of the examples (both logged; the current trees stay and that version
   is not tried again), installed with :meth:`CtrModel.set_trees
   <engine.model.CtrModel.set_trees>`, and a publish follows right after. Serving gets
   trees only inside the trainer's snapshot, so leaves and LR weights always match.

Why aiokafka and not a faust agent: the source of truth for "what has been learnt" is the
Redis snapshot, so the consumer must start exactly at the offsets stored in it. A faust
agent owns its offsets (group commits, rebalances, its own seek on assignment) and would
have to be fought on every (re)assignment; tansu also refuses transactional producers, so
faust's exactly-once mode is not available. The trainer therefore assigns every partition
of the examples topic manually (no consumer group, ``enable_auto_commit=False``) and seeks
to the snapshot's offsets. One trainer instance per model key: a second one would not be
fenced and the two would race on ``latest`` (each publish is still atomic).

Crash safety (at-least-once delivery, effectively-once learning): a record changes the
model only in memory until a publish stores model + next offsets + seen ids atomically.
After a kill the trainer restarts from that snapshot and re-reads everything after its
offsets, none of which the restored model has learnt, so every example is learnt once.
What is *not* exactly-once: dead letters and model-update messages sent between the last
publish and a crash are sent again (or, for the update message, lost when the crash falls
between the Redis write and the send; subscribers also poll Redis). The example store is
at-least-once: the buffer is appended *before* the snapshot that covers it is written, so
a crash in between appends those examples again after the restart (reads dedup by
``example_id``); a failed append is logged and retried at the next publish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest, start_http_server

from engine.config import Settings, load_settings
from engine.datasets import SCHEMAS
from engine.events import EventError, TrainingExample, decode
from engine.features import FeatureBatch
from engine.metrics import ProgressiveValidation
from engine.model import CtrModel
from engine.replay import spec_for
from streams.example_store import ExampleStore
from streams.publish import ModelPublisher
from streams.refresh import TreeLoadError, TreePublisher
from streams.trainer_state import SeenIds, StallGuard

log = logging.getLogger("adengine.trainer")

DEFAULT_DEDUP_CAPACITY = 100_000
TREE_CHECK_EVERY_S = 5.0  # poll Redis for a newer GBDT version at most this often
MAX_STORE_BACKLOG = 1_000_000  # examples kept for the store while appends keep failing


class TrainerMetrics:
    """Prometheus metrics of one trainer, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"adengine_trainer_{name}", doc, registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"adengine_trainer_{name}", doc, registry=r)

        self.ne = gauge("ne", "Progressive-validation normalised entropy (lower is better)")
        self.logloss = gauge("logloss", "Progressive-validation log loss")
        self.calibration = gauge("calibration", "Progressive validation: sum(p) / sum(y)")
        self.ctr = gauge("ctr", "Progressive validation: observed click rate")
        self.model_version = gauge("model_version", "Version of the last published snapshot")
        self.stalled = gauge("stalled", "1 while clicks have stopped arriving (learning paused)")
        self.examples = counter("examples", "Unique, valid examples consumed")
        self.learned = counter("learned", "Examples learnt")
        self.duplicates = counter("duplicates", "Examples dropped as duplicates (example id)")
        self.malformed = counter("malformed", "Records sent to the dead-letter topic")
        self.paused = counter("paused", "Non-clicks skipped while stalled")
        self.stalls = counter("stalls", "Click stalls detected")
        self.publishes = counter("publishes", "Model snapshots published")
        self.tree_version = gauge("tree_version", "GBDT version the LR learns on (0: none)")
        self.tree_refusals = counter("tree_refusals", "GBDT versions refused (load or shape)")
        self.store_errors = counter("store_errors", "Failed appends to the example store")

    def text(self) -> str:
        return generate_latest(self.registry).decode()


@dataclass
class Stats:
    examples: int = 0
    learned: int = 0
    duplicates: int = 0
    malformed: int = 0
    paused: int = 0
    publishes: int = 0


@dataclass
class BatchResult:
    dead_letters: list[dict] = field(default_factory=list)
    learned: int = 0


class Trainer:
    """One trainer: call :meth:`run` (until :meth:`request_stop`), or drive it step by step."""

    def __init__(
        self,
        settings: Settings,
        bootstrap_servers: str,
        client: redis.Redis,
        *,
        schema: str = "synthetic",
        dedup_capacity: int = DEFAULT_DEDUP_CAPACITY,
        keep: int = 5,
        store: ExampleStore | None = None,
        tree_check_every_s: float = TREE_CHECK_EVERY_S,
    ):
        self.settings = settings
        self.cfg = settings.trainer
        self.bootstrap_servers = bootstrap_servers
        self.topic = settings.kafka.examples_topic
        self.partitions = settings.kafka.examples_partitions
        self.publisher = ModelPublisher(client, settings.redis.model_key, keep=keep)
        self.tree_publisher = TreePublisher(client, settings.redis.model_key)
        self.store = store if store is not None else ExampleStore(settings.refresh.store_dir)
        self.tree_check_every_s = tree_check_every_s
        self.schema = schema
        self.dedup_capacity = dedup_capacity
        self.metrics = TrainerMetrics()
        self.model: CtrModel | None = None
        self.version: int | None = None
        self.offsets: dict[int, int] = {}
        self.seen = SeenIds(dedup_capacity)
        self.guard = StallGuard(self.cfg.stall_window_s, self.cfg.stall_min_impressions)
        self.pv = ProgressiveValidation()
        self.stats = Stats()
        self._unpublished = 0
        self._last_publish = time.monotonic()
        self._stop = asyncio.Event()
        self._consumer = None
        self._producer = None
        self._http = None
        self._shape: tuple[int, int] | None = None
        self._to_store: list[TrainingExample] = []  # learnt, not yet in the example store
        self._force_publish = False  # new trees installed: publish without waiting
        self._trees_due = False  # a "trees" model-updates message arrived
        self._last_tree_check = -math.inf
        self._refused_trees: set[int] = set()
        self._update_parts: list = []  # model-updates partitions (TopicPartition)

    # -- state -------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the newest intact snapshot and its trainer state, or start fresh."""
        self._shape = None
        published = self.publisher.load_latest(self.settings)
        if published is None:
            schema = SCHEMAS[self.schema]
            self.model = CtrModel(spec_for(schema, self.settings), self.settings)
            log.info(
                "no published model under %r: fresh %s model", self.publisher.prefix, schema.name
            )
            self.refresh_trees()
            return
        state = published.extra_state
        self.model, self.version = published.model, published.version
        self.offsets = {int(p): int(o) for p, o in state.get("offsets", {}).items()}
        if state.get("topic", self.topic) != self.topic:
            log.warning(
                "snapshot %s consumed %r, not %r: its offsets do not apply, reading from the start",
                published.version,
                state.get("topic"),
                self.topic,
            )
            self.offsets = {}
        self.seen = SeenIds(self.dedup_capacity, state.get("seen", []))
        cfg = self.cfg
        self.guard = StallGuard.from_state(
            cfg.stall_window_s, cfg.stall_min_impressions, state.get("stall")
        )
        pv = ProgressiveValidation()
        pv.__dict__.update(state.get("pv", {}))
        self.pv = pv
        self.stats = Stats(**state.get("stats", {}))
        m, s = self.metrics, self.stats
        for counter, value in [
            (m.examples, s.examples),
            (m.learned, s.learned),
            (m.duplicates, s.duplicates),
            (m.malformed, s.malformed),
            (m.paused, s.paused),
            (m.publishes, s.publishes),
            (m.stalls, self.guard.stalls),
        ]:
            counter.inc(value)
        m.model_version.set(self.version)
        m.tree_version.set(self.tree_version)
        self._update_gauges()
        log.info(
            "resumed from snapshot %s (model %s, %d examples learnt), offsets %s",
            self.version,
            self.model.version,
            self.model.learner.n_examples,
            self.offsets,
        )
        self.refresh_trees()

    def trainer_state(self) -> dict:
        return {
            "topic": self.topic,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "seen": self.seen.state(),
            "stall": self.guard.state(),
            "pv": dict(vars(self.pv)),
            "stats": vars(self.stats),
        }

    def _expected_shape(self) -> tuple[int, int]:
        probe = self.model.pipeline.transform_many([{}])
        return probe.indices.shape[1], probe.dense.shape[1]

    # -- GBDT versions -------------------------------------------------------------------------
    @property
    def tree_version(self) -> int:
        """Version of the trees the model's LR learns on; 0 without trees."""
        trees = self.model.trees if self.model is not None else None
        return trees.version if trees is not None else 0

    def tree_check_due(self) -> bool:
        if self.model is None or not self.model.use_trees:
            return False
        waited = time.monotonic() - self._last_tree_check
        return self._trees_due or waited >= self.tree_check_every_s

    def refresh_trees(self) -> bool:
        """Install the newest published trees if newer than the model's; True when installed.

        Synchronous (Redis reads and LightGBM parsing): the loop runs it in a thread while
        it awaits, i.e. between mini-batches, never inside one. A version that fails to
        load or whose ``n_features`` is not the examples' dense width is logged and
        remembered (not tried again); the current trees stay.
        """
        self._trees_due = False
        self._last_tree_check = time.monotonic()
        if self.model is None or not self.model.use_trees:
            return False
        try:
            latest = self.tree_publisher.latest_version()
        except redis.RedisError as exc:
            log.warning("tree version check failed: %s", exc)
            return False
        current = self.tree_version
        if latest is None or latest <= current or latest in self._refused_trees:
            return False
        try:
            trees = self.tree_publisher.load_latest()
        except (TreeLoadError, redis.RedisError) as exc:
            # a Redis error is transient: try again at the next check; a bad model is not
            if isinstance(exc, TreeLoadError):
                self._refuse_trees(latest, str(exc))
            else:
                log.warning("loading trees v%d failed: %s", latest, exc)
            return False
        if trees is None or trees.version <= current or trees.version in self._refused_trees:
            return False  # deleted or replaced between the two reads: the next check decides
        if self._shape is None:
            self._shape = self._expected_shape()
        dense_width = self._shape[1]
        if trees.n_features != dense_width:
            self._refuse_trees(
                trees.version,
                f"trees use {trees.n_features} dense features, the examples have {dense_width}",
            )
            return False
        before = self.model.version
        self.model.set_trees(trees)
        self.metrics.tree_version.set(trees.version)
        self._force_publish = True
        log.info("moved onto trees v%d (model %s -> %s)", trees.version, before, self.model.version)
        return True

    def _refuse_trees(self, version: int, reason: str) -> None:
        self._refused_trees.add(version)
        self.metrics.tree_refusals.inc()
        log.error("refusing trees v%d, keeping v%d: %s", version, self.tree_version, reason)

    # -- one mini-batch (synchronous, no I/O) --------------------------------------------------
    def process(self, records: list) -> BatchResult:
        """Decode, dedup, stall-check, score and learn a batch of consumer records.

        ``records`` need ``partition``, ``offset`` and ``value`` (aiokafka's
        ``ConsumerRecord``). Offsets advance past every record, whatever became of it.
        """
        result = BatchResult()
        if self._shape is None:
            self._shape = self._expected_shape()
        width, dense_width = self._shape
        bits = self.model.spec.bits
        keep: list[TrainingExample] = []
        for record in records:
            self.offsets[record.partition] = max(
                self.offsets.get(record.partition, 0), record.offset + 1
            )
            self._unpublished += 1
            reason = None
            try:
                example = decode(record.value, TrainingExample)
            except EventError as exc:
                reason = str(exc)
            else:
                f = example.features
                if len(f.indices) != width or len(f.dense) != dense_width:
                    reason = (
                        f"feature shape ({len(f.indices)} sparse, {len(f.dense)} dense) is not "
                        f"the model's ({width}, {dense_width})"
                    )
                elif f.indices and max(f.indices) >= 1 << bits:
                    reason = f"feature index beyond the model's 2**{bits} hashed space"
            if reason is not None:
                self.stats.malformed += 1
                self.metrics.malformed.inc()
                result.dead_letters.append(self._dead_letter(record, reason))
                continue
            if not self.seen.add(example.example_id):
                self.stats.duplicates += 1
                self.metrics.duplicates.inc()
                continue
            self.stats.examples += 1
            self.metrics.examples.inc()
            was_stalled, stalls = self.guard.stalled, self.guard.stalls
            if self.guard.observe(example.label, example.impression_ts):
                self.stats.paused += 1
                self.metrics.paused.inc()
            else:
                keep.append(example)
            if self.guard.stalls != stalls:
                self.metrics.stalls.inc()
                log.warning(
                    "click stall: %d impressions and %.0fs of event time without a click; "
                    "pausing learning of non-clicks",
                    self.guard.since_click,
                    self.guard.now - self.guard.last_click_ts,
                )
            elif was_stalled and not self.guard.stalled:
                log.warning("clicks resumed: learning again")
        self.metrics.stalled.set(1 if self.guard.stalled else 0)
        if keep:
            self._learn(keep)
            result.learned = len(keep)
        return result

    def _learn(self, examples: list[TrainingExample]) -> None:
        batch = FeatureBatch(
            np.array([e.features.indices for e in examples], dtype=np.int64),
            np.array([e.features.values for e in examples], dtype=np.float64),
            np.array([e.features.dense for e in examples], dtype=np.float64),
        )
        y = np.array([e.label for e in examples], dtype=np.float64)
        w = np.array([e.weight for e in examples], dtype=np.float64)
        p = self.model.predict_proba_many(batch)  # progressive validation: before learning
        self.pv.update_many(y, p, w)
        self.model.learn_many(batch, y)
        self.model.pipeline.observe(batch, y)
        self._to_store.extend(examples)
        self.stats.learned += len(examples)
        self.metrics.learned.inc(len(examples))
        self._update_gauges()

    def _update_gauges(self) -> None:
        summary = self.pv.get()
        m = self.metrics
        for gauge, key in [
            (m.ne, "ne"),
            (m.logloss, "logloss"),
            (m.calibration, "calibration"),
            (m.ctr, "ctr"),
        ]:
            value = summary.get(key, math.nan)
            gauge.set(value if value is not None else math.nan)
        m.stalled.set(1 if self.guard.stalled else 0)

    def _dead_letter(self, record, reason: str) -> dict:
        value = record.value
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        return {
            "reason": reason,
            "source": "trainer",
            "topic": getattr(record, "topic", self.topic),
            "partition": record.partition,
            "offset": record.offset,
            "value": text[:4000],
        }

    @property
    def unpublished(self) -> int:
        """Records consumed since the last publish (their effect is not in Redis yet)."""
        return self._unpublished

    # -- publication -------------------------------------------------------------------------
    def publish_due(self) -> bool:
        if self._force_publish:
            return True
        if self._unpublished == 0:
            return False
        waited = time.monotonic() - self._last_publish
        return (
            self._unpublished >= self.cfg.publish_every_examples
            or waited >= self.cfg.publish_every_s
        )

    def publish_snapshot(self) -> int:
        """Model + offsets + dedup + guard state, in one Redis transaction."""
        self.stats.publishes += 1
        try:
            version = self.publisher.publish(self.model, self.trainer_state())
        except BaseException:
            self.stats.publishes -= 1
            raise
        self.version = version
        self._unpublished = 0
        self._force_publish = False
        self._last_publish = time.monotonic()
        self.metrics.publishes.inc()
        self.metrics.model_version.set(version)
        return version

    def flush_store(self) -> int:
        """Append the learnt-but-unstored examples to the example store; how many.

        On failure the examples stay buffered (the oldest dropped beyond
        ``MAX_STORE_BACKLOG``) and the next call tries again.
        """
        pending = self._to_store
        if not pending:
            return 0
        self._to_store = []
        try:
            self.store.append(pending)
        except Exception as exc:  # noqa: BLE001 - the LR must not stop for the GBDT's data
            self.metrics.store_errors.inc()
            self._to_store = (pending + self._to_store)[-MAX_STORE_BACKLOG:]
            log.error("example store append of %d examples failed: %s", len(pending), exc)
            return 0
        return len(pending)

    async def publish(self) -> int:
        # the store first: a crash between the two repeats the append (at-least-once)
        # rather than losing the examples the snapshot says were learnt
        await asyncio.to_thread(self.flush_store)
        version = self.publish_snapshot()
        message = {
            "version": version,
            "key": self.publisher.prefix,
            "model_version": self.model.version,
            "examples_learnt": self.model.learner.n_examples,
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "ts": time.time(),
        }
        if self._producer is not None:
            try:
                await self._producer.send_and_wait(
                    self.settings.kafka.model_updates_topic, json.dumps(message).encode()
                )
            except Exception as exc:  # noqa: BLE001 - the snapshot is out; subscribers poll
                log.warning("model-updates message for version %s not sent: %s", version, exc)
        log.info(
            "published version %s (model %s, %d learnt, %d duplicates, %d paused)",
            version,
            self.model.version,
            self.stats.learned,
            self.stats.duplicates,
            self.stats.paused,
        )
        return version

    # -- the loop ------------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        await asyncio.to_thread(self.restore)
        if self.cfg.metrics_port > 0:
            self._http, _thread = start_http_server(
                self.cfg.metrics_port, registry=self.metrics.registry
            )
            log.info("metrics on :%d/metrics", self.cfg.metrics_port)
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=f"{self.cfg.app_id}-producer",
            max_batch_size=1,  # tansu reports wrong end offsets after multi-record batches
            linger_ms=0,
        )
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            client_id=self.cfg.app_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.cfg.batch_size,
        )
        await self._consumer.start()
        parts = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        # the model-updates topic too (from its end): "trees" messages trigger a tree check
        updates = self.settings.kafka.model_updates_topic
        await self._consumer.topics()  # metadata of every topic
        self._update_parts = [
            TopicPartition(updates, p)
            for p in sorted(self._consumer.partitions_for_topic(updates) or ())
        ]
        if not self._update_parts:
            log.warning("no topic %r: new trees are found by polling Redis only", updates)
        self._consumer.assign(parts + self._update_parts)
        for tp in parts:
            if tp.partition in self.offsets:
                self._consumer.seek(tp, self.offsets[tp.partition])
            else:
                await self._consumer.seek_to_beginning(tp)
        if self._update_parts:
            await self._consumer.seek_to_end(*self._update_parts)
        log.info("consuming %s partitions %s from %s", self.topic, self.partitions, self.offsets)

    async def stop(self) -> None:
        for client in (self._consumer, self._producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()
        self._consumer = self._producer = None
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    async def run(self) -> None:
        """Consume, learn and publish until :meth:`request_stop`; a final publish on the way out."""
        await self.start()
        try:
            await self._loop()
            if self._unpublished or self._force_publish:
                await self.publish()
        finally:
            await self.stop()

    async def _loop(self) -> None:
        size, max_wait = self.cfg.batch_size, self.cfg.max_wait_s
        buffer: list = []
        first_at: float | None = None
        while not self._stop.is_set():
            now = time.monotonic()
            wait = max_wait if first_at is None else max(0.0, first_at + max_wait - now)
            if self._unpublished:  # idle (nothing to publish): no reason to wake early
                wait = min(wait, max(0.0, self._last_publish + self.cfg.publish_every_s - now))
            if self._force_publish:
                wait = 0.0
            data = await self._consumer.getmany(
                timeout_ms=max(1, int(wait * 1000)), max_records=size - len(buffer)
            )
            for tp, records in data.items():
                if tp.topic == self.topic:
                    buffer.extend(records)
                else:
                    self._on_update(records)
            now = time.monotonic()
            if buffer and first_at is None:
                first_at = now
            if buffer and (len(buffer) >= size or now - first_at >= max_wait):
                await self._flush(buffer)
                buffer, first_at = [], None
            # between mini-batches (the buffer has not been scored yet): newer trees?
            if self.tree_check_due():
                await asyncio.to_thread(self.refresh_trees)
            if self.publish_due():
                await self.publish()
        if buffer:
            await self._flush(buffer)

    def _on_update(self, records: list) -> None:
        """Model-updates messages: a ``"trees"`` one makes the next tree check due."""
        for record in records:
            try:
                message = json.loads(record.value)
            except (TypeError, ValueError):
                continue
            if isinstance(message, dict) and message.get("kind") == "trees":
                log.info("trees v%s announced", message.get("version"))
                self._trees_due = True

    async def _flush(self, buffer: list) -> None:
        result = self.process(buffer)
        if result.dead_letters:
            topic = self.settings.kafka.dead_letters_topic
            sends = [
                await self._producer.send(topic, json.dumps(letter).encode())
                for letter in result.dead_letters
            ]
            await asyncio.gather(*sends)  # before the offsets move on in Redis


async def serve(settings: Settings, schema: str) -> None:
    from streams import redis_store
    from streams.broker import connect as connect_kafka
    from streams.topics import ensure_topics_async

    bootstrap, broker = connect_kafka(settings)
    try:
        await ensure_topics_async(bootstrap, settings)
        trainer = Trainer(settings, bootstrap, redis_store.connect(settings), schema=schema)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, trainer.request_stop)
        await trainer.run()
    finally:
        if broker is not None:
            broker.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m streams.trainer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="settings file (default: configs/default.toml)")
    parser.add_argument("--schema", default="synthetic", choices=sorted(SCHEMAS))
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(load_settings(args.config), args.schema))


if __name__ == "__main__":
    main()
