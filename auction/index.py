"""In-memory inverted index over active ads: phase 1 of ad selection (targeting match).

Each ad is indexed with its campaign's :class:`~engine.events.Targeting`. For every
targeting dimension the index keeps postings ``value -> ad ids`` plus the set of ads
whose list for that dimension is empty ("wildcards": they match any request, including
one that lacks the value). :meth:`AdIndex.match` returns exactly the ads for which every
non-empty dimension contains one of the request's values:

=============  ===================================================================
dimension      request value(s)
=============  ===================================================================
query_terms    lower-cased whitespace tokens of ``request.query`` (any overlap);
               targeting terms are lower-cased too (single tokens)
regions        ``coarse_region(user.region, user.lat, user.lon)``
age_buckets    ``age_bucket(user.age)``
genders        ``user.gender``
languages      ``user.language``
interests      ``user.interests`` (any overlap)
devices        ``context.device``
user_ids       ``user.user_id`` (raw id: an explicit allow-list of users)
=============  ===================================================================

A non-empty dimension never matches a request missing that value. On top of targeting,
the campaign must be ``active`` and scheduled: ``start_ts <= request.ts < end_ts``.

Postings are bitsets over ad slots (Python ints): a dimension's candidates are the OR
of its wildcards and the postings of the request's values; dimensions are then ANDed,
smallest first, stopping as soon as the intersection is empty. The schedule filter is
one vectorised comparison over the surviving slots.

>>> from engine.events import Ad, AdRequest, Campaign, Targeting, UserProfile
>>> camp = Campaign(campaign_id="c1", advertiser_id="a1", name="shoes", daily_budget=10.0,
...                 total_budget=100.0, start_ts=0.0, end_ts=1e10, pricing="cpc", bid=0.5,
...                 targeting=Targeting(query_terms=["Shoes"], regions=["FR"]),
...                 status="active")
>>> ad = Ad(ad_id="ad1", campaign_id="c1", advertiser_id="a1", category="shoes",
...         landing_domain="x.fr", created_ts=0.0)
>>> index = AdIndex()
>>> index.upsert(ad, camp)
>>> def req(query, region):
...     user = UserProfile(user_id="u1", region=region)
...     return AdRequest(request_id="r", ts=5.0, user=user, query=query, slots=1)
>>> index.match(req("red shoes", "FR"))
{'ad1'}
>>> index.match(req("red shoes", None)), index.match(req("red boots", "FR"))
(set(), set())
>>> index.remove("ad1"); len(index)
0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.events import Ad, AdRequest, Campaign, Targeting
from engine.features import age_bucket, coarse_region

__all__ = ["DIMENSIONS", "AdIndex", "IndexedAd", "request_values", "targeting_values"]

DIMENSIONS: tuple[str, ...] = (
    "query_terms",
    "regions",
    "age_buckets",
    "genders",
    "languages",
    "interests",
    "devices",
    "user_ids",
)


def _tokens(text: str) -> frozenset[str]:
    return frozenset(text.lower().split())


def request_values(request: AdRequest) -> dict[str, frozenset[str]]:
    """The request's value set per targeting dimension (empty set = value missing).

    >>> from engine.events import AdRequest, UserProfile
    >>> r = AdRequest(request_id="r", ts=0.0, query=" Red  SHOES ", slots=1,
    ...               user=UserProfile(user_id="u9", age=30, lat=48.8, lon=2.3))
    >>> v = request_values(r)
    >>> sorted(v["query_terms"]), v["regions"], v["age_buckets"], v["genders"]
    (['red', 'shoes'], frozenset({'grid:48:2'}), frozenset({'25-34'}), frozenset())
    """
    user, context = request.user, request.context

    def one(value: str | None) -> frozenset[str]:
        return frozenset() if value is None else frozenset((value,))

    return {
        "query_terms": _tokens(request.query),
        "regions": one(coarse_region(user.region, user.lat, user.lon)),
        "age_buckets": one(age_bucket(user.age)),
        "genders": one(user.gender),
        "languages": one(user.language),
        "interests": frozenset(user.interests),
        "devices": one(context.device),
        "user_ids": one(user.user_id),
    }


def targeting_values(targeting: Targeting) -> dict[str, frozenset[str]]:
    """A targeting's value set per dimension (empty set = any); query terms lower-cased.

    Query terms are single tokens: a term containing whitespace can never match.
    """
    out = {dim: frozenset(getattr(targeting, dim)) for dim in DIMENSIONS}
    out["query_terms"] = frozenset(term.lower() for term in targeting.query_terms)
    return out


@dataclass(frozen=True)
class IndexedAd:
    """What the index remembers about one ad: its campaign's schedule and targeting."""

    ad_id: str
    campaign_id: str
    slot: int  # bit position of the ad in every posting bitset
    start_ts: float
    end_ts: float
    active: bool
    targeting: dict[str, frozenset[str]]


def _slots(mask: int) -> np.ndarray:
    """Positions of the set bits of a non-negative int, ascending."""
    if not mask:
        return np.empty(0, dtype=np.int64)
    raw = mask.to_bytes((mask.bit_length() + 7) // 8, "little")
    return np.flatnonzero(np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little"))


class AdIndex:
    """Inverted index ``dimension -> value -> ad ids`` with per-dimension wildcards.

    Every ad owns a slot (a small integer, reused after removal); postings and wildcard
    sets are bitsets over slots held in Python ints, so a dimension's candidates are one
    OR per request value and dimensions combine with AND, smallest first.

    :meth:`upsert` and :meth:`remove` are idempotent; upserting an ad again replaces its
    old postings. Paused campaigns' ads are remembered but not posted, so
    :meth:`update_campaign` can reactivate them.
    """

    def __init__(self) -> None:
        self._ads: dict[str, IndexedAd] = {}
        self._by_campaign: dict[str, set[str]] = {}
        self._postings: dict[str, dict[str, int]] = {dim: {} for dim in DIMENSIONS}
        self._wildcards: dict[str, int] = dict.fromkeys(DIMENSIONS, 0)
        self._slot_ids: list[str | None] = []
        self._free: list[int] = []
        self._start = np.empty(0, dtype=np.float64)
        self._end = np.empty(0, dtype=np.float64)

    def __len__(self) -> int:
        """Number of ads known to the index (active or not)."""
        return len(self._ads)

    def __contains__(self, ad_id: object) -> bool:
        return ad_id in self._ads

    def get(self, ad_id: str) -> IndexedAd | None:
        return self._ads.get(ad_id)

    def postings(self, dim: str) -> dict[str | None, set[str]]:
        """``value -> ad ids`` of one dimension, plus ``None -> wildcard ad ids`` (debugging)."""
        out = {value: self._ids(mask) for value, mask in self._postings[dim].items()}
        out[None] = self._ids(self._wildcards[dim])
        return out

    def _ids(self, mask: int) -> set[str]:
        ids = self._slot_ids
        return {ids[i] for i in _slots(mask).tolist()}

    # -- updates -----------------------------------------------------------------------
    def _entry(self, ad_id: str, campaign: Campaign, slot: int) -> IndexedAd:
        self._start[slot], self._end[slot] = campaign.start_ts, campaign.end_ts
        return IndexedAd(
            ad_id=ad_id,
            campaign_id=campaign.campaign_id,
            slot=slot,
            start_ts=campaign.start_ts,
            end_ts=campaign.end_ts,
            active=campaign.status == "active",
            targeting=targeting_values(campaign.targeting),
        )

    def _new_slot(self, ad_id: str) -> int:
        if self._free:
            slot = self._free.pop()
            self._slot_ids[slot] = ad_id
            return slot
        slot = len(self._slot_ids)
        self._slot_ids.append(ad_id)
        if slot >= len(self._start):
            size = max(64, 2 * len(self._start))
            self._start = np.resize(self._start, size)
            self._end = np.resize(self._end, size)
        return slot

    def upsert(self, ad: Ad, campaign: Campaign) -> None:
        """Add ``ad`` (targeted by ``campaign``), replacing any earlier version of it."""
        if ad.campaign_id != campaign.campaign_id:
            raise ValueError(
                f"ad {ad.ad_id!r} belongs to campaign {ad.campaign_id!r}, "
                f"not {campaign.campaign_id!r}"
            )
        self.remove(ad.ad_id)
        entry = self._entry(ad.ad_id, campaign, self._new_slot(ad.ad_id))
        self._ads[ad.ad_id] = entry
        self._by_campaign.setdefault(entry.campaign_id, set()).add(ad.ad_id)
        if entry.active:
            self._post(entry)

    def remove(self, ad_id: str) -> None:
        """Forget ``ad_id`` and its postings (no-op when unknown)."""
        entry = self._ads.pop(ad_id, None)
        if entry is None:
            return
        ads = self._by_campaign[entry.campaign_id]
        ads.discard(ad_id)
        if not ads:
            del self._by_campaign[entry.campaign_id]
        if entry.active:
            self._unpost(entry)
        self._slot_ids[entry.slot] = None
        self._free.append(entry.slot)

    def update_campaign(self, campaign: Campaign) -> int:
        """Re-index every known ad of ``campaign`` (targeting, schedule or status changed).

        Returns the number of ads re-indexed.
        """
        ad_ids = sorted(self._by_campaign.get(campaign.campaign_id, ()))
        for ad_id in ad_ids:
            old = self._ads[ad_id]
            if old.active:
                self._unpost(old)
            new = self._ads[ad_id] = self._entry(ad_id, campaign, old.slot)
            if new.active:
                self._post(new)
        return len(ad_ids)

    def remove_campaign(self, campaign_id: str) -> int:
        """Remove every ad of a campaign; returns how many were removed."""
        ad_ids = sorted(self._by_campaign.get(campaign_id, ()))
        for ad_id in ad_ids:
            self.remove(ad_id)
        return len(ad_ids)

    def _post(self, entry: IndexedAd) -> None:
        bit = 1 << entry.slot
        for dim, values in entry.targeting.items():
            if not values:
                self._wildcards[dim] |= bit
            postings = self._postings[dim]
            for value in values:
                postings[value] = postings.get(value, 0) | bit

    def _unpost(self, entry: IndexedAd) -> None:
        keep = ~(1 << entry.slot)
        for dim, values in entry.targeting.items():
            if not values:
                self._wildcards[dim] &= keep
            postings = self._postings[dim]
            for value in values:
                mask = postings.get(value, 0) & keep
                if mask:
                    postings[value] = mask
                else:
                    postings.pop(value, None)

    # -- queries -----------------------------------------------------------------------
    def match_slots(self, request: AdRequest) -> np.ndarray:
        """Slots of the matching ads, ascending (see :meth:`match`)."""
        wanted = request_values(request)
        masks = []
        for dim in DIMENSIONS:
            mask = self._wildcards[dim]
            postings = self._postings[dim]
            for value in wanted[dim]:
                mask |= postings.get(value, 0)
            if not mask:
                return np.empty(0, dtype=np.int64)
            masks.append(mask)
        masks.sort(key=int.bit_count)
        result = masks[0]
        for mask in masks[1:]:
            result &= mask
            if not result:
                return np.empty(0, dtype=np.int64)
        slots = _slots(result)
        ts = request.ts
        return slots[(self._start[slots] <= ts) & (ts < self._end[slots])]

    def match(self, request: AdRequest) -> set[str]:
        """Ids of the active, scheduled ads whose targeting matches ``request``."""
        ids = self._slot_ids
        return {ids[i] for i in self.match_slots(request).tolist()}
