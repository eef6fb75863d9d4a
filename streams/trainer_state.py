"""The trainer's small, snapshot-able state: bounded dedup and the click-stall guard.

Both serialise to plain JSON (``state()`` / ``from_state()``) so that they travel in the
same Redis value as the model and the consumed offsets (see :mod:`streams.publish`).
"""

from __future__ import annotations

from collections import OrderedDict, deque


class SeenIds:
    """The last ``capacity`` example ids learnt, in arrival order (oldest evicted first).

    A duplicate is caught if its first copy is among the last ``capacity`` unique ids:
    redeliveries after a crash (at most one publication interval back) and producer
    retries are, a replay of the whole topic months later is not.

    >>> seen = SeenIds(2)
    >>> [seen.add(x) for x in "abab"] + [seen.add("c"), seen.add("a")]
    [True, True, False, False, True, True]
    """

    def __init__(self, capacity: int = 100_000, ids: list[str] = ()):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        for example_id in list(ids)[-capacity:]:
            self._ids[example_id] = None

    def __contains__(self, example_id: str) -> bool:
        return example_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, example_id: str) -> bool:
        """Record ``example_id``; False when it was already there (a duplicate)."""
        if example_id in self._ids:
            return False
        self._ids[example_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def state(self) -> list[str]:
        return list(self._ids)


class StallGuard:
    """Detects a click-tracking outage from the example stream itself.

    The rule, evaluated per example in consumption order, on *event* time: the example's
    ``impression_ts`` (not ``label_ts``: the joiner emits a non-click only when its click
    window closes, ``window_s`` after the impression, while a click comes at once, so
    label times would make every non-click look newer than every click). ``now`` is the
    largest impression time seen so far and ``last_click_ts`` the largest impression time
    of a click (before the first click: the first example's):

        a stall starts when   now - last_click_ts >= window_s
                              and at least min_impressions of the last 2 * min_impressions
                              non-clicks consumed have an impression time after last_click_ts
        a stall ends only at  a click with impression time >= now - window_s (a recent one)

    i.e. at least ``min_impressions`` impressions and ``window_s`` seconds of event time
    without one click. Partitions are consumed unevenly, so clicks can arrive late and
    out of event-time order: an *old* click from a lagging partition moves
    ``last_click_ts`` but does not end a stall (that hysteresis keeps the flag from
    flapping); only a click on a recent impression proves that click tracking works.

    While stalled the trainer learns no non-clicks (they are consumed, counted and
    skipped, and left out of progressive validation): their labels are suspect, and
    learning them would teach the model that nothing gets clicked. Clicks are always
    learnt. The non-clicks that arrive before the rule triggers are learnt, which bounds
    the damage to about ``min_impressions`` negatives per outage.

    >>> guard = StallGuard(window_s=10, min_impressions=3)
    >>> [guard.observe(0, t) for t in (0, 5, 8, 12)] + [guard.observe(1, 13)]
    [False, False, False, True, False]
    """

    def __init__(
        self,
        window_s: float,
        min_impressions: int,
        last_click_ts: float | None = None,
        recent: list[float] = (),
        now: float | None = None,
        stalled: bool = False,
        stalls: int = 0,
    ):
        self.window_s = window_s
        self.min_impressions = max(1, min_impressions)
        self.last_click_ts = last_click_ts
        self.recent: deque[float] = deque(recent, maxlen=2 * self.min_impressions)
        self.now = now
        self.stalled = stalled
        self.stalls = stalls  # how many times a stall began
        self.since_click = self._count()

    def _count(self) -> int:
        last = self.last_click_ts
        return sum(1 for t in self.recent if last is None or t > last)

    def observe(self, label: int, ts: float) -> bool:
        """Account for one example; True when it is a non-click arriving during a stall."""
        self.now = ts if self.now is None else max(self.now, ts)
        if self.last_click_ts is None:
            self.last_click_ts = ts
            self.since_click = self._count()
        if label:
            if ts > self.last_click_ts:
                self.last_click_ts = ts
                self.since_click = self._count()
            if self.stalled and ts >= self.now - self.window_s:
                self.stalled = False  # a recent click: click tracking works again
            return False  # clicks are always learnt
        if len(self.recent) == self.recent.maxlen and self.recent[0] > self.last_click_ts:
            self.since_click -= 1  # the oldest counted non-click drops out
        self.recent.append(ts)
        if ts > self.last_click_ts:
            self.since_click += 1
        if not self.stalled and (
            self.now - self.last_click_ts >= self.window_s
            and self.since_click >= self.min_impressions
        ):
            self.stalled = True
            self.stalls += 1
        return self.stalled

    def state(self) -> dict:
        return {
            "last_click_ts": self.last_click_ts,
            "recent": list(self.recent),
            "now": self.now,
            "stalled": self.stalled,
            "stalls": self.stalls,
        }

    @classmethod
    def from_state(cls, window_s: float, min_impressions: int, state: dict | None) -> StallGuard:
        return cls(window_s, min_impressions, **dict(state or {}))
