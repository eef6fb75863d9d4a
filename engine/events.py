"""Typed, validated, versioned event records shared by every adengine component.

Every record is a frozen :class:`msgspec.Struct` carrying ``schema_version``.
Field constraints (``msgspec.Meta``) are enforced when decoding, so bad input from
a stream or file is rejected at the boundary with an :class:`EventError` naming the
offending field path. Cross-field invariants live in ``__post_init__`` and run both
on construction and on decode. Note that ``Meta`` constraints are *not* checked
when a record is built directly in Python; only ``__post_init__`` checks are.

``AdRequest``, ``Impression`` and ``Engagement`` are tagged (``"type": "<Name>"``
in the JSON) so a mixed event stream can be read with :func:`decode_any`.

JSON has no NaN: dense GBDT features encode NaN (missing) as ``null`` and decode
``null`` back to NaN.

>>> eng = Engagement(engagement_id="e1", impression_id="i1", ts=1.5, kind="click")
>>> data = encode(eng)
>>> data[:40]
b'{"type":"Engagement","schema_version":1,'
>>> decode(data, Engagement) == eng
True
>>> decode_any(data) == eng
True
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

import msgspec

__all__ = [
    "Ad",
    "AdRequest",
    "Campaign",
    "Engagement",
    "Event",
    "EventError",
    "Impression",
    "RequestContext",
    "ScoredFeatures",
    "Targeting",
    "TrainingExample",
    "UserProfile",
    "decode",
    "decode_any",
    "encode",
]

T = TypeVar("T")

Id = Annotated[str, msgspec.Meta(min_length=1)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
Probability = Annotated[float, msgspec.Meta(ge=0, le=1)]


class EventError(ValueError):
    """Invalid or undecodable event; the message names the record type and field."""


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    """Base for all records: immutable, keyword-only, versioned."""

    schema_version: int = 1


class _Tagged(_Record, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """Base for stream events that carry a ``"type"`` tag for :func:`decode_any`."""


# --------------------------------------------------------------------------- requests


class UserProfile(_Record, frozen=True, kw_only=True):
    """Who the request is for; optional fields are unknown when ``None``."""

    user_id: Id
    age: Annotated[int, msgspec.Meta(ge=0, le=130)] | None = None
    gender: str | None = None
    region: str | None = None
    lat: Annotated[float, msgspec.Meta(ge=-90, le=90)] | None = None
    lon: Annotated[float, msgspec.Meta(ge=-180, le=180)] | None = None
    language: str | None = None
    interests: list[str] = []


class RequestContext(_Record, frozen=True, kw_only=True):
    """Where and when the ad slot is shown."""

    device: str | None = None
    os: str | None = None
    placement: str | None = None
    page_category: str | None = None
    hour: Annotated[int, msgspec.Meta(ge=0, le=23)] | None = None


class AdRequest(_Tagged, frozen=True, kw_only=True):
    """A request for up to ``slots`` ads; ``ts`` is event time (epoch seconds)."""

    request_id: Id
    ts: float
    user: UserProfile
    context: RequestContext = msgspec.field(default_factory=RequestContext)
    query: str = ""
    slots: Annotated[int, msgspec.Meta(ge=1, le=20)]


# --------------------------------------------------------------------------- features


class ScoredFeatures(_Record, frozen=True, kw_only=True):
    """The exact feature values that were scored, kept so training sees no skew.

    ``indices``/``values`` are the hashed sparse features (same length, finite values);
    ``dense`` feeds the GBDT and may hold NaN for missing values (``null`` in JSON).
    """

    indices: list[Annotated[int, msgspec.Meta(ge=0)]]
    values: list[float]
    dense: list[float | None] = []

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.values):
            raise EventError(
                f"ScoredFeatures: indices and values differ in length "
                f"({len(self.indices)} != {len(self.values)})"
            )
        for i, v in enumerate(self.values):
            if not math.isfinite(v):
                raise EventError(f"ScoredFeatures: values[{i}] must be finite, got {v}")
        has_null = False
        for i, v in enumerate(self.dense):
            if v is None:
                has_null = True
            elif math.isinf(v):
                # JSON would silently turn inf into null -> NaN; refuse instead.
                raise EventError(f"ScoredFeatures: dense[{i}] must be finite or NaN, got {v}")
        if has_null:
            dense = [math.nan if v is None else v for v in self.dense]
            msgspec.structs.force_setattr(self, "dense", dense)


# --------------------------------------------------------------------------- events


class Impression(_Tagged, frozen=True, kw_only=True):
    """An ad shown in a slot, with the model output and features behind it."""

    impression_id: Id
    request_id: Id
    ts: float
    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    position: Annotated[int, msgspec.Meta(ge=0)]
    price: NonNegFloat
    model_version: str
    exploration: bool
    pctr: Probability
    features: ScoredFeatures
    # What billing charges against (auction.billing); optional so older events decode.
    pricing: Literal["cpc", "cpm"] | None = None  # the ad's pricing: price is per click or mille
    bid: PosFloat | None = None  # the campaign's bid in that unit: the largest possible price


class Engagement(_Tagged, frozen=True, kw_only=True):
    """A user action on an impression (click, hide, report)."""

    engagement_id: Id
    impression_id: Id
    ts: float
    kind: Literal["click", "hide", "report"]


class TrainingExample(_Record, frozen=True, kw_only=True):
    """A labelled impression for the online learner.

    ``weight`` is the importance weight compensating for negative downsampling.
    """

    example_id: Id
    impression_id: Id
    label: Annotated[int, msgspec.Meta(ge=0, le=1)]
    weight: PosFloat
    features: ScoredFeatures
    impression_ts: float
    label_ts: float
    model_version: str


# --------------------------------------------------------------------------- catalog


class Targeting(_Record, frozen=True, kw_only=True):
    """Who a campaign may be shown to; an empty list means "any"."""

    query_terms: list[str] = []
    regions: list[str] = []
    age_buckets: list[str] = []
    genders: list[str] = []
    languages: list[str] = []
    interests: list[str] = []
    devices: list[str] = []
    user_ids: list[str] = []


class Campaign(_Record, frozen=True, kw_only=True):
    """An advertiser's budgeted, time-boxed bid with its targeting."""

    campaign_id: Id
    advertiser_id: Id
    name: str
    daily_budget: PosFloat
    total_budget: PosFloat
    start_ts: float
    end_ts: float
    pricing: Literal["cpc", "cpm"]
    bid: PosFloat
    targeting: Targeting = msgspec.field(default_factory=Targeting)
    status: Literal["active", "paused"]

    def __post_init__(self) -> None:
        if not self.end_ts > self.start_ts:
            raise EventError(
                f"Campaign: end_ts ({self.end_ts}) must be greater than start_ts ({self.start_ts})"
            )


class Ad(_Record, frozen=True, kw_only=True):
    """A creative belonging to a campaign."""

    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    creative_terms: list[str] = []
    category: str
    landing_domain: str
    created_ts: float


# --------------------------------------------------------------------------- codec

Event = Impression | Engagement | AdRequest
"""Union of the tagged stream events accepted by :func:`decode_any`."""

_ENCODER = msgspec.json.Encoder()
_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    dec = _DECODERS.get(type_)
    if dec is None:
        dec = _DECODERS[type_] = msgspec.json.Decoder(type_)
    return dec


def encode(record: msgspec.Struct) -> bytes:
    """Encode a record to JSON bytes (shared, cached encoder)."""
    return _ENCODER.encode(record)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode and validate JSON into ``type_``; raises :class:`EventError` on bad input."""
    try:
        return _decoder(type_).decode(data)
    except msgspec.DecodeError as exc:  # includes ValidationError
        name = getattr(type_, "__name__", repr(type_))
        raise EventError(f"invalid {name}: {exc}") from exc


def decode_any(data: bytes | str) -> Impression | Engagement | AdRequest:
    """Decode a tagged stream event, dispatching on its ``"type"`` field."""
    try:
        return _decoder(Event).decode(data)
    except msgspec.DecodeError as exc:
        raise EventError(f"invalid event (Impression | Engagement | AdRequest): {exc}") from exc
