"""Phase 2 of ad selection: keep the ``k`` targeting matches with the best prior value.

Scoring every targeting match with the full model is too slow, so candidates are first
cut down by a cheap prior: ``bid x prior CTR`` (the expected value per impression of a
CPC ad under its prior CTR). A CPM ad's value per impression does not depend on the
CTR; pass ``pricing`` to score CPM ads as ``bid / 1000`` instead.

Selection is O(n) with :func:`numpy.argpartition`; ties are broken by ad id (ascending)
so the result never depends on candidate order.

>>> top_k_by_prior(["b", "a", "c"], bids=[1.0, 2.0, 1.0], prior_ctr=[0.02, 0.01, 0.02], k=2)
['a', 'b']
>>> top_k_by_prior(["x", "y"], bids={"x": 1.0, "y": 5.0}, prior_ctr={"x": 0.01, "y": 0.01},
...                k=5, pricing={"x": "cpc", "y": "cpm"})
['x', 'y']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["prior_scores", "top_k_by_prior"]


def _aligned(values, ids: Sequence[str], name: str, dtype=np.float64) -> np.ndarray:
    """``values`` as an array aligned with ``ids`` (a mapping is looked up by id)."""
    if isinstance(values, Mapping):
        values = [values[i] for i in ids]
    arr = np.asarray(values, dtype=dtype)
    if arr.shape != (len(ids),):
        raise ValueError(f"{name} has shape {arr.shape}, expected ({len(ids)},)")
    return arr


def prior_scores(
    bids: np.ndarray, prior_ctr: np.ndarray, pricing: np.ndarray | None = None
) -> np.ndarray:
    """Expected value per impression: ``bid x CTR`` (CPC) or ``bid / 1000`` (CPM).

    NaN scores (unknown prior) become ``-inf`` so they rank last.

    >>> prior_scores(np.array([2.0, 3.0]), np.array([0.1, np.nan]), np.array(["cpc", "cpm"]))
    array([0.2  , 0.003])
    """
    scores = bids * prior_ctr
    if pricing is not None:
        scores = np.where(pricing == "cpm", bids / 1000.0, scores)
    return np.where(np.isnan(scores), -np.inf, scores)


def top_k_by_prior(
    candidates: Iterable[str],
    bids: Sequence[float] | Mapping[str, float],
    prior_ctr: Sequence[float] | Mapping[str, float],
    k: int,
    pricing: Sequence[str] | Mapping[str, str] | None = None,
) -> list[str]:
    """The ``k`` best candidates by prior value, best first, ties by ad id.

    ``bids``/``prior_ctr``/``pricing`` are either sequences aligned with ``candidates``
    or mappings keyed by ad id. A set of candidates is sorted first (deterministic).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if isinstance(candidates, set | frozenset):
        candidates = sorted(candidates)
    ids = list(candidates)
    n = len(ids)
    if n == 0 or k == 0:
        return []
    bid = _aligned(bids, ids, "bids")
    ctr = _aligned(prior_ctr, ids, "prior_ctr")
    kinds = None if pricing is None else _aligned(pricing, ids, "pricing", dtype=object)
    scores = prior_scores(bid, ctr, kinds)
    if k < n:
        # O(n) cut at the k-th best score; every candidate tied with it stays in the
        # running so the id tie-break below (not argpartition's order) decides.
        threshold = scores[np.argpartition(-scores, k - 1)[k - 1]]
        keep = np.flatnonzero(scores >= threshold)
    else:
        keep = np.arange(n)
    id_rank = np.empty(len(keep), dtype=np.int64)
    id_rank[np.argsort(np.array([ids[i] for i in keep], dtype=object), kind="stable")] = np.arange(
        len(keep)
    )
    order = np.lexsort((id_rank, -scores[keep]))[:k]
    return [ids[i] for i in keep[order]]
