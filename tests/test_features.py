import numpy as np
import pytest

from engine.events import ScoredFeatures, TrainingExample, decode, encode
from engine.features import ClickCounts, FeaturePipeline, FeatureSpec, numeric_bucket

SPEC = FeatureSpec(
    categorical=("user", "device", "ad_id", "category"),
    numeric=("age_days",),
    crosses=(("device", "category"),),
    bits=18,
)


def ads(n=50):
    return [
        {"ad_id": f"ad{i}", "category": f"c{i % 7}", "age_days": float(i % 11)} for i in range(n)
    ]


def test_width_and_unit_norm_rows():
    batch = FeaturePipeline(SPEC).transform_many(ads(5))
    assert batch.indices.shape == (5, SPEC.width)
    assert np.allclose((batch.values**2).sum(axis=1), 1.0)
    assert batch.indices.min() >= 0 and batch.indices.max() < 2**SPEC.bits


def test_same_salt_same_features_across_instances_other_salt_differs():
    a = FeaturePipeline(SPEC).transform_many(ads())
    b = FeaturePipeline(SPEC).transform_many(ads())
    other = FeatureSpec(SPEC.categorical, SPEC.numeric, SPEC.crosses, SPEC.bits, salt="other")
    c = FeaturePipeline(other).transform_many(ads())
    assert np.array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)


def test_request_path_equals_record_path():
    """Serving (shared fields broadcast, ads cached) gives exactly the training features."""
    pipeline = FeaturePipeline(SPEC)
    shared = {"user": "u1", "device": "ios"}
    candidates = ads()
    keys = [ad["ad_id"] for ad in candidates]
    for _ in range(2):  # second call is served from the ad cache
        served = pipeline.transform_request(shared, candidates, keys)
        trained = pipeline.transform_many([{**shared, **ad} for ad in candidates])
        assert np.array_equal(served.indices, trained.indices)
        assert np.array_equal(served.values, trained.values)
        assert np.array_equal(served.dense, trained.dense, equal_nan=True)


def test_logged_impression_features_reproduce_when_trained_on():
    """Features logged at serving time survive the event round trip bit for bit."""
    pipeline = FeaturePipeline(SPEC)
    served = pipeline.transform_request(
        {"user": "u9", "device": None}, ads(3), ["ad0", "ad1", "ad2"]
    )
    logged = ScoredFeatures(
        indices=served.indices[1].tolist(),
        values=served.values[1].tolist(),
        dense=served.dense[1].tolist(),
    )
    example = TrainingExample(
        example_id="e1",
        impression_id="i1",
        label=1,
        weight=1.0,
        features=logged,
        impression_ts=1.0,
        label_ts=2.0,
        model_version="t1.w1",
    )
    back = decode(encode(example), TrainingExample).features
    assert np.array_equal(np.array(back.indices), served.indices[1])
    assert np.array_equal(np.array(back.values), served.values[1])
    assert np.array_equal(np.array(back.dense), served.dense[1], equal_nan=True)
    recomputed = pipeline.transform_many([{"user": "u9", "device": None, **ads(3)[1]}])
    assert np.array_equal(recomputed.indices[0], np.array(back.indices))


def test_missing_and_numeric_buckets():
    assert numeric_bucket(None) == numeric_bucket(float("nan"))
    assert numeric_bucket(0.0) != numeric_bucket(100.0)
    assert numeric_bucket(-5.0) != numeric_bucket(5.0)
    batch = FeaturePipeline(SPEC).transform_many([{"user": None, "age_days": None}])
    assert np.isnan(batch.dense).all()


def test_crosses_are_order_sensitive_and_distinct_from_fields():
    pipeline = FeaturePipeline(SPEC)
    a = pipeline.transform_many([{"device": "x", "category": "y"}])
    b = pipeline.transform_many([{"device": "y", "category": "x"}])
    cross = len(SPEC.fields)
    assert a.indices[0, cross] != b.indices[0, cross]


def test_spec_validation():
    with pytest.raises(ValueError, match="cross"):
        FeatureSpec(categorical=("a",), crosses=(("a", "b"),))
    with pytest.raises(ValueError, match="twice|both"):
        FeatureSpec(categorical=("a",), numeric=("a",))
    kept = SPEC.restricted_to(["device", "category"])
    assert kept.crosses == (("device", "category"),)
    assert SPEC.restricted_to(["device"]).crosses == ()


def test_request_fields_are_pii_safe():
    from engine.events import AdRequest, RequestContext, UserProfile
    from engine.features import request_fields

    request = AdRequest(
        request_id="r1",
        ts=1_700_000_000.0,
        user=UserProfile(
            user_id="alice@example.com", age=31, lat=48.8566, lon=2.3522, interests=["b", "a", "c"]
        ),
        context=RequestContext(device="ios"),
        query="running shoes",
        slots=2,
    )
    fields = request_fields(request, salt="s1")
    text = repr(fields)
    assert "alice" not in text and "31" not in text and "48.85" not in text
    assert fields["age_bucket"] == "25-34"
    assert fields["region"] == "grid:48:2"
    assert fields["interest_1"] == "a" and fields["interest_2"] == "b"
    assert fields["user_id"] == request_fields(request, salt="s1")["user_id"]
    assert fields["user_id"] != request_fields(request, salt="s2")["user_id"]


def test_ad_cache_is_bounded_and_stays_correct():
    pipeline = FeaturePipeline(SPEC, ad_cache_size=60)
    shared = {"user": "u1", "device": "ios"}
    for start in (0, 40, 80, 0):  # forces the cache to start over between requests
        candidates = [
            {"ad_id": f"ad{i}", "category": f"c{i % 7}", "age_days": float(i)}
            for i in range(start, start + 50)
        ]
        served = pipeline.transform_request(shared, candidates, [a["ad_id"] for a in candidates])
        trained = pipeline.transform_many([{**shared, **ad} for ad in candidates])
        assert np.array_equal(served.indices, trained.indices)
        assert np.array_equal(served.dense, trained.dense, equal_nan=True)


def test_tree_leaf_features_reproduce_lightgbm_raw_score():
    from engine.config import TreeSettings
    from engine.trees import TreeModel

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4))
    X[:, 3] = rng.integers(0, 50, 3000)
    y = (X[:, 0] * X[:, 1] + 0.3 * (X[:, 3] % 3 == 0) > 0).astype(int)
    model = TreeModel.fit(X, y, TreeSettings(num_trees=30), version=1, categorical=[3])
    coordinates, margin = model.leaf_features(X, bits=18)
    np.testing.assert_allclose(margin, model.booster.predict(X, raw_score=True), atol=1e-12)
    assert coordinates.shape == (3000, 30) and coordinates.max() < 2**18
    other = TreeModel.fit(X, y, TreeSettings(num_trees=30), version=2, categorical=[3])
    assert not np.intersect1d(coordinates, other.leaf_features(X, bits=18)[0]).size > 30


def test_counting_features_are_past_only_and_replace_codes():
    spec = FeatureSpec(categorical=("ad", "site"), numeric=("n",), bits=16)
    pipeline = FeaturePipeline(spec, counts=ClickCounts(spec.bits, 5.0), category_codes=False)
    records = [{"ad": "a", "site": "s", "n": 1.0}] * 4
    first = pipeline.transform_many(records)
    # one numeric column, then log1p(impressions) and smoothed CTR per categorical
    assert first.dense.shape == (4, 1 + 2 * 2)
    assert np.all(first.dense[:, 1:3] == 0.0)  # nothing learnt yet: no impressions
    pipeline.observe(first, np.array([1, 1, 0, 0]))
    second = pipeline.transform_many(records[:1])
    assert second.dense[0, 1] == pytest.approx(np.log1p(4))
    prior = 3 / 6  # (clicks + 1) / (impressions + 2)
    assert second.dense[0, 3] == pytest.approx((2 + 5 * prior) / (4 + 5))
    # serving reads the same counts as training
    request = pipeline.transform_request({"site": "s", "n": 1.0}, [{"ad": "a"}])
    np.testing.assert_allclose(request.dense, second.dense)
