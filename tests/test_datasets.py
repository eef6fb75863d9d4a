"""Tests for engine.datasets: real-log readers, bad-row accounting, synthetic ground truth."""

from __future__ import annotations

import calendar
import doctest
import gzip
import math
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from engine import datasets
from engine.datasets import (
    SCHEMAS,
    SYNTHETIC_SCHEMA,
    BadRows,
    LogRecord,
    detect_format,
    read_log,
    synthetic_log,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# file, format, rows, positive rate from the data README, tolerance on the rate
REAL = {
    "criteo": ("criteo/criteo_dac_rows_1_8000.tsv", 8000, 0.216, 0.001),
    "avazu": ("avazu/avazu_rows_1_7000.csv", 7000, 0.17, 0.005),
    "talkingdata": ("talkingdata/talkingdata_2017-11-06_to_08.csv", 71439, 0.0024, 0.0001),
}


def _path(fmt: str) -> Path:
    path = DATA / REAL[fmt][0]
    if not path.is_file():
        pytest.skip(f"real data not available: {path}")
    return path


@cache
def _read_real(fmt: str) -> tuple[tuple[LogRecord, ...], BadRows]:
    bad = BadRows()
    return tuple(read_log(_path(fmt), fmt, bad_rows=bad)), bad


def _utc(*args: int) -> float:
    """Epoch seconds of a UTC date and time given as (year, month, day[, h[, m[, s]]])."""
    return float(calendar.timegm((*args, 0, 0, 0)[:6]))


CRITEO_GOOD = "1\t5\t-1" + "\t" * 12 + "\t".join(["68fd1e64"] * 25 + [""]) + "\n"
AVAZU_HEADER = ",".join(datasets.AVAZU_COLUMNS) + "\n"
AVAZU_GOOD = "1,{label},14102113,1005,0,1fbe01fe,f3845767,28905ebd,ecad2386,7801e8d9,"
AVAZU_GOOD += "07d7df22,a99f214a,ddd2926e,44956a24,1,2,15706,320,50,1722,0,35,-1,79\n"
TD_HEADER = "ip,app,device,os,channel,click_time,attributed_time,is_attributed\r\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, newline="")
    return path


# --------------------------------------------------------------------------- real logs


@pytest.mark.parametrize("fmt", sorted(REAL))
def test_real_log_rows_and_positive_rate(fmt):
    records, bad = _read_real(fmt)
    _, rows, rate, tol = REAL[fmt]
    assert bad.total == 0, str(bad)
    assert len(records) == rows
    assert [r.row for r in records] == list(range(1, rows + 1))
    assert abs(np.mean([r.label for r in records]) - rate) <= tol
    assert {r.label for r in records} == {0, 1}
    assert all(r.p_true is None for r in records)
    fields = set(SCHEMAS[fmt].fields)
    assert all(r.fields.keys() == fields for r in records)
    ts = np.array([r.ts for r in records])
    assert np.all(np.diff(ts) >= 0), "rows are in time order"


def test_criteo_value_types():
    records, _ = _read_real("criteo")
    schema = SCHEMAS["criteo"]
    assert schema.numeric == tuple(f"I{i}" for i in range(1, 14))
    assert schema.categorical == tuple(f"C{i}" for i in range(1, 27))
    numeric = [r.fields[name] for r in records for name in schema.numeric]
    categorical = [r.fields[name] for r in records for name in schema.categorical]
    assert all(v is None or type(v) is float for v in numeric)
    assert all(v is None or (type(v) is str and len(v) == 8) for v in categorical)
    assert None in numeric and None in categorical  # empties are missing, not "" or 0
    assert min(v for v in numeric if v is not None) < 0  # negative counts survive
    assert records[0].fields["I5"] == 1382.0 and records[0].fields["C22"] is None
    assert [r.ts for r in records[:3]] == [1.0, 2.0, 3.0]


def test_avazu_derived_time_fields():
    records, _ = _read_real("avazu")
    assert all(0 <= int(r.fields["hour_of_day"]) <= 23 for r in records)
    # The sample is the hour 14102100: 2014-10-21 00h UTC, a Tuesday.
    assert {r.fields["hour_of_day"] for r in records} == {"0"}
    assert {r.fields["weekday"] for r in records} == {"1"}
    assert {r.ts for r in records} == {_utc(2014, 10, 21)}
    for name in ("id", "click", "hour"):
        assert name not in SCHEMAS["avazu"].fields
    assert records[0].fields["site_id"] == "1fbe01fe" and records[0].fields["C20"] == "-1"


def test_talkingdata_hides_attributed_time():
    records, _ = _read_real("talkingdata")
    assert "attributed_time" not in SCHEMAS["talkingdata"].fields
    assert all("attributed_time" not in r.fields for r in records)
    assert all(isinstance(v, str) for r in records for v in r.fields.values())
    assert sum(r.label for r in records) == 168
    first = records[0]
    assert first.ts == _utc(2017, 11, 6, 16)  # 2017-11-06 16:00:00, read as UTC
    assert first.fields["hour_of_day"] == "16" and first.fields["ip"] == "48646"
    assert all(int(r.fields["hour_of_day"]) == int(r.ts // 3600) % 24 for r in records[::997])


@pytest.mark.parametrize("fmt", sorted(REAL))
def test_detect_format_real(fmt):
    assert detect_format(_path(fmt)) == fmt
    assert next(read_log(_path(fmt), "auto")) == _read_real(fmt)[0][0]


# --------------------------------------------------------------------------- bad rows


def test_criteo_bad_rows_counted_and_neighbours_kept(tmp_path):
    lines = [
        CRITEO_GOOD,
        "0\t1\t2\n",  # wrong column count
        CRITEO_GOOD.replace("\t5\t", "\tfive\t", 1),  # non-numeric I1
        "2" + CRITEO_GOOD[1:],  # bad label
        CRITEO_GOOD.replace("1\t", "0\t", 1),
        CRITEO_GOOD[:-1] + "\t\n",  # 41 columns (trailing tab)
    ]
    path = _write(tmp_path, "log.tsv", "".join(lines))
    bad = BadRows()
    records = list(read_log(path, "criteo", bad_rows=bad))
    assert [(r.row, r.label, r.ts) for r in records] == [(1, 1, 1.0), (5, 0, 5.0)]
    assert records[0].fields["I2"] == -1.0 and records[0].fields["I3"] is None
    assert records[0].fields["C1"] == "68fd1e64" and records[0].fields["C26"] is None
    assert bad.counts == {"column_count": 2, "non_numeric": 1, "bad_label": 1}
    assert bad.total == 4
    assert bad.samples[0] == (2, "wrong column count (got 3, expected 40)")
    assert bad.samples[1] == (3, "non-numeric value 'five' in I1")
    assert bad.samples[2][0] == 4 and "bad label '2'" in bad.samples[2][1]
    assert bad.samples[3][0] == 6
    text = str(bad)
    assert text.startswith("4 bad rows") and "non_numeric: 1" in text and "row 2:" in text


def test_avazu_and_talkingdata_bad_rows(tmp_path):
    avazu = _write(
        tmp_path,
        "a.csv",
        AVAZU_HEADER
        + AVAZU_GOOD.format(label=0)
        + AVAZU_GOOD.format(label=1).replace("14102113", "14109913")  # day 99
        + AVAZU_GOOD.format(label="yes")
        + "1,0,14102113\n"
        + AVAZU_GOOD.format(label=1),
    )
    bad = BadRows()
    records = list(read_log(avazu, "avazu", bad))
    assert [(r.row, r.label) for r in records] == [(1, 0), (5, 1)]
    assert records[0].ts == _utc(2014, 10, 21, 13) and records[0].fields["hour_of_day"] == "13"
    assert bad.counts == {"bad_time": 1, "bad_label": 1, "column_count": 1}
    assert [row for row, _ in bad.samples] == [2, 3, 4]

    td = _write(
        tmp_path,
        "t.csv",
        TD_HEADER
        + "1,2,3,4,5,2017-11-07 09:30:00,2017-11-07 09:31:00,1\r\n"
        + "1,2,3,4,5,2017-11-07 25:30:00,,0\r\n"
        + "1,2,3,4,5,2017-11-07,,0\r\n"
        + "1,2,3,4,5,2017-11-07 09:30:01,,x\r\n"
        + "1,2,3,4,5\r\n"
        + "7,2,3,4,5,2017-11-07 09:30:02,,0\r\n",
    )
    bad = BadRows()
    records = list(read_log(td, "talkingdata", bad))
    assert [(r.row, r.label, r.ts) for r in records] == [
        (1, 1, _utc(2017, 11, 7, 9, 30)),
        (6, 0, _utc(2017, 11, 7, 9, 30, 2)),
    ]
    assert records[0].fields == {
        "ip": "1", "app": "2", "device": "3", "os": "4", "channel": "5", "hour_of_day": "9",
    }  # fmt: skip
    assert bad.counts == {"bad_time": 2, "bad_label": 1, "column_count": 1}


def test_bad_rows_samples_are_capped_and_warned_without_counter(tmp_path):
    path = _write(tmp_path, "log.tsv", "x\n" * 30 + CRITEO_GOOD)
    bad = BadRows()
    assert [r.row for r in read_log(path, "criteo", bad)] == [31]
    assert bad.total == 30 and len(bad.samples) == 20
    with pytest.warns(UserWarning, match="30 bad rows"):
        assert len(list(read_log(path, "criteo"))) == 1
    assert str(BadRows()) == "no bad rows"


def test_header_mismatch_raises(tmp_path):
    path = _write(tmp_path, "a.csv", "id,clicks,hour\n1,0,14102100\n")
    with pytest.raises(ValueError, match="avazu"):
        list(read_log(path, "avazu"))


# --------------------------------------------------------------------------- options


def test_limit(tmp_path):
    path = _write(tmp_path, "log.tsv", CRITEO_GOOD + "bad\n" + CRITEO_GOOD * 5)
    assert [r.row for r in read_log(path, "criteo", BadRows(), limit=3)] == [1, 3, 4]
    assert list(read_log(path, "criteo", BadRows(), limit=0)) == []
    assert len(list(read_log(path, "criteo", BadRows(), limit=100))) == 6
    with pytest.raises(ValueError, match="limit"):
        read_log(path, "criteo", limit=-1)


def test_limit_real():
    records = list(read_log(_path("talkingdata"), "talkingdata", limit=25))
    assert [r.row for r in records] == list(range(1, 26))


def test_unknown_format_names_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="criteo.*avazu.*talkingdata"):
        read_log(tmp_path / "x.csv", "parquet")


def test_detect_format_temp_files(tmp_path):
    criteo = _write(tmp_path, "c.tsv", CRITEO_GOOD)
    avazu = _write(tmp_path, "a.csv", AVAZU_HEADER + AVAZU_GOOD.format(label=1))
    td = _write(tmp_path, "t.csv", TD_HEADER)
    assert detect_format(criteo) == "criteo"
    assert detect_format(avazu) == "avazu"
    assert detect_format(td) == "talkingdata"
    gz = tmp_path / "c.tsv.gz"
    gz.write_bytes(gzip.compress(CRITEO_GOOD.encode()))
    assert detect_format(gz) == "criteo"
    assert [r.fields["I1"] for r in read_log(gz, "auto")] == [5.0]
    for text in ("a,b,c\n1,2,3\n", "1\t2\t3\n", ""):
        with pytest.raises(ValueError, match="cannot tell"):
            detect_format(_write(tmp_path, "junk.txt", text))


# --------------------------------------------------------------------------- synthetic


@cache
def _synthetic_50k() -> tuple[LogRecord, ...]:
    return tuple(synthetic_log(50_000, seed=7))


def test_synthetic_deterministic_and_seeded():
    a = list(synthetic_log(1500, seed=3))
    assert a == list(synthetic_log(1500, seed=3))
    assert a[:700] == list(synthetic_log(700, seed=3))  # prefix-stable
    b = list(synthetic_log(1500, seed=4))
    assert [r.label for r in a] != [r.label for r in b]
    assert [r.fields for r in a] != [r.fields for r in b]
    assert list(synthetic_log(0)) == []
    with pytest.raises(ValueError):
        synthetic_log(-1)


def test_synthetic_shape():
    records = _synthetic_50k()
    assert [r.row for r in records[:5]] == [1, 2, 3, 4, 5]
    assert SCHEMAS["synthetic"] is SYNTHETIC_SCHEMA
    names = set(SYNTHETIC_SCHEMA.fields)
    assert {"user_id", "age_bucket", "device", "hour_of_day", "ad_id", "category"} <= names
    ts = np.array([r.ts for r in records])
    assert np.all(np.diff(ts) > 0)
    assert 0.3 < np.mean(np.diff(ts)) < 0.7
    for r in records[::499]:
        assert r.fields.keys() == names
        categorical = [r.fields[k] for k in SYNTHETIC_SCHEMA.categorical]
        numeric = [r.fields[k] for k in SYNTHETIC_SCHEMA.numeric]
        assert all(v is None or type(v) is str for v in categorical)
        assert all(v is None or type(v) is float for v in numeric)
        assert int(r.fields["hour_of_day"]) == int(r.ts // 3600) % 24
        assert r.label in (0, 1) and 0.0 < r.p_true < 1.0
    assert len({r.fields["user_id"] for r in records}) > 1000
    assert len({r.fields["ad_id"] for r in records}) > 250
    assert any(r.fields["user_recency_days"] is None for r in records)


def test_synthetic_ctr_and_oracle_is_informative():
    records = _synthetic_50k()
    y = np.array([r.label for r in records], dtype=float)
    p = np.array([r.p_true for r in records])
    ctr = y.mean()
    assert 0.03 <= ctr <= 0.06
    assert abs(p.mean() - ctr) < 0.005  # labels really are Bernoulli(p_true)
    base_entropy = -(ctr * math.log(ctr) + (1 - ctr) * math.log(1 - ctr))
    oracle = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    assert oracle / base_entropy < 0.9


def _fit_deviance(x: np.ndarray, clicks: np.ndarray, trials: np.ndarray) -> float:
    """Binomial deviance of a logistic model (Newton's method) on aggregated cells."""
    x = np.column_stack([np.ones(len(x)), x])
    beta = np.zeros(x.shape[1])
    beta[0] = math.log(clicks.sum() / (trials.sum() - clicks.sum()))
    for _ in range(30):
        p = 1.0 / (1.0 + np.exp(-x @ beta))
        hess = x.T @ (x * (trials * p * (1 - p))[:, None]) + 1e-6 * np.eye(x.shape[1])
        beta += np.linalg.solve(hess, x.T @ (clicks - trials * p))
    fit = trials / (1.0 + np.exp(-x @ beta))
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = np.where(clicks > 0, clicks * np.log(clicks / fit), 0.0) + np.where(
            trials > clicks, (trials - clicks) * np.log((trials - clicks) / (trials - fit)), 0.0
        )
    return 2.0 * float(dev.sum())


def _interaction_lr(records, left: str, right: str, extra=None) -> tuple[float, int]:
    """Likelihood-ratio statistic of main effects of ``left`` and ``right`` against
    (main effects + ``extra`` interaction columns, default: the saturated table).

    Returns (statistic, degrees of freedom); under "main effects only" it would be
    about chi-square(df), i.e. close to df.
    """
    a_levels = sorted({str(r.fields[left]) for r in records})
    b_levels = sorted({str(r.fields[right]) for r in records})
    a = np.array([a_levels.index(str(r.fields[left])) for r in records])
    b = np.array([b_levels.index(str(r.fields[right])) for r in records])
    y = np.array([r.label for r in records])
    cells = a * len(b_levels) + b
    trials = np.bincount(cells, minlength=len(a_levels) * len(b_levels)).astype(float)
    clicks = np.bincount(cells, weights=y, minlength=len(trials))
    ca, cb = np.divmod(np.arange(len(trials)), len(b_levels))
    keep = trials > 0
    main = np.column_stack(
        [ca == i for i in range(1, len(a_levels))] + [cb == j for j in range(1, len(b_levels))]
    ).astype(float)
    if extra is None:
        dev_full, df = 0.0, int(keep.sum()) - 1 - main.shape[1]
    else:
        inter = np.column_stack(extra(np.array(a_levels)[ca], np.array(b_levels)[cb])).astype(float)
        dev_full = _fit_deviance(np.hstack([main, inter])[keep], clicks[keep], trials[keep])
        df = inter.shape[1]
    dev_main = _fit_deviance(main[keep], clicks[keep], trials[keep])
    return dev_main - dev_full, df


def test_synthetic_needs_interactions():
    """Main effects alone cannot explain the clicks: specific cells deviate."""
    records = _synthetic_50k()

    # XOR-like: gender x (video or story placement), read off the 2x2 table directly.
    known = [r for r in records if r.fields["gender"] is not None]
    table = np.zeros((2, 2, 2))  # female?, visual?, (clicks, trials)
    for r in known:
        f, v = r.fields["gender"] == "f", r.fields["placement"] in ("video", "story")
        table[int(f), int(v)] += (r.label, 1)
    logit = np.log(table[..., 0] / (table[..., 1] - table[..., 0]))
    contrast = logit[1, 1] - logit[1, 0] - logit[0, 1] + logit[0, 0]
    se = math.sqrt(np.sum(1 / table[..., 0] + 1 / (table[..., 1] - table[..., 0])))
    assert contrast < -8 * se  # main effects only would give 0 +- se (true value: -2)

    # Interest == category: one "match" column explains far more than chance would.
    stat, df = _interaction_lr(records, "interest_1", "category", extra=lambda i, c: [i == c])
    assert df == 1 and stat > 100  # chi-square(1) is above 11 with probability 0.001

    # Age bucket x category affinity: the main-effects table misfits badly.
    stat, df = _interaction_lr(records, "age_bucket", "category")
    assert df == 70 and stat > 3 * df  # chi-square(70) is above 112 w.p. 0.001


def test_module_doctest():
    result = doctest.testmod(datasets)
    assert result.attempted > 0 and result.failed == 0
