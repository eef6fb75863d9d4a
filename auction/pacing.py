"""Budget pacing maths: a traffic-shaped spend target and a PI(D) throttling controller.

A campaign should spend its daily budget in proportion to the day's traffic, not as
fast as demand allows (that exhausts the budget by mid-morning and leaves the evening
unserved). Three pure pieces:

* :func:`target_spend_fraction`: the cumulative share of the day's expected traffic by
  time ``t`` (hours since the start of the budget day) from a 24-bucket hourly profile,
  linear within each hour. ``budget x target_spend_fraction(t)`` is the spend target.
* :func:`pacing_step`: a stateless PI(D) controller step. The error is
  ``(actual spend - target spend) / daily budget`` (positive = ahead of schedule) and
  the output is the **throttle probability**: the chance that an eligible request is
  skipped (the campaign bids with probability ``1 - throttle``). Output and integral
  are clamped to ``[0, 1]`` (anti-windup), so the controller recovers at once when it
  falls behind.
* :func:`can_afford`: serve only while ``remaining budget >= max charge``. As every
  charge is at most ``max_charge`` (a GSP price never exceeds the bid), a campaign
  whose charges are applied atomically at serve time never spends more than its
  budget, and one check that races with a single in-flight charge overspends by at
  most one max charge.

Time ``t`` and ``dt`` are in **hours**; gains are per hour accordingly.

>>> profile = [1.0] * 12 + [3.0] * 12          # afternoons carry 3x the traffic
>>> target_spend_fraction(12.0, profile)
0.25
>>> state = PacingState()
>>> state, throttle = pacing_step(state, spend_so_far=30.0, target_so_far=25.0,
...                               budget=100.0, dt=1 / 60)
>>> 0.0 < throttle <= 1.0                      # 5% of the budget ahead: slow down
True
>>> pacing_step(PacingState(), 10.0, 25.0, 100.0, 1 / 60)[1]   # behind: full speed
0.0
>>> can_afford(remaining_budget=0.8, max_charge=1.0)
False
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "DIURNAL_PROFILE",
    "PacingGains",
    "PacingState",
    "can_afford",
    "hourly_target_fractions",
    "pacing_step",
    "target_spend_fraction",
]

# Relative request volume per UTC hour for a typical consumer audience: a night trough,
# a morning ramp, a lunch bump and an evening peak (only the shape matters).
DIURNAL_PROFILE: tuple[float, ...] = (
    0.35, 0.25, 0.2, 0.2, 0.25, 0.4, 0.65, 0.95, 1.2, 1.25, 1.3, 1.4,
    1.45, 1.4, 1.3, 1.25, 1.25, 1.35, 1.55, 1.75, 1.8, 1.6, 1.15, 0.75,
)  # fmt: skip


def _cumulative(profile: Sequence[float]) -> np.ndarray:
    weights = np.asarray(profile, dtype=np.float64)
    if weights.shape != (24,):
        raise ValueError(f"traffic_profile needs 24 hourly values, got shape {weights.shape}")
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError("traffic_profile values must be finite, >= 0 and not all zero")
    cumulative = np.concatenate([[0.0], np.cumsum(weights)])
    return cumulative / cumulative[-1]  # exactly 1 at 24h, never above


def target_spend_fraction(t, traffic_profile: Sequence[float] = DIURNAL_PROFILE):
    """Fraction of the day's expected traffic seen by ``t`` hours (0 at 0, 1 at 24).

    Piecewise linear (uniform traffic within an hour), clipped to ``[0, 24]``; works
    elementwise on arrays.

    >>> [round(target_spend_fraction(h), 4) for h in (0, 0.5, 24, 30)]
    [0.0, 0.007, 1.0, 1.0]
    """
    out = np.interp(np.clip(t, 0.0, 24.0), np.arange(25.0), _cumulative(traffic_profile))
    return float(out) if np.ndim(out) == 0 else out


def hourly_target_fractions(traffic_profile: Sequence[float] = DIURNAL_PROFILE) -> np.ndarray:
    """Ideal share of the daily budget to spend in each of the 24 hours."""
    return np.diff(_cumulative(traffic_profile))


@dataclass(frozen=True)
class PacingGains:
    """PI(D) gains, per hour. Defaults suit a demand/budget ratio of about 1.5-6.

    With error ``e`` in fractions of the daily budget, ``kp = 40`` throttles fully when
    2.5% of the budget ahead of schedule; ``ki`` makes the integral carry the steady
    throttle level (``1 - budget/demand``) once the error has decayed.
    """

    kp: float = 40.0
    ki: float = 120.0
    kd: float = 0.0


@dataclass(frozen=True)
class PacingState:
    """Controller memory between steps: integral term and last error (``None`` at start).

    ``integral`` is stored as the integral *contribution* ``ki x sum(e dt)``, clamped to
    ``[0, 1]`` so it never winds up beyond what the output can use.
    """

    integral: float = 0.0
    prev_error: float | None = None
    throttle: float = 0.0


def pacing_step(
    state: PacingState,
    spend_so_far: float,
    target_so_far: float,
    budget: float,
    dt: float,
    gains: PacingGains = PacingGains(),  # noqa: B008 (frozen, immutable default)
) -> tuple[PacingState, float]:
    """One controller update; returns ``(new_state, throttle_probability)``.

    ``throttle = clip(kp e + integral + kd de/dt, 0, 1)`` with
    ``e = (spend_so_far - target_so_far) / budget`` and ``integral += ki e dt``
    (clamped to ``[0, 1]``). ``dt`` is the time since the previous step, in hours.
    """
    if budget <= 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    error = (spend_so_far - target_so_far) / budget
    integral = min(1.0, max(0.0, state.integral + gains.ki * error * dt))
    derivative = 0.0 if state.prev_error is None else (error - state.prev_error) / dt
    raw = gains.kp * error + integral + gains.kd * derivative
    throttle = min(1.0, max(0.0, raw)) if math.isfinite(raw) else 1.0
    return replace(state, integral=integral, prev_error=error, throttle=throttle), throttle


def can_afford(remaining_budget: float, max_charge: float) -> bool:
    """Whether a campaign may serve: it must be able to pay the largest possible charge.

    >>> can_afford(1.0, 1.0), can_afford(0.99, 1.0)
    (True, False)
    """
    return remaining_budget >= max_charge
