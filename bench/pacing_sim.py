"""A simulated day of budget pacing: PI throttling against a spend-as-fast-as-you-can peer.

Several CPC campaigns whose demand exceeds their daily budget (1.5x to 8x) face diurnal
traffic in 1-minute steps. The real traffic shape deviates from the forecast profile
(log-normal noise per hour) and arrives as Poisson counts. Each served impression is
clicked with the campaign's known CTR and charged a second-price-like CPC in
``[0.5, 1] x bid``; charges are applied atomically in-process, and a campaign serves only
while :func:`auction.pacing.can_afford` (remaining >= max charge = bid).

* paced: :func:`auction.pacing.pacing_step` each minute drives a throttle probability
  towards the traffic-shaped target spend curve;
* baseline (same run, same traffic): no throttling, spend as fast as demand allows.

Prints per-hour spend (all campaigns) against the ideal, then, as the LAST stdout line,
one JSON object: ``utilization`` (paced spend / budget, overall and worst campaign),
``overspend_beyond_bound`` (amount spent beyond budget + one max charge; target 0),
``max_hourly_deviation`` (max over campaigns and hours of |hourly spend - ideal| / daily
budget) and ``baseline`` (its utilization and the hour each campaign exhausted).

Run: ``python bench/pacing_sim.py [--seed 7] [--noise 0.1]`` (takes about a second).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from auction.pacing import (
    DIURNAL_PROFILE,
    PacingGains,
    PacingState,
    can_afford,
    hourly_target_fractions,
    pacing_step,
    target_spend_fraction,
)

MINUTES = 24 * 60


@dataclass(frozen=True)
class CampaignSpec:
    """A CPC campaign: daily budget, max CPC bid, true CTR, demand / budget ratio."""

    name: str
    daily_budget: float
    bid: float
    ctr: float
    demand_ratio: float


DEFAULT_CAMPAIGNS = (
    CampaignSpec("c-1.5x", 300.0, 1.0, 0.02, 1.5),
    CampaignSpec("c-2x", 500.0, 0.8, 0.03, 2.0),
    CampaignSpec("c-3x", 800.0, 1.5, 0.015, 3.0),
    CampaignSpec("c-5x", 400.0, 0.5, 0.04, 5.0),
    CampaignSpec("c-8x", 1000.0, 2.0, 0.01, 8.0),
)


@dataclass(frozen=True)
class DayResult:
    """Outcome of one simulated day; arrays are per campaign (rows) and hour (cols)."""

    budgets: np.ndarray
    max_charges: np.ndarray
    spend: np.ndarray
    hourly_spend: np.ndarray  # (n_campaigns, 24)
    ideal_hourly: np.ndarray  # (n_campaigns, 24)
    exhausted_hour: list[float | None]
    throttle_range: tuple[float, float]

    @property
    def utilization(self) -> float:
        return float(self.spend.sum() / self.budgets.sum())

    @property
    def min_utilization(self) -> float:
        return float((self.spend / self.budgets).min())

    @property
    def overspend_beyond_bound(self) -> float:
        return float(np.maximum(0.0, self.spend - self.budgets - self.max_charges).sum())

    @property
    def max_overspend(self) -> float:
        return float(np.maximum(0.0, self.spend - self.budgets).max())

    @property
    def max_hourly_deviation(self) -> float:
        dev = np.abs(self.hourly_spend - self.ideal_hourly) / self.budgets[:, None]
        return float(dev.max())


def _serve(rng, n: int, spec: CampaignSpec, remaining: float) -> tuple[float, bool]:
    """Serve ``n`` impressions one by one (vectorised); returns (charged, exhausted)."""
    clicks = rng.random(n) < spec.ctr
    charges = np.where(clicks, spec.bid * rng.uniform(0.5, 1.0, n), 0.0)
    before = remaining - (np.cumsum(charges) - charges)  # remaining before each serve
    blocked = np.flatnonzero(~(before >= spec.bid))  # i.e. not can_afford(before, bid)
    if len(blocked) == 0:
        return float(charges.sum()), False
    return float(charges[: blocked[0]].sum()), True


def simulate_day(
    campaigns: Sequence[CampaignSpec] = DEFAULT_CAMPAIGNS,
    paced: bool = True,
    seed: int = 7,
    traffic_noise: float = 0.1,
    traffic_profile: Sequence[float] = DIURNAL_PROFILE,
    gains: PacingGains = PacingGains(),  # noqa: B008 (frozen, immutable default)
) -> DayResult:
    """Simulate one day in 1-minute steps; same ``seed`` = same traffic and clicks."""
    traffic_rng = np.random.default_rng(seed)
    profile = np.asarray(traffic_profile, dtype=np.float64)
    real = profile * traffic_rng.lognormal(0.0, traffic_noise, 24)  # forecast error
    minute_share = np.repeat(real / profile.sum() / 60.0, 60)  # of forecast daily traffic
    ideal = hourly_target_fractions(profile)
    dt = 1.0 / 60.0
    n = len(campaigns)
    spend = np.zeros(n)
    hourly = np.zeros((n, 24))
    exhausted: list[float | None] = [None] * n
    lo, hi = 1.0, 0.0
    for c, spec in enumerate(campaigns):
        rng = np.random.default_rng([seed, c])
        # impressions the campaign could win per day if never throttled
        daily_demand = spec.demand_ratio * spec.daily_budget / (spec.ctr * 0.75 * spec.bid)
        lam = rng.poisson(daily_demand * minute_share)
        state, throttle = PacingState(), 0.0
        for m in range(MINUTES):
            remaining = spec.daily_budget - spend[c]
            if exhausted[c] is None and can_afford(remaining, spec.bid):
                eligible = lam[m] if not paced else rng.binomial(lam[m], 1.0 - throttle)
                charged, out = _serve(rng, int(eligible), spec, remaining)
                spend[c] += charged
                hourly[c, m // 60] += charged
                if out:
                    exhausted[c] = (m + 1) / 60.0
            if paced:
                target = spec.daily_budget * target_spend_fraction((m + 1) * dt, profile)
                state, throttle = pacing_step(state, spend[c], target, spec.daily_budget, dt, gains)
                lo, hi = min(lo, throttle), max(hi, throttle)
    budgets = np.array([s.daily_budget for s in campaigns])
    return DayResult(
        budgets=budgets,
        max_charges=np.array([s.bid for s in campaigns]),
        spend=spend,
        hourly_spend=hourly,
        ideal_hourly=budgets[:, None] * ideal[None, :],
        exhausted_hour=exhausted,
        throttle_range=(lo, hi) if paced else (0.0, 0.0),
    )


def _fmt(hour: float | None) -> str:
    return "never" if hour is None else f"{hour:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--noise", type=float, default=0.1, help="hourly traffic noise (sd)")
    args = parser.parse_args()

    paced = simulate_day(paced=True, seed=args.seed, traffic_noise=args.noise)
    base = simulate_day(paced=False, seed=args.seed, traffic_noise=args.noise)
    ideal = paced.ideal_hourly.sum(axis=0)
    print(f"{'hour':>4} {'ideal':>9} {'paced':>9} {'no-pacing':>10}")
    for h in range(24):
        print(
            f"{h:>4} {ideal[h]:>9.1f} {paced.hourly_spend[:, h].sum():>9.1f} "
            f"{base.hourly_spend[:, h].sum():>10.1f}"
        )
    for c, spec in enumerate(DEFAULT_CAMPAIGNS):
        print(
            f"{spec.name:>7}: budget {spec.daily_budget:7.1f}  paced {paced.spend[c]:7.1f}  "
            f"no-pacing {base.spend[c]:7.1f} (exhausted at hour {_fmt(base.exhausted_hour[c])})"
        )
    exhaust = [h for h in base.exhausted_hour if h is not None]
    result = {
        "seed": args.seed,
        "traffic_noise": args.noise,
        "campaigns": len(DEFAULT_CAMPAIGNS),
        "utilization": round(paced.utilization, 4),
        "min_campaign_utilization": round(paced.min_utilization, 4),
        "overspend_beyond_bound": round(paced.overspend_beyond_bound, 6),
        "max_overspend": round(paced.max_overspend, 6),
        "max_hourly_deviation": round(paced.max_hourly_deviation, 4),
        "throttle_range": [round(x, 4) for x in paced.throttle_range],
        "baseline": {
            "utilization": round(base.utilization, 4),
            "overspend_beyond_bound": round(base.overspend_beyond_bound, 6),
            "max_hourly_deviation": round(base.max_hourly_deviation, 4),
            "exhaustion_hour": [None if h is None else round(h, 2) for h in base.exhausted_hour],
            "median_exhaustion_hour": round(float(np.median(exhaust)), 2) if exhaust else None,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
