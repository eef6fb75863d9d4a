"""auction.index: the inverted index agrees with a brute-force targeting filter."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import auction.index
from auction.index import AdIndex
from engine.events import Ad, AdRequest, Campaign, RequestContext, Targeting, UserProfile
from engine.features import AGE_LABELS, age_bucket, coarse_region

# Small value domains so that matches (and near misses) are common.
TERMS = ["shoes", "Shoes", "red", "boots", "bag"]
REGIONS = ["FR", "DE", "grid:48:2"]
GENDERS = ["f", "m"]
LANGS = ["fr", "en"]
INTERESTS = ["golf", "tech", "food"]
DEVICES = ["ios", "android", "web"]
USERS = ["u1", "u2", "u3"]
AGES = list(AGE_LABELS[:3])


def _subset(values):
    return st.lists(st.sampled_from(values), max_size=2, unique=True)


def _targeted(values):
    """Empty ("any") about half the time, else one or two values."""
    return st.one_of(
        st.just([]), st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True)
    )


targetings = st.builds(
    Targeting,
    query_terms=_targeted(TERMS),
    regions=_targeted(REGIONS),
    age_buckets=_targeted(AGES),
    genders=_targeted(GENDERS),
    languages=_targeted(LANGS),
    interests=_targeted(INTERESTS),
    devices=_targeted(DEVICES),
    user_ids=_targeted(USERS),
)


@st.composite
def campaigns(draw, campaign_id):
    start = draw(st.sampled_from([0.0, 50.0, 100.0]))
    return Campaign(
        campaign_id=campaign_id,
        advertiser_id="adv",
        name=campaign_id,
        daily_budget=10.0,
        total_budget=100.0,
        start_ts=start,
        end_ts=start + draw(st.sampled_from([50.0, 100.0])),
        pricing=draw(st.sampled_from(["cpc", "cpm"])),
        bid=1.0,
        targeting=draw(targetings),
        status=draw(st.sampled_from(["active", "active", "active", "paused"])),
    )


def _ad(ad_id: str, campaign_id: str) -> Ad:
    return Ad(
        ad_id=ad_id,
        campaign_id=campaign_id,
        advertiser_id="adv",
        category="x",
        landing_domain="x.com",
        created_ts=0.0,
    )


def _opt(values):
    return st.one_of(st.none(), st.sampled_from(values))


AGE_OF = {"<18": 10, "18-24": 20, "25-34": 30}
TIMES = [0.0, 49.9, 50.0, 99.0, 100.0, 150.0, 199.0, 200.0]


@st.composite
def requests(draw, hint: Campaign | None = None):
    """A random request; with a ``hint`` campaign, mostly one its targeting accepts."""
    t = hint.targeting if hint is not None else Targeting()

    def pick(options, hinted, optional=True):
        if hinted and draw(st.integers(0, 4)):  # 80%: a value the hint targets
            return draw(st.sampled_from(hinted))
        return draw(_opt(options) if optional else st.sampled_from(options))

    region = pick(REGIONS, t.regions)
    use_latlon = region == "grid:48:2" and draw(st.booleans())
    age_label = pick(AGES, t.age_buckets)
    age = AGE_OF[age_label] if age_label else draw(st.one_of(st.none(), st.integers(0, 40)))
    interests = draw(_subset(INTERESTS))
    if t.interests and draw(st.integers(0, 4)):
        interests = sorted({*interests, draw(st.sampled_from(t.interests))})
    user = UserProfile(
        user_id=pick(USERS, t.user_ids, optional=False),
        age=age,
        gender=pick(GENDERS, t.genders),
        region=None if use_latlon else region,
        lat=48.5 if use_latlon else None,
        lon=2.9 if use_latlon else None,
        language=pick(LANGS, t.languages),
        interests=interests,
    )
    words = draw(st.lists(st.sampled_from(TERMS + ["SHOES", "hat"]), max_size=3))
    if t.query_terms and draw(st.integers(0, 4)):
        term = draw(st.sampled_from(t.query_terms))
        words.insert(draw(st.integers(0, len(words))), draw(st.sampled_from([term, term.upper()])))
    times = TIMES
    if hint is not None and draw(st.integers(0, 4)):
        times = [x for x in TIMES if hint.start_ts <= x < hint.end_ts] or TIMES
    return AdRequest(
        request_id="r",
        ts=draw(st.sampled_from(times)),
        user=user,
        context=RequestContext(device=pick(DEVICES, t.devices)),
        query=" ".join(words),
        slots=1,
    )


def brute_force(request: AdRequest, ads: dict[str, Campaign]) -> set[str]:
    """Reference semantics, written independently of the index."""
    user = request.user
    tokens = set(request.query.lower().split())
    single = {
        "regions": coarse_region(user.region, user.lat, user.lon),
        "age_buckets": age_bucket(user.age),
        "genders": user.gender,
        "languages": user.language,
        "devices": request.context.device,
        "user_ids": user.user_id,
    }
    out = set()
    for ad_id, camp in ads.items():
        t = camp.targeting
        if camp.status != "active" or not (camp.start_ts <= request.ts < camp.end_ts):
            continue
        if t.query_terms and not tokens & {q.lower() for q in t.query_terms}:
            continue
        if t.interests and not set(t.interests) & set(user.interests):
            continue
        if all(not getattr(t, dim) or value in getattr(t, dim) for dim, value in single.items()):
            out.add(ad_id)
    return out


@st.composite
def scenarios(draw):
    """A sequence of upserts/updates/removals over a few ads and campaigns."""
    n_campaigns = draw(st.integers(1, 4))
    camps = {f"c{i}": draw(campaigns(f"c{i}")) for i in range(n_campaigns)}
    ops = []
    for _ in range(draw(st.integers(1, 25))):
        kind = draw(st.sampled_from(["upsert", "upsert", "upsert", "remove", "campaign"]))
        ad_id = f"a{draw(st.integers(0, 7))}"
        cid = draw(st.sampled_from(sorted(camps)))
        if kind == "campaign":
            ops.append((kind, cid, draw(campaigns(cid))))
        else:
            ops.append((kind, ad_id, cid))
    return camps, ops


def _apply(index: AdIndex, camps, ops) -> dict[str, Campaign]:
    """Apply ops to the index and return the reference state ``ad id -> campaign``."""
    state: dict[str, str] = {}
    camps = dict(camps)
    for op in ops:
        if op[0] == "upsert":
            _, ad_id, cid = op
            index.upsert(_ad(ad_id, cid), camps[cid])
            state[ad_id] = cid
        elif op[0] == "remove":
            index.remove(op[1])
            state.pop(op[1], None)
        else:
            _, cid, camp = op
            camps[cid] = camp
            index.update_campaign(camp)
    return {ad_id: camps[cid] for ad_id, cid in state.items()}


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.data())
def test_match_equals_brute_force(scenario, data):
    camps, ops = scenario
    index = AdIndex()
    reference = _apply(index, camps, ops)
    assert len(index) == len(reference)
    hints = [None, *reference.values()]  # requests aimed at indexed ads, and random ones
    for _ in range(data.draw(st.integers(1, 8))):
        request = data.draw(requests(data.draw(st.sampled_from(hints))))
        assert index.match(request) == brute_force(request, reference)


@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_index_rebuilt_from_scratch_is_identical(scenario):
    """After arbitrary updates, postings equal those of a fresh index (no stale entries)."""
    camps, ops = scenario
    index = AdIndex()
    reference = _apply(index, camps, ops)
    fresh = AdIndex()
    for ad_id, camp in reference.items():
        fresh.upsert(_ad(ad_id, camp.campaign_id), camp)
    for dim in auction.index.DIMENSIONS:
        assert index.postings(dim) == fresh.postings(dim)


def _campaign(cid="c1", status="active", **targeting) -> Campaign:
    return Campaign(
        campaign_id=cid,
        advertiser_id="adv",
        name=cid,
        daily_budget=10.0,
        total_budget=100.0,
        start_ts=0.0,
        end_ts=100.0,
        pricing="cpc",
        bid=1.0,
        targeting=Targeting(**targeting),
        status=status,
    )


def _request(query="", ts=10.0, **user) -> AdRequest:
    user.setdefault("user_id", "u1")
    return AdRequest(request_id="r", ts=ts, user=UserProfile(**user), query=query, slots=1)


def test_update_replaces_old_postings():
    index = AdIndex()
    index.upsert(_ad("a1", "c1"), _campaign(regions=["FR"]))
    assert index.match(_request(region="FR")) == {"a1"}
    index.upsert(_ad("a1", "c1"), _campaign(regions=["DE"]))
    assert index.match(_request(region="FR")) == set()
    assert index.match(_request(region="DE")) == {"a1"}
    assert index.postings("regions") == {"DE": {"a1"}, None: set()}


def test_upsert_and_remove_are_idempotent():
    index = AdIndex()
    for _ in range(2):
        index.upsert(_ad("a1", "c1"), _campaign(genders=["f"]))
    assert len(index) == 1 and index.match(_request(gender="f")) == {"a1"}
    for _ in range(2):
        index.remove("a1")
    assert len(index) == 0 and index.match(_request(gender="f")) == set()
    assert all(index.postings(dim) == {None: set()} for dim in auction.index.DIMENSIONS)
    assert all(not p for p in index._postings.values())
    assert not any(index._wildcards.values())
    index.remove("never-added")


def test_paused_campaign_and_reactivation():
    index = AdIndex()
    index.upsert(_ad("a1", "c1"), _campaign(status="paused"))
    index.upsert(_ad("a2", "c1"), _campaign(status="paused"))
    assert index.match(_request()) == set()
    assert index.update_campaign(_campaign(status="active")) == 2
    assert index.match(_request()) == {"a1", "a2"}
    assert index.remove_campaign("c1") == 2 and len(index) == 0


def test_missing_request_value_only_matches_wildcards():
    index = AdIndex()
    index.upsert(_ad("any", "c0"), _campaign("c0"))
    index.upsert(_ad("aged", "c1"), _campaign("c1", age_buckets=["25-34"]))
    index.upsert(_ad("geo", "c2"), _campaign("c2", regions=["grid:48:2"]))
    assert index.match(_request()) == {"any"}
    assert index.match(_request(age=30, lat=48.1, lon=2.7)) == {"any", "aged", "geo"}


def test_query_terms_and_user_ids():
    index = AdIndex()
    index.upsert(_ad("q", "c1"), _campaign("c1", query_terms=["Running", "shoes"]))
    index.upsert(_ad("u", "c2"), _campaign("c2", user_ids=["u7"]))
    assert index.match(_request("best RUNNING gear")) == {"q"}
    assert index.match(_request("runningshoes")) == set()
    assert index.match(_request("", user_id="u7")) == {"u"}


def test_schedule_is_half_open():
    index = AdIndex()
    index.upsert(_ad("a1", "c1"), _campaign())
    assert index.match(_request(ts=0.0)) == {"a1"}
    assert index.match(_request(ts=99.999)) == {"a1"}
    assert index.match(_request(ts=100.0)) == set()
    assert index.match(_request(ts=-1.0)) == set()


def test_ad_must_belong_to_campaign():
    with pytest.raises(ValueError, match="belongs to campaign"):
        AdIndex().upsert(_ad("a1", "other"), _campaign("c1"))


def test_doctests():
    assert doctest.testmod(auction.index).failed == 0
