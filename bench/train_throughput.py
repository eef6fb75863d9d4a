"""Mini-batch training throughput of the online LR on raw + GBDT leaf features, vs Vowpal Wabbit.

What it measures (examples per second, best of ``--repeats`` runs, plus medians):

* ``feature_extraction_examples_per_s``: ``FeaturePipeline.transform_many`` over every record
  with a fresh pipeline (cold token cache); ``feature_extraction_warm_examples_per_s`` is the
  same call again on the now warm pipeline.
* ``leaf_extraction_examples_per_s``: ``CtrModel.augment`` (GBDT leaf tokens + margin) over
  every record, with a ``TreeModel`` trained on the first 2,000 rows (``[trees]`` settings).
* ``examples_per_s``: ``OnlineLogisticRegression.learn_many`` over mini-batches of
  ``--batch-size`` (default ``[learner] batch_size``) of the pre-extracted raw + leaf arrays,
  ``--passes`` passes over the stream, a fresh learner per run.
* ``vw_examples_per_s``: the peer, Vowpal Wabbit's Python ``Workspace.learn(line)`` on the
  same raw + leaf coordinates, pre-formatted ONCE (untimed) to VW text lines by
  ``VowpalWabbitModel.format_examples`` (the lines the replay feeds VW), a fresh workspace per
  run. ``vw_preparsed_examples_per_s`` times ``learn(example)`` on examples parsed beforehand
  (parsing untimed), ``vw_with_values_examples_per_s`` feeds lines that also carry our
  feature values (``index:value``).

Both sides start from the same already-extracted features. The machine is shared, so the
runs of ours and VW are interleaved and ``ratio`` (ours / VW, target >= 1.0) compares figures
taken in the same run. Data: the Criteo sample in ``<repo>/../shared/data/criteo`` when
present, otherwise ``synthetic_log`` (``data_source`` in the JSON says which).

Run::

    python bench/train_throughput.py [--passes 5] [--batch-size 32] [--repeats 3]

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from engine.baselines import VowpalWabbitModel
from engine.config import load_settings
from engine.datasets import SCHEMAS, SYNTHETIC_SCHEMA, BadRows, read_log, synthetic_log
from engine.learner import OnlineLogisticRegression
from engine.model import CtrModel
from engine.replay import spec_for

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_FILE = DATA_DIR / "criteo" / "criteo_dac_rows_1_8000.tsv"
TREE_ROWS = 2000
TARGET_RATIO = 1.0


def load_records(rows: int, seed: int):
    """(records, schema, source, path): the Criteo sample if present, else synthetic."""
    if CRITEO_FILE.exists():
        bad = BadRows()
        records = list(read_log(CRITEO_FILE, "criteo", bad_rows=bad, limit=rows))
        return records, SCHEMAS["criteo"], "criteo", str(CRITEO_FILE), bad.total
    records = list(synthetic_log(rows, seed=seed))
    return records, SYNTHETIC_SCHEMA, "synthetic (criteo file not found)", None, 0


def best_and_median(seconds: list[float], n_examples: int) -> tuple[float, float]:
    """Examples per second of the fastest and of the median run."""
    return n_examples / min(seconds), n_examples / statistics.median(seconds)


def time_ours(learner_settings, bits: int, indices, values, y, passes: int) -> float:
    learner = OnlineLogisticRegression.from_settings(learner_settings, bits)
    learn_many = learner.learn_many
    bs = learner_settings.batch_size
    starts = range(0, len(y), bs)
    start = time.perf_counter()
    for _ in range(passes):
        for i in starts:
            learn_many(indices[i : i + bs], values[i : i + bs], y[i : i + bs])
    return time.perf_counter() - start


def time_vw_lines(bits: int, lines: list[str], passes: int) -> float:
    """VW's plain string API: ``workspace.learn(line)`` per example."""
    vw = VowpalWabbitModel(bits)
    learn = vw.workspace.learn
    start = time.perf_counter()
    for _ in range(passes):
        for line in lines:
            learn(line)
    elapsed = time.perf_counter() - start
    vw.close()
    return elapsed


def time_vw_preparsed(bits: int, lines: list[str], passes: int) -> float:
    """``workspace.learn(example)`` on examples parsed beforehand (parsing untimed)."""
    vw = VowpalWabbitModel(bits)
    workspace = vw.workspace
    learn = workspace.learn
    elapsed = 0.0
    for _ in range(passes):
        examples = [workspace.parse(line) for line in lines]
        start = time.perf_counter()
        for example in examples:
            learn(example)
        elapsed += time.perf_counter() - start
        for example in examples:
            workspace.finish_example(example)
    vw.close()
    return elapsed


def lines_with_values(indices: np.ndarray, values: np.ndarray, y: np.ndarray) -> list[str]:
    return [
        ("1 " if label else "-1 ") + "|f " + " ".join(f"{i}:{v:.9g}" for i, v in zip(row, vals))
        for label, row, vals in zip(y.tolist(), indices.tolist(), values.tolist())
    ]


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=5, help="passes over the stream per run")
    parser.add_argument(
        "--batch-size", type=int, default=settings.learner.batch_size, help="learn_many batch"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender")
    parser.add_argument("--rows", type=int, default=8000, help="records to load")
    args = parser.parse_args(argv)
    if args.passes < 1 or args.batch_size < 1 or args.repeats < 1 or args.rows <= TREE_ROWS:
        parser.error(f"--passes, --batch-size, --repeats must be >= 1, --rows > {TREE_ROWS}")

    seed = settings.replay.synthetic_seed
    records, schema, source, path, bad_rows = load_records(args.rows, seed)
    spec = spec_for(schema, settings)
    fields = [r.fields for r in records]
    y = np.fromiter((r.label for r in records), dtype=np.int64, count=len(records))
    n = len(records)

    # Feature extraction: fresh model pipeline (cold token cache), then the same call warm.
    cold, warm = [], []
    for _ in range(args.repeats):
        model = CtrModel(spec, settings)
        pipeline = model.pipeline
        start = time.perf_counter()
        batch = pipeline.transform_many(fields)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        pipeline.transform_many(fields)
        warm.append(time.perf_counter() - start)

    # GBDT on the first rows, then raw + leaf + margin features for every row.
    start = time.perf_counter()
    trees = model.fit_trees(batch.dense[:TREE_ROWS], y[:TREE_ROWS], version=1)
    tree_fit_s = time.perf_counter() - start
    model.set_trees(trees)
    leaf_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        augmented = model.augment(batch)
        leaf_times.append(time.perf_counter() - start)
    indices, values = augmented.indices, augmented.values

    # VW inputs: formatted once, untimed.
    lines = VowpalWabbitModel.format_examples(indices, y)
    valued_lines = lines_with_values(indices, values, y)

    learner_settings = replace(settings.learner, batch_size=args.batch_size)
    bits = settings.features.bits
    times: dict[str, list[float]] = {"ours": [], "vw": [], "vw_preparsed": [], "vw_values": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        times["ours"].append(time_ours(learner_settings, bits, indices, values, y, args.passes))
        times["vw"].append(time_vw_lines(bits, lines, args.passes))
        times["vw_preparsed"].append(time_vw_preparsed(bits, lines, args.passes))
        times["vw_values"].append(time_vw_lines(bits, valued_lines, args.passes))

    total = n * args.passes
    ours_best, ours_median = best_and_median(times["ours"], total)
    vw_best, vw_median = best_and_median(times["vw"], total)
    fe_cold, _ = best_and_median(cold, n)
    fe_warm, _ = best_and_median(warm, n)
    leaf_rate, _ = best_and_median(leaf_times, n)
    ratio = ours_best / vw_best
    result = {
        "benchmark": "train_throughput",
        "data_source": source,
        "data_path": path,
        "rows": n,
        "bad_rows": bad_rows,
        "passes": args.passes,
        "repeats": args.repeats,
        "batch_size": args.batch_size,
        "optimizer": learner_settings.optimizer,
        "n_features_per_example": int(indices.shape[1]),
        "n_raw_features": int(batch.indices.shape[1]),
        "n_leaf_features": int(indices.shape[1] - batch.indices.shape[1]),
        "tree_rows": TREE_ROWS,
        "tree_fit_s": round(tree_fit_s, 4),
        "feature_extraction_examples_per_s": round(fe_cold),
        "feature_extraction_warm_examples_per_s": round(fe_warm),
        "leaf_extraction_examples_per_s": round(leaf_rate),
        "examples_per_s": round(ours_best),
        "examples_per_s_median": round(ours_median),
        "vw_examples_per_s": round(vw_best),
        "vw_examples_per_s_median": round(vw_median),
        "vw_preparsed_examples_per_s": round(best_and_median(times["vw_preparsed"], total)[0]),
        "vw_with_values_examples_per_s": round(best_and_median(times["vw_values"], total)[0]),
        "ratio": round(ratio, 3),
        "ratio_median": round(ours_median / vw_median, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "timing": "best of repeats (ours and VW interleaved); *_median = median run",
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"{source}: {n} rows x {args.passes} passes, {result['n_features_per_example']} "
        f"features/example, batch {args.batch_size}\n"
        f"  feature extraction {fe_cold:,.0f}/s cold, {fe_warm:,.0f}/s warm; "
        f"leaves {leaf_rate:,.0f}/s\n"
        f"  learn_many {ours_best:,.0f}/s vs VW learn(line) {vw_best:,.0f}/s: "
        f"ratio {ratio:.2f} (target >= {TARGET_RATIO})"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
