import doctest
import math

import numpy as np
import pytest

import engine.metrics
from engine.metrics import (
    CalibrationBucket,
    ProgressiveValidation,
    WindowedMetrics,
    calibration_by_bucket,
    calibration_ratio,
    evaluate,
    log_loss,
    normalized_entropy,
    progressive_validation,
    roc_auc,
)

STREAM_KEYS = ("ne", "logloss", "calibration", "n", "ctr")


def _data(n=2000, seed=0, ties=False, weights=False):
    rng = np.random.default_rng(seed)
    p = rng.beta(1, 20, size=n)
    if ties:
        p = np.round(p, 2)
    y = (rng.random(n) < p).astype(int)
    w = rng.uniform(0.1, 10, size=n) if weights else None
    return y, p, w


def _assert_metrics_close(got, expected, keys=STREAM_KEYS):
    for k in keys:
        assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12, nan_ok=True), k


def test_doctests():
    assert doctest.testmod(engine.metrics).failed == 0


# --------------------------------------------------------------------------- log loss / NE


def test_log_loss_hand_computed():
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.3)) / 3
    assert log_loss([1, 0, 1], [0.9, 0.2, 0.3]) == pytest.approx(expected, rel=1e-12)


def test_log_loss_weighted_and_clipped():
    expected = -(2 * math.log(0.9) + 1 * math.log(0.8)) / 3
    assert log_loss([1, 0], [0.9, 0.2], sample_weight=[2, 1]) == pytest.approx(expected)
    # p is clipped to [1e-15, 1 - 1e-15], so confident mistakes are finite
    assert log_loss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-15), rel=1e-4)


def test_ne_of_base_rate_predictor_is_one():
    y, _, w = _data(weights=True)
    ctr = y.mean()
    assert normalized_entropy(y, np.full(y.size, ctr)) == pytest.approx(1.0, abs=1e-12)
    wctr = np.average(y, weights=w)
    assert normalized_entropy(y, np.full(y.size, wctr), w) == pytest.approx(1.0, abs=1e-12)


def test_ne_of_perfect_predictions_near_zero():
    y, _, _ = _data()
    assert normalized_entropy(y, y.astype(float)) < 1e-12
    assert normalized_entropy(y, np.where(y == 1, 0.999, 0.001)) < 0.05


def test_ne_hand_computed():
    y = [1, 0, 0, 0]
    p = [0.5, 0.2, 0.1, 0.4]
    logloss = -(math.log(0.5) + math.log(0.8) + math.log(0.9) + math.log(0.6)) / 4
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(y, p) == pytest.approx(logloss / entropy, rel=1e-12)


def test_ne_nan_without_both_classes():
    assert math.isnan(normalized_entropy([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(normalized_entropy([1, 1], [0.1, 0.2]))
    # zero weight on the only click: weighted background CTR is 0
    assert math.isnan(normalized_entropy([1, 0], [0.5, 0.5], sample_weight=[0, 1]))


def test_input_validation():
    with pytest.raises(ValueError, match="same length"):
        log_loss([1, 0], [0.5])
    with pytest.raises(ValueError, match="0 and 1"):
        log_loss([2, 0], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([1, 0], [0.5, 1.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([1, 0], [0.5, np.nan])
    with pytest.raises(ValueError, match="non-negative"):
        log_loss([1, 0], [0.5, 0.5], sample_weight=[1, -1])


# --------------------------------------------------------------------------- AUC


def _brute_force_auc(y, p, w=None):
    w = np.ones(len(y)) if w is None else np.asarray(w)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    pp, pn = p[pos][:, None], p[neg][None, :]
    pair_w = w[pos][:, None] * w[neg][None, :]
    wins = (pp > pn) + 0.5 * (pp == pn)
    return float(np.sum(pair_w * wins) / np.sum(pair_w))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_ties(seed):
    y, p, _ = _data(n=500, seed=seed, ties=True)
    assert len(np.unique(p)) < len(p)  # there really are ties
    assert roc_auc(y, p) == pytest.approx(_brute_force_auc(y, p), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force_with_weights(seed):
    y, p, w = _data(n=500, seed=seed, ties=True, weights=True)
    assert roc_auc(y, p, w) == pytest.approx(_brute_force_auc(y, p, w), rel=1e-12)


def test_auc_integer_weights_equal_repetition():
    y = np.array([0, 1, 0, 1, 1, 0])
    p = np.array([0.1, 0.2, 0.2, 0.7, 0.3, 0.5])
    w = np.array([1, 3, 2, 1, 2, 4])
    rep = np.repeat(np.arange(len(y)), w)
    assert roc_auc(y, p, w) == pytest.approx(roc_auc(y[rep], p[rep]), rel=1e-12)


def test_auc_edge_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.3] * 4) == 0.5
    assert math.isnan(roc_auc([0, 0], [0.1, 0.2]))
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


# --------------------------------------------------------------------------- calibration


def test_calibration_ratio_of_mean_predictor_is_one():
    y, _, w = _data(weights=True)
    assert calibration_ratio(y, np.full(y.size, y.mean())) == pytest.approx(1.0, rel=1e-12)
    wctr = np.average(y, weights=w)
    assert calibration_ratio(y, np.full(y.size, wctr), w) == pytest.approx(1.0, rel=1e-12)
    assert calibration_ratio([1, 0], [0.5, 0.5]) == pytest.approx(1.0)
    assert math.isnan(calibration_ratio([0, 0], [0.5, 0.5]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_buckets", [1, 3, 10, 37])
def test_buckets_partition_all_examples(ties, n_buckets):
    y, p, w = _data(n=1001, ties=ties, weights=True)
    buckets = calibration_by_bucket(y, p, n_buckets=n_buckets, sample_weight=w)
    assert all(isinstance(b, CalibrationBucket) for b in buckets)
    assert 1 <= len(buckets) <= n_buckets
    assert sum(b.count for b in buckets) == y.size
    assert all(b.count > 0 for b in buckets)
    # contiguous, ordered, covering [min p, max p]
    assert buckets[0].lower == p.min()
    assert buckets[-1].upper == p.max()
    for a, b in zip(buckets, buckets[1:], strict=False):
        assert a.upper <= b.lower
    # each example falls in exactly one bucket, and the per-bucket stats add up
    in_bucket = [
        (p >= b.lower) & ((p < b.upper) if i < len(buckets) - 1 else (p <= b.upper))
        for i, b in enumerate(buckets)
    ]
    assert np.all(np.sum(in_bucket, axis=0) == 1)
    for b, mask in zip(buckets, in_bucket, strict=True):
        assert b.count == mask.sum()
        assert b.mean_predicted == pytest.approx(np.average(p[mask], weights=w[mask]))
        assert b.observed_rate == pytest.approx(np.average(y[mask], weights=w[mask]))


def test_buckets_are_equal_count_without_ties():
    y, p, _ = _data(n=1000)
    buckets = calibration_by_bucket(y, p, n_buckets=10)
    assert [b.count for b in buckets] == [100] * 10


def test_buckets_all_tied_collapse_to_one():
    buckets = calibration_by_bucket([0, 1, 0, 0], [0.3] * 4, n_buckets=5)
    assert len(buckets) == 1
    (b,) = buckets
    assert (b.count, b.mean_predicted, b.observed_rate) == (4, 0.3, 0.25)
    assert b.ratio == pytest.approx(1.2)
    with pytest.raises(ValueError):
        calibration_by_bucket([0, 1], [0.1, 0.2], n_buckets=0)
    assert calibration_by_bucket([], []) == []


def test_evaluate_keys_and_values():
    y, p, w = _data(weights=True)
    m = evaluate(y, p, w)
    assert set(m) == {"ne", "logloss", "auc", "calibration", "n", "ctr"}
    assert m["n"] == y.size
    assert m["ctr"] == pytest.approx(np.average(y, weights=w))
    assert m["logloss"] == pytest.approx(log_loss(y, p, w))
    assert m["ne"] == pytest.approx(normalized_entropy(y, p, w))
    assert m["auc"] == pytest.approx(roc_auc(y, p, w))
    assert m["calibration"] == pytest.approx(calibration_ratio(y, p, w))


# --------------------------------------------------------------------------- incremental


@pytest.mark.parametrize("weights", [False, True])
def test_progressive_validation_matches_batch(weights):
    y, p, w = _data(weights=weights)
    expected = evaluate(y, p, w)

    one = ProgressiveValidation()
    for i in range(y.size):
        if weights:
            one.update(int(y[i]), float(p[i]), float(w[i]))
        else:
            one.update(int(y[i]), float(p[i]))
    _assert_metrics_close(one.get(), expected)

    many = ProgressiveValidation()
    for chunk in np.array_split(np.arange(y.size), 7):
        many.update_many(y[chunk], p[chunk], None if w is None else w[chunk])
    _assert_metrics_close(many.get(), expected)


def test_progressive_validation_empty_is_nan():
    m = ProgressiveValidation().get()
    assert m["n"] == 0
    assert all(math.isnan(m[k]) for k in ("ne", "logloss", "calibration", "ctr"))


def test_incremental_update_validates():
    for metric in (ProgressiveValidation(), WindowedMetrics(3)):
        with pytest.raises(ValueError):
            metric.update(2, 0.5)
        with pytest.raises(ValueError):
            metric.update(1, 1.5)
        with pytest.raises(ValueError):
            metric.update(1, 0.5, -1.0)


@pytest.mark.parametrize("window", [1, 7, 100, 5000])
@pytest.mark.parametrize("weights", [False, True])
def test_windowed_matches_batch_over_last_window(window, weights):
    y, p, w = _data(n=2003, weights=weights)
    w_arr = np.ones(y.size) if w is None else w
    one = WindowedMetrics(window)
    many = WindowedMetrics(window)
    bounds = [0, 1, 5, 50, 51, 400, 1234, 1900, 2003]
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        for i in range(lo, hi):
            one.update(int(y[i]), float(p[i]), float(w_arr[i]))
        many.update_many(y[lo:hi], p[lo:hi], None if w is None else w[lo:hi])
        start = max(0, hi - window)
        expected = evaluate(y[start:hi], p[start:hi], w_arr[start:hi])
        _assert_metrics_close(one.get(), expected)
        _assert_metrics_close(many.get(), expected)


def test_windowed_all_negative_window_gives_exact_zero_ctr():
    wm = WindowedMetrics(3)
    wm.update_many([1, 1], [0.3, 0.7], [0.1, 0.7])  # weights that don't cancel exactly
    wm.update_many([0, 0, 0], [0.2, 0.1, 0.3], [0.3, 0.9, 1.1])
    m = wm.get()
    assert m["ctr"] == 0.0
    assert math.isnan(m["ne"]) and math.isnan(m["calibration"])


def test_windowed_rejects_bad_window():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError):
            WindowedMetrics(bad)


class _MeanModel:
    """Predicts the running CTR (with a 0.5 prior); records call order."""

    def __init__(self):
        self.clicks, self.n, self.calls = 1.0, 2.0, []

    def predict_proba_one(self, x):
        self.calls.append(("predict", x))
        return self.clicks / self.n

    def learn_one(self, x, y):
        self.calls.append(("learn", x))
        self.clicks += y
        self.n += 1


def test_progressive_validation_driver_predicts_before_learning():
    y, _, _ = _data(n=300)
    model = _MeanModel()
    pv = progressive_validation(enumerate(y.tolist()), model)
    assert model.calls[:4] == [("predict", 0), ("learn", 0), ("predict", 1), ("learn", 1)]
    # the predictions the driver scored are the pre-learning running means
    p = (1.0 + np.concatenate([[0], np.cumsum(y)[:-1]])) / (2.0 + np.arange(y.size))
    _assert_metrics_close(pv.get(), evaluate(y, p))
