import doctest

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import engine.calibration
from engine.calibration import NegativeDownsampler, recalibrate

probabilities = st.floats(min_value=0.0, max_value=1.0)
rates = st.floats(min_value=0.0, max_value=1.0, exclude_min=True)


def test_doctests():
    assert doctest.testmod(engine.calibration).failed == 0


# --------------------------------------------------------------------------- recalibrate


@pytest.mark.parametrize("true_ctr", [0.01, 0.05, 0.2])
def test_recalibrate_inverts_negative_downsampling(true_ctr):
    rng = np.random.default_rng(1234)
    rate = 0.1
    labels = (rng.random(1_000_000) < true_ctr).astype(int)
    kept = NegativeDownsampler(rate, seed=99).keep_many(labels)
    assert np.all(kept[labels == 1])  # every click survives
    downsampled_ctr = labels[kept].mean()
    assert downsampled_ctr > 2 * true_ctr  # downsampling really inflated the CTR
    assert recalibrate(downsampled_ctr, rate) == pytest.approx(true_ctr, rel=0.02)


def test_recalibrate_inverts_per_example_odds():
    """A model fit on the downsampled stream learns odds * (1 / w); recalibrate undoes it."""
    p_true = np.linspace(0.001, 0.999, 999)
    w = 0.05
    odds_ds = p_true / (1 - p_true) / w
    p_ds = odds_ds / (1 + odds_ds)
    np.testing.assert_allclose(recalibrate(p_ds, w), p_true, rtol=1e-12)


def test_recalibrate_identity_at_one():
    p = np.array([0.0, 1e-12, 0.1, 0.3333, 0.7, 1.0])
    out = recalibrate(p, 1.0)
    np.testing.assert_array_equal(out, p)
    assert out is not p
    assert recalibrate(0.1, 1) == 0.1
    assert isinstance(recalibrate(0.1, 1), float)


def test_recalibrate_scalar_and_array_types():
    assert isinstance(recalibrate(0.3, 0.5), float)
    assert isinstance(recalibrate(np.float32(0.3), 0.5), float)
    out = recalibrate([0.1, 0.2], 0.5)
    assert isinstance(out, np.ndarray) and out.shape == (2,)
    assert recalibrate(0.0, 0.1) == 0.0
    assert recalibrate(1.0, 0.1) == 1.0


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), "0.5", None])
def test_recalibrate_invalid_w_raises(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        recalibrate(0.5, bad)


def test_recalibrate_invalid_p_raises():
    with pytest.raises(ValueError, match="probabilities"):
        recalibrate(1.5, 0.5)
    with pytest.raises(ValueError, match="probabilities"):
        recalibrate(np.array([0.1, np.nan]), 0.5)


@given(p1=probabilities, p2=probabilities, w=rates)
def test_recalibrate_monotone_and_in_unit_interval(p1, p2, w):
    lo, hi = sorted((p1, p2))
    q_lo, q_hi = recalibrate(lo, w), recalibrate(hi, w)
    assert 0.0 <= q_lo <= q_hi <= 1.0
    if w < 1:
        assert q_lo <= lo and q_hi <= hi  # downsampling only ever inflated predictions
    arr = recalibrate(np.array([lo, hi]), w)
    assert arr[0] == q_lo and arr[1] == q_hi


# --------------------------------------------------------------------------- downsampler


def test_positives_always_kept():
    ds = NegativeDownsampler(0.01, seed=0)
    assert all(ds.keep(1) for _ in range(1000))
    assert all(ds.keep(1, key=f"id-{i}") for i in range(1000))
    assert ds.keep_many(np.ones(1000, dtype=int)).all()


def test_keyed_decisions_reproducible_across_instances():
    keys = [f"imp-{i}" for i in range(20_000)]
    a = NegativeDownsampler(0.1, seed=42)
    b = NegativeDownsampler(0.1, seed=42)
    b.keep(0)  # consuming the un-keyed generator must not affect keyed decisions
    da = [a.keep(0, key=k) for k in keys]
    db = [b.keep(0, key=k) for k in reversed(keys)][::-1]  # order does not matter either
    assert da == db
    assert [a.keep(0, key=k) for k in keys] == da  # repeatable on the same instance
    assert [a.keep(0, key=k.encode()) for k in keys] == da  # bytes == utf-8 str


def test_keyed_decisions_depend_on_seed():
    keys = [f"imp-{i}" for i in range(5_000)]
    a = [NegativeDownsampler(0.5, seed=1).keep(0, key=k) for k in keys]
    b = [NegativeDownsampler(0.5, seed=2).keep(0, key=k) for k in keys]
    assert a != b


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5])
def test_keep_rate_within_tolerance(rate):
    n = 100_000
    keyed = NegativeDownsampler(rate, seed=3)
    keyed_rate = np.mean([keyed.keep(0, key=str(i)) for i in range(n)])
    assert keyed_rate == pytest.approx(rate, abs=0.005)

    unkeyed = NegativeDownsampler(rate, seed=3)
    assert np.mean([unkeyed.keep(0) for _ in range(n)]) == pytest.approx(rate, abs=0.005)
    assert NegativeDownsampler(rate, seed=3).keep_many(np.zeros(n, dtype=int)).mean() == (
        pytest.approx(rate, abs=0.005)
    )


def test_unkeyed_decisions_reproducible_with_seed():
    labels = np.zeros(1000, dtype=int)
    a, b = NegativeDownsampler(0.3, seed=5), NegativeDownsampler(0.3, seed=5)
    np.testing.assert_array_equal(a.keep_many(labels), b.keep_many(labels))
    assert [a.keep(0) for _ in range(100)] == [b.keep(0) for _ in range(100)]


def test_rate_one_keeps_everything():
    ds = NegativeDownsampler(1.0, seed=0)
    assert all(ds.keep(0, key=str(i)) for i in range(1000))
    assert all(ds.keep(0) for _ in range(1000))
    assert ds.keep_many(np.zeros(1000, dtype=int)).all()
    assert ds.weight == 1.0


def test_weights_make_downsampled_ctr_unbiased():
    rng = np.random.default_rng(7)
    labels = (rng.random(500_000) < 0.03).astype(int)
    ds = NegativeDownsampler(0.1, seed=8)
    kept = labels[ds.keep_many(labels)]
    weights = np.array([ds.weight_for(int(label)) for label in kept])
    assert ds.weight == pytest.approx(10.0)
    assert (ds.weight_for(1), ds.weight_for(0)) == (1.0, pytest.approx(10.0))
    assert np.average(kept, weights=weights) == pytest.approx(labels.mean(), rel=0.03)


def test_downsampler_validation():
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            NegativeDownsampler(bad)
    ds = NegativeDownsampler(0.5, seed=0)
    with pytest.raises(ValueError):
        ds.keep(2)
    with pytest.raises(ValueError):
        ds.weight_for(-1)
    with pytest.raises(ValueError):
        ds.keep_many(np.array([0, 1, 2]))
