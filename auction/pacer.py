"""The runtime pacing controller: per-campaign throttle probabilities for the ad server.

Every ``[auction] pacing_interval_s`` a :class:`Pacer` reads, for each active campaign,
today's spend and budget from the :class:`~auction.budget.BudgetLedger`, computes the
spend target so far (``budget x`` :func:`~auction.pacing.target_spend_fraction` of the
hours elapsed in the budget day, shaped by ``pacing_traffic_profile``) and runs one
:func:`~auction.pacing.pacing_step`. :meth:`Pacer.throttle` is the
``throttle(campaign_id) -> skip probability`` hook of :class:`~auction.serving.AdServer`.

The budget paced is what the campaign may still spend today: the daily budget, or less
when the lifetime total runs out first.

**Replicas agree.** The controller's memory (integral, last error, throttle) lives in
Redis per campaign and day, stamped with the step's tick ``floor(now / interval)``. The
first replica to reach a tick steps the controller from the stored state and stores the
result with a compare-and-set (a Lua script that keeps the newer tick); the others, and
any replica started later, adopt the stored throttle for that tick. So every replica
reading the same Redis serves with the same throttle, and a restart keeps the integral.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence

import redis

from auction.budget import BudgetLedger, budget_day
from auction.pacing import (
    DIURNAL_PROFILE,
    PacingGains,
    PacingState,
    pacing_step,
    target_spend_fraction,
)
from auction.periodic import Periodic

__all__ = ["Pacer", "active_campaigns", "day_hours", "paced_budget"]

log = logging.getLogger(__name__)

_STEP_LUA = """
-- KEYS: state hash; ARGV: tick, integral, prev_error, throttle, ttl seconds
-- keeps the newer tick; returns the stored (tick, integral, prev_error, throttle)
local stored = tonumber(redis.call('HGET', KEYS[1], 'tick') or '-1')
if tonumber(ARGV[1]) > stored then
  redis.call('HSET', KEYS[1], 'tick', ARGV[1], 'integral', ARGV[2], 'prev_error', ARGV[3],
             'throttle', ARGV[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
end
return redis.call('HMGET', KEYS[1], 'tick', 'integral', 'prev_error', 'throttle')
"""


def day_hours(ts: float, utc_offset_hours: float = 0.0) -> float:
    """Hours elapsed in the budget day of epoch time ``ts``.

    >>> day_hours(86400 * 3 + 5400), day_hours(0.0, utc_offset_hours=2)
    (1.5, 2.0)
    """
    return ((ts + utc_offset_hours * 3600.0) % 86400.0) / 3600.0


def paced_budget(daily: float, daily_spent: float, total_remaining: float) -> float:
    """What the campaign may spend today: the daily budget, capped by the lifetime rest.

    >>> paced_budget(100.0, 40.0, 1000.0), paced_budget(100.0, 40.0, 20.0)
    (100.0, 60.0)
    """
    return min(daily, daily_spent + total_remaining)


def active_campaigns(service, clock: Callable[[], float] = time.time) -> Callable[[], list[str]]:
    """Ids of the catalogue's active campaigns running now (for :class:`Pacer`)."""
    from auction.auth import OPERATOR

    def ids() -> list[str]:
        now = clock()
        return [
            c.campaign_id
            for c in service.list_campaigns(OPERATOR)
            if c.status == "active" and c.start_ts <= now < c.end_ts
        ]

    return ids


def _float(value: bytes | None, default: float) -> float:
    return default if value is None else float(value)


class Pacer:
    """Throttle probabilities of the active campaigns, stepped every ``interval_s``.

    ``campaigns()`` returns the ids to pace. :meth:`step` runs one update (the
    background thread of :meth:`start` calls it; tests call it with a fake ``clock``).
    A campaign never stepped, or whose budget lookup failed, has throttle 0: the ad
    server's budget check still stops it at exhaustion.
    """

    def __init__(
        self,
        ledger: BudgetLedger,
        campaigns: Callable[[], Iterable[str]],
        *,
        interval_s: float = 10.0,
        traffic_profile: Sequence[float] = DIURNAL_PROFILE,
        gains: PacingGains = PacingGains(),  # noqa: B008 (frozen, immutable default)
        utc_offset_hours: float = 0.0,
        prefix: str = "adengine:pacing:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        target_spend_fraction(0.0, traffic_profile)  # validates the profile
        self.ledger = ledger
        self.campaigns = campaigns
        self.interval_s = float(interval_s)
        self.traffic_profile = tuple(traffic_profile)
        self.gains = gains
        self.utc_offset_hours = float(utc_offset_hours)
        self.prefix = prefix
        self.clock = clock
        self._step_script = ledger.redis.register_script(_STEP_LUA)
        self._throttles: dict[str, float] = {}
        self._loop = Periodic(self.step, self.interval_s, "pacer")

    @classmethod
    def from_settings(cls, ledger: BudgetLedger, campaigns, auction, clock=time.time) -> Pacer:
        """A pacer from :class:`engine.config.AuctionSettings` (``pacing_*`` keys)."""
        return cls(
            ledger,
            campaigns,
            interval_s=auction.pacing_interval_s,
            traffic_profile=auction.pacing_traffic_profile or DIURNAL_PROFILE,
            gains=PacingGains(auction.pacing_kp, auction.pacing_ki, auction.pacing_kd),
            utc_offset_hours=auction.budget_utc_offset_hours,
            prefix=auction.pacing_prefix,
            clock=clock,
        )

    # -- serving hook -------------------------------------------------------------------
    def throttle(self, campaign_id: str) -> float:
        """Probability that ``campaign_id`` skips a request (0 when not paced)."""
        return self._throttles.get(campaign_id, 0.0)

    @property
    def throttles(self) -> dict[str, float]:
        return dict(self._throttles)

    # -- control ------------------------------------------------------------------------
    def _key(self, campaign_id: str, day: str) -> str:
        return f"{self.prefix}{{{campaign_id}}}:{day}"

    def step(self, now: float | None = None) -> dict[str, float]:
        """Step every active campaign; returns (and serves from then on) their throttles.

        Three pipelined round trips whatever the number of campaigns: budgets and spend,
        stored controller states, and the compare-and-set of the new states.
        """
        now = self.clock() if now is None else now
        day = budget_day(now, self.utc_offset_hours)
        tick = math.floor(now / self.interval_s)
        ids = list(dict.fromkeys(self.campaigns()))
        try:
            throttles = self._step_all(ids, now, day, tick)
        except (redis.RedisError, ValueError):
            log.exception("pacing step failed: keeping the previous throttles")
            throttles = {cid: self._throttles[cid] for cid in ids if cid in self._throttles}
        self._throttles = throttles  # one reference swap: readers never see a half update
        return throttles

    def _step_all(self, ids: list[str], now: float, day: str, tick: int) -> dict[str, float]:
        accounts = self.ledger.budgets_and_spend(ids, day)
        paced = {cid: acc for cid, acc in accounts.items() if acc is not None}
        pipe = self.ledger.redis.pipeline(transaction=False)
        for cid in paced:
            pipe.hmget(self._key(cid, day), ["tick", "integral", "prev_error", "throttle"])
        stored = dict(zip(paced, pipe.execute() if paced else []))
        throttles: dict[str, float] = {}
        updates: dict[str, tuple[PacingState, float]] = {}
        hours = day_hours(now, self.utc_offset_hours)
        fraction = target_spend_fraction(hours, self.traffic_profile)
        for cid, (budget, spend) in paced.items():
            today = paced_budget(budget.daily, spend.daily_spent, spend.total_remaining)
            if today <= 0:
                throttles[cid] = 1.0
                continue
            raw = stored[cid]
            stored_tick = int(raw[0]) if raw[0] is not None else None
            if stored_tick is not None and stored_tick >= tick:
                throttles[cid] = _float(raw[3], 0.0)  # another replica stepped this tick
                continue
            if stored_tick is None:
                state, ticks = PacingState(), 1
            else:
                prev = None if raw[2] in (None, b"") else float(raw[2])
                state = PacingState(_float(raw[1], 0.0), prev, _float(raw[3], 0.0))
                ticks = tick - stored_tick
            dt = min(ticks * self.interval_s, 3600.0) / 3600.0  # hours since the last step
            updates[cid] = pacing_step(
                state, spend.daily_spent, today * fraction, today, dt, self.gains
            )
        if updates:
            try:
                winners = self._store(updates, day, tick)
            except redis.exceptions.NoScriptError:  # the server's script cache was flushed
                self.ledger.redis.script_load(_STEP_LUA)
                winners = self._store(updates, day, tick)
            for (cid, (_, throttle)), kept in zip(updates.items(), winners):
                throttles[cid] = _float(kept[3], throttle)  # another replica's, if first
        return throttles

    def _store(self, updates: dict[str, tuple[PacingState, float]], day: str, tick: int):
        pipe = self.ledger.redis.pipeline(transaction=False)
        for cid, (state, throttle) in updates.items():
            prev_error = "" if state.prev_error is None else repr(state.prev_error)
            args = [tick, repr(state.integral), prev_error, repr(throttle), 2 * 86400]
            pipe.evalsha(self._step_script.sha, 1, self._key(cid, day), *args)
        return pipe.execute()

    def start(self) -> Pacer:
        """Step now, then every ``interval_s`` in a daemon thread until :meth:`stop`."""
        self._loop.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.stop(timeout)
