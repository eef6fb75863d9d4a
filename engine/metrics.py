"""Offline and streaming evaluation metrics for binary CTR models.

Batch functions take array-likes ``y`` (labels in {0, 1}), ``p`` (predicted
click probabilities in [0, 1]) and optional non-negative ``sample_weight``
(e.g. the importance weights of a negatively downsampled stream).
Probabilities are clipped to ``[EPS, 1 - EPS]`` before taking logs.
Metrics that are undefined on the given data (no clicks, zero total weight,
...) come back as NaN rather than raising, so dashboards keep working.

The headline metric is normalized entropy (NE, He et al. 2014): log loss
divided by the log loss of always predicting the background CTR. NE < 1
means the model beats the base rate; unlike raw log loss it is comparable
across traffic with different CTRs.

``ProgressiveValidation`` and ``WindowedMetrics`` are river-style incremental
counterparts (``update`` / ``update_many`` / ``get``) of :func:`evaluate`
(without AUC, which has no O(1) update).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

EPS = 1e-15
"""Probabilities are clipped to [EPS, 1 - EPS] before logs."""

__all__ = [
    "EPS",
    "CalibrationBucket",
    "ProgressiveValidation",
    "WindowedMetrics",
    "calibration_by_bucket",
    "calibration_ratio",
    "evaluate",
    "log_loss",
    "normalized_entropy",
    "progressive_validation",
    "roc_auc",
]


# --------------------------------------------------------------------------- helpers


def _prepare(y, p, sample_weight=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate inputs and return float64 1-d arrays (y, p, w); p is NOT clipped."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y and p must have the same length, got {y.size} and {p.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y must contain only 0 and 1")
    if not np.all((p >= 0) & (p <= 1)):  # also rejects NaN
        raise ValueError("p must contain probabilities in [0, 1]")
    if sample_weight is None:
        w = np.ones_like(y)
    else:
        w = np.asarray(sample_weight, dtype=np.float64).ravel()
        if w.shape != y.shape:
            raise ValueError(
                f"sample_weight must have the same length as y, got {w.size} and {y.size}"
            )
        if not np.all((w >= 0) & np.isfinite(w)):
            raise ValueError("sample_weight must be finite and non-negative")
    return y, p, w


def _pointwise_log_loss(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * np.log(p) + (1 - y) * np.log1p(-p))


def _entropy(ctr: float) -> float:
    """Binary entropy (nats) of the background CTR; NaN if ctr is not in (0, 1)."""
    if not 0 < ctr < 1:
        return math.nan
    return -(ctr * math.log(ctr) + (1 - ctr) * math.log1p(-ctr))


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _summary(n: int, sw: float, swy: float, swp: float, swll: float) -> dict[str, float]:
    """Metrics from running sums; shared by evaluate() and the incremental classes."""
    logloss = _div(swll, sw)
    ctr = _div(swy, sw)
    return {
        "ne": logloss / _entropy(ctr),  # NaN when ctr is 0, 1 or undefined
        "logloss": logloss,
        "calibration": _div(swp, swy),
        "n": n,
        "ctr": ctr,
    }


def _sums(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float]:
    """(sum w, sum w*y, sum w*p, sum w*logloss)."""
    return (
        float(np.sum(w)),
        float(np.sum(w * y)),
        float(np.sum(w * p)),
        float(np.sum(w * _pointwise_log_loss(y, p))),
    )


# --------------------------------------------------------------------------- batch metrics


def log_loss(y, p, sample_weight=None) -> float:
    """(Weighted) mean binary cross-entropy in nats.

    >>> round(log_loss([1, 0], [0.8, 0.4]), 6)  # -(ln 0.8 + ln 0.6) / 2
    0.366985
    """
    y, p, w = _prepare(y, p, sample_weight)
    sw, _, _, swll = _sums(y, p, w)
    return _div(swll, sw)


def normalized_entropy(y, p, sample_weight=None) -> float:
    """Log loss divided by the entropy of the background CTR (He et al. 2014).

    The background CTR is the (weighted) mean of ``y`` over the same examples,
    so NE == 1 for a constant predictor at the base rate and lower is better.
    NaN when the background CTR is 0 or 1 (entropy is zero).

    >>> normalized_entropy([1, 0, 0, 0], [0.25] * 4)
    1.0
    """
    y, p, w = _prepare(y, p, sample_weight)
    return _summary(y.size, *_sums(y, p, w))["ne"]


def roc_auc(y, p, sample_weight=None) -> float:
    """Area under the ROC curve via (weighted) ranks; tied scores count 1/2.

    Equals the Mann-Whitney statistic with average ranks for tied scores; with
    weights, each (positive, negative) pair counts ``w_pos * w_neg``. NaN if
    either class has zero total weight.

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])
    0.5
    """
    y, p, w = _prepare(y, p, sample_weight)
    scores, group = np.unique(p, return_inverse=True)  # groups of tied scores, ascending
    w_pos = np.bincount(group, weights=w * y, minlength=scores.size)
    w_neg = np.bincount(group, weights=w * (1 - y), minlength=scores.size)
    total_pos, total_neg = w_pos.sum(), w_neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return math.nan
    neg_below = np.cumsum(w_neg) - w_neg  # negative weight with a strictly lower score
    return float(np.sum(w_pos * (neg_below + 0.5 * w_neg)) / (total_pos * total_neg))


def calibration_ratio(y, p, sample_weight=None) -> float:
    """(Weighted) mean predicted CTR over observed CTR; 1 is perfectly calibrated.

    NaN if there are no (weighted) clicks.

    >>> calibration_ratio([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])
    2.0
    """
    y, p, w = _prepare(y, p, sample_weight)
    return _div(float(np.sum(w * p)), float(np.sum(w * y)))


@dataclass(frozen=True)
class CalibrationBucket:
    """One bucket of a reliability table: predictions in ``[lower, upper)``.

    The last bucket is closed, ``[lower, upper]``. ``count`` is the number of
    examples (unweighted); means and the rate are weighted. ``ratio`` is
    ``mean_predicted / observed_rate`` (NaN without clicks).
    """

    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_rate: float
    ratio: float


def calibration_by_bucket(y, p, n_buckets: int = 10, sample_weight=None) -> list[CalibrationBucket]:
    """Reliability table over equal-count buckets (quantiles of ``p``).

    Quantile buckets keep every bucket populated even though CTR predictions
    are heavily skewed towards 0. Buckets left empty by tied quantile edges
    are omitted, so fewer than ``n_buckets`` may be returned.

    >>> [b.count for b in calibration_by_bucket([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], 2)]
    [2, 2]
    """
    if n_buckets < 1:
        raise ValueError(f"n_buckets must be >= 1, got {n_buckets}")
    y, p, w = _prepare(y, p, sample_weight)
    if y.size == 0:
        return []
    edges = np.quantile(p, np.linspace(0.0, 1.0, n_buckets + 1))
    idx = np.searchsorted(edges[1:-1], p, side="right")  # bucket i: edges[i] <= p < edges[i+1]
    count = np.bincount(idx, minlength=n_buckets)
    sw = np.bincount(idx, weights=w, minlength=n_buckets)
    swy = np.bincount(idx, weights=w * y, minlength=n_buckets)
    swp = np.bincount(idx, weights=w * p, minlength=n_buckets)
    buckets = []
    for i in np.flatnonzero(count):
        mean_p, rate = _div(swp[i], sw[i]), _div(swy[i], sw[i])
        buckets.append(
            CalibrationBucket(
                lower=float(edges[i]),
                upper=float(edges[i + 1]),
                count=int(count[i]),
                mean_predicted=mean_p,
                observed_rate=rate,
                ratio=_div(mean_p, rate),
            )
        )
    return buckets


def evaluate(y, p, sample_weight=None) -> dict[str, float]:
    """All headline metrics at once: keys ne, logloss, auc, calibration, n, ctr.

    ``n`` is the number of examples (unweighted); ``ctr`` is the weighted mean
    of ``y``; ``calibration`` is :func:`calibration_ratio`.

    >>> m = evaluate([1, 0, 0, 0], [0.25] * 4)
    >>> m["ne"], m["auc"], m["calibration"], m["n"], m["ctr"]
    (1.0, 0.5, 1.0, 4, 0.25)
    """
    y, p, w = _prepare(y, p, sample_weight)
    out = _summary(y.size, *_sums(y, p, w))
    out["auc"] = roc_auc(y, p, w)
    return out


# --------------------------------------------------------------------------- incremental


def _check_one(y: float, p: float, w: float) -> None:
    if y not in (0, 1):
        raise ValueError(f"y must be 0 or 1, got {y!r}")
    if not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if not (w >= 0 and math.isfinite(w)):
        raise ValueError(f"w must be finite and non-negative, got {w!r}")


def _log_loss_one(y: float, p: float) -> float:
    p = min(max(p, EPS), 1 - EPS)
    return -math.log(p) if y else -math.log1p(-p)


class ProgressiveValidation:
    """Running NE / log loss / calibration over every prediction seen so far.

    Progressive validation scores each example with the prediction made
    *before* the model learned from it, so the running metric is an honest
    out-of-sample estimate without a holdout set. Only five running sums are
    kept, so ``update`` and ``get`` are O(1).

    >>> pv = ProgressiveValidation()
    >>> for y in [1, 0, 0, 0]:
    ...     pv.update(y, 0.25)
    >>> pv.get()["ne"], pv.get()["n"]
    (1.0, 4)
    """

    def __init__(self) -> None:
        self.n = 0
        self._sw = self._swy = self._swp = self._swll = 0.0

    def update(self, y: int, p: float, w: float = 1.0) -> None:
        """Record one (label, pre-learning prediction, weight)."""
        _check_one(y, p, w)
        self.n += 1
        self._sw += w
        self._swy += w * y
        self._swp += w * p
        self._swll += w * _log_loss_one(y, p)

    def update_many(self, y_arr, p_arr, w_arr=None) -> None:
        """Vectorised :meth:`update` for a batch of examples."""
        y, p, w = _prepare(y_arr, p_arr, w_arr)
        sw, swy, swp, swll = _sums(y, p, w)
        self.n += y.size
        self._sw += sw
        self._swy += swy
        self._swp += swp
        self._swll += swll

    def get(self) -> dict[str, float]:
        """dict(ne, logloss, calibration, n, ctr); NaN where undefined."""
        return _summary(self.n, self._sw, self._swy, self._swp, self._swll)

    def __repr__(self) -> str:
        m = self.get()
        return f"ProgressiveValidation(n={m['n']}, ne={m['ne']:.6f}, logloss={m['logloss']:.6f})"


class WindowedMetrics:
    """NE / log loss / calibration over the last ``window`` examples.

    For monitoring dashboards, where a regression must show up quickly rather
    than be averaged away by the whole history. A ring buffer holds each
    example's contributions to the running sums, so an update adds the new
    example and subtracts the evicted one in O(1). Sums are re-computed from
    the buffer each time it wraps around (amortised O(1)) so floating-point
    drift from the add/subtract cannot accumulate, and exact counts of
    clicks / non-clicks make an all-negative window give ctr exactly 0.

    >>> wm = WindowedMetrics(window=2)
    >>> wm.update_many([1, 1, 0], [0.1, 0.9, 0.5])  # only the last two count
    >>> wm.get()["n"], wm.get()["ctr"], wm.get()["calibration"]
    (2, 0.5, 1.4)
    """

    def __init__(self, window: int) -> None:
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        self.window = int(window)
        # columns: w, w*y, w*p, w*logloss, is weighted click, is weighted non-click;
        # empty slots are zero so evicting them is a no-op
        self._buf = np.zeros((self.window, 6))
        self._sums = np.zeros(6)
        self._head = 0  # next slot to write
        self._seen = 0

    @property
    def n(self) -> int:
        """Number of examples currently in the window."""
        return min(self._seen, self.window)

    def update(self, y: int, p: float, w: float = 1.0) -> None:
        """Add one example, evicting the oldest once the window is full."""
        _check_one(y, p, w)
        row = (w, w * y, w * p, w * _log_loss_one(y, p), w > 0 and y == 1, w > 0 and y == 0)
        self._sums += row - self._buf[self._head]
        self._buf[self._head] = row
        self._advance(1)

    def update_many(self, y_arr, p_arr, w_arr=None) -> None:
        """Vectorised :meth:`update`: same result as updating one by one."""
        y, p, w = _prepare(y_arr, p_arr, w_arr)
        k = y.size
        if k == 0:
            return
        rows = np.column_stack(
            (w, w * y, w * p, w * _pointwise_log_loss(y, p), (w > 0) & (y == 1), (w > 0) & (y == 0))
        )
        if k >= self.window:  # the batch alone fills the window
            self._buf[:] = rows[-self.window :]
            self._head = 0
            self._seen += k
            self._sums = self._buf.sum(axis=0)
            return
        slots = (self._head + np.arange(k)) % self.window  # distinct since k < window
        self._sums += rows.sum(axis=0) - self._buf[slots].sum(axis=0)
        self._buf[slots] = rows
        self._advance(k)

    def _advance(self, k: int) -> None:
        head = self._head + k
        self._seen += k
        if head >= self.window:  # wrapped: refresh sums to cancel accumulated rounding
            self._sums = self._buf.sum(axis=0)
        self._head = head % self.window

    def get(self) -> dict[str, float]:
        """dict(ne, logloss, calibration, n, ctr) over the window; NaN where undefined."""
        sw, swy, swp, swll, n_pos, n_neg = (float(s) for s in self._sums)
        if n_pos == 0:  # counts are exact; running float sums may leave residue
            swy = 0.0
            if n_neg == 0:
                sw = 0.0
        elif n_neg == 0:
            swy = sw
        return _summary(self.n, sw, swy, swp, swll)


# --------------------------------------------------------------------------- driver


class OnlineModel(Protocol):
    """What :func:`progressive_validation` needs from a model."""

    def predict_proba_one(self, x: Any) -> float: ...

    def learn_one(self, x: Any, y: int) -> Any: ...


def progressive_validation(
    stream: Iterable[tuple[Any, int]], model: OnlineModel
) -> ProgressiveValidation:
    """Predict-then-learn over ``stream`` of (x, y); returns the filled metrics.

    ``model.predict_proba_one(x)`` must return the click probability as a
    float. (river classifiers return a ``{False: p0, True: p1}`` dict; wrap
    them.) The model is trained in place.
    """
    pv = ProgressiveValidation()
    for x, y in stream:
        pv.update(y, float(model.predict_proba_one(x)))
        model.learn_one(x, y)
    return pv
