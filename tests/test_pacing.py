"""auction.pacing: target curve, PI controller, budget guard, and a simulated day."""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import auction.pacing
from auction.pacing import (
    DIURNAL_PROFILE,
    PacingGains,
    PacingState,
    can_afford,
    hourly_target_fractions,
    pacing_step,
    target_spend_fraction,
)

REPO = Path(__file__).resolve().parents[1]


def _load_sim():
    spec = importlib.util.spec_from_file_location("pacing_sim", REPO / "bench" / "pacing_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pacing_sim"] = module
    spec.loader.exec_module(module)
    return module


sim = _load_sim()

profiles = st.lists(st.floats(0.0, 10.0), min_size=24, max_size=24).filter(lambda p: sum(p) > 0.01)

# --------------------------------------------------------------------------- target curve


@settings(max_examples=200, deadline=None)
@given(profiles, st.lists(st.floats(-5.0, 30.0), min_size=2, max_size=10))
def test_target_fraction_is_a_monotone_cdf(profile, times):
    times = sorted(times)
    values = [target_spend_fraction(t, profile) for t in times]
    assert all(0.0 <= v <= 1.0 for v in values)
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    assert target_spend_fraction(0.0, profile) == 0.0
    assert target_spend_fraction(24.0, profile) == pytest.approx(1.0)
    assert np.allclose(target_spend_fraction(np.array(times), profile), values)


@settings(max_examples=100, deadline=None)
@given(profiles, st.integers(0, 23))
def test_target_follows_traffic_shape(profile, hour):
    total = sum(profile)
    gained = target_spend_fraction(hour + 1.0, profile) - target_spend_fraction(hour, profile)
    assert gained == pytest.approx(profile[hour] / total, abs=1e-9)
    assert hourly_target_fractions(profile)[hour] == pytest.approx(profile[hour] / total)
    half = target_spend_fraction(hour + 0.5, profile) - target_spend_fraction(hour, profile)
    assert half == pytest.approx(gained / 2, abs=1e-9)


def test_flat_profile_is_linear_and_bad_profiles_fail():
    assert target_spend_fraction(6.0, [1.0] * 24) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        target_spend_fraction(1.0, [1.0] * 23)
    with pytest.raises(ValueError):
        target_spend_fraction(1.0, [0.0] * 24)
    with pytest.raises(ValueError):
        target_spend_fraction(1.0, [-1.0] + [1.0] * 23)


# --------------------------------------------------------------------------- controller


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 2e3), st.floats(0.0, 2e3), st.floats(1e-4, 2.0)),
        min_size=1,
        max_size=30,
    ),
    st.floats(1.0, 1e3),
    st.floats(0.0, 100.0),
    st.floats(0.0, 500.0),
    st.floats(0.0, 5.0),
)
def test_throttle_and_integral_stay_in_unit_interval(steps, budget, kp, ki, kd):
    state = PacingState()
    gains = PacingGains(kp=kp, ki=ki, kd=kd)
    for spend, target, dt in steps:
        state, throttle = pacing_step(state, spend, target, budget, dt, gains)
        assert 0.0 <= throttle <= 1.0
        assert 0.0 <= state.integral <= 1.0
        assert state.throttle == throttle


def test_controller_direction():
    ahead = pacing_step(PacingState(), 60.0, 50.0, 1000.0, 1 / 60)[1]
    further = pacing_step(PacingState(), 70.0, 50.0, 1000.0, 1 / 60)[1]
    behind = pacing_step(PacingState(), 40.0, 50.0, 1000.0, 1 / 60)[1]
    assert 0.0 < ahead < further and behind == 0.0
    # the integral remembers being ahead: on target, the throttle stays up
    state = PacingState()
    for _ in range(30):
        state, _ = pacing_step(state, 60.0, 50.0, 1000.0, 1 / 60)
    _, on_target = pacing_step(state, 50.0, 50.0, 1000.0, 1 / 60)
    assert on_target > 0.0
    with pytest.raises(ValueError):
        pacing_step(PacingState(), 1.0, 1.0, 0.0, 1.0)
    with pytest.raises(ValueError):
        pacing_step(PacingState(), 1.0, 1.0, 1.0, 0.0)


# --------------------------------------------------------------------------- budget guard


@settings(max_examples=300, deadline=None)
@given(
    st.floats(1.0, 100.0),
    st.floats(0.01, 5.0),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=300),
)
def test_guard_bounds_overspend(budget, max_charge, fractions):
    """Atomic charges never overspend; a check racing one in-flight charge overspends
    by at most one max charge."""
    spend = 0.0
    for f in fractions:
        if can_afford(budget - spend, max_charge):
            spend += f * max_charge
    assert spend <= budget + 1e-9
    spend, in_flight = 0.0, 0.0
    for f in fractions:
        if can_afford(budget - spend, max_charge):
            spend += in_flight  # the previous charge lands after this check
            in_flight = f * max_charge
    spend += in_flight
    assert spend <= budget + max_charge + 1e-9


# --------------------------------------------------------------------------- simulated day


@pytest.mark.parametrize("seed,noise", [(0, 0.1), (1, 0.2), (2, 0.3)])
def test_simulated_day(seed, noise):
    paced = sim.simulate_day(paced=True, seed=seed, traffic_noise=noise)
    base = sim.simulate_day(paced=False, seed=seed, traffic_noise=noise)
    assert paced.min_utilization >= 0.95
    assert paced.overspend_beyond_bound == 0.0
    assert base.overspend_beyond_bound == 0.0
    assert paced.max_hourly_deviation <= 0.05  # of the daily budget, in any hour
    assert base.max_hourly_deviation > 0.15
    lo, hi = paced.throttle_range
    assert 0.0 <= lo <= hi <= 1.0
    # the cumulative spend tracks the target curve at every hour boundary
    cumulative = np.cumsum(paced.hourly_spend, axis=1) / paced.budgets[:, None]
    target = target_spend_fraction(np.arange(1.0, 25.0), DIURNAL_PROFILE)
    assert np.abs(cumulative - target[None, :]).max() <= 0.05
    # without pacing the heaviest-demand campaigns run dry before the evening peak
    assert all(h is not None and h < 18.0 for h in base.exhausted_hour[2:])
    # with pacing, budgets last into the final hour
    assert all(h is None or h >= 23.0 for h in paced.exhausted_hour)


def test_bench_last_line_is_json(capsys, monkeypatch):
    import json

    monkeypatch.setattr(sys, "argv", ["pacing_sim.py", "--seed", "3"])
    sim.main()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["overspend_beyond_bound"] == 0.0
    assert result["utilization"] >= 0.95
    assert {"max_hourly_deviation", "baseline"} <= result.keys()
    assert result["baseline"]["median_exhaustion_hour"] < 24


def test_doctests():
    assert doctest.testmod(auction.pacing).failed == 0
