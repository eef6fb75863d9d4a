"""Tests for engine.events: round trips, validation errors, tagged union, NaN handling."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.events import (
    Ad,
    AdRequest,
    Campaign,
    Engagement,
    EventError,
    Impression,
    RequestContext,
    ScoredFeatures,
    Targeting,
    TrainingExample,
    UserProfile,
    decode,
    decode_any,
    encode,
)


def make_features() -> ScoredFeatures:
    return ScoredFeatures(indices=[3, 17, 1024], values=[1.0, 0.5, 2.0], dense=[0.1, 7.0])


def make_request() -> AdRequest:
    return AdRequest(
        request_id="r1",
        ts=1_700_000_000.25,
        user=UserProfile(
            user_id="u1",
            age=34,
            gender="f",
            region="FR-IDF",
            lat=48.85,
            lon=2.35,
            language="fr",
            interests=["cycling", "jazz"],
        ),
        context=RequestContext(
            device="mobile", os="android", placement="feed", page_category="news", hour=9
        ),
        query="road bike",
        slots=3,
    )


def make_impression() -> Impression:
    return Impression(
        impression_id="i1",
        request_id="r1",
        ts=1_700_000_001.0,
        ad_id="a1",
        campaign_id="c1",
        advertiser_id="adv1",
        position=0,
        price=0.42,
        model_version="m-2024-01-01",
        exploration=False,
        pctr=0.031,
        features=make_features(),
    )


def make_engagement() -> Engagement:
    return Engagement(engagement_id="e1", impression_id="i1", ts=1_700_000_010.0, kind="click")


def make_example() -> TrainingExample:
    return TrainingExample(
        example_id="x1",
        impression_id="i1",
        label=1,
        weight=10.0,
        features=make_features(),
        impression_ts=1_700_000_001.0,
        label_ts=1_700_000_010.0,
        model_version="m-2024-01-01",
    )


def make_campaign() -> Campaign:
    return Campaign(
        campaign_id="c1",
        advertiser_id="adv1",
        name="Spring bikes",
        daily_budget=100.0,
        total_budget=3000.0,
        start_ts=1_700_000_000.0,
        end_ts=1_702_592_000.0,
        pricing="cpc",
        bid=0.8,
        targeting=Targeting(
            query_terms=["bike"],
            regions=["FR-IDF"],
            age_buckets=["25-34"],
            genders=["f"],
            languages=["fr"],
            interests=["cycling"],
            devices=["mobile"],
            user_ids=["u1", "u2"],
        ),
        status="active",
    )


def make_ad() -> Ad:
    return Ad(
        ad_id="a1",
        campaign_id="c1",
        advertiser_id="adv1",
        creative_terms=["bike", "carbon"],
        category="sports",
        landing_domain="example.com",
        created_ts=1_699_999_000.0,
    )


ALL_RECORDS = [
    make_request(),
    make_impression(),
    make_engagement(),
    make_example(),
    make_campaign(),
    make_ad(),
    make_features(),
    Targeting(),
    UserProfile(user_id="u9"),
    RequestContext(),
]


def as_dict(record: msgspec.Struct) -> dict:
    return json.loads(encode(record))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("record", ALL_RECORDS, ids=lambda r: type(r).__name__)
def test_round_trip(record: msgspec.Struct) -> None:
    data = encode(record)
    assert isinstance(data, bytes)
    back = decode(data, type(record))
    assert type(back) is type(record)
    assert back == record
    assert back.schema_version == 1
    # str input is accepted too
    assert decode(data.decode(), type(record)) == record


@pytest.mark.parametrize(
    "record", [make_request(), make_impression(), make_engagement()], ids=lambda r: type(r).__name__
)
def test_decode_any_dispatches_on_type_tag(record: msgspec.Struct) -> None:
    data = encode(record)
    assert as_dict(record)["type"] == type(record).__name__
    assert decode_any(data) == record


def test_untagged_records_have_no_type_field() -> None:
    assert "type" not in as_dict(make_example())
    assert "type" not in as_dict(make_campaign())


def test_defaults_fill_optional_fields() -> None:
    req = decode(b'{"request_id": "r", "ts": 1, "user": {"user_id": "u"}, "slots": 1}', AdRequest)
    assert req.query == ""
    assert req.user.age is None
    assert req.user.interests == []
    assert req.context == RequestContext()
    assert req.schema_version == 1


def test_nan_in_dense_survives_round_trip() -> None:
    feats = ScoredFeatures(indices=[1], values=[1.0], dense=[1.5, math.nan, float("nan"), 0.0])
    imp = msgspec.structs.replace(make_impression(), features=feats)
    data = encode(imp)
    assert as_dict(imp)["features"]["dense"] == [1.5, None, None, 0.0]
    dense = decode(data, Impression).features.dense
    assert len(dense) == 4
    assert dense[0] == 1.5 and dense[3] == 0.0
    assert math.isnan(dense[1]) and math.isnan(dense[2])
    assert all(isinstance(v, float) for v in decode_any(data).features.dense)


# --------------------------------------------------------------------------- validation


def _decode_patched(record: msgspec.Struct, path: list[str], value: object) -> None:
    """Encode ``record``, set (or delete, if value is ``...``) a nested key, decode."""
    obj = as_dict(record)
    target = obj
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    decode(json.dumps(obj), type(record))


@pytest.mark.parametrize(
    ("record", "path", "value", "field"),
    [
        # missing required fields
        (make_request(), ["request_id"], ..., "request_id"),
        (make_impression(), ["features"], ..., "features"),
        (make_request(), ["user", "user_id"], ..., "user_id"),
        # wrong types
        (make_request(), ["user", "age"], "old", "$.user.age"),
        (make_impression(), ["exploration"], "yes", "$.exploration"),
        (make_example(), ["features", "indices"], [1, "x", 3], "$.features.indices[1]"),
        (make_campaign(), ["targeting", "regions"], "FR", "$.targeting.regions"),
        # constraint violations
        (make_request(), ["user", "age"], 200, "$.user.age"),
        (make_request(), ["slots"], 0, "$.slots"),
        (make_request(), ["slots"], 21, "$.slots"),
        (make_request(), ["context", "hour"], 24, "$.context.hour"),
        (make_request(), ["user", "lat"], 91.0, "$.user.lat"),
        (make_impression(), ["price"], -0.01, "$.price"),
        (make_impression(), ["pctr"], 1.5, "$.pctr"),
        (make_impression(), ["position"], -1, "$.position"),
        (make_impression(), ["impression_id"], "", "$.impression_id"),
        (make_example(), ["label"], 2, "$.label"),
        (make_example(), ["weight"], 0, "$.weight"),
        (make_example(), ["features", "indices"], [1, -2, 3], "$.features.indices[1]"),
        (make_engagement(), ["kind"], "like", "$.kind"),
        (make_campaign(), ["daily_budget"], 0, "$.daily_budget"),
        (make_campaign(), ["bid"], -1, "$.bid"),
        (make_campaign(), ["pricing"], "cpa", "$.pricing"),
        (make_campaign(), ["status"], "deleted", "$.status"),
    ],
)
def test_invalid_input_names_field(
    record: msgspec.Struct, path: list[str], value: object, field: str
) -> None:
    with pytest.raises(EventError) as info:
        _decode_patched(record, path, value)
    msg = str(info.value)
    assert field in msg
    assert type(record).__name__ in msg


def test_event_error_is_value_error() -> None:
    assert issubclass(EventError, ValueError)
    with pytest.raises(ValueError):
        decode(b"{not json", Engagement)


def test_malformed_json_raises_event_error() -> None:
    with pytest.raises(EventError, match="Engagement"):
        decode(b"{not json", Engagement)
    with pytest.raises(EventError):
        decode_any(b"[1, 2")


def test_unknown_type_tag_rejected() -> None:
    obj = as_dict(make_engagement())
    obj["type"] = "Conversion"
    with pytest.raises(EventError, match=r"\$\.type"):
        decode_any(json.dumps(obj))


def test_missing_type_tag_rejected_by_decode_any() -> None:
    obj = as_dict(make_engagement())
    del obj["type"]
    with pytest.raises(EventError, match="type"):
        decode_any(json.dumps(obj))


def test_wrong_type_tag_rejected_by_typed_decode() -> None:
    obj = as_dict(make_engagement())
    obj["type"] = "Impression"
    with pytest.raises(EventError, match=r"\$\.type"):
        decode(json.dumps(obj), Engagement)


@pytest.mark.parametrize("end_offset", [0.0, -1.0])
def test_campaign_end_must_follow_start(end_offset: float) -> None:
    camp = make_campaign()
    with pytest.raises(EventError, match="end_ts"):
        msgspec.structs.replace(camp, end_ts=camp.start_ts + end_offset)
    obj = as_dict(camp)
    obj["end_ts"] = obj["start_ts"] + end_offset
    with pytest.raises(EventError, match="end_ts") as info:
        decode(json.dumps(obj), Campaign)
    assert "Campaign" in str(info.value)


def test_features_length_mismatch_rejected() -> None:
    with pytest.raises(EventError, match="indices"):
        ScoredFeatures(indices=[1, 2], values=[1.0])
    obj = as_dict(make_impression())
    obj["features"]["values"] = [1.0]
    with pytest.raises(EventError, match=r"indices.*\$\.features") as info:
        decode(json.dumps(obj), Impression)
    assert "Impression" in str(info.value)


def test_infinite_feature_values_rejected() -> None:
    with pytest.raises(EventError, match=r"dense\[1\]"):
        ScoredFeatures(indices=[], values=[], dense=[0.0, math.inf])
    with pytest.raises(EventError, match=r"values\[0\]"):
        ScoredFeatures(indices=[1], values=[math.nan])


# --------------------------------------------------------------------------- property


ids = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
features_st = st.integers(min_value=0, max_value=32).flatmap(
    lambda n: st.builds(
        ScoredFeatures,
        indices=st.lists(st.integers(min_value=0, max_value=2**40), min_size=n, max_size=n),
        values=st.lists(finite, min_size=n, max_size=n),
        dense=st.lists(st.floats(allow_infinity=False), max_size=16),
    )
)
engagement_st = st.builds(
    Engagement,
    engagement_id=ids,
    impression_id=ids,
    ts=finite,
    kind=st.sampled_from(["click", "hide", "report"]),
)
impression_st = st.builds(
    Impression,
    impression_id=ids,
    request_id=ids,
    ts=finite,
    ad_id=ids,
    campaign_id=ids,
    advertiser_id=ids,
    position=st.integers(min_value=0, max_value=1000),
    price=st.floats(min_value=0, allow_infinity=False),
    model_version=st.text(max_size=12),
    exploration=st.booleans(),
    pctr=st.floats(min_value=0, max_value=1),
    features=features_st,
)


def _same_floats(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        (math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True)
    )


@given(st.one_of(engagement_st, impression_st))
def test_round_trip_property(record: Engagement | Impression) -> None:
    data = encode(record)
    for back in (decode(data, type(record)), decode_any(data)):
        assert type(back) is type(record)
        if isinstance(record, Impression):
            assert _same_floats(back.features.dense, record.features.dense)
            # NaN != NaN, so compare the rest with dense stripped out
            strip = {"dense": []}
            assert msgspec.structs.replace(
                back, features=msgspec.structs.replace(back.features, **strip)
            ) == msgspec.structs.replace(
                record, features=msgspec.structs.replace(record.features, **strip)
            )
        else:
            assert back == record
