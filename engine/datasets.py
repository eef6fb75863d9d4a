"""Click-log readers: turn a public ad-click log into a stream of uniform records.

Every reader yields :class:`LogRecord` s in file order. A record carries its 1-based
data-line number (header excluded), a 0/1 ``label``, an event time ``ts`` in seconds
and a flat ``fields`` mapping (categorical values as ``str``, numeric values as
``float``, missing values as ``None``). Which fields a format has is described by its
:class:`Schema` in :data:`SCHEMAS`.

Supported formats (:func:`read_log`, :func:`detect_format`):

``criteo``
    Criteo Display Advertising Challenge: tab separated, no header, 40 columns
    ``label, I1..I13, C1..C26``. ``I*`` are integer counts (may be empty or negative)
    and become floats; ``C*`` are 8-hex hashed categoricals. The file has no time
    column, so ``ts`` is the row number (rows are in time order).
``avazu``
    Avazu CTR Prediction: CSV with header ``id,click,hour,C1,banner_pos,...,C21``.
    Label ``click``; ``hour`` is ``YYMMDDHH`` (read as UTC) and gives ``ts`` (the start
    of that hour, so all rows of one hour share a timestamp). Categoricals are every
    column except ``id``, ``click`` and ``hour``, plus two derived fields:
    ``hour_of_day`` (``"0"``..``"23"``, from ``hour``) and ``weekday`` (``"0"`` =
    Monday .. ``"6"`` = Sunday, from the date in ``hour``).
``talkingdata``
    TalkingData AdTracking: CSV with header
    ``ip,app,device,os,channel,click_time,attributed_time,is_attributed``. Label
    ``is_attributed``; ``ts`` is ``click_time`` read as UTC. Categoricals are ``ip, app,
    device, os, channel`` plus the derived ``hour_of_day`` (UTC hour of ``click_time``).
    ``attributed_time`` is never read into a record: it is only set for positives, so it
    would leak the label.

Invalid rows never stop a read and are never dropped silently: each is counted by
reason in a :class:`BadRows` (``column_count``, ``non_numeric``, ``bad_label``,
``bad_time``) with the first few samples kept for the error report.

:func:`synthetic_log` generates a seeded click log from a hidden ground-truth model
(users, contexts and ads with random effects and non-linear interactions) and records
the true click probability ``p_true`` on every record, so the oracle normalised
entropy (the floor no model can beat) is known.

>>> import tempfile, pathlib
>>> from engine.datasets import BadRows, read_log, synthetic_log, SYNTHETIC_SCHEMA
>>> path = pathlib.Path(tempfile.mkdtemp()) / "tiny.tsv"
>>> good = "1\\t5\\t-1" + "\\t" * 12 + "\\t".join(["68fd1e64"] * 26) + "\\n"
>>> _ = path.write_text(good + "0\\tnot-a-number\\n" + good)
>>> bad = BadRows()
>>> records = list(read_log(path, "criteo", bad_rows=bad))
>>> [(r.row, r.label, r.fields["I1"], r.fields["I2"], r.fields["I3"]) for r in records]
[(1, 1, 5.0, -1.0, None), (3, 1, 5.0, -1.0, None)]
>>> bad.counts
{'column_count': 1}
>>> logs = list(synthetic_log(1000, seed=1))
>>> len(logs), logs[0].row, set(logs[0].fields) == set(SYNTHETIC_SCHEMA.fields)
(1000, 1, True)
>>> all(0.0 < r.p_true < 1.0 for r in logs)
True
"""

from __future__ import annotations

import calendar
import csv
import datetime as _dt
import gzip
import io
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

__all__ = [
    "SCHEMAS",
    "SYNTHETIC_SCHEMA",
    "BadRows",
    "LogRecord",
    "Schema",
    "detect_format",
    "read_log",
    "synthetic_log",
]

FieldValue = str | float | None


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One logged event.

    ``row`` is the 1-based data-line number in the source (header excluded); ``ts`` the
    event time in seconds; ``fields`` maps field name to ``str`` (categorical),
    ``float`` (numeric) or ``None`` (missing); ``p_true`` is the ground-truth click
    probability, known only for synthetic data.
    """

    row: int
    label: int
    ts: float
    fields: dict[str, FieldValue]
    p_true: float | None = None


@dataclass(frozen=True)
class Schema:
    """The fields of one log format."""

    name: str
    categorical: tuple[str, ...]
    numeric: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return self.categorical + self.numeric


@dataclass
class BadRows:
    """Invalid rows met while reading: counts per reason and the first samples.

    ``counts`` maps a short reason key (``column_count``, ``non_numeric``,
    ``bad_label``, ``bad_time``) to a count; ``samples`` holds ``(row, message)`` for
    the first :attr:`max_samples` bad rows, e.g. ``(7, "wrong column count (got 3,
    expected 40)")``.
    """

    counts: dict[str, int] = field(default_factory=dict)
    samples: list[tuple[int, str]] = field(default_factory=list)
    max_samples: int = 20

    def add(self, row: int, reason: str, message: str) -> None:
        """Count one bad row under ``reason``; keep ``message`` among the first samples."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.samples) < self.max_samples:
            self.samples.append((row, message))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __str__(self) -> str:
        if not self.counts:
            return "no bad rows"
        by_reason = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        shown = "; ".join(f"row {row}: {msg}" for row, msg in self.samples[:5])
        more = "; ..." if self.total > 5 else ""
        return f"{self.total} bad rows ({by_reason}); first: {shown}{more}"


# --------------------------------------------------------------------------- schemas

CRITEO_NUMERIC = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
CRITEO_COLUMNS = ("label", *CRITEO_NUMERIC, *CRITEO_CATEGORICAL)

AVAZU_COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category",
    "app_id", "app_domain", "app_category", "device_id", "device_ip", "device_model",
    "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip
_AVAZU_RAW_CATEGORICAL = AVAZU_COLUMNS[3:]

TALKINGDATA_COLUMNS = (
    "ip", "app", "device", "os", "channel", "click_time", "attributed_time", "is_attributed",
)  # fmt: skip
_TALKINGDATA_RAW_CATEGORICAL = ("ip", "app", "device", "os", "channel")

# Synthetic vocabularies (the ground-truth model is in :func:`synthetic_log`).
_N_USERS, _N_ADS, _N_ADVERTISERS = 2000, 300, 50
_AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
_GENDERS = ("f", "m")
_REGIONS = tuple(f"r{i:02d}" for i in range(20))
_DEVICES = ("ios", "android", "desktop", "tablet")
_CATEGORIES = (
    "auto", "beauty", "books", "electronics", "fashion", "finance", "food", "games",
    "health", "home", "music", "pets", "sports", "toys", "travel",
)  # fmt: skip
_PLACEMENTS = ("feed", "sidebar", "search", "video", "story")
_PAGE_CATEGORIES = (*_CATEGORIES, "news")
_SYNTHETIC_EPOCH = 1_704_067_200.0  # 2024-01-01T00:00:00Z
_SYNTHETIC_MEAN_GAP_S = 0.5
_SYNTHETIC_TARGET_CTR = 0.04
_SYNTHETIC_BLOCK = 10_000

SYNTHETIC_SCHEMA = Schema(
    name="synthetic",
    categorical=(
        "user_id", "age_bucket", "gender", "region", "device", "interest_1", "interest_2",
        "hour_of_day", "placement", "page_category", "ad_id", "advertiser", "category",
    ),
    numeric=("user_recency_days", "ad_age_days", "position"),
)  # fmt: skip

SCHEMAS: dict[str, Schema] = {
    "criteo": Schema("criteo", CRITEO_CATEGORICAL, CRITEO_NUMERIC),
    "avazu": Schema("avazu", (*_AVAZU_RAW_CATEGORICAL, "hour_of_day", "weekday")),
    "talkingdata": Schema("talkingdata", (*_TALKINGDATA_RAW_CATEGORICAL, "hour_of_day")),
    "synthetic": SYNTHETIC_SCHEMA,
}
_FILE_FORMATS = ("criteo", "avazu", "talkingdata")


# --------------------------------------------------------------------------- reading


def _open_text(path: Path) -> IO[str]:
    """Open a log as text for the csv module (``.gz`` transparently, BOM dropped)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 - closed by caller


def _short(value: str, limit: int = 30) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _checked_label(row: list[str], width: int, i_label: int, n: int, bad: BadRows) -> int | None:
    """The row's 0/1 label, or None after counting the row as bad (wrong width or label)."""
    if len(row) != width:
        bad.add(n, "column_count", f"wrong column count (got {len(row)}, expected {width})")
        return None
    value = row[i_label]
    if value == "0":
        return 0
    if value == "1":
        return 1
    bad.add(n, "bad_label", f"bad label {_short(value)} (expected 0 or 1)")
    return None


def _non_numeric_message(names: tuple[str, ...], values: list[str]) -> str:
    for name, value in zip(names, values, strict=True):
        try:
            int(value or "0")
        except ValueError:
            return f"non-numeric value {_short(value)} in {name}"
    return "non-numeric value"


def _header_index(header: list[str], required: tuple[str, ...], fmt: str, path: Path):
    """Column positions of ``required`` in ``header``; ValueError when one is missing."""
    names = [h.strip() for h in header]
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(
            f"{path}: header does not look like {fmt} (missing {', '.join(missing)}); "
            f"got {','.join(names)[:200]}"
        )
    return {c: names.index(c) for c in required}


def _read_criteo(rows: Iterator[list[str]], bad: BadRows) -> Iterator[LogRecord]:
    numeric, names = CRITEO_NUMERIC, CRITEO_NUMERIC + CRITEO_CATEGORICAL
    width = len(CRITEO_COLUMNS)
    n = 0
    for row in rows:
        n += 1
        label = _checked_label(row, width, 0, n, bad)
        if label is None:
            continue
        try:
            values: list[FieldValue] = [float(int(v)) if v else None for v in row[1:14]]
        except ValueError:
            bad.add(n, "non_numeric", _non_numeric_message(numeric, row[1:14]))
            continue
        values += [v or None for v in row[14:]]
        yield LogRecord(n, label, float(n), dict(zip(names, values, strict=True)), None)


def _avazu_hour(value: str, cache: dict[str, tuple[float, str, str]]):
    """``YYMMDDHH`` -> (epoch seconds UTC, hour_of_day, weekday), or None if invalid."""
    hit = cache.get(value)
    if hit is not None:
        return hit
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        when = _dt.datetime(
            2000 + int(value[:2]), int(value[2:4]), int(value[4:6]), int(value[6:8]),
            tzinfo=_dt.UTC,
        )  # fmt: skip
    except ValueError:
        return None
    out = (when.timestamp(), str(when.hour), str(when.weekday()))
    if len(cache) < 100_000:
        cache[value] = out
    return out


def _read_avazu(rows: Iterator[list[str]], bad: BadRows, path: Path) -> Iterator[LogRecord]:
    header = next(rows, None)
    if header is None:
        return
    index = _header_index(header, AVAZU_COLUMNS, "avazu", path)
    width = len(header)
    i_click, i_hour = index["click"], index["hour"]
    cat_names = _AVAZU_RAW_CATEGORICAL
    cat_index = [index[c] for c in cat_names]
    hours: dict[str, tuple[float, str, str]] = {}
    n = 0
    for row in rows:
        n += 1
        label = _checked_label(row, width, i_click, n, bad)
        if label is None:
            continue
        when = _avazu_hour(row[i_hour], hours)
        if when is None:
            bad.add(n, "bad_time", f"bad hour {_short(row[i_hour])} (expected YYMMDDHH)")
            continue
        fields: dict[str, FieldValue] = dict(
            zip(cat_names, [row[i] or None for i in cat_index], strict=True)
        )
        fields["hour_of_day"] = when[1]
        fields["weekday"] = when[2]
        yield LogRecord(n, label, when[0], fields, None)


def _click_time(value: str, days: dict[str, float]) -> float | None:
    """``YYYY-MM-DD HH:MM:SS`` (UTC) -> epoch seconds, or None if invalid."""
    if len(value) != 19 or value[10] != " " or value[13] != ":" or value[16] != ":":
        return None
    day = value[:10]
    start = days.get(day)
    if start is None:
        if day[4] != "-" or day[7] != "-" or not (day[:4] + day[5:7] + day[8:]).isdigit():
            return None
        try:
            date = _dt.date(int(day[:4]), int(day[5:7]), int(day[8:]))
            start = float(calendar.timegm(date.timetuple()))
        except ValueError:
            return None
        if len(days) < 100_000:
            days[day] = start
    hh, mm, ss = value[11:13], value[14:16], value[17:19]
    if not (hh + mm + ss).isdigit():
        return None
    h, m, s = int(hh), int(mm), int(ss)
    if h > 23 or m > 59 or s > 59:
        return None
    return start + 3600 * h + 60 * m + s


def _read_talkingdata(rows: Iterator[list[str]], bad: BadRows, path: Path) -> Iterator[LogRecord]:
    header = next(rows, None)
    if header is None:
        return
    required = (*_TALKINGDATA_RAW_CATEGORICAL, "click_time", "is_attributed")
    index = _header_index(header, required, "talkingdata", path)
    width = len(header)
    i_label, i_time = index["is_attributed"], index["click_time"]
    cat_names = _TALKINGDATA_RAW_CATEGORICAL
    cat_index = [index[c] for c in cat_names]
    days: dict[str, float] = {}
    n = 0
    for row in rows:
        n += 1
        label = _checked_label(row, width, i_label, n, bad)
        if label is None:
            continue
        text = row[i_time]
        ts = _click_time(text, days)
        if ts is None:
            message = f"bad click_time {_short(text)} (expected YYYY-MM-DD HH:MM:SS)"
            bad.add(n, "bad_time", message)
            continue
        fields: dict[str, FieldValue] = dict(
            zip(cat_names, [row[i] or None for i in cat_index], strict=True)
        )
        fields["hour_of_day"] = text[11:13].lstrip("0") or "0"
        yield LogRecord(n, label, ts, fields, None)


def read_log(
    path: str | Path,
    fmt: str,
    bad_rows: BadRows | None = None,
    limit: int | None = None,
) -> Iterator[LogRecord]:
    """Stream the records of the log at ``path`` in file order.

    ``fmt`` is ``"criteo"``, ``"avazu"``, ``"talkingdata"`` or ``"auto"`` (use
    :func:`detect_format`). Invalid rows are skipped and counted in ``bad_rows``; when
    no ``bad_rows`` is given and some rows were bad, a :class:`UserWarning` with the
    summary is emitted when the stream ends. ``limit`` stops after that many records
    have been yielded. ``.gz`` files are decompressed on the fly. A header that does
    not match the format raises :class:`ValueError` (on the first ``next``).
    """
    path = Path(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in _FILE_FORMATS:
        valid = ", ".join(repr(f) for f in (*_FILE_FORMATS, "auto"))
        raise ValueError(f"unknown log format {fmt!r}; valid formats are {valid}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return _stream(path, fmt, bad_rows, limit)


def _stream(
    path: Path, fmt: str, bad_rows: BadRows | None, limit: int | None
) -> Iterator[LogRecord]:
    bad = BadRows() if bad_rows is None else bad_rows
    before = bad.total
    if limit == 0:
        return
    try:
        with _open_text(path) as handle:
            if fmt == "criteo":
                rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
                records = _read_criteo(rows, bad)
            elif fmt == "avazu":
                records = _read_avazu(csv.reader(handle), bad, path)
            else:
                records = _read_talkingdata(csv.reader(handle), bad, path)
            if limit is None:
                yield from records
            else:
                for count, record in enumerate(records, start=1):
                    yield record
                    if count >= limit:
                        break
    finally:
        if bad_rows is None and bad.total > before:
            warnings.warn(f"{path}: skipped {bad}", stacklevel=2)


def detect_format(path: str | Path) -> str:
    """Guess a log's format from its first line (and extension).

    A header starting ``id,click`` is Avazu, one starting ``ip,app`` is TalkingData and a
    tab-separated first line with 40 columns (``.tsv``/``.txt`` or no header) is Criteo.
    Anything else raises :class:`ValueError`.
    """
    path = Path(path)
    with _open_text(path) as handle:
        first = handle.readline().rstrip("\r\n")
    lowered = first.lower().replace(" ", "")
    if lowered.startswith("id,click"):
        return "avazu"
    if lowered.startswith("ip,app"):
        return "talkingdata"
    if first.count("\t") == len(CRITEO_COLUMNS) - 1:
        return "criteo"
    raise ValueError(
        f"{path}: cannot tell the log format from its first line {_short(first, 60)}; "
        f"expected a 40-column TSV (criteo), a header starting 'id,click' (avazu) "
        f"or 'ip,app' (talkingdata)"
    )


# --------------------------------------------------------------------------- synthetic


@dataclass(frozen=True)
class _World:
    """Hidden ground truth of the synthetic log: entities and their effects."""

    user_p: np.ndarray
    user_age: np.ndarray
    user_gender: np.ndarray  # -1 = missing
    user_region: np.ndarray
    user_device: np.ndarray
    user_interest1: np.ndarray
    user_interest2: np.ndarray
    user_recency_mean: np.ndarray
    user_new: np.ndarray  # probability the recency is unknown
    user_effect: np.ndarray
    ad_p: np.ndarray
    ad_advertiser: np.ndarray
    ad_category: np.ndarray
    ad_base_age: np.ndarray
    ad_effect: np.ndarray
    advertiser_effect: np.ndarray
    region_effect: np.ndarray
    placement_effect: np.ndarray
    affinity: np.ndarray  # (age bucket, ad category) -> logit shift
    ads_by_category: np.ndarray  # ad ids sorted by category
    category_start: np.ndarray
    category_count: np.ndarray
    base: float = 0.0


def _make_world(rng: np.random.Generator) -> _World:
    n_cat = len(_CATEGORIES)
    activity = rng.lognormal(0.0, 1.0, _N_USERS)
    user_interest1 = rng.integers(0, n_cat, _N_USERS)
    user_interest2 = (user_interest1 + rng.integers(1, n_cat, _N_USERS)) % n_cat
    gender = rng.integers(0, 2, _N_USERS)
    gender[rng.random(_N_USERS) < 0.08] = -1
    advertiser_category = rng.integers(0, n_cat, _N_ADVERTISERS)
    ad_advertiser = rng.choice(_N_ADVERTISERS, _N_ADS, p=_normalise(rng.lognormal(0, 0.7, 50)))
    ad_category = np.where(
        rng.random(_N_ADS) < 0.8, advertiser_category[ad_advertiser], rng.integers(0, n_cat, _N_ADS)
    )
    ad_category[:n_cat] = np.arange(n_cat)  # every category has at least one ad
    order = np.argsort(ad_category, kind="stable")
    count = np.bincount(ad_category, minlength=n_cat)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    return _World(
        user_p=_normalise(activity),
        user_age=rng.choice(6, _N_USERS, p=[0.16, 0.28, 0.22, 0.15, 0.11, 0.08]),
        user_gender=gender,
        user_region=rng.choice(20, _N_USERS, p=_normalise(1.0 / np.arange(1, 21) ** 0.8)),
        user_device=rng.choice(4, _N_USERS, p=[0.35, 0.4, 0.2, 0.05]),
        user_interest1=user_interest1,
        user_interest2=user_interest2,
        user_recency_mean=rng.lognormal(1.0, 1.0, _N_USERS),
        user_new=np.where(rng.random(_N_USERS) < 0.1, 0.3, 0.01),
        user_effect=rng.normal(0.0, 0.5, _N_USERS),
        ad_p=_normalise(rng.lognormal(0.0, 0.8, _N_ADS)),
        ad_advertiser=ad_advertiser,
        ad_category=ad_category,
        ad_base_age=rng.exponential(20.0, _N_ADS),
        ad_effect=rng.normal(0.0, 0.4, _N_ADS),
        advertiser_effect=rng.normal(0.0, 0.3, _N_ADVERTISERS),
        region_effect=rng.normal(0.0, 0.2, len(_REGIONS)),
        placement_effect=np.array([0.0, -0.6, 0.5, 0.2, -0.1]),
        affinity=rng.normal(0.0, 0.7, (len(_AGE_BUCKETS), n_cat)),
        ads_by_category=order,
        category_start=start,
        category_count=count,
    )


def _normalise(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


@dataclass
class _Block:
    """One block of synthetic events as numpy arrays (``logit`` excludes the base)."""

    ts: np.ndarray
    user: np.ndarray
    device: np.ndarray
    hour: np.ndarray
    placement: np.ndarray
    page: np.ndarray
    ad: np.ndarray
    position: np.ndarray
    recency: np.ndarray  # NaN = unknown (new user)
    ad_age: np.ndarray
    logit: np.ndarray


def _draw_block(world: _World, rng: np.random.Generator, ts: np.ndarray) -> _Block:
    """Events at times ``ts`` and their ground-truth logits (without the base term).

    The logit is a sum of
    * random effects per user, ad, advertiser and region, a main effect per placement;
    * age bucket x ad category affinity (a dense random table);
    * interest match: +1.0 when the ad category is the user's first interest, +0.5 for
      the second; +0.4 when the page category matches the ad category;
    * device x hour: mobile at night (21h-6h) +0.5, desktop in office hours (9h-18h)
      +0.4, desktop at night -0.4;
    * thresholds on numbers: position <= 2 +0.5, >= 5 -0.5; user recency < 1 day +0.4,
      > 14 days -0.6, unknown -0.3; ad age < 2 days +0.5 (novelty), > 45 days -0.4
      (fatigue);
    * an XOR: +0.5 when exactly one of "gender is f" and "placement is video or story"
      holds, -0.5 when both or neither (users of unknown gender: 0).
    """
    n = len(ts)
    user = rng.choice(_N_USERS, n, p=world.user_p)
    device = np.where(rng.random(n) < 0.8, world.user_device[user], rng.integers(0, 4, n))
    hour = (((ts - _SYNTHETIC_EPOCH) // 3600) % 24).astype(np.int64)
    placement = rng.choice(5, n, p=[0.4, 0.15, 0.2, 0.15, 0.1])
    interest1 = world.user_interest1[user]
    page = np.where(rng.random(n) < 0.3, interest1, rng.integers(0, len(_PAGE_CATEGORIES), n))
    # Ad choice: a quarter of the traffic is targeted at the user's first interest.
    targeted = rng.random(n) < 0.25
    random_ad = rng.choice(_N_ADS, n, p=world.ad_p)
    pick = np.floor(rng.random(n) * world.category_count[interest1]).astype(np.int64)
    targeted_ad = world.ads_by_category[world.category_start[interest1] + pick]
    ad = np.where(targeted, targeted_ad, random_ad)
    position = np.minimum(rng.geometric(0.35, n), 8)
    recency = rng.exponential(world.user_recency_mean[user])
    recency[rng.random(n) < world.user_new[user]] = np.nan
    ad_age = world.ad_base_age[ad] + (ts - _SYNTHETIC_EPOCH) / 86_400.0

    category = world.ad_category[ad]
    gender = world.user_gender[user]
    z = (
        world.user_effect[user]
        + world.ad_effect[ad]
        + world.advertiser_effect[world.ad_advertiser[ad]]
        + world.region_effect[world.user_region[user]]
        + world.placement_effect[placement]
        + world.affinity[world.user_age[user], category]
        + 1.0 * (interest1 == category)
        + 0.5 * (world.user_interest2[user] == category)
        + 0.4 * (page == category)
    )
    mobile = device <= 1
    night = (hour >= 21) | (hour < 6)
    office = (hour >= 9) & (hour < 18)
    desktop = device == 2
    z += 0.5 * (mobile & night) + 0.4 * (desktop & office) - 0.4 * (desktop & night)
    z += 0.5 * (position <= 2) - 0.5 * (position >= 5)
    with np.errstate(invalid="ignore"):
        z += 0.4 * (recency < 1.0) - 0.6 * (recency > 14.0)
    z -= 0.3 * np.isnan(recency)
    z += 0.5 * (ad_age < 2.0) - 0.4 * (ad_age > 45.0)
    visual = placement >= 3
    xor = np.where((gender == 0) != visual, 0.5, -0.5)
    z += np.where(gender >= 0, xor, 0.0)
    return _Block(ts, user, device, hour, placement, page, ad, position, recency, ad_age, z)


def _calibrated_base(world: _World, rng: np.random.Generator) -> float:
    """Base logit giving the target mean CTR over a day of traffic (bisection)."""
    ts = _SYNTHETIC_EPOCH + np.sort(rng.random(40_000)) * 86_400.0
    z = _draw_block(world, rng, ts).logit
    lo, hi = -15.0, 5.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if np.mean(1.0 / (1.0 + np.exp(-(mid + z)))) < _SYNTHETIC_TARGET_CTR:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def synthetic_log(n: int, seed: int = 0) -> Iterator[LogRecord]:
    """``n`` synthetic ad-click events from a hidden ground-truth model, in time order.

    Fields are in :data:`SYNTHETIC_SCHEMA`: the user (``user_id`` among 2000 with
    Zipf-like activity, ``age_bucket``, ``gender`` (None for ~8% of users), ``region``
    among 20, ``device``, ``interest_1``/``interest_2`` among the 15 ad categories),
    the context (``hour_of_day`` of ``ts``, ``placement``, ``page_category``), the ad
    (``ad_id`` among 300, ``advertiser`` among 50, ``category`` among 15) and numbers
    (``user_recency_days``, None for new users; ``ad_age_days``, growing with time;
    ``position`` 1..8). The true click probability ``p_true`` is the logistic of the
    terms listed in :func:`_draw_block` plus a base calibrated so that the mean CTR over
    a day of traffic is about 4%; ``label`` is Bernoulli(``p_true``). Events arrive
    every 0.5 s on average (exponential gaps) from 2024-01-01T00:00:00Z, so ``ts``
    strictly increases and 50k events span about 7 hours.

    The output is deterministic per ``seed``, and ``synthetic_log(m, seed)`` is a prefix
    of ``synthetic_log(n, seed)`` for ``m <= n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _synthetic(n, seed)


def _synthetic(n: int, seed: int) -> Iterator[LogRecord]:
    world_seq, calib_seq, event_seq = np.random.SeedSequence([seed, 0x5EED]).spawn(3)
    world = _make_world(np.random.default_rng(world_seq))
    base = _calibrated_base(world, np.random.default_rng(calib_seq))
    rng = np.random.default_rng(event_seq)

    age_names = np.array(_AGE_BUCKETS, dtype=object)
    gender_names = np.array([*_GENDERS, None], dtype=object)  # index -1 -> None
    region_names = np.array(_REGIONS, dtype=object)
    device_names = np.array(_DEVICES, dtype=object)
    category_names = np.array(_CATEGORIES, dtype=object)
    page_names = np.array(_PAGE_CATEGORIES, dtype=object)
    placement_names = np.array(_PLACEMENTS, dtype=object)
    hour_names = np.array([str(h) for h in range(24)], dtype=object)
    user_names = np.array([f"u{i:04d}" for i in range(_N_USERS)], dtype=object)
    ad_names = np.array([f"a{i:03d}" for i in range(_N_ADS)], dtype=object)
    advertiser_names = np.array([f"adv{i:02d}" for i in range(_N_ADVERTISERS)], dtype=object)
    names = SYNTHETIC_SCHEMA.fields

    last_ts = _SYNTHETIC_EPOCH
    done = 0
    while done < n:
        gaps = 0.001 + rng.exponential(_SYNTHETIC_MEAN_GAP_S - 0.001, _SYNTHETIC_BLOCK)
        ts = last_ts + np.cumsum(gaps)
        last_ts = float(ts[-1])
        b = _draw_block(world, rng, ts)
        p = 1.0 / (1.0 + np.exp(-(base + b.logit)))
        labels = (rng.random(_SYNTHETIC_BLOCK) < p).astype(np.int64)
        take = min(_SYNTHETIC_BLOCK, n - done)
        u, a = b.user[:take], b.ad[:take]
        recency = b.recency[:take].tolist()
        recency = [None if math.isnan(r) else r for r in recency]
        columns = (
            user_names[u],
            age_names[world.user_age[u]],
            gender_names[world.user_gender[u]],
            region_names[world.user_region[u]],
            device_names[b.device[:take]],
            category_names[world.user_interest1[u]],
            category_names[world.user_interest2[u]],
            hour_names[b.hour[:take]],
            placement_names[b.placement[:take]],
            page_names[b.page[:take]],
            ad_names[a],
            advertiser_names[world.ad_advertiser[a]],
            category_names[world.ad_category[a]],
        )
        cols = [c.tolist() for c in columns]
        cols += [recency, b.ad_age[:take].tolist(), b.position[:take].astype(float).tolist()]
        rows = zip(
            ts[:take].tolist(),
            labels[:take].tolist(),
            p[:take].tolist(),
            zip(*cols, strict=True),
            strict=True,
        )
        for i, (t, y, pt, values) in enumerate(rows, start=done + 1):
            yield LogRecord(i, y, t, dict(zip(names, values, strict=True)), pt)
        done += take
