"""Offline replay of a click log with progressive validation.

Every model sees the log in file order, predicts each mini-batch before learning it
(progressive validation), and is scored on the same examples: those that arrive
after the first GBDT exists. Compared on identical hashed features:

* ``lr``: online logistic regression on the hashed raw features;
* ``gbdt``: the current LightGBM model alone;
* ``gbdt_lr``: online logistic regression on raw + GBDT leaf features (+ the
  GBDT's centred margin as one numeric feature whose meaning survives a tree
  refresh), served as a probability mixture with the GBDT (``features.gbdt_blend``),
  i.e. :class:`engine.model.CtrModel`, the model serving uses;
* ``vw``: Vowpal Wabbit on the raw hashed features.

The GBDT warms up on the first ``gbdt_warmup`` examples and is retrained every
``gbdt_refresh_every`` examples on the last ``gbdt_window``. With
``features.count_features`` the GBDT's input includes progressive counting features,
updated after each mini-batch has been learnt, so no example sees its own label.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.baselines import VowpalWabbitModel
from engine.calibration import NegativeDownsampler, recalibrate
from engine.config import Settings
from engine.datasets import LogRecord, Schema
from engine.features import FeatureSpec
from engine.metrics import evaluate, normalized_entropy
from engine.model import CtrModel
from engine.trees import TreeModel

MODELS = ("lr", "gbdt", "gbdt_lr", "vw")


def spec_for(schema: Schema, settings: Settings) -> FeatureSpec:
    """The feature spec of a dataset: its fields plus the configured crosses it can use."""
    features = settings.features
    spec = FeatureSpec(schema.categorical, schema.numeric, (), features.bits, features.salt)
    return spec.restricted_to(spec.fields, features.crosses)


def synthetic_model(rows: int, seed: int = 3, settings: Settings | None = None) -> CtrModel:
    """A GBDT + LR model warmed up offline on ``rows`` of the synthetic log: trees on the
    first half, then LR mini-batches (with progressive counting features) over all rows.
    What benchmarks and tests serve when they need a realistic trained model."""
    from engine.config import load_settings
    from engine.datasets import SYNTHETIC_SCHEMA, synthetic_log

    settings = load_settings() if settings is None else settings
    model = CtrModel(spec_for(SYNTHETIC_SCHEMA, settings), settings)
    records = list(synthetic_log(rows, seed=seed))
    batch = model.pipeline.transform_many([r.fields for r in records])
    y = np.array([r.label for r in records])
    half = rows // 2
    model.set_trees(model.fit_trees(batch.dense[:half], y[:half], version=1))
    for start in range(0, rows, 64):
        model.learn_many(batch[start : start + 64], y[start : start + 64])
        model.pipeline.observe(batch[start : start + 64], y[start : start + 64])
    return model


@dataclass
class ReplayResult:
    """Figures of one replay: per-model metrics on the evaluated examples."""

    dataset: str
    n_rows: int
    n_evaluated: int
    metrics: dict[str, dict[str, float]]
    extraction_s: float
    bad_rows: dict[str, int] = field(default_factory=dict)
    oracle_ne: float | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tree_versions: int = 0

    def to_json(self) -> dict:
        out = {
            "dataset": self.dataset,
            "rows": self.n_rows,
            "evaluated": self.n_evaluated,
            "bad_rows": self.bad_rows,
            "tree_versions": self.tree_versions,
            "feature_extraction_s": round(self.extraction_s, 4),
            "models": self.metrics,
        }
        if self.oracle_ne is not None:
            out["oracle_ne"] = self.oracle_ne
        return out


def _chunks(records: Iterable[LogRecord], size: int) -> Iterator[list[LogRecord]]:
    chunk: list[LogRecord] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Replay:
    """Runs the four models over a stream of log records."""

    def __init__(self, settings: Settings, schema: Schema, with_vw: bool = True):
        self.settings = settings
        spec = spec_for(schema, settings)
        self.lr = CtrModel(spec, settings, use_trees=False)
        self.gbdt_lr = CtrModel(spec, settings)
        self.pipeline = self.gbdt_lr.pipeline
        self.vw = VowpalWabbitModel(settings.features.bits) if with_vw else None
        self.trees: TreeModel | None = None
        self.rate = settings.calibration.negative_downsampling_rate
        self.downsampler = (
            NegativeDownsampler(self.rate, seed=settings.trees.seed) if self.rate < 1 else None
        )
        self.categorical_columns = self.pipeline.categorical_columns
        self._trained_at = 0

    def _maybe_refresh_trees(self, dense: list[np.ndarray], labels: list[np.ndarray], seen: int):
        replay = self.settings.replay
        if self.trees is None:
            due = seen >= replay.gbdt_warmup
        else:
            due = seen - self._trained_at >= replay.gbdt_refresh_every
        if not due:
            return 0.0
        start = time.perf_counter()
        X = np.vstack(dense)[-replay.gbdt_window :]
        y = np.concatenate(labels)[-replay.gbdt_window :]
        version = 1 if self.trees is None else self.trees.version + 1
        self.trees = self.gbdt_lr.fit_trees(X, y, version)
        self.gbdt_lr.set_trees(self.trees)
        self._trained_at = seen
        return time.perf_counter() - start

    def run(
        self,
        records: Iterable[LogRecord],
        dataset: str = "",
        predictions_out: str | Path | None = None,
        progress=None,
    ) -> ReplayResult:
        settings = self.settings
        rows, labels_eval, truth = [], [], []
        preds: dict[str, list[np.ndarray]] = {name: [] for name in MODELS}
        timings = dict.fromkeys(MODELS, 0.0)
        extraction = 0.0
        window_dense: list[np.ndarray] = []
        window_labels: list[np.ndarray] = []
        seen = 0

        def timed(name, fn, *args):
            start = time.perf_counter()
            out = fn(*args)
            timings[name] += time.perf_counter() - start
            return out

        for chunk in _chunks(records, settings.learner.batch_size):
            start = time.perf_counter()
            batch = self.pipeline.transform_many([r.fields for r in chunk])
            extraction += time.perf_counter() - start
            y = np.fromiter((r.label for r in chunk), dtype=np.int64, count=len(chunk))
            evaluated = self.trees is not None

            # Progressive validation: every model predicts the chunk before learning it.
            if evaluated:
                p_gbdt = timed("gbdt", self.trees.predict_proba, batch.dense)
                preds["gbdt"].append(recalibrate(p_gbdt, self.rate))
                preds["lr"].append(timed("lr", self.lr.predict_proba_many, batch))
                preds["gbdt_lr"].append(timed("gbdt_lr", self.gbdt_lr.predict_proba_many, batch))

            # Training set: all positives, negatives kept at rate w.
            keep = slice(None)
            if self.downsampler is not None:
                keep = self.downsampler.keep_many(y)
            timed("lr", self.lr.learn_many, batch[keep], y[keep])
            timed("gbdt_lr", self.gbdt_lr.learn_many, batch[keep], y[keep])
            # Counting features only ever include examples that have been learnt.
            self.pipeline.observe(batch[keep], y[keep])
            if self.vw is not None:
                p_vw = timed("vw", self.vw.learn_many, batch.indices, y)
                if evaluated:
                    preds["vw"].append(p_vw)

            if evaluated:
                rows.extend(r.row for r in chunk)
                labels_eval.append(y)
                truth.extend(r.p_true for r in chunk)
            window_dense.append(batch.dense[keep])
            window_labels.append(y[keep])
            seen += len(chunk)
            timings["gbdt"] += self._maybe_refresh_trees(window_dense, window_labels, seen)
            if len(window_dense) > 4 * max(1, settings.replay.gbdt_window // len(chunk)):
                window_dense, window_labels = self._trim(window_dense, window_labels)
            if progress is not None:
                progress.update(len(chunk))

        return self._result(
            dataset, seen, rows, labels_eval, preds, timings, extraction, truth, predictions_out
        )

    def _trim(self, dense, labels):
        keep = self.settings.replay.gbdt_window
        X, y = np.vstack(dense)[-keep:], np.concatenate(labels)[-keep:]
        return [X], [y]

    def _result(self, dataset, seen, rows, labels_eval, preds, timings, extraction, truth, out):
        y = np.concatenate(labels_eval) if labels_eval else np.empty(0, dtype=np.int64)
        metrics, series = {}, {}
        for name in MODELS:
            if not preds[name]:
                continue
            p = np.concatenate(preds[name])
            series[name] = p
            figures = evaluate(y, p)
            figures["examples_per_s"] = seen / timings[name] if timings[name] else float("nan")
            metrics[name] = {
                k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()
            }
        oracle = None
        if truth and all(t is not None for t in truth):
            oracle = round(normalized_entropy(y, np.asarray(truth, dtype=np.float64)), 6)
        if out is not None:
            _write_predictions(out, rows, y, series)
        return ReplayResult(
            dataset=dataset,
            n_rows=seen,
            n_evaluated=len(y),
            metrics=metrics,
            extraction_s=extraction,
            oracle_ne=oracle,
            curves={name: _ne_curve(y, p) for name, p in series.items()},
            tree_versions=self.trees.version if self.trees else 0,
        )


def _ne_curve(y: np.ndarray, p: np.ndarray, points: int = 50) -> list[tuple[int, float]]:
    """Cumulative NE at evenly spaced points of the evaluated stream, for plotting."""
    ends = np.unique(np.linspace(len(y) // points, len(y), points).astype(int))
    return [(int(end), float(normalized_entropy(y[:end], p[:end]))) for end in ends if end > 0]


def _write_predictions(path, rows, y, series):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(series)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "label", *names])
        columns = [series[name] for name in names]
        for i, row in enumerate(rows):
            writer.writerow([row, int(y[i]), *(f"{col[i]:.8g}" for col in columns)])
