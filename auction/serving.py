"""Serving one ad request: targeting match -> prior cut -> model pCTR -> GSP auction.

:class:`AdServer` runs the selection funnel for an :class:`~engine.events.AdRequest`:

1. **match** - :meth:`AdIndex.match <auction.index.AdIndex.match>` under the
   :class:`~auction.campaigns.CampaignService` lock; the matched ads and their campaigns
   are copied out under the same lock, so a concurrent catalog change never yields an
   ad paired with another version of its campaign.
2. **eligibility** - an optional pacing ``throttle(campaign_id) -> skip probability``
   (one draw per campaign and request: the campaign bids with probability
   ``1 - throttle``) and an optional budget check: a campaign serves only while
   :func:`~auction.pacing.can_afford` ``(remaining, max_charge)``, the largest charge
   one impression can cause being the bid for CPC (a click) and ``bid / 1000`` for CPM.
   ``remaining_budgets(campaign_ids) -> {campaign_id: remaining}`` is called once per
   request with every distinct campaign that survived the throttle (e.g.
   :meth:`~auction.budget.BudgetLedger.remaining_many`: one Redis round trip). A
   failing call drops all of them, a campaign missing from its answer is dropped (fail
   closed: never overspend), and either sets ``budget_checked=False`` in the response.
3. **prior cut** - :func:`~auction.selection.top_k_by_prior` on ``bid x prior CTR``
   keeps ``top_k`` candidates. The prior CTR is a constant (``prior_ctr``, default 2%)
   until learned per-ad priors exist; a callable ``ad_id -> prior`` may be passed
   instead. With a constant prior the cut ranks CPC ads by bid.
4. **pCTR** - the current model scores the survivors. Features are
   ``model.pipeline.transform_request(request_fields(request, salt), ad_fields, keys)``;
   an ad's own fields are ``ad_id``, ``advertiser`` (its advertiser id) and
   ``category``, plus ``advertiser_id``/``campaign_id``/``landing_domain`` when the
   model's spec names them. Every other spec field comes from the request or is
   missing (``None``); in particular ``ad_age_days`` and ``position`` (unknown before the
   auction) are not provided. The exact rows scored (sparse ``indices``/``values`` and
   the ``dense`` GBDT row) travel with each winner as
   :class:`~engine.events.ScoredFeatures`, so the impression event - and the training
   example joined from it - sees no train/serve skew.
5. **auction** - :func:`~auction.auction.run_auction` with ``quality(ad_id)`` (default
   1.0), per-pricing reserve prices and ``slots=request.slots``. With an
   :class:`~auction.exploration.Exploration` (off by default), a request in the
   exploration slice or with new ads among its candidates is ranked on exploration
   scores and priced on the model's by :func:`~auction.exploration.explore_auction`;
   impressions where that changed the outcome carry ``exploration=True``. Served ads
   are counted per replica for the policy and the new-ad boost.

If no model is available (``model_source()`` returns ``None``) or scoring raises or
returns non-finite values, the request is served on the prior CTR instead:
``model_available=False`` in the response, ``model_version="prior"`` and empty features
on its impressions. :meth:`AdServer.serve` never raises for a model problem.

Each served ad carries a ready :class:`~engine.events.Impression` event (impression id
a fresh ``uuid4().hex``, price in the ad's pricing unit, 0-based position, pCTR,
model version and scored features, and the pricing and bid that billing charges against)
for the caller to publish. Its pCTR is the model's
calibrated pCTR, also when exploration ranked the ad on another score.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from auction.auction import auction_scores, run_auction
from auction.campaigns import CampaignService
from auction.exploration import Exploration, explore_auction
from auction.pacing import can_afford
from auction.selection import top_k_by_prior
from engine.events import Ad, AdRequest, Campaign, Impression, ScoredFeatures
from engine.features import request_fields

__all__ = [
    "PRIOR_VERSION",
    "AdResponse",
    "AdServer",
    "ServedAd",
    "ad_fields",
    "subscriber_source",
]

log = logging.getLogger(__name__)

PRIOR_VERSION = "prior"
"""``model_version`` of impressions served without a model (on the prior CTR)."""

# Optional ad fields, used only when the model's spec names them.
_OPTIONAL_AD_FIELDS: dict[str, Callable[[Ad], Any]] = {
    "advertiser_id": lambda ad: ad.advertiser_id,
    "campaign_id": lambda ad: ad.campaign_id,
    "landing_domain": lambda ad: ad.landing_domain,
}


class _Rng(Protocol):
    def random(self) -> float: ...


ModelSource = Callable[[], "tuple[Any, Any, Any] | None"]
RemainingBudgets = Callable[[Sequence[str]], Mapping[str, float]]
_Candidate = tuple[Ad, Campaign]  # plain tuples: hundreds are matched per request


def ad_fields(ad: Ad, spec_fields: Sequence[str] = ()) -> dict[str, Any]:
    """The ad's own feature fields (see the module docstring).

    >>> ad = Ad(ad_id="ad1", campaign_id="c1", advertiser_id="a1", category="shoes",
    ...         landing_domain="x.fr", created_ts=0.0)
    >>> ad_fields(ad, ("ad_id", "campaign_id"))
    {'ad_id': 'ad1', 'advertiser': 'a1', 'category': 'shoes', 'campaign_id': 'c1'}
    """
    out: dict[str, Any] = {
        "ad_id": ad.ad_id,
        "advertiser": ad.advertiser_id,
        "category": ad.category,
    }
    for name in spec_fields:
        getter = _OPTIONAL_AD_FIELDS.get(name)
        if getter is not None:
            out[name] = getter(ad)
    return out


def subscriber_source(subscriber) -> ModelSource:
    """A ``model_source`` over a :class:`streams.publish.ModelSubscriber`."""

    def source():
        serving = subscriber.current  # one read: model and scorer always belong together
        if serving is None:
            return None
        return serving.model, serving.scorer, serving.version

    return source


def _ranking_factor(exploration: Exploration, auction: dict[str, Any]) -> np.ndarray | None:
    """The exploration's ranking-score factors for one auction (``None``: exploit)."""
    bids = np.asarray(auction["bids"], dtype=np.float64)
    pctr = auction["pctr"]
    kinds = np.asarray(auction["pricing"], dtype=object)
    scores = auction_scores(bids, pctr, auction["quality"], kinds)
    eligible = (bids >= np.asarray(auction["reserve"])) & (scores > 0) & np.isfinite(scores)
    impressions = exploration.counter.counts(auction["ad_ids"])
    return exploration.ranking_factor(pctr, impressions, eligible, kinds == "cpc", scores)


@dataclass(frozen=True)
class ServedAd:
    """One won slot, with the impression event to publish when it is shown."""

    ad_id: str
    campaign_id: str
    advertiser_id: str
    position: int  # 0 = best slot
    price: float  # in the ad's pricing unit: per click (CPC) or per mille (CPM)
    pricing: str
    bid: float
    pctr: float
    score: float  # expected value per impression on pctr (exploration may rank on another)
    impression: Impression

    @property
    def impression_id(self) -> str:
        return self.impression.impression_id

    @property
    def model_version(self) -> str:
        return self.impression.model_version

    @property
    def features(self) -> ScoredFeatures:
        return self.impression.features


@dataclass(frozen=True)
class AdResponse:
    """The result of one request; ``ads`` ordered by position (possibly empty)."""

    request_id: str
    ads: list[ServedAd] = field(default_factory=list)
    model_available: bool = True
    model_version: str = PRIOR_VERSION
    budget_checked: bool = True  # False when a budget lookup failed (campaign dropped)
    matched: int = 0  # ads matching targeting
    eligible: int = 0  # after throttling and budget checks
    scored: int = 0  # after the prior cut (sent to the model)


class AdServer:
    """Runs the selection funnel over a campaign catalog and the current model.

    ``model_source()`` returns ``(model, scorer, version)`` - a
    :class:`~engine.model.CtrModel`, the scorer to pass to its ``predict_proba_many``
    (``None`` = the model's own learner) and a version recorded on impressions - or
    ``None`` when no model is available. It is called once per request.

    ``exploration`` (``None`` = pure exploitation, as every request outside the slice)
    adds the exploration policy and the new-ad boost of :mod:`auction.exploration`.

    Thread-safe: feature extraction (the pipeline's per-ad row cache) runs under a
    lock of the server's.
    """

    def __init__(
        self,
        service: CampaignService,
        model_source: ModelSource,
        *,
        salt: str = "adengine-v1",
        top_k: int = 50,
        prior_ctr: float | Callable[[str], float] = 0.02,
        quality: Callable[[str], float] | None = None,
        reserve_cpc: float = 0.01,
        reserve_cpm: float = 0.1,
        throttle: Callable[[str], float] | None = None,
        remaining_budgets: RemainingBudgets | None = None,
        exploration: Exploration | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not callable(prior_ctr) and not 0.0 < prior_ctr <= 1.0:
            raise ValueError(f"prior_ctr must be within (0, 1], got {prior_ctr}")
        self.service = service
        self.model_source = model_source
        self.salt = salt
        self.top_k = top_k
        self.prior_ctr = prior_ctr
        self.quality = quality
        self.reserve = {"cpc": reserve_cpc, "cpm": reserve_cpm}
        self.throttle = throttle
        self.remaining_budgets = remaining_budgets
        self.exploration = exploration
        self._features_lock = threading.Lock()
        self._ad_field_cache: dict[str, tuple] = {}

    # -- phases ------------------------------------------------------------------------
    def _match(self, request: AdRequest) -> list[_Candidate]:
        service = self.service
        with service.lock:
            return service.serving_view(sorted(service.index.match(request)))

    def _eligible(self, candidates: list[_Candidate], rng: _Rng) -> tuple[list[_Candidate], bool]:
        """Candidates whose campaign passed the throttle draw and the budget check."""
        throttle, lookup = self.throttle, self.remaining_budgets
        if throttle is None and lookup is None:
            return candidates, True
        campaigns: dict[str, Campaign] = {}
        for _, campaign in candidates:
            campaigns.setdefault(campaign.campaign_id, campaign)
        live = list(campaigns)
        if throttle is not None:  # one draw per campaign, in candidate order
            live = [cid for cid in live if not rng.random() < throttle(cid)]
        checked = True
        if lookup is not None and live:
            try:
                remaining = {cid: float(left) for cid, left in lookup(live).items()}
            except Exception:
                log.exception("budget lookup failed for %d campaigns: not serving them", len(live))
                return [], False
            affordable = []
            for cid in live:
                campaign = campaigns[cid]
                max_charge = campaign.bid if campaign.pricing == "cpc" else campaign.bid / 1000.0
                left = remaining.get(cid)
                if left is None:
                    log.error("no budget answer for campaign %s: not serving it", cid)
                    checked = False
                elif can_afford(left, max_charge):
                    affordable.append(cid)
            live = affordable
        keep = set(live)
        return [c for c in candidates if c[1].campaign_id in keep], checked

    def _priors(self, ad_ids: list[str]) -> list[float]:
        prior = self.prior_ctr
        if callable(prior):
            return [float(prior(ad_id)) for ad_id in ad_ids]
        return [float(prior)] * len(ad_ids)

    def _score(self, request: AdRequest, candidates: list[_Candidate]):
        """``(pctr, features, version)`` from the model, or ``None`` to serve on priors."""
        try:
            current = self.model_source()
            if current is None:
                return None
            model, scorer, version = current
            spec_fields = model.pipeline.spec.fields
            shared = request_fields(request, self.salt)
            ads, keys = self._ad_features([ad for ad, _ in candidates], spec_fields)
            with self._features_lock:
                batch = model.pipeline.transform_request(shared, ads, keys)
            pctr = np.asarray(model.predict_proba_many(batch, scorer), dtype=np.float64)
            if pctr.shape != (len(candidates),) or not np.isfinite(pctr).all():
                raise ValueError(f"model returned invalid pCTRs (shape {pctr.shape})")
            return np.clip(pctr, 0.0, 1.0), batch, str(version)
        except Exception:
            log.exception("model scoring failed: serving on prior CTR")
            return None

    def _ad_features(self, candidates: list[Ad], spec_fields: Sequence[str]):
        """Each ad's feature fields and cache key, computed once per ad version.

        The key identifies the ad's field values, so an edited ad (a new record) gets
        fresh feature rows; an unchanged ad reuses its fields and key.
        """
        cache = self._ad_field_cache
        ads, keys = [], []
        for ad in candidates:
            hit = cache.get(ad.ad_id)
            if hit is None or hit[0] is not ad or hit[1] != spec_fields:
                fields = ad_fields(ad, spec_fields)
                hit = (ad, tuple(spec_fields), fields, tuple(fields.items()))
                cache[ad.ad_id] = hit
            ads.append(hit[2])
            keys.append(hit[3])
        return ads, keys

    def _model_present(self) -> bool:
        try:
            return self.model_source() is not None
        except Exception:
            log.exception("model source failed")
            return False

    # -- entry point -------------------------------------------------------------------
    def serve(self, request: AdRequest, rng: _Rng | None = None) -> AdResponse:
        """Select, price and return up to ``request.slots`` ads (see the module docstring)."""
        rng = random if rng is None else rng
        matched = self._match(request)
        eligible, budget_checked = self._eligible(matched, rng)
        ids = [ad.ad_id for ad, _ in eligible]  # unique: the index matches a set of ids
        priors = self._priors(ids)
        survivors_ids = top_k_by_prior(
            ids,
            bids=[campaign.bid for _, campaign in eligible],
            prior_ctr=priors,
            k=self.top_k,
            pricing=[campaign.pricing for _, campaign in eligible],
        )
        position = {ad_id: n for n, ad_id in enumerate(ids)}
        survivors = [eligible[position[i]] for i in survivors_ids]
        counts = {"matched": len(matched), "eligible": len(eligible), "scored": len(survivors)}
        if not survivors:
            return AdResponse(
                request.request_id,
                [],
                model_available=self._model_present(),
                model_version=PRIOR_VERSION,
                budget_checked=budget_checked,
                **counts,
            )

        scored = self._score(request, survivors)
        if scored is None:
            pctr = np.array([priors[position[i]] for i in survivors_ids], dtype=np.float64)
            batch, version = None, PRIOR_VERSION
        else:
            pctr, batch, version = scored
        quality = (
            [1.0] * len(survivors)
            if self.quality is None
            else [float(self.quality(ad_id)) for ad_id in survivors_ids]
        )
        pricing = [campaign.pricing for _, campaign in survivors]
        auction_args = {
            "bids": [campaign.bid for _, campaign in survivors],
            "pctr": pctr,
            "quality": quality,
            "pricing": pricing,
            "reserve": [self.reserve[p] for p in pricing],
            "slots": request.slots,
            "ad_ids": survivors_ids,
        }
        exploration = self.exploration
        factor = None if exploration is None else _ranking_factor(exploration, auction_args)
        if factor is None:
            winners = run_auction(**auction_args)
            explored = [False] * len(winners)
        else:
            winners, explored = explore_auction(**auction_args, factor=factor)
        if exploration is not None:
            exploration.counter.add(survivors_ids[win.index] for win in winners)
        served = []
        for win, exploring in zip(winners, explored):
            ad, campaign = survivors[win.index]
            if batch is None:
                features = ScoredFeatures(indices=[], values=[], dense=[])
            else:
                features = ScoredFeatures(
                    indices=batch.indices[win.index].tolist(),
                    values=batch.values[win.index].tolist(),
                    dense=batch.dense[win.index].tolist(),
                )
            p = float(pctr[win.index])
            impression = Impression(
                impression_id=uuid.uuid4().hex,
                request_id=request.request_id,
                ts=request.ts,
                ad_id=ad.ad_id,
                campaign_id=campaign.campaign_id,
                advertiser_id=ad.advertiser_id,
                position=win.position,
                price=win.price,
                model_version=version,
                exploration=exploring,
                pctr=p,
                features=features,
                pricing=campaign.pricing,
                bid=campaign.bid,
            )
            served.append(
                ServedAd(
                    ad_id=ad.ad_id,
                    campaign_id=campaign.campaign_id,
                    advertiser_id=ad.advertiser_id,
                    position=win.position,
                    price=win.price,
                    pricing=win.pricing,
                    bid=win.bid,
                    pctr=p,
                    score=win.score,
                    impression=impression,
                )
            )
        return AdResponse(
            request.request_id,
            served,
            model_available=scored is not None,
            model_version=version,
            budget_checked=budget_checked,
            **counts,
        )
