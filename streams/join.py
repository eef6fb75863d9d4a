"""Event-time join of impressions and engagements into labelled training examples.

Pure logic, no Kafka: :class:`Join` is a state machine over a mapping-like *store*
(a plain ``dict`` in unit tests, a Redis-backed table in :mod:`streams.joiner`). Both input
topics are keyed by impression id, so an impression and its clicks land on the same
partition number; state is kept per partition and the outputs depend only on the order
of events per partition, never on wall-clock time.

Rules (``W`` is the partition's event-time watermark, see below):

* impression -> held as *pending* under ``i:<impression_id>``; a second copy of the same
  impression id is counted (``duplicate_impressions``) and ignored (replay safety).
* click on a pending impression with ``click.ts <= imp.ts + window`` -> one positive
  :class:`TrainingExample` at once (``example_id = impression_id``, weight 1, features,
  model version and ``impression_ts`` copied from the impression, ``label_ts`` = click ts).
* a second click on an already clicked impression, or an engagement id seen before ->
  ``duplicates`` (ignored).
* click with ``click.ts > imp.ts + window`` -> ``late`` (side topic, reason
  ``after_window``); a click inside the window whose impression was already expired (only
  possible with disorder inside a topic) -> ``late`` with reason ``after_expiry``.
* click with no impression yet -> held under ``c:<impression_id>`` for the grace period;
  if the impression arrives while it is held the click is joined as above; once
  ``click.ts + grace < W`` it is an ``orphan`` (side topic, reason ``no_impression``).
* pending impression with ``imp.ts + window < W`` -> expires unclicked: a negative,
  kept with probability ``w`` by :class:`NegativeDownsampler` keyed by the impression id
  (so a replay or a restarted worker keeps the same ones) and weighted ``1 / w``;
  dropped ones are counted (``negatives_dropped``).
* hide / report engagements are counted (``hides``, ``reports``) and advance event time
  but do not change labels: the learner predicts clicks; negative feedback is read by its
  consumers straight from the engagements topic, so it is not copied anywhere.

Finished impressions stay as small tombstones (no features) until
``imp.ts + window + retention < W`` so that duplicate and late clicks, and re-delivered
impressions, are recognised after the label was emitted (at-least-once replay safety).

**Watermark.** ``W`` for a partition is ``min(max impression ts, max engagement ts)``
seen on that partition: the standard watermark of a two-input operator. The two topics
are consumed interleaved in an order that depends on fetch timing (in a replay with a
backlog, by record count rather than event time), so a watermark driven by whichever topic
happens to be ahead would turn in-window clicks into late ones and early clicks into
orphans on replay. With the minimum, a click inside the window is always seen before its
impression expires (as long as each topic is ordered by event time up to the grace
period), so the examples do not depend on the interleaving. The price: a partition whose
engagement stream is idle does not advance (see the docstring of :class:`Join`).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Literal

import msgspec

from engine.calibration import NegativeDownsampler
from engine.events import Engagement, Impression, ScoredFeatures, TrainingExample

__all__ = [
    "COUNTERS",
    "DeadLetter",
    "Join",
    "Output",
    "SideClick",
    "join_events",
]

COUNTERS = (
    "impressions",
    "duplicate_impressions",
    "clicks",
    "hides",
    "reports",
    "positives",
    "negatives",
    "negatives_dropped",
    "duplicates",
    "held",
    "orphans",
    "late",
    "malformed",  # counted by the worker (streams.joiner), as is:
    "misrouted",  # an event not keyed by its impression id
)

PENDING, CLICKED, EXPIRED = 0, 1, 2


class SideClick(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """A click that produced no example, written to the late-clicks topic."""

    reason: Literal["after_window", "after_expiry", "no_impression"]
    engagement: Engagement
    impression_ts: float | None = None
    watermark: float | None = None
    schema_version: int = 1


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """A record that could not be processed; ``raw`` holds its bytes (base64 in JSON)."""

    reason: str
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    raw: bytes = b""
    schema_version: int = 1


@dataclass(frozen=True)
class Output:
    """One record to publish: ``kind`` is ``"example"`` or ``"side"``; key = impression id."""

    kind: Literal["example", "side"]
    key: str
    record: TrainingExample | SideClick


# ----------------------------------------------------------------------------- store values


class _Imp(msgspec.Struct, array_like=True):
    ts: float
    part: int
    state: int
    model_version: str
    features: ScoredFeatures | None  # dropped once the label is out
    engagements: list[str] = []  # click engagement ids seen


class _Held(msgspec.Struct, array_like=True):
    part: int
    clicks: list[Engagement]


class _Mark(msgspec.Struct, array_like=True):
    imp: float = -math.inf
    eng: float = -math.inf


_ENC = msgspec.msgpack.Encoder()
_IMP = msgspec.msgpack.Decoder(_Imp)
_HELD = msgspec.msgpack.Decoder(_Held)
_MARK = msgspec.msgpack.Decoder(_Mark)


class Join:
    """The join state machine for the partitions whose state lives in ``store``.

    ``store`` needs ``get``, ``__setitem__``, ``__delitem__`` and ``items`` with ``str``
    keys and ``bytes`` values. Keys: ``i:<impression id>``, ``c:<impression id>`` (held
    clicks) and ``w:<partition>`` (that partition's watermark), so a store shared by all
    partitions works. Expiry uses an in-memory index per partition (and the watermark is
    kept decoded), rebuilt from the store on first use and after :meth:`forget_partitions`
    (call it when partitions are (re)assigned: their state may have changed elsewhere).

    Idle sources: the watermark is the minimum over the two topics, so a partition with
    no engagements does not expire impressions. Producers that may go idle should emit
    keep-alive events (e.g. a ``hide`` on a synthetic impression id) per partition.
    """

    def __init__(
        self,
        store: MutableMapping[str, bytes],
        *,
        window_s: float,
        grace_s: float,
        downsampler: NegativeDownsampler | None = None,
        retention_s: float | None = None,
    ) -> None:
        if window_s <= 0 or grace_s < 0:
            raise ValueError(f"window_s must be > 0 and grace_s >= 0; got {window_s}, {grace_s}")
        self.store = store
        self.window_s = float(window_s)
        self.grace_s = float(grace_s)
        self.retention_s = float(window_s if retention_s is None else retention_s)
        self.downsampler = downsampler or NegativeDownsampler(1.0)
        self.counts: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._heaps: dict[int, list[tuple[float, str, str]]] = {}
        self._pending: dict[int, int] = {}  # per indexed partition
        self._marks: dict[int, _Mark] = {}  # decoded watermarks (the store has them too)

    # -- public ---------------------------------------------------------------------------

    def process(self, event: Impression | Engagement, partition: int) -> list[Output]:
        """Apply one event of ``partition``; return the records to publish, in order."""
        heap = self._heap(partition)
        out: list[Output] = []
        if isinstance(event, Impression):
            self._impression(event, partition, heap, out)
        elif isinstance(event, Engagement):
            self._engagement(event, partition, heap, out)
        else:
            raise TypeError(f"not an Impression or Engagement: {type(event).__name__}")
        self._advance(event, partition, heap, out)
        return out

    def watermark(self, partition: int) -> float:
        mark = self._mark(partition)
        return min(mark.imp, mark.eng)

    def forget_partitions(self, partitions: Iterable[int] | None = None) -> None:
        """Drop the in-memory expiry index and watermarks (all partitions by default)."""
        if partitions is None:
            self._heaps.clear()
            self._pending.clear()
            self._marks.clear()
        else:
            for p in partitions:
                self._heaps.pop(p, None)
                self._pending.pop(p, None)
                self._marks.pop(p, None)

    def pending_count(self) -> int:
        """Impressions waiting for a label in the partitions seen since the last
        :meth:`forget_partitions` (kept up to date, unlike :meth:`pending`, which scans)."""
        return sum(self._pending.values())

    def pending(self) -> int:
        """Impressions still waiting for a label (all partitions in the store)."""
        return sum(
            1 for k, v in self.store.items() if k.startswith("i:") and _IMP.decode(v).state == 0
        )

    # -- events ---------------------------------------------------------------------------

    def _impression(self, imp: Impression, part: int, heap, out: list[Output]) -> None:
        self.counts["impressions"] += 1
        key = "i:" + imp.impression_id
        if self.store.get(key) is not None:
            self.counts["duplicate_impressions"] += 1
            return
        rec = _Imp(imp.ts, part, PENDING, imp.model_version, imp.features)
        held_raw = self.store.get("c:" + imp.impression_id)
        if held_raw is not None:
            del self.store["c:" + imp.impression_id]
            held = _HELD.decode(held_raw)
            for click in sorted(held.clicks, key=lambda c: (c.ts, c.engagement_id)):
                self._click_on(imp.impression_id, rec, click, out)
        if rec.state == PENDING:
            self._pending[part] += 1
        self.store[key] = _ENC.encode(rec)
        heapq.heappush(heap, (imp.ts + self.window_s, "i", imp.impression_id))

    def _engagement(self, eng: Engagement, part: int, heap, out: list[Output]) -> None:
        if eng.kind != "click":
            self.counts["hides" if eng.kind == "hide" else "reports"] += 1
            return
        self.counts["clicks"] += 1
        iid = eng.impression_id
        raw = self.store.get("i:" + iid)
        if raw is not None:
            rec = _IMP.decode(raw)
            was_pending = rec.state == PENDING
            if self._click_on(iid, rec, eng, out):
                self.store["i:" + iid] = _ENC.encode(rec)
                if was_pending and rec.state != PENDING:
                    self._pending[part] -= 1
            return
        held_raw = self.store.get("c:" + iid)
        held = _HELD.decode(held_raw) if held_raw is not None else _Held(part, [])
        if any(c.engagement_id == eng.engagement_id for c in held.clicks):
            self.counts["duplicates"] += 1
            return
        self.counts["held"] += 1
        held.clicks.append(eng)
        self.store["c:" + iid] = _ENC.encode(held)
        heapq.heappush(heap, (eng.ts + self.grace_s, "c", iid))

    def _click_on(self, iid: str, rec: _Imp, click: Engagement, out: list[Output]) -> bool:
        """Join one click to a known impression; True when ``rec`` changed."""
        if click.engagement_id in rec.engagements or rec.state == CLICKED:
            self.counts["duplicates"] += 1
            return False
        rec.engagements.append(click.engagement_id)
        if click.ts > rec.ts + self.window_s or rec.state == EXPIRED:
            self.counts["late"] += 1
            reason = "after_window" if click.ts > rec.ts + self.window_s else "after_expiry"
            side = SideClick(reason=reason, engagement=click, impression_ts=rec.ts)
            out.append(Output("side", iid, side))
            return True
        assert rec.features is not None
        example = TrainingExample(
            example_id=iid,
            impression_id=iid,
            label=1,
            weight=1.0,
            features=rec.features,
            impression_ts=rec.ts,
            label_ts=click.ts,
            model_version=rec.model_version,
        )
        self.counts["positives"] += 1
        out.append(Output("example", iid, example))
        rec.state, rec.features = CLICKED, None
        return True

    # -- event time -------------------------------------------------------------------------

    def _mark(self, part: int) -> _Mark:
        mark = self._marks.get(part)
        if mark is None:  # kept decoded: it changes with almost every event
            raw = self.store.get(f"w:{part}")
            mark = self._marks[part] = _MARK.decode(raw) if raw is not None else _Mark()
        return mark

    def _advance(self, event, part: int, heap, out: list[Output]) -> None:
        mark = self._mark(part)
        before = min(mark.imp, mark.eng)
        if isinstance(event, Impression):
            if event.ts <= mark.imp:
                return self._expire(part, before, heap, out)
            mark.imp = event.ts
        else:
            if event.ts <= mark.eng:
                return self._expire(part, before, heap, out)
            mark.eng = event.ts
        self.store[f"w:{part}"] = _ENC.encode(mark)
        self._expire(part, min(mark.imp, mark.eng), heap, out)

    def _expire(self, part: int, wm: float, heap, out: list[Output]) -> None:
        while heap and heap[0][0] < wm:
            deadline, kind, iid = heapq.heappop(heap)
            if kind == "c":
                self._expire_held(iid, wm, heap, out)
                continue
            raw = self.store.get("i:" + iid)
            if raw is None:
                continue
            rec = _IMP.decode(raw)
            if rec.state == PENDING:
                if rec.ts + self.window_s < wm:
                    self._negative(iid, rec, out)
                    rec.state, rec.features = EXPIRED, None
                    self.store["i:" + iid] = _ENC.encode(rec)
                    self._pending[part] -= 1
                heapq.heappush(heap, (rec.ts + self.window_s + self.retention_s, "i", iid))
            elif rec.ts + self.window_s + self.retention_s < wm:
                del self.store["i:" + iid]
            else:
                heapq.heappush(heap, (rec.ts + self.window_s + self.retention_s, "i", iid))

    def _expire_held(self, iid: str, wm: float, heap, out: list[Output]) -> None:
        raw = self.store.get("c:" + iid)
        if raw is None:
            return
        held = _HELD.decode(raw)
        gone = [c for c in held.clicks if c.ts + self.grace_s < wm]
        keep = [c for c in held.clicks if c.ts + self.grace_s >= wm]
        for click in sorted(gone, key=lambda c: (c.ts, c.engagement_id)):
            self.counts["orphans"] += 1
            side = SideClick(reason="no_impression", engagement=click, watermark=wm)
            out.append(Output("side", iid, side))
        if keep:
            self.store["c:" + iid] = _ENC.encode(_Held(held.part, keep))
            heapq.heappush(heap, (min(c.ts for c in keep) + self.grace_s, "c", iid))
        else:
            del self.store["c:" + iid]

    def _negative(self, iid: str, rec: _Imp, out: list[Output]) -> None:
        if not self.downsampler.keep(0, key=iid):
            self.counts["negatives_dropped"] += 1
            return
        assert rec.features is not None
        example = TrainingExample(
            example_id=iid,
            impression_id=iid,
            label=0,
            weight=self.downsampler.weight,
            features=rec.features,
            impression_ts=rec.ts,
            label_ts=rec.ts + self.window_s,
            model_version=rec.model_version,
        )
        self.counts["negatives"] += 1
        out.append(Output("example", iid, example))

    # -- index --------------------------------------------------------------------------------

    def _heap(self, part: int) -> list[tuple[float, str, str]]:
        heap = self._heaps.get(part)
        if heap is None:
            self._pending[part] = 0
            heap = self._heaps[part] = list(self._scan(part))
            heapq.heapify(heap)
        return heap

    def _scan(self, part: int) -> Iterator[tuple[float, str, str]]:
        for key, raw in list(self.store.items()):
            if raw is None:
                continue
            if key.startswith("i:"):
                rec = _IMP.decode(raw)
                if rec.part == part:
                    self._pending[part] += rec.state == PENDING
                    extra = 0.0 if rec.state == PENDING else self.retention_s
                    yield (rec.ts + self.window_s + extra, "i", key[2:])
            elif key.startswith("c:"):
                held = _HELD.decode(raw)
                if held.part == part and held.clicks:
                    yield (min(c.ts for c in held.clicks) + self.grace_s, "c", key[2:])


def join_events(
    events: Iterable[tuple[int, Impression | Engagement]],
    *,
    window_s: float,
    grace_s: float,
    rate: float = 1.0,
    seed: int | None = None,
    store: MutableMapping[str, bytes] | None = None,
) -> tuple[list[Output], Counter[str]]:
    """Run ``(partition, event)`` pairs through a fresh :class:`Join` on a dict store."""
    join = Join(
        {} if store is None else store,
        window_s=window_s,
        grace_s=grace_s,
        downsampler=NegativeDownsampler(rate, seed=seed),
    )
    out: list[Output] = []
    for part, event in events:
        out.extend(join.process(event, part))
    return out, join.counts
