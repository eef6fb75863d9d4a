"""One feature pipeline for training and serving.

A record is a flat mapping of field -> value (categorical values are strings,
numeric values floats, missing values ``None``). The pipeline turns records into

* a sparse hashed matrix for the logistic regression (hashing trick): one token per
  categorical field, one bucket token per numeric field, one token per configured
  cross and a bias token; stored as fixed-width ``indices``/``values`` arrays, and
* a dense float matrix for the GBDT: numeric values as they are, then (optionally)
  categoricals as stable hashed codes that LightGBM treats as categories, then
  (with a :class:`ClickCounts` table) two counting features per categorical field.

Serving scores many candidate ads for one request: the fields shared by every
candidate (user, context) are hashed once and broadcast, each ad's own tokens are
cached by ad id, and crosses are mixed in numpy. Training calls the same code on
logged records, so both sides produce the same numbers by construction.

>>> spec = FeatureSpec(categorical=("device", "category"), numeric=("age_days",),
...                    crosses=(("device", "category"),), bits=18)
>>> pipeline = FeaturePipeline(spec)
>>> batch = pipeline.transform_many([{"device": "ios", "category": "shoes", "age_days": 3.0}])
>>> batch.indices.shape, batch.dense.shape
((1, 5), (1, 3))
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
MISSING = "\x00NA"
CATEGORY_CODE_BITS = 16  # LightGBM sizes arrays by the largest category code


def _splitmix(h: np.ndarray) -> np.ndarray:
    """Finalise 64-bit hashes (splitmix64) so that low bits are well mixed."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> _U64(30))) * _MIX1
        h = (h ^ (h >> _U64(27))) * _MIX2
        return h ^ (h >> _U64(31))


def cross_hash(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Order-sensitive 64-bit hash of two token hashes, vectorised."""
    with np.errstate(over="ignore"):
        return _splitmix(left * _GOLDEN + right)


def numeric_bucket(value: float | None) -> str:
    """Log-scale bucket of a number: fine near zero, coarse for large counts."""
    if value is None or math.isnan(value):
        return MISSING
    magnitude = math.floor(2.0 * math.log2(1.0 + abs(value)))
    return f"-{magnitude}" if value < 0 else str(magnitude)


@dataclass(frozen=True)
class FeatureSpec:
    """Which fields become features, and how many hash bits they share."""

    categorical: tuple[str, ...]
    numeric: tuple[str, ...] = ()
    crosses: tuple[tuple[str, str], ...] = ()
    bits: int = 20
    salt: str = "adengine-v1"

    def __post_init__(self):
        fields = set(self.categorical) | set(self.numeric)
        if len(fields) != len(self.categorical) + len(self.numeric):
            raise ValueError("a field is declared both categorical and numeric, or twice")
        for left, right in self.crosses:
            if left not in fields or right not in fields:
                raise ValueError(f"cross ({left}, {right}) names a field not in the spec")
        if not 8 <= self.bits <= 30:
            raise ValueError(f"bits must be within [8, 30], got {self.bits}")

    @property
    def fields(self) -> tuple[str, ...]:
        return self.categorical + self.numeric

    @property
    def width(self) -> int:
        """Sparse tokens per record: one per field, one per cross, one bias."""
        return len(self.fields) + len(self.crosses) + 1

    def restricted_to(self, available: Sequence[str], crosses=None) -> FeatureSpec:
        """Keep only crosses whose two fields exist (one crosses list serves all datasets)."""
        crosses = self.crosses if crosses is None else crosses
        present = set(available)
        kept = tuple((a, b) for a, b in crosses if a in present and b in present)
        return FeatureSpec(self.categorical, self.numeric, kept, self.bits, self.salt)


@dataclass(frozen=True)
class FeatureBatch:
    """Features of ``n`` records: sparse LR part and dense GBDT part, row-aligned."""

    indices: np.ndarray  # (n, width) int64 hashed coordinates
    values: np.ndarray  # (n, width) float64 feature values, each row of unit norm
    dense: np.ndarray  # (n, n_dense) float64 GBDT input, NaN = missing

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, rows) -> FeatureBatch:
        return FeatureBatch(self.indices[rows], self.values[rows], self.dense[rows])

    def with_extra(self, indices: np.ndarray, values: np.ndarray) -> FeatureBatch:
        """Append sparse columns (for example GBDT leaf tokens) to every row."""
        return FeatureBatch(
            np.hstack([self.indices, indices]), np.hstack([self.values, values]), self.dense
        )


def categorical_dense_columns(spec: FeatureSpec, category_codes: bool) -> list[int]:
    """Positions of the hashed category codes in the dense GBDT matrix (none without codes).

    The matrix is numeric fields, then (with codes) one code per categorical field, then
    (with counts) the counting columns, which are numbers, never categories.
    """
    if not category_codes:
        return []
    first = len(spec.numeric)
    return list(range(first, first + len(spec.categorical)))


class ClickCounts:
    """Progressive impression and click counts per hashed token ("historical" features).

    He et al. (2014) found counting features (how often a value was shown, how often
    it was clicked) to be the most informative GBDT inputs. Counts live in the LR's
    hashed coordinate space, so memory is fixed and collisions match the LR's. They
    are strictly past-only: :meth:`columns` reads the counts as they stand and
    :meth:`observe` adds examples once they have been learnt, so a record's counting
    features never include its own label.

    >>> counts = ClickCounts(bits=8, prior_strength=10.0)
    >>> counts.observe(np.array([[3], [3]]), np.array([1, 0]))
    >>> counts.columns(np.array([[3], [4]])).round(3).tolist()
    [[1.099, 0.5], [0.0, 0.5]]
    """

    def __init__(self, bits: int, prior_strength: float):
        self.prior_strength = prior_strength
        self.impressions = np.zeros(1 << bits, dtype=np.float64)
        self.clicks = np.zeros(1 << bits, dtype=np.float64)
        self.total_impressions = 0.0
        self.total_clicks = 0.0

    def columns(self, indices: np.ndarray) -> np.ndarray:
        """(n, 2k) features of (n, k) token coordinates: log1p(impressions), smoothed CTR.

        The CTR is shrunk towards the global CTR so far with ``prior_strength``
        pseudo-impressions, so rare values read as average rather than as 0 or 1.
        """
        impressions = self.impressions[indices]
        prior = (self.total_clicks + 1.0) / (self.total_impressions + 2.0)
        strength = self.prior_strength
        ctr = (self.clicks[indices] + strength * prior) / (impressions + strength)
        return np.hstack([np.log1p(impressions), ctr])

    def state_dict(self) -> dict[str, np.ndarray]:
        """The non-zero counts, for snapshots."""
        keys = np.flatnonzero(self.impressions)
        return {
            "count_keys": keys,
            "count_impressions": self.impressions[keys],
            "count_clicks": self.clicks[keys],
            "count_scalars": np.array([self.total_impressions, self.total_clicks]),
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        keys = state["count_keys"]
        if len(keys) and keys.max() >= len(self.impressions):
            raise ValueError("count state has coordinates beyond the hashed space")
        self.impressions[:] = 0.0
        self.clicks[:] = 0.0
        self.impressions[keys] = state["count_impressions"]
        self.clicks[keys] = state["count_clicks"]
        self.total_impressions, self.total_clicks = state["count_scalars"].tolist()

    def observe(self, indices: np.ndarray, y: np.ndarray) -> None:
        """Count learnt examples: each row of ``indices`` was shown, clicked if ``y``."""
        y = np.asarray(y, dtype=np.float64)
        np.add.at(self.impressions, indices, 1.0)
        np.add.at(self.clicks, indices, np.broadcast_to(y[:, None], indices.shape))
        self.total_impressions += len(y)
        self.total_clicks += float(y.sum())


class _AdRows:
    """Cached per-ad token and dense rows in growable arrays (one gather per request)."""

    def __init__(self, width: int, capacity: int):
        self.width, self.capacity = width, capacity
        self.clear()

    def clear(self) -> None:
        self.positions: dict[object, int] = {}
        self.tokens = np.empty((64, self.width), dtype=_U64)
        self.dense = np.empty((64, self.width), dtype=np.float64)
        self.last = np.empty(0, dtype=np.int64)

    def add(self, key, tokens: np.ndarray, dense: np.ndarray) -> int:
        row = len(self.positions)
        if row == len(self.tokens):
            self.tokens = np.vstack([self.tokens, np.empty_like(self.tokens)])
            self.dense = np.vstack([self.dense, np.empty_like(self.dense)])
        self.tokens[row], self.dense[row] = tokens, dense
        self.positions[key] = row
        return row


class FeaturePipeline:
    """Hashes records into :class:`FeatureBatch` es; shared by training and serving."""

    def __init__(
        self,
        spec: FeatureSpec,
        ad_cache_size: int = 100_000,
        counts: ClickCounts | None = None,
        category_codes: bool = True,
    ):
        self.spec = spec
        self.counts = counts
        self.category_codes = category_codes
        self.mask = (1 << spec.bits) - 1
        self._key = hashlib.blake2b(spec.salt.encode(), digest_size=16).digest()
        self._token_cache: dict[tuple[str, str], int] = {}
        self._ad_caches: dict[tuple[str, ...], _AdRows] = {}
        self._ad_cache_size = ad_cache_size
        self._field_pos = {name: i for i, name in enumerate(spec.fields)}
        self._cross_pos = np.array(
            [[self._field_pos[a], self._field_pos[b]] for a, b in spec.crosses], dtype=np.int64
        ).reshape(-1, 2)
        self._bias = self.token_hash("\x00bias", "1")
        n_cat = len(spec.categorical)
        self._count_cols = np.r_[np.arange(n_cat), len(spec.fields) + np.arange(len(spec.crosses))]

    # -- hashing -----------------------------------------------------------------------
    def token_hash(self, field: str, value: str) -> int:
        """Stable, salted 64-bit hash of one ``field=value`` token (cached)."""
        key = (field, value)
        cached = self._token_cache.get(key)
        if cached is None:
            digest = hashlib.blake2b(
                f"{field}\x1f{value}".encode(), digest_size=8, key=self._key
            ).digest()
            cached = int.from_bytes(digest, "little")
            if len(self._token_cache) < 2_000_000:
                self._token_cache[key] = cached
        return cached

    def hash_index(self, namespace: str, value: str) -> int:
        """Coordinate in the LR space of a token outside the record fields (e.g. a leaf)."""
        return self.token_hash(namespace, value) & self.mask

    def _field_tokens(self, record: Mapping, fields: Sequence[str]) -> np.ndarray:
        """64-bit token hashes of ``fields`` of one record."""
        numeric = set(self.spec.numeric)
        out = np.empty(len(fields), dtype=_U64)
        for j, name in enumerate(fields):
            value = record.get(name)
            if name in numeric:
                text = numeric_bucket(value)
            else:
                text = MISSING if value is None else str(value)
            out[j] = self.token_hash(name, text)
        return out

    def _field_dense(self, record: Mapping, tokens: np.ndarray, fields: Sequence[str]):
        """Dense values of ``fields``: numbers as they are, categoricals as hashed codes."""
        numeric = set(self.spec.numeric)
        out = np.empty(len(fields), dtype=np.float64)
        for j, name in enumerate(fields):
            value = record.get(name)
            if name in numeric:
                out[j] = np.nan if value is None else float(value)
            elif value is None:
                out[j] = np.nan
            else:
                out[j] = float(int(tokens[j]) >> (64 - CATEGORY_CODE_BITS))
        return out

    # -- assembly ----------------------------------------------------------------------
    def _assemble(self, tokens: np.ndarray, field_dense: np.ndarray) -> FeatureBatch:
        """Tokens of all fields (n, n_fields) -> crosses, bias, masking, dense reordering."""
        n = len(tokens)
        parts = [tokens]
        if len(self._cross_pos):
            parts.append(
                cross_hash(tokens[:, self._cross_pos[:, 0]], tokens[:, self._cross_pos[:, 1]])
            )
        parts.append(np.full((n, 1), self._bias, dtype=_U64))
        hashed = np.hstack(parts)
        indices = (_splitmix(hashed) & _U64(self.mask)).astype(np.int64)
        n_cat = len(self.spec.categorical)
        parts = [field_dense[:, n_cat:]]
        if self.category_codes:
            parts.append(field_dense[:, :n_cat])
        if self.counts is not None:
            parts.append(self.counts.columns(self.count_keys(indices)))
        dense = np.hstack(parts)
        # Unit-norm rows: the LR's step size then does not depend on how many tokens
        # a dataset has (the normalisation Vowpal Wabbit applies by default).
        values = np.full(indices.shape, 1.0 / np.sqrt(indices.shape[1]))
        return FeatureBatch(indices, values, dense)

    @property
    def categorical_columns(self) -> list[int]:
        """The dense columns LightGBM must treat as categories."""
        return categorical_dense_columns(self.spec, self.category_codes)

    def count_keys(self, indices: np.ndarray) -> np.ndarray:
        """The token coordinates that carry counting features: the categorical fields."""
        return indices[:, self._count_cols]

    def observe(self, batch: FeatureBatch, y: np.ndarray) -> None:
        """Update the counting features with learnt examples (no-op without counts)."""
        if self.counts is not None and len(batch):
            self.counts.observe(self.count_keys(batch.indices), y)

    def transform_many(self, records: Sequence[Mapping]) -> FeatureBatch:
        """Features of independent records (training, replay)."""
        fields = self.spec.fields
        tokens = np.empty((len(records), len(fields)), dtype=_U64)
        dense = np.empty((len(records), len(fields)), dtype=np.float64)
        for i, record in enumerate(records):
            tokens[i] = self._field_tokens(record, fields)
            dense[i] = self._field_dense(record, tokens[i], fields)
        return self._assemble(tokens, dense)

    def _ad_rows(self, ad_fields: tuple[str, ...], ads, ad_keys) -> _AdRows:
        """Token and dense rows of ``ads``, computed once per ad key and then reused."""
        cache = self._ad_caches.get(ad_fields)
        if cache is None:
            cache = self._ad_caches[ad_fields] = _AdRows(len(ad_fields), self._ad_cache_size)
        if ad_keys is None:
            ad_keys = [object() for _ in ads]  # uncacheable: fresh keys, rows reused next
            cache.clear()
        rows = [cache.positions.get(key, -1) for key in ad_keys]
        missing = rows.count(-1)
        if missing and len(cache.positions) + missing > cache.capacity:
            cache.clear()  # bounded memory: start over rather than grow without limit
            rows = [-1] * len(ads)
        for i, row in enumerate(rows):
            if row < 0:
                tokens = self._field_tokens(ads[i], ad_fields)
                dense = self._field_dense(ads[i], tokens, ad_fields)
                rows[i] = cache.add(ad_keys[i], tokens, dense)
        cache.last = np.asarray(rows, dtype=np.int64)
        return cache

    def transform_request(
        self, shared: Mapping, ads: Sequence[Mapping], ad_keys: Sequence | None = None
    ) -> FeatureBatch:
        """Features of every candidate ad of one request, vectorised.

        ``shared`` holds the request's fields (user, context, query), ``ads`` each
        candidate's own fields. Each ad's tokens are cached under its key in
        ``ad_keys`` (ads are immutable once indexed; a changed ad gets a new key).
        The result equals ``transform_many([{**shared, **ad} for ad in ads])``.
        """
        fields = self.spec.fields
        ad_fields = [f for f in fields if any(f in ad for ad in ads[:1])] if ads else []
        shared_fields = [f for f in fields if f not in ad_fields]
        n = len(ads)
        tokens = np.empty((n, len(fields)), dtype=_U64)
        dense = np.empty((n, len(fields)), dtype=np.float64)
        shared_cols = [self._field_pos[f] for f in shared_fields]
        ad_cols = [self._field_pos[f] for f in ad_fields]
        shared_tokens = self._field_tokens(shared, shared_fields)
        tokens[:, shared_cols] = shared_tokens
        dense[:, shared_cols] = self._field_dense(shared, shared_tokens, shared_fields)
        if ad_cols:
            rows = self._ad_rows(tuple(ad_fields), ads, ad_keys)
            tokens[:, ad_cols] = rows.tokens[rows.last]
            dense[:, ad_cols] = rows.dense[rows.last]
        return self._assemble(tokens, dense)


# -- privacy-safe request fields ---------------------------------------------------------
AGE_EDGES = (18, 25, 35, 45, 55, 65)
AGE_LABELS = ("<18", "18-24", "25-34", "35-44", "45-54", "55-64", "65+")


def age_bucket(age: int | None) -> str | None:
    """Ages only ever enter the model as coarse buckets."""
    if age is None:
        return None
    return AGE_LABELS[sum(age >= edge for edge in AGE_EDGES)]


def coarse_region(region: str | None, lat: float | None, lon: float | None) -> str | None:
    """A region name, or failing that a one-degree grid cell (about 100 km): never a point."""
    if region:
        return region
    if lat is None or lon is None:
        return None
    return f"grid:{math.floor(lat)}:{math.floor(lon)}"


def pseudonymous_user_id(user_id: str, salt: str) -> str:
    """Salted one-way hash of a raw user id; the raw id never reaches features or logs."""
    return hashlib.blake2b(user_id.encode(), digest_size=8, key=salt.encode()[:64]).hexdigest()


def request_fields(request, salt: str) -> dict[str, str | float | None]:
    """The shared (user + context) fields of an ``AdRequest``, PII-safe by construction.

    Only derived values leave this function: the user id salted and hashed, age as a
    bucket, location as a region, interests as at most two sorted labels.
    """
    user, context = request.user, request.context
    interests = sorted(user.interests)[:2] + [None, None]
    hour = context.hour if context.hour is not None else time.gmtime(request.ts).tm_hour
    return {
        "user_id": pseudonymous_user_id(user.user_id, salt),
        "age_bucket": age_bucket(user.age),
        "gender": user.gender,
        "region": coarse_region(user.region, user.lat, user.lon),
        "language": user.language,
        "interest_1": interests[0],
        "interest_2": interests[1],
        "device": context.device,
        "os": context.os,
        "placement": context.placement,
        "page_category": context.page_category,
        "hour_of_day": str(hour),
        "query": request.query or None,
    }
