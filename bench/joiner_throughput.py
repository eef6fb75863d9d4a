"""Joiner throughput per worker against a plain aiokafka consume-and-produce loop.

Starts the embedded broker, writes a backlog of impressions and clicks (keyed by
impression id, event times spread over more than one join window so negatives expire),
then measures, on the same broker in the same run:

* the joiner: one ``python -m streams.joiner worker`` process per driver (``faust``, the
  faust agent; ``aiokafka``, the consumer-group loop) draining the backlog; throughput =
  input events / (time of the last expected output - time of the first);
* ``faust-forward``: a faust agent that only forwards every record to another topic, in
  the same batches: what faust itself costs per record, the ceiling of any faust agent;
* the peer, run right before each of those: one process-local aiokafka loop that consumes
  the same two topics, decodes every record with :func:`engine.events.decode_any` and
  produces one record per event to another topic.

Run: ``python bench/joiner_throughput.py [--impressions 30000]``. Last line: one JSON
object with ``<driver>_events_per_s``, ``<driver>_aiokafka_loop_events_per_s`` and
``<driver>_ratio`` per driver (target ratio >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from engine.calibration import NegativeDownsampler
from engine.config import load_settings
from engine.events import Engagement, Impression, ScoredFeatures, decode_any, encode
from streams import redis_store
from streams.broker import EmbeddedBroker
from streams.topics import ensure_topics

REPO = Path(__file__).resolve().parents[1]
WINDOW_S = 60.0
PARTITIONS = 4


FEATURES = ScoredFeatures(indices=[1, 2, 3], values=[0.5, 0.5, 0.5], dense=[1.0, 2.0])


def impression(iid: str, ts: float, price: float = 0.1, pctr: float = 0.05) -> bytes:
    """An encoded impression of the backlog (every one of the same ad and features)."""
    return encode(
        Impression(
            impression_id=iid,
            request_id=f"r-{iid}",
            ts=ts,
            ad_id="a",
            campaign_id="c",
            advertiser_id="adv",
            position=0,
            price=price,
            model_version="t0.w0",
            exploration=False,
            pctr=pctr,
            features=FEATURES,
        )
    )


def backlog(n_impressions: int, click_rate: float) -> list[tuple[str, str, bytes]]:
    """(role, key, value) records: impressions every 0.1 s of event time, some clicked."""
    records, stride = [], max(1, round(1 / click_rate))
    for i in range(n_impressions):
        ts = 1_700_000_000.0 + 0.1 * i
        imp_id = f"imp-{i}"
        records.append(("impressions", imp_id, impression(imp_id, ts)))
        if i % stride == 0:
            click = Engagement(engagement_id=f"e{i}", impression_id=imp_id, ts=ts + 1, kind="click")
            records.append(("engagements", imp_id, encode(click)))
    end = 1_700_000_000.0 + 0.1 * n_impressions + 2 * WINDOW_S
    for part in range(PARTITIONS):  # advance every partition's event time past the window
        key = next(
            f"tick-{part}-{j}" for j in range(10_000) if _partition(f"tick-{part}-{j}") == part
        )
        hide = Engagement(engagement_id=f"h-{key}", impression_id=key, ts=end, kind="hide")
        tick = impression(key, end, price=0.0, pctr=0.0)
        records += [("impressions", key, tick), ("engagements", key, encode(hide))]
    return records


def _partition(key: str) -> int:
    """The partition aiokafka's default partitioner picks for ``key``."""
    partitions = list(range(PARTITIONS))
    return DefaultPartitioner()(key.encode(), partitions, partitions)


async def produce(bootstrap: str, topics: dict[str, str], records) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        for role, key, value in records:
            await producer.send(topics[role], value, key=key.encode())
        await producer.flush()
    finally:
        await producer.stop()


async def drain(bootstrap: str, topic: str, expected: int, timeout_s: float) -> tuple[float, float]:
    """Consume ``topic`` from the start until ``expected`` records; (first, last) arrival times."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    seen, first, last = 0, None, None
    deadline = time.monotonic() + timeout_s
    try:
        while seen < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=5000)
            now = time.perf_counter()
            for records in batch.values():
                if records and first is None:
                    first = now
                seen += len(records)
                if records:
                    last = now
    finally:
        await consumer.stop()
    if seen < expected:
        raise RuntimeError(f"{topic}: {seen} of {expected} records before the timeout")
    return first, last


async def plain_loop(bootstrap: str, topics: dict[str, str], out_topic: str, n: int) -> float:
    """The peer: consume both topics, decode, produce one record per event; events/s."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    parts = [
        TopicPartition(topics[r], p)
        for r in ("impressions", "engagements")
        for p in range(PARTITIONS)
    ]
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    done, start = 0, None
    try:
        while done < n:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    if start is None:
                        start = time.perf_counter()
                    event = decode_any(record.value)
                    await producer.send(out_topic, encode(event), key=record.key)
                    done += 1
        await producer.flush()
        return n / (time.perf_counter() - start)
    finally:
        await producer.stop()
        await consumer.stop()


def faust_forward_worker() -> None:
    """A faust agent that only forwards each record (``BENCH_FORWARD_TO``): faust's ceiling."""
    import faust

    settings = load_settings()
    kafka = settings.kafka
    app = faust.App(
        settings.joiner.app_id,
        broker=f"kafka://{kafka.bootstrap_servers}",
        store="memory://",
        topic_partitions=PARTITIONS,
        broker_session_timeout=settings.joiner.session_timeout_s,
        broker_heartbeat_interval=settings.joiner.heartbeat_interval_s,
        broker_rebalance_timeout=settings.joiner.session_timeout_s,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
    )
    raw = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw"}
    source = app.topic(
        kafka.impressions_topic, kafka.engagements_topic, **raw, value_serializer="raw"
    )
    out = os.environ["BENCH_FORWARD_TO"]
    batch, wait = settings.joiner.batch_size, settings.joiner.batch_max_wait_s

    @app.agent(source)
    async def forward(stream) -> None:
        async for events in stream.take_events(batch, within=wait):
            sent = [
                await app.producer.send(out, e.message.key, e.message.value, None, None, None)
                for e in events
            ]
            await asyncio.gather(*sent)

    sys.argv = [sys.argv[0], "worker", "-l", "warn", "--without-web"]
    app.main()


def run_worker(env: dict, driver: str, bootstrap: str, topic: str, expected: int, timeout: float):
    """One worker process for ``driver`` draining the backlog; (first, last) output times.

    ``driver`` is a joiner driver, or ``faust-forward`` (:func:`faust_forward_worker`).
    """
    if driver == "faust-forward":
        command = [sys.executable, __file__, "--faust-forward-worker"]
        env = {**env, "BENCH_FORWARD_TO": topic}
    else:
        command = [sys.executable, "-m", "streams.joiner", "worker", "-l", "warn", "--without-web"]
        env = {**env, "ADENGINE_JOINER_DRIVER": driver}
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        worker = subprocess.Popen(
            command,
            cwd=REPO,
            env={**env, "PYTHONPATH": str(REPO)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return asyncio.run(drain(bootstrap, topic, expected, timeout))
        except RuntimeError:
            print(Path(log.name).read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(20)
            except subprocess.TimeoutExpired:
                worker.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=30000)
    parser.add_argument("--click-rate", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=240.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--drivers",
        default="faust,aiokafka,faust-forward",
        help="joiner drivers to measure; faust-forward is a faust agent that only forwards",
    )
    args = parser.parse_args()

    settings = load_settings()
    rate = settings.calibration.negative_downsampling_rate
    records = backlog(args.impressions, args.click_rate)
    n_events = len(records)
    n_clicks = sum(1 for role, _, _ in records if role == "engagements") - PARTITIONS
    if rate >= 1.0:
        expected = args.impressions
    else:  # downsampled negatives: count what the joiner's keyed sampler keeps
        sampler = NegativeDownsampler(rate)  # as the joiner builds it
        clicked = {key for role, key, _ in records if role == "engagements"}
        expected = n_clicks + sum(
            sampler.keep(0, key=f"imp-{i}")
            for i in range(args.impressions)
            if f"imp-{i}" not in clicked
        )
    run = uuid.uuid4().hex[:6]
    topics = {r: f"bench-{run}.{r}" for r in ("impressions", "engagements")}
    result: dict = {
        "benchmark": "joiner_throughput",
        "events": n_events,
        "impressions": args.impressions,
        "clicks": n_clicks,
        "examples": expected,
    }
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        bootstrap = broker.bootstrap_servers
        redis = redis_store.embedded(Path(tmp) / "redis.db")  # the joiner's state
        base = {k: v for k, v in os.environ.items() if not k.startswith("ADENGINE_")}
        base.update(
            REDIS_URL=redis_store.socket_url(redis),
            KAFKA_BOOTSTRAP_SERVERS=bootstrap,
            ADENGINE_JOINER_WINDOW_S=str(WINDOW_S),
            ADENGINE_KAFKA_IMPRESSIONS_TOPIC=topics["impressions"],
            ADENGINE_KAFKA_ENGAGEMENTS_TOPIC=topics["engagements"],
        )
        for role in ("impressions", "engagements", "examples"):
            base[f"ADENGINE_KAFKA_{role.upper()}_PARTITIONS"] = str(PARTITIONS)
        asyncio.run(produce(bootstrap, topics, records))
        runs: dict[str, list[tuple[float, float]]] = {}
        try:
            for repeat in range(args.repeats):
                for driver in args.drivers.split(","):
                    # each run: its own group, outputs and state; the peer right before it
                    tag = f"{driver}-{repeat}"
                    env = dict(base, ADENGINE_JOINER_APP_ID=f"bench-{run}-{tag}")
                    for role in ("examples", "late_clicks", "dead_letters"):
                        env[f"ADENGINE_KAFKA_{role.upper()}_TOPIC"] = f"bench-{run}.{tag}.{role}"
                    ensure_topics(bootstrap, load_settings(env=env))
                    peer = asyncio.run(
                        plain_loop(bootstrap, topics, f"bench-{run}.{tag}.peer-out", n_events)
                    )
                    first, last = run_worker(
                        env,
                        driver,
                        bootstrap,
                        env["ADENGINE_KAFKA_EXAMPLES_TOPIC"],
                        n_events if driver == "faust-forward" else expected,
                        args.timeout,
                    )
                    if last - first < 0.05:  # all outputs in one or two fetches: no timing
                        sys.exit(
                            f"{driver}: the backlog drained too fast to time; raise --impressions"
                        )
                    ours = n_events / (last - first)
                    runs.setdefault(driver, []).append((ours, peer))
                    print(
                        f"{driver}: {ours:,.0f} events/s vs plain aiokafka loop "
                        f"{peer:,.0f} events/s: ratio {ours / peer:.2f}"
                    )
        finally:
            redis_store.close_embedded(Path(tmp) / "redis.db")
    for driver, pairs in runs.items():
        name = driver.replace("-", "_")
        result[f"{name}_events_per_s"] = round(statistics.median(o for o, _ in pairs))
        result[f"{name}_aiokafka_loop_events_per_s"] = round(statistics.median(p for _, p in pairs))
        result[f"{name}_ratio"] = round(statistics.median(o / p for o, p in pairs), 3)
    result.update(
        repeats=args.repeats,
        statistic="median over repeats of each run and of its ratio to the peer run before it",
        target_ratio=0.5,
        timing="backlog drained; first to last output record (group join excluded)",
    )
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--faust-forward-worker"]:
        faust_forward_worker()
    else:
        main()
