"""Negative downsampling at w = 0.1 with recalibration, against training on every example.

Replays the same seeded synthetic log twice (all negatives kept; 10% of negatives kept)
and reports, for the LR and the GBDT + LR model, NE and calibration ratio (mean
predicted / observed CTR) of the recalibrated predictions, plus the calibration of the
downsampled LR's raw scores on the last rows (the bias that recalibration removes).

Run: ``python bench/downsampling.py [--rows 100000]``. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from engine.config import load_settings
from engine.datasets import SCHEMAS, synthetic_log
from engine.metrics import calibration_ratio
from engine.replay import Replay


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=2)
    args = parser.parse_args()

    settings = load_settings()
    sampled = dataclasses.replace(
        settings,
        calibration=dataclasses.replace(settings.calibration, negative_downsampling_rate=args.rate),
    )
    records = list(synthetic_log(args.rows, seed=args.seed))
    full = Replay(settings, SCHEMAS["synthetic"], with_vw=False).run(records)
    replay = Replay(sampled, SCHEMAS["synthetic"], with_vw=False)
    down = replay.run(records)

    tail = records[-10_000:]
    batch = replay.lr.pipeline.transform_many([r.fields for r in tail])
    raw = replay.lr.learner.predict_proba_many(batch.indices, batch.values)
    raw_calibration = calibration_ratio(np.array([r.label for r in tail]), raw)

    out = {"benchmark": "downsampling", "rows": args.rows, "rate": args.rate}
    for name in ("lr", "gbdt_lr"):
        f, d = full.metrics[name], down.metrics[name]
        out[name] = {
            "ne_full": f["ne"],
            "ne_downsampled": d["ne"],
            "ne_rel_diff": round(d["ne"] / f["ne"] - 1.0, 5),
            "calibration_full": f["calibration"],
            "calibration_downsampled": d["calibration"],
            "calibration_rel_diff": round(d["calibration"] / f["calibration"] - 1.0, 5),
        }
    out["lr_raw_calibration_without_recalibration"] = round(float(raw_calibration), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
