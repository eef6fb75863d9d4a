import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main
from engine.config import load_settings
from engine.datasets import SCHEMAS, read_log, synthetic_log
from engine.metrics import calibration_ratio, normalized_entropy
from engine.replay import Replay

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO = DATA / "criteo" / "criteo_dac_rows_1_8000.tsv"
ROWS = 100_000  # enough that 10% of the negatives still pin the weights down


def small_settings(**replay):
    settings = load_settings()
    return dataclasses.replace(
        settings,
        replay=dataclasses.replace(
            settings.replay, gbdt_warmup=1000, gbdt_refresh_every=1000, **replay
        ),
    )


def test_cli_replay_synthetic_json_predictions_and_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADENGINE_REPLAY_GBDT_WARMUP", "1000")
    monkeypatch.setenv("ADENGINE_REPLAY_GBDT_REFRESH_EVERY", "1000")
    out, plot = tmp_path / "pred.csv", tmp_path / "ne.png"
    code = main(
        [
            "replay",
            "--rows",
            "3000",
            "--json",
            "--quiet",
            "--predictions-out",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["models"]) == {"lr", "gbdt", "gbdt_lr", "vw"}
    for figures in result["models"].values():
        assert {"ne", "logloss", "auc", "calibration", "examples_per_s"} <= set(figures)
    assert 0 < result["oracle_ne"] < 1
    assert plot.stat().st_size > 10_000  # a real PNG

    # Anyone can recompute the metrics from the predictions file.
    with out.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result["evaluated"]
    y = np.array([int(r["label"]) for r in rows])
    for name, figures in result["models"].items():
        p = np.array([float(r[name]) for r in rows])
        assert normalized_entropy(y, p) == pytest.approx(figures["ne"], abs=1e-5)
    # Row numbers are the input's, in order, starting after the warm-up.
    assert [int(r["row"]) for r in rows] == list(range(1025, 3001))


def test_models_are_scored_on_identical_examples():
    settings = small_settings()
    result = Replay(settings, SCHEMAS["synthetic"]).run(synthetic_log(3000, seed=1))
    counts = {figures["n"] for figures in result.metrics.values()}
    assert counts == {result.n_evaluated}
    assert result.tree_versions >= 2


def test_negative_downsampling_with_recalibration_matches_full_data():
    """w = 0.1: recalibrated LR is calibrated; without recalibration it is biased upwards."""
    base = small_settings()
    full = Replay(base, SCHEMAS["synthetic"], with_vw=False).run(synthetic_log(ROWS, seed=2))
    sampled_settings = dataclasses.replace(
        base, calibration=dataclasses.replace(base.calibration, negative_downsampling_rate=0.1)
    )
    sampled = Replay(sampled_settings, SCHEMAS["synthetic"], with_vw=False)
    records = list(synthetic_log(ROWS, seed=2))
    result = sampled.run(records)

    for name in ("lr", "gbdt_lr"):  # the LR alone and the served GBDT + LR model
        full_m, sampled_m = full.metrics[name], result.metrics[name]
        assert 0.95 <= sampled_m["calibration"] <= 1.05, name
        assert sampled_m["calibration"] == pytest.approx(full_m["calibration"], rel=0.02), name
        assert sampled_m["ne"] == pytest.approx(full_m["ne"], rel=0.01), name

    # The bias recalibration removes: raw scores of the downsampled model over-predict.
    batch = sampled.lr.pipeline.transform_many([r.fields for r in records[-5000:]])
    y = np.array([r.label for r in records[-5000:]])
    raw = sampled.lr.learner.predict_proba_many(batch.indices, batch.values)
    assert calibration_ratio(y, raw) > 2.0


@pytest.mark.skipif(not CRITEO.exists(), reason="../shared/data not present")
def test_bad_rows_are_counted_not_fatal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ADENGINE_REPLAY_GBDT_WARMUP", "500")
    lines = CRITEO.read_text().splitlines()[:1500]
    lines.insert(10, "1\t2\t3")  # wrong column count
    lines.insert(20, "\t".join(["0", "x"] + lines[0].split("\t")[2:]))  # non-numeric I1
    broken = tmp_path / "broken.tsv"
    broken.write_text("\n".join(lines) + "\n")
    code = main(
        [
            "replay",
            "--data",
            str(broken),
            "--format",
            "criteo",
            "--json",
            "--quiet",
            "--no-vw",
            "--plot",
            str(tmp_path / "p.png"),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bad_rows"] == {"column_count": 1, "non_numeric": 1}
    assert result["rows"] == 1500


@pytest.mark.skipif(not CRITEO.exists(), reason="../shared/data not present")
def test_replay_reads_real_log_in_file_order():
    settings = small_settings()
    records = list(read_log(CRITEO, "criteo", limit=2000))
    result = Replay(settings, SCHEMAS["criteo"], with_vw=False).run(records)
    assert result.n_rows == 2000
    assert all(0.5 < m["ne"] < 1.2 for m in result.metrics.values())


def test_missing_file_is_a_clear_error(capsys):
    assert main(["replay", "--data", "/nonexistent/log.tsv"]) == 2
    assert "no such file" in capsys.readouterr().err
