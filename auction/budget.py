"""Campaign budgets and spend in Redis, charged atomically by a Lua script.

:class:`BudgetLedger` stores, per campaign (all keys share the Redis Cluster hash tag
``{<campaign_id>}``, so one script touches one slot)::

    <prefix>{cid}:budget          hash  daily, total        (micro-units, no TTL)
    <prefix>{cid}:total           int   total spend         (micro-units, no TTL)
    <prefix>{cid}:day:<day>       int   spend of that day   (TTL ``day_ttl_s``)
    <prefix>{cid}:charges:<day>   hash  charge id -> amount (TTL ``day_ttl_s``)

Money is kept as integer **micro-units** (``round(amount * 1e6)``) so repeated charges
never accumulate float error; Lua numbers are doubles, exact up to 2**53 micro-units
(about 9e9 currency units).

:meth:`BudgetLedger.charge` runs one script that, atomically:

1. returns the original outcome (``duplicate``) if the charge id was already accepted
   that day: a retried billable event is never charged twice;
2. refuses (``no_budget``) a campaign without a budget;
3. refuses (``daily_budget`` / ``total_budget``) a charge that would take the day's or
   the lifetime spend beyond the budget. Because the check and the increment are one
   atomic step, **spend can never exceed the budget**, whatever the concurrency;
4. otherwise adds the amount to both counters and records the charge id.

``day`` identifies the budget day and must come from the billable event (e.g.
:func:`budget_day` of its timestamp), not from the wall clock at retry time, so a retry
after midnight still finds its charge id. The result's ``exhausted`` flag tells the
caller to stop serving: the remaining daily or total budget is below ``max_charge``
(:func:`auction.pacing.can_afford`).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import redis

from auction.pacing import can_afford

__all__ = ["BudgetLedger", "Budget", "ChargeResult", "Spend", "budget_day"]

MICROS = 1_000_000

ChargeStatus = Literal["accepted", "duplicate", "no_budget", "daily_budget", "total_budget"]

_CHARGE_LUA = """
-- KEYS: budget hash, day spend, total spend, day charge ids
-- ARGV: charge id, amount (micros), ttl seconds
local budget, day_key, total_key, charges = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local charge_id, amount, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local daily_spent = tonumber(redis.call('GET', day_key) or '0')
local total_spent = tonumber(redis.call('GET', total_key) or '0')
local limits = redis.call('HMGET', budget, 'daily', 'total')
local daily, total = tonumber(limits[1] or '-1'), tonumber(limits[2] or '-1')
local prev = redis.call('HGET', charges, charge_id)
if prev then
  return {'duplicate', tonumber(prev), daily_spent, total_spent, daily, total}
end
if daily < 0 or total < 0 then
  return {'no_budget', 0, daily_spent, total_spent, daily, total}
end
if daily_spent + amount > daily then
  return {'daily_budget', 0, daily_spent, total_spent, daily, total}
end
if total_spent + amount > total then
  return {'total_budget', 0, daily_spent, total_spent, daily, total}
end
daily_spent = redis.call('INCRBY', day_key, amount)
redis.call('EXPIRE', day_key, ttl)
total_spent = redis.call('INCRBY', total_key, amount)
redis.call('HSET', charges, charge_id, amount)
redis.call('EXPIRE', charges, ttl)
return {'accepted', amount, daily_spent, total_spent, daily, total}
"""


_REMAINING_LUA = """
-- KEYS: budget hash, day spend, total spend
-- returns what may still be spent (micros, >= 0), or -1 without a budget
local limits = redis.call('HMGET', KEYS[1], 'daily', 'total')
if not limits[1] or not limits[2] then
  return -1
end
local daily = tonumber(limits[1]) - tonumber(redis.call('GET', KEYS[2]) or '0')
local total = tonumber(limits[2]) - tonumber(redis.call('GET', KEYS[3]) or '0')
return math.max(0, math.min(daily, total))
"""


def budget_day(ts: float, utc_offset_hours: float = 0.0) -> str:
    """The budget day (``YYYY-MM-DD``) of epoch time ``ts`` in a fixed UTC offset.

    >>> budget_day(0.0), budget_day(86399.0), budget_day(86400.0), budget_day(0.0, -1)
    ('1970-01-01', '1970-01-01', '1970-01-02', '1969-12-31')
    """
    tz = dt.timezone(dt.timedelta(hours=utc_offset_hours))
    return dt.datetime.fromtimestamp(ts, tz).date().isoformat()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _micros(amount: float, name: str) -> int:
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"{name} must be a number, got {type(amount).__name__}")
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {amount}")
    return round(amount * MICROS)


def _day(day: str | dt.date) -> str:
    if isinstance(day, dt.date):
        return day.isoformat()
    if not isinstance(day, str) or not day or any(c in day for c in "{}: "):
        raise ValueError(f"day must be a date or a non-empty key-safe string, got {day!r}")
    return day


@dataclass(frozen=True)
class Budget:
    daily: float
    total: float


@dataclass(frozen=True)
class Spend:
    """A campaign's spend and what is left on ``day`` (remaining clamped at 0)."""

    daily_spent: float
    total_spent: float
    daily_remaining: float
    total_remaining: float

    @property
    def remaining(self) -> float:
        """What can still be spent today: the smaller of the daily and total remainders."""
        return min(self.daily_remaining, self.total_remaining)


@dataclass(frozen=True)
class ChargeResult:
    """Outcome of :meth:`BudgetLedger.charge`; amounts in currency units.

    ``amount`` is what this charge id has been charged (the original amount for a
    ``duplicate``, 0 when refused). ``daily_spent``/``total_spent`` are the counters
    after the call. ``exhausted``: the campaign can no longer pay ``max_charge``.
    """

    status: ChargeStatus
    amount: float
    daily_spent: float
    total_spent: float
    exhausted: bool

    @property
    def accepted(self) -> bool:
        """True when the charge is (now, or already was) on the books."""
        return self.status in ("accepted", "duplicate")


class BudgetLedger:
    """Budgets and atomic, idempotent spend per campaign in Redis.

    ``day_ttl_s`` is how long per-day spend and charge ids are kept (and so the window
    in which a retried charge is recognised); it must exceed one day plus the longest
    retry delay.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "adengine:budget:",
        day_ttl_s: int = 3 * 86400,
    ) -> None:
        if day_ttl_s <= 86400:
            raise ValueError(f"day_ttl_s must exceed one day, got {day_ttl_s}")
        self.redis = client
        self.prefix = prefix
        self.day_ttl_s = int(day_ttl_s)
        self._charge = client.register_script(_CHARGE_LUA)
        self._remaining = client.register_script(_REMAINING_LUA)

    # -- keys --------------------------------------------------------------------------
    def _key(self, campaign_id: str, suffix: str) -> str:
        if not campaign_id or "{" in campaign_id or "}" in campaign_id:
            raise ValueError(f"invalid campaign_id {campaign_id!r}")
        return f"{self.prefix}{{{campaign_id}}}:{suffix}"

    def _keys(self, campaign_id: str, day: str) -> list[str]:
        return [
            self._key(campaign_id, "budget"),
            self._key(campaign_id, f"day:{day}"),
            self._key(campaign_id, "total"),
            self._key(campaign_id, f"charges:{day}"),
        ]

    # -- budgets -----------------------------------------------------------------------
    def set_budget(self, campaign_id: str, daily: float, total: float) -> None:
        """Set (or change) a campaign's budgets. Lowering a budget below what is already
        spent does not undo spend; it only refuses further charges."""
        daily_m, total_m = _micros(daily, "daily"), _micros(total, "total")
        if daily_m <= 0 or total_m <= 0:
            raise ValueError(f"budgets must be > 0, got daily={daily}, total={total}")
        self.redis.hset(
            self._key(campaign_id, "budget"), mapping={"daily": daily_m, "total": total_m}
        )

    def get_budget(self, campaign_id: str) -> Budget | None:
        raw = self.redis.hmget(self._key(campaign_id, "budget"), ["daily", "total"])
        if raw[0] is None or raw[1] is None:
            return None
        return Budget(int(raw[0]) / MICROS, int(raw[1]) / MICROS)

    def delete_budget(self, campaign_id: str) -> None:
        """Remove the budget: every later charge is refused (spend history is kept)."""
        self.redis.delete(self._key(campaign_id, "budget"))

    # -- spend -------------------------------------------------------------------------
    def charge(
        self,
        campaign_id: str,
        amount: float,
        day: str | dt.date,
        max_charge: float,
        charge_id: str,
    ) -> ChargeResult:
        """Atomically charge ``amount`` for billable event ``charge_id`` (see module doc).

        ``amount`` must be ``<= max_charge`` (the largest charge the campaign can incur,
        e.g. its bid): the pacing guarantee relies on it.
        """
        day = _day(day)
        amount_m, max_m = _micros(amount, "amount"), _micros(max_charge, "max_charge")
        if amount_m > max_m:
            raise ValueError(f"amount ({amount}) exceeds max_charge ({max_charge})")
        if not charge_id:
            raise ValueError("charge_id must be non-empty")
        status, charged, daily_m, total_m, daily_limit, total_limit = self._charge(
            keys=self._keys(campaign_id, day), args=[charge_id, amount_m, self.day_ttl_s]
        )
        status = _text(status)
        if daily_limit < 0 or total_limit < 0:
            exhausted = True
        else:
            left = min(daily_limit - daily_m, total_limit - total_m)
            exhausted = not can_afford(left, max_m)
        return ChargeResult(
            status=status,
            amount=int(charged) / MICROS,
            daily_spent=int(daily_m) / MICROS,
            total_spent=int(total_m) / MICROS,
            exhausted=exhausted,
        )

    def spend(self, campaign_id: str, day: str | dt.date) -> Spend | None:
        """Spend and remaining budget on ``day``; ``None`` when the campaign has no budget."""
        day = _day(day)
        budget_key, day_key, total_key, _ = self._keys(campaign_id, day)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hmget(budget_key, ["daily", "total"])
        pipe.get(day_key)
        pipe.get(total_key)
        limits, daily_raw, total_raw = pipe.execute()
        if limits[0] is None or limits[1] is None:
            return None
        daily_m, total_m = int(daily_raw or 0), int(total_raw or 0)
        return Spend(
            daily_spent=daily_m / MICROS,
            total_spent=total_m / MICROS,
            daily_remaining=max(0, int(limits[0]) - daily_m) / MICROS,
            total_remaining=max(0, int(limits[1]) - total_m) / MICROS,
        )

    def budgets_and_spend(
        self, campaign_ids: Iterable[str], day: str | dt.date
    ) -> dict[str, tuple[Budget, Spend] | None]:
        """Budget and spend on ``day`` of several campaigns in one pipelined round trip
        (``None`` without a budget); each campaign's reads are not one snapshot, which is
        close enough for pacing, never for charging."""
        day = _day(day)
        ids = list(dict.fromkeys(campaign_ids))
        pipe = self.redis.pipeline(transaction=False)
        for cid in ids:
            budget_key, day_key, total_key, _ = self._keys(cid, day)
            pipe.hmget(budget_key, ["daily", "total"]).get(day_key).get(total_key)
        raw = pipe.execute() if ids else []
        out: dict[str, tuple[Budget, Spend] | None] = {}
        for k, cid in enumerate(ids):
            limits, daily_raw, total_raw = raw[3 * k : 3 * k + 3]
            if limits[0] is None or limits[1] is None:
                out[cid] = None
                continue
            daily_limit, total_limit = int(limits[0]), int(limits[1])
            daily_m, total_m = int(daily_raw or 0), int(total_raw or 0)
            out[cid] = (
                Budget(daily_limit / MICROS, total_limit / MICROS),
                Spend(
                    daily_spent=daily_m / MICROS,
                    total_spent=total_m / MICROS,
                    daily_remaining=max(0, daily_limit - daily_m) / MICROS,
                    total_remaining=max(0, total_limit - total_m) / MICROS,
                ),
            )
        return out

    def remaining(self, campaign_id: str, day: str | dt.date) -> float:
        """What the campaign may still spend on ``day`` (0 without a budget)."""
        spend = self.spend(campaign_id, day)
        return 0.0 if spend is None else spend.remaining

    def remaining_many(self, campaign_ids: Iterable[str], day: str | dt.date) -> dict[str, float]:
        """:meth:`remaining` of several campaigns in one round trip (ad serving's check).

        One pipeline of one script call per campaign, each reading that campaign's budget
        and counters atomically, as :meth:`remaining` does. Not one transaction over all
        of them: different campaigns may live in different slots of a cluster.
        """
        day = _day(day)
        ids = list(dict.fromkeys(campaign_ids))
        if not ids:
            return {}
        keys = [self._keys(cid, day)[:3] for cid in ids]
        try:
            raw = self._remaining_pipeline(keys)
        except redis.exceptions.NoScriptError:  # the server's script cache was flushed
            self.redis.script_load(_REMAINING_LUA)
            raw = self._remaining_pipeline(keys)
        return {cid: max(0, int(left)) / MICROS for cid, left in zip(ids, raw)}

    def _remaining_pipeline(self, keys: list[list[str]]) -> list:
        # evalsha directly: a Script object in a pipeline costs a SCRIPT EXISTS round trip
        sha, pipe = self._remaining.sha, self.redis.pipeline(transaction=False)
        for campaign_keys in keys:
            pipe.evalsha(sha, 3, *campaign_keys)
        return pipe.execute()

    def charge_ids(self, campaign_id: str, day: str | dt.date) -> dict[str, float]:
        """Accepted charge ids of ``day`` and their amounts (auditing, tests)."""
        raw = self.redis.hgetall(self._key(campaign_id, f"charges:{_day(day)}"))
        return {_text(k): int(v) / MICROS for k, v in raw.items()}

    def ping(self) -> bool:
        return bool(self.redis.ping())
