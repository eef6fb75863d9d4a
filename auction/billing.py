"""The billing worker: billable events from the event topics -> atomic budget charges.

Run it with::

    KAFKA_BOOTSTRAP_SERVERS=host:port python -m auction.billing -l info

Workers with the same ``[billing] app_id`` form one aiokafka consumer group over the
impressions and engagements topics and share their partitions. Each event is charged to
its campaign's :class:`~auction.budget.BudgetLedger` in Redis:

* **CPM impression**: ``price`` is per mille, so the impression costs ``price / 1000``
  (largest charge ``bid / 1000``); charge id = the impression id; day = the budget day of
  the impression's ``ts``.
* **CPC click**: costs the impression's ``price`` (largest charge ``bid``); charge id =
  ``<impression id>:click``; day = the budget day of the click's ``ts``. A click is billed
  when ``click.ts <= impression.ts + [joiner] window_s``, the rule by which the joiner
  labels it a positive, and only the first click of an impression is billed.

A click does not carry its price, so the worker remembers each impression's campaign,
price, pricing, bid and time in Redis (:class:`ImpressionMemory`, one hash per impression
id, kept ``[joiner] window_s + out_of_order_grace_s``) together with the engagement id of
its first click. Recording a click and remembering an impression are each one Lua
script, so whichever of the two arrives second (the topics are consumed independently,
possibly by different workers) sees the other and bills the click: a click that comes
first is held in the same hash until its impression arrives.

**Feedback counts.** The same scripts count, per ad, the impressions, hides and reports
that :mod:`auction.feedback` turns into ad quality: a hash per ad (key
:func:`~auction.feedback.feedback_key` under ``[billing] feedback_prefix``, fields
``impressions``, ``hides`` and ``reports``, kept for good). An impression is counted by
the call that remembers it first, which also stores its ad's counter key in the
impression's hash; a hide or report is counted once per impression and kind (the first
one is flagged in the impression's hash, later ones and redeliveries are ``duplicate``),
in the ad's counters when its impression is remembered, else held like a click and
counted when the impression arrives. Feedback whose impression never comes within the
memory's lifetime, or comes after it expired, is never counted. Both scripts write the
impression's hash and its ad's counters: the billing state must live on one Redis node,
not spread over a cluster's slots.

Delivery is at-least-once: offsets are committed only after a batch's charges are done
and its dead letters acknowledged, and a crashed worker's uncommitted events are charged
again under the same charge ids, which the ledger answers with ``duplicate``. The charge
day comes from the event, never from the wall clock, so a retry finds its charge id.

Events that cannot be billed (undecodable, an ``AdRequest``, an impression without
``pricing``/``bid`` or priced above its bid, an unusable campaign id, an impression id
already remembered for a different impression) go to
``[kafka] dead_letters_topic`` as a :class:`streams.join.DeadLetter` with the reason; the
stream goes on. Refused charges (no budget, daily or total budget exhausted) are counted,
never retried: serving stops showing a campaign that can no longer pay its largest
charge (:func:`auction.pacing.can_afford`), and the ledger never lets spend exceed a
budget, whatever the number of workers.

Prometheus metrics (own registry, exporter on ``[billing] metrics_port``):
``adengine_billing_charges_total{status}`` (the ledger's outcome),
``adengine_billing_spend_total`` (currency units accepted),
``adengine_billing_events_total{kind}`` (impression, click, hide, report, malformed),
``adengine_billing_clicks_total{outcome}`` (charged, held, repeat, late, cpm) and
``adengine_billing_feedback_total{kind, outcome}`` (impression, hide, report; counted,
held, duplicate).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client import Counter as PromCounter

from auction.auction import PER_MILLE
from auction.budget import BudgetLedger, budget_day
from auction.feedback import feedback_key
from engine.config import Settings, load_settings
from engine.events import Engagement, EventError, Impression, ScoredFeatures, decode_any, encode
from streams.group import group_consumer, stop_on_signals
from streams.join import DeadLetter

__all__ = [
    "BatchResult",
    "Biller",
    "BillingMetrics",
    "Charge",
    "ImpressionMemory",
    "NotBillable",
    "Remembered",
    "click_charge",
    "impression_charge",
    "run_group",
]

log = logging.getLogger(__name__)

REPORT_EVERY_S = 5.0
RETRY_BACKOFF_S = 1.0
CHARGE_STATUSES = ("accepted", "duplicate", "no_budget", "daily_budget", "total_budget")
EVENT_KINDS = ("impression", "click", "hide", "report", "malformed")
CLICK_OUTCOMES = ("charged", "held", "repeat", "late", "cpm")
FEEDBACK_KINDS = ("hide", "report")
FEEDBACK_OUTCOMES = ("counted", "held", "duplicate")
_NO_FEATURES = ScoredFeatures(indices=[], values=[], dense=[])


class NotBillable(ValueError):
    """An event that can never be charged; it goes to the dead-letter topic."""


@dataclass(frozen=True)
class Charge:
    """One charge for :meth:`BudgetLedger.charge`; amounts in currency units."""

    campaign_id: str
    amount: float
    max_charge: float
    day: str
    charge_id: str


# --------------------------------------------------------------------------- pure rules


def _check(imp: Impression) -> None:
    if imp.pricing is None or imp.bid is None:
        raise NotBillable(f"impression {imp.impression_id} has no pricing/bid: not billable")
    if imp.price > imp.bid:
        raise NotBillable(
            f"impression {imp.impression_id}: price {imp.price} exceeds bid {imp.bid}"
        )
    if "{" in imp.campaign_id or "}" in imp.campaign_id:
        raise NotBillable(f"impression {imp.impression_id}: invalid campaign_id")


def impression_charge(imp: Impression, utc_offset_hours: float = 0.0) -> Charge | None:
    """The charge of an impression: ``price / 1000`` for CPM, ``None`` for CPC.

    >>> from engine.events import ScoredFeatures
    >>> imp = Impression(impression_id="i1", request_id="r", ts=0.0, ad_id="a",
    ...     campaign_id="c", advertiser_id="v", position=0, price=2.5, model_version="m",
    ...     exploration=False, pctr=0.1, features=ScoredFeatures(indices=[], values=[]),
    ...     pricing="cpm", bid=4.0)
    >>> impression_charge(imp)
    Charge(campaign_id='c', amount=0.0025, max_charge=0.004, day='1970-01-01', charge_id='i1')
    """
    _check(imp)
    if imp.pricing != "cpm":
        return None
    return Charge(
        campaign_id=imp.campaign_id,
        amount=imp.price / PER_MILLE,
        max_charge=imp.bid / PER_MILLE,
        day=budget_day(imp.ts, utc_offset_hours),
        charge_id=imp.impression_id,
    )


def click_charge(
    imp: Impression, click_ts: float, window_s: float, utc_offset_hours: float = 0.0
) -> tuple[Charge | None, str]:
    """``(charge, outcome)`` of the first click on ``imp`` at ``click_ts``.

    Outcome ``charged`` (a CPC click within the window: the impression's price),
    ``late`` (after ``imp.ts + window_s``) or ``cpm`` (clicks on CPM ads are free).
    """
    _check(imp)
    if imp.pricing != "cpc":
        return None, "cpm"
    if click_ts > imp.ts + window_s:
        return None, "late"
    charge = Charge(
        campaign_id=imp.campaign_id,
        amount=imp.price,
        max_charge=imp.bid,
        day=budget_day(click_ts, utc_offset_hours),
        charge_id=f"{imp.impression_id}:click",
    )
    return charge, "charged"


# --------------------------------------------------------------------------- Redis memory

_REMEMBER_LUA = """
-- KEYS: impression hash, its ad's feedback counters; ARGV: impression record (JSON), ttl
-- first write wins and counts the impression, and any hide/report held for it, in the
-- ad's counters; returns the stored record, the held first click (id, ts), the hide and
-- report flags (nil when absent) and 1 when this call stored the impression, else 0
local first = 0
if redis.call('HEXISTS', KEYS[1], 'imp') == 0 then
  redis.call('HSET', KEYS[1], 'imp', ARGV[1], 'ad', KEYS[2])
  redis.call('HINCRBY', KEYS[2], 'impressions', 1)
  for _, kind in ipairs({'hide', 'report'}) do
    if redis.call('HEXISTS', KEYS[1], kind) == 1 then
      redis.call('HINCRBY', KEYS[2], kind .. 's', 1)
    end
  end
  first = 1
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
local out = redis.call('HMGET', KEYS[1], 'imp', 'click', 'click_ts', 'hide', 'report')
out[6] = first
return out
"""

_CLICK_LUA = """
-- KEYS: impression hash; ARGV: engagement id, click ts, ttl seconds
-- the first click wins; returns (first click id, its ts, impression record or nil)
if redis.call('HSETNX', KEYS[1], 'click', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'click_ts', ARGV[2])
  if redis.call('TTL', KEYS[1]) < 0 then
    redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  end
end
return redis.call('HMGET', KEYS[1], 'click', 'click_ts', 'imp')
"""

_FEEDBACK_LUA = """
-- KEYS: impression hash; ARGV: kind ('hide' or 'report'), engagement id, ttl seconds
-- once per impression and kind: counted in the ad's counters (the key stored with the
-- impression, not in KEYS: one Redis node) when the impression is remembered, else held
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 'duplicate'
end
local ad = redis.call('HGET', KEYS[1], 'ad')
if ad then
  redis.call('HINCRBY', ad, ARGV[1] .. 's', 1)
  return 'counted'
end
if redis.call('TTL', KEYS[1]) < 0 then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return 'held'
"""


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(frozen=True)
class Remembered:
    """What :meth:`ImpressionMemory.remember` found: the first click if one came first,
    whether this call stored (and counted) the impression, and the kinds of held
    feedback it counted with it."""

    click: tuple[str, float] | None
    first: bool
    feedback: tuple[str, ...] = ()


class ImpressionMemory:
    """Recent impressions, their first click and feedback, by impression id, in Redis.

    ``<prefix>imp:<impression id>`` is a hash: ``imp`` (the impression event, without
    its features), ``ad`` (its ad's feedback counter key), ``click`` and ``click_ts``
    (the first click's engagement id and time), ``hide`` and ``report`` (the first such
    engagement's id). It expires ``ttl_s`` after the last write of the impression (or of
    a click or feedback that came first). Per-ad counters live under ``feedback_prefix``
    (:func:`~auction.feedback.feedback_key`).
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        ttl_s: float,
        feedback_prefix: str = "adengine:feedback:",
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.redis = client
        self.prefix = prefix
        self.feedback_prefix = feedback_prefix
        self.ttl_s = max(1, round(ttl_s))
        self._remember = client.register_script(_REMEMBER_LUA)
        self._click = client.register_script(_CLICK_LUA)
        self._feedback = client.register_script(_FEEDBACK_LUA)

    def _key(self, impression_id: str) -> str:
        return f"{self.prefix}imp:{impression_id}"

    def remember(self, imp: Impression) -> Remembered:
        """Store and count ``imp`` unless it is stored already (see :class:`Remembered`).

        Raises :class:`NotBillable` when another impression was stored under that id.
        """
        slim = msgspec.structs.replace(imp, features=_NO_FEATURES)  # billing needs no features
        stored, click, click_ts, hide, report, first = self._remember(
            keys=[self._key(imp.impression_id), feedback_key(self.feedback_prefix, imp.ad_id)],
            args=[encode(slim), self.ttl_s],
        )
        if decode_any(stored) != slim:
            raise NotBillable(f"impression id {imp.impression_id} reused by another impression")
        held = tuple(k for k, flag in zip(FEEDBACK_KINDS, (hide, report)) if flag is not None)
        return Remembered(
            click=None if click is None else (_text(click), float(click_ts)),
            first=bool(first),
            feedback=held if first else (),
        )

    def record_feedback(self, eng: Engagement) -> str:
        """Count a hide or report once per impression and kind: ``counted``, ``held``
        (its impression is not remembered yet) or ``duplicate``."""
        if eng.kind not in FEEDBACK_KINDS:
            raise ValueError(f"not a feedback kind: {eng.kind!r}")
        outcome = self._feedback(
            keys=[self._key(eng.impression_id)],
            args=[eng.kind, eng.engagement_id, self.ttl_s],
        )
        return _text(outcome) or ""

    def record_click(self, click: Engagement) -> tuple[str, float, Impression | None]:
        """Record ``click`` unless the impression has an earlier-recorded one.

        Returns the first click's engagement id and ts, and the impression if known.
        """
        first, first_ts, raw = self._click(
            keys=[self._key(click.impression_id)],
            args=[click.engagement_id, repr(float(click.ts)), self.ttl_s],
        )
        imp = None if raw is None else decode_any(raw)
        return _text(first), float(first_ts), imp if isinstance(imp, Impression) else None


# --------------------------------------------------------------------------- metrics


class BillingMetrics:
    """Prometheus metrics of one billing worker, in their own registry."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.charges = PromCounter(
            "adengine_billing_charges", "Charges by ledger outcome", ["status"], registry=r
        )
        self.spend = PromCounter(
            "adengine_billing_spend", "Currency units charged (accepted charges)", registry=r
        )
        self.events = PromCounter(
            "adengine_billing_events", "Events consumed by kind", ["kind"], registry=r
        )
        self.clicks = PromCounter(
            "adengine_billing_clicks", "Clicks by billing outcome", ["outcome"], registry=r
        )
        for status in CHARGE_STATUSES:
            self.charges.labels(status)
        for kind in EVENT_KINDS:
            self.events.labels(kind)
        for outcome in CLICK_OUTCOMES:
            self.clicks.labels(outcome)
        self.feedback = PromCounter(
            "adengine_billing_feedback",
            "Impressions, hides and reports counted for ad quality, by outcome",
            ["kind", "outcome"],
            registry=r,
        )
        for outcome in ("counted", "duplicate"):
            self.feedback.labels("impression", outcome)
        for kind in FEEDBACK_KINDS:
            for outcome in FEEDBACK_OUTCOMES:
                self.feedback.labels(kind, outcome)


# --------------------------------------------------------------------------- batch step


@dataclass
class BatchResult:
    """What :meth:`Biller.process` did: records done (in order), their dead letters, and
    the error that stopped the batch early (``None`` when every record was done)."""

    done: list[Any] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    error: Exception | None = None


class Biller:
    """Charges a batch of source records (anything with ``topic``, ``partition``,
    ``offset``, ``key`` and ``value``); independent of the Kafka client."""

    def __init__(
        self,
        ledger: BudgetLedger,
        memory: ImpressionMemory,
        window_s: float,
        utc_offset_hours: float = 0.0,
        metrics: BillingMetrics | None = None,
    ) -> None:
        self.ledger = ledger
        self.memory = memory
        self.window_s = float(window_s)
        self.utc_offset_hours = float(utc_offset_hours)
        self.metrics = metrics or BillingMetrics()
        self.counts: Counter[str] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> Biller:
        auction, joiner = settings.auction, settings.joiner
        ledger = BudgetLedger(
            client, prefix=auction.budget_prefix, day_ttl_s=auction.budget_day_ttl_s
        )
        ttl = joiner.window_s + joiner.out_of_order_grace_s
        billing = settings.billing
        memory = ImpressionMemory(client, billing.state_prefix, ttl, billing.feedback_prefix)
        return cls(ledger, memory, joiner.window_s, auction.budget_utc_offset_hours)

    def _count(self, name: str) -> None:
        self.counts[name] += 1

    def _charge(self, charge: Charge) -> None:
        result = self.ledger.charge(
            charge.campaign_id, charge.amount, charge.day, charge.max_charge, charge.charge_id
        )
        self.metrics.charges.labels(result.status).inc()
        self._count(f"charge_{result.status}")
        if result.status == "accepted":
            self.metrics.spend.inc(result.amount)

    def _click_outcome(self, outcome: str) -> None:
        self.metrics.clicks.labels(outcome).inc()
        self._count(f"click_{outcome}")

    def _feedback_outcome(self, kind: str, outcome: str) -> None:
        self.metrics.feedback.labels(kind, outcome).inc()
        self._count(f"feedback_{kind}_{outcome}")

    def _impression(self, imp: Impression) -> None:
        charge = impression_charge(imp, self.utc_offset_hours)  # validates: may raise
        remembered = self.memory.remember(imp)  # may raise for a reused impression id
        self._feedback_outcome("impression", "counted" if remembered.first else "duplicate")
        for kind in remembered.feedback:  # hides/reports that came first
            self._feedback_outcome(kind, "counted")
        held = remembered.click
        if charge is not None:
            self._charge(charge)
        if held is not None:  # a click came first: bill it now
            click, outcome = click_charge(imp, held[1], self.window_s, self.utc_offset_hours)
            self._click_outcome(outcome)
            if click is not None:
                self._charge(click)

    def _click(self, eng: Engagement) -> None:
        first, first_ts, imp = self.memory.record_click(eng)
        if first != eng.engagement_id:
            self._click_outcome("repeat")  # another click on this impression came first
        elif imp is None:
            self._click_outcome("held")  # billed when its impression arrives
        else:
            charge, outcome = click_charge(imp, first_ts, self.window_s, self.utc_offset_hours)
            self._click_outcome(outcome)
            if charge is not None:
                self._charge(charge)

    def handle(self, record: Any) -> DeadLetter | None:
        """Charge one record; the dead letter when it cannot be billed.

        Redis errors propagate (the record is not done and will be retried).
        """
        try:
            event = decode_any(record.value)
            if isinstance(event, Impression):
                self.metrics.events.labels("impression").inc()
                self._impression(event)
            elif isinstance(event, Engagement):
                self.metrics.events.labels(event.kind).inc()
                if event.kind == "click":
                    self._click(event)
                elif event.kind in FEEDBACK_KINDS:
                    self._feedback_outcome(event.kind, self.memory.record_feedback(event))
            else:
                raise NotBillable(f"unexpected {type(event).__name__} on {record.topic}")
        except (EventError, NotBillable) as exc:
            return self._dead(record, str(exc))
        except ValueError as exc:  # e.g. an id the ledger refuses before Redis
            return self._dead(record, f"{type(exc).__name__}: {exc}")
        return None

    def _dead(self, record: Any, reason: str) -> DeadLetter:
        self.metrics.events.labels("malformed").inc()
        self._count("malformed")
        log.info("billing: dead letter %s[%d]@%d: %s", record.topic, record.partition,
                 record.offset, reason)  # fmt: skip
        return DeadLetter(
            reason=reason,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=record.key,
            raw=record.value or b"",
        )

    def process(self, records: list[Any]) -> BatchResult:
        """Charge ``records`` in order; stops at the first Redis error (see BatchResult)."""
        result = BatchResult()
        for record in records:
            try:
                dead = self.handle(record)
            except redis.RedisError as exc:
                result.error = exc
                break
            if dead is not None:
                result.dead.append(dead)
            result.done.append(record)
        return result


# --------------------------------------------------------------------------- the worker


def _log_counts(biller: Biller) -> None:
    log.info("billing counts %s", json.dumps(dict(biller.counts), sort_keys=True))


def _first_offsets(records: list[Any]) -> dict[tuple[str, int], int]:
    first: dict[tuple[str, int], int] = {}
    for record in records:
        tp = (record.topic, record.partition)
        first[tp] = min(first.get(tp, record.offset), record.offset)
    return first


async def run_group(settings: Settings, redis_client=None, stop: asyncio.Event | None = None):
    """Bill batches until ``stop`` is set (or SIGTERM/SIGINT); returns the :class:`Biller`."""
    kafka, cfg = settings.kafka, settings.billing
    stop = stop or asyncio.Event()
    if redis_client is None:
        from streams.redis_store import connect

        redis_client = connect(settings)
    biller = Biller.from_settings(settings, redis_client)
    bootstrap = kafka.bootstrap_servers.strip()
    consumer = group_consumer(bootstrap, cfg)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    loop = asyncio.get_running_loop()
    stop_on_signals(stop)
    if cfg.metrics_port > 0:
        start_http_server(cfg.metrics_port, registry=biller.metrics.registry)
        log.info("billing metrics on :%d/metrics", cfg.metrics_port)
    await producer.start()
    consumer.subscribe([kafka.impressions_topic, kafka.engagements_topic])
    await consumer.start()
    last_report = loop.time()
    try:
        while not stop.is_set():
            fetched = await consumer.getmany(
                timeout_ms=int(cfg.batch_max_wait_s * 1000), max_records=cfg.batch_size
            )
            records = [record for batch in fetched.values() for record in batch]
            if records:
                await _bill_batch(biller, records, consumer, producer, kafka.dead_letters_topic)
            if loop.time() - last_report >= REPORT_EVERY_S:
                last_report = loop.time()
                _log_counts(biller)
    finally:
        _log_counts(biller)
        await consumer.stop()
        await producer.stop()
    return biller


async def _bill_batch(biller: Biller, records, consumer, producer, dead_letters: str) -> None:
    """Charge one fetched batch, publish its dead letters, then commit what is done."""
    result = await asyncio.to_thread(biller.process, records)
    done = result.done
    try:
        sent = [
            await producer.send(dead_letters, encode(dead), key=dead.key) for dead in result.dead
        ]
        for ack in sent:
            await ack
    except KafkaError as exc:
        log.warning("billing: dead letters not acknowledged (%r): retrying the batch", exc)
        done, result.error = [], exc
    if done:
        offsets: dict[tuple[str, int], int] = {}
        for record in done:
            tp = (record.topic, record.partition)
            offsets[tp] = max(offsets.get(tp, -1), record.offset + 1)
        try:
            await consumer.commit({TopicPartition(t, p): o for (t, p), o in offsets.items()})
        except KafkaError as exc:  # e.g. a rebalance: the new owner re-charges, idempotently
            log.info("billing: offset commit failed (%r); events will be re-charged", exc)
    if result.error is not None:
        log.warning("billing: batch stopped (%r); retrying", result.error)
        for (topic, partition), offset in _first_offsets(records[len(done) :]).items():
            tp = TopicPartition(topic, partition)
            if tp in consumer.assignment():
                consumer.seek(tp, offset)
        await asyncio.sleep(RETRY_BACKOFF_S)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m auction.billing", description=__doc__)
    parser.add_argument("-l", "--loglevel", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel.upper(),
        format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s",
    )
    settings = load_settings()
    bootstrap = settings.kafka.bootstrap_servers.strip()
    if not bootstrap:
        sys.exit(
            "auction.billing needs a broker: set KAFKA_BOOTSTRAP_SERVERS or "
            "[kafka] bootstrap_servers (start one with `adengine broker`)"
        )
    from streams.topics import TopicError, ensure_topics

    try:
        ensure_topics(bootstrap, settings)
    except TopicError as exc:
        sys.exit(f"auction.billing: {exc}")
    asyncio.run(run_group(settings))


if __name__ == "__main__":
    main()
