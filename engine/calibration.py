"""Negative downsampling and the matching re-calibration of predicted CTR.

Clicks are rare, so training streams keep every positive but only a fraction
``w`` of negatives (He et al. 2014, section 6.2). A model trained on that
stream over-predicts: its odds are inflated by ``1 / w``. :func:`recalibrate`
undoes this at serving time; :class:`NegativeDownsampler` makes the keep/drop
decision and reports the importance weight of kept examples.
"""

from __future__ import annotations

import hashlib
import numbers

import numpy as np

__all__ = ["NegativeDownsampler", "recalibrate"]


def _check_rate(w: float, name: str) -> float:
    if isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 < w <= 1:
        raise ValueError(
            f"{name} must be the fraction of negatives kept, a number in (0, 1]; got {w!r}"
        )
    return float(w)


def recalibrate(p, w: float):
    """Map a probability from a negatively downsampled model back to the true scale.

    ``q = p / (p + (1 - p) / w)`` where ``w`` in (0, 1] is the fraction of
    negatives kept. Computed as ``1 / (1 + (1 - p) / (p * w))``, which is the
    same value but provably monotone in ``p`` under floating-point rounding.
    Accepts a float (returns a float) or an array (returns an array);
    ``w == 1`` returns ``p`` unchanged.

    >>> recalibrate(0.5, 0.1)  # odds 1 -> 0.1
    0.09090909090909091
    >>> recalibrate(np.array([0.0, 1.0]), 0.1)
    array([0., 1.])
    """
    w = _check_rate(w, "w")
    arr = np.asarray(p, dtype=np.float64)
    if not np.all((arr >= 0) & (arr <= 1)):  # also rejects NaN
        raise ValueError("p must contain probabilities in [0, 1]")
    if w != 1.0:
        with np.errstate(divide="ignore", over="ignore"):  # p*w == 0 -> inf -> q == 0
            arr = 1.0 / (1.0 + (1.0 - arr) / (arr * w))
    elif isinstance(p, np.ndarray):
        arr = arr.copy()  # identity, but never hand back the caller's array
    return float(arr) if arr.ndim == 0 else arr


class NegativeDownsampler:
    """Keep every positive and each negative with probability ``rate``.

    With ``key`` (e.g. an impression or request id) the decision is a pure
    function of ``(seed, key)`` via BLAKE2b, so replays and restarted workers
    keep exactly the same examples. Without a key, a numpy Generator seeded
    with ``seed`` is used. Kept negatives stand for ``1 / rate`` originals:
    use :attr:`weight` / :meth:`weight_for` as importance weights, and
    ``recalibrate(p, rate)`` on the trained model's predictions.

    >>> ds = NegativeDownsampler(0.25, seed=7)
    >>> ds.keep(1), ds.weight_for(1), ds.weight_for(0)
    (True, 1.0, 4.0)
    >>> ds.keep(0, key="imp-42") == NegativeDownsampler(0.25, seed=7).keep(0, key="imp-42")
    True
    """

    def __init__(self, rate: float, seed: int | None = None) -> None:
        self.rate = _check_rate(rate, "rate")
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._salt = b"" if seed is None else f"{int(seed)}\x00".encode()

    @property
    def weight(self) -> float:
        """Importance weight of a kept negative, ``1 / rate``."""
        return 1.0 / self.rate

    def weight_for(self, label: int) -> float:
        """Importance weight of a kept example: 1 for positives, ``1 / rate`` otherwise."""
        return 1.0 if _is_positive(label) else self.weight

    def keep(self, label: int, key: str | bytes | None = None) -> bool:
        """Whether to keep this example; deterministic in ``(seed, key)`` when keyed."""
        if _is_positive(label):
            return True
        if self.rate == 1.0:
            return True
        if key is None:
            return bool(self._rng.random() < self.rate)
        data = key.encode() if isinstance(key, str) else bytes(key)
        digest = hashlib.blake2b(self._salt + data, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64 < self.rate

    def keep_many(self, labels: np.ndarray) -> np.ndarray:
        """Vectorised un-keyed :meth:`keep`: boolean mask of examples to keep."""
        labels = np.asarray(labels)
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("labels must contain only 0 and 1")
        return (labels == 1) | (self._rng.random(labels.shape) < self.rate)

    def __repr__(self) -> str:
        return f"NegativeDownsampler(rate={self.rate!r}, seed={self.seed!r})"


def _is_positive(label: int) -> bool:
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    return label == 1
