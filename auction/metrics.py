"""Prometheus metrics of ad serving: what ``POST /v1/ad-requests`` answered.

Everything is a counter (or a histogram) so that Prometheus derives ratios over any
window instead of the process averaging over its lifetime:

* fill rate: ``rate(adengine_serving_slots_filled_total) /
  rate(adengine_serving_slots_requested_total)``;
* mean served pCTR: ``rate(adengine_serving_pctr_sum) / rate(adengine_serving_pctr_count)``
  (one observation per served ad);
* share of requests served on the prior CTR (no usable model):
  ``rate(adengine_serving_prior_fallbacks_total) / rate(adengine_serving_requests_total)``.

The served model version is exported as numbers, comparable with the trainer's
``adengine_trainer_model_version``: ``adengine_serving_model_version`` for a published
snapshot version (``"17"``), ``adengine_serving_tree_version`` and
``adengine_serving_weights_version`` for a model version ``"t3.w17"``. Requests served on
the prior leave them unchanged; 0 means no model served yet.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from auction.serving import AdResponse

__all__ = ["PCTR_BUCKETS", "ServingMetrics", "parse_model_version"]

PCTR_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Histogram buckets of served pCTRs: click rates live in the low percents."""

_TREES_WEIGHTS = re.compile(r"t(\d+)\.w(\d+)")


def parse_model_version(version: str) -> dict[str, int]:
    """The numbers in a served model version (empty for the prior or an unknown form).

    >>> parse_model_version("17")
    {'model': 17}
    >>> parse_model_version("t3.w17")
    {'trees': 3, 'weights': 17}
    >>> parse_model_version("prior")
    {}
    """
    if version.isdigit():
        return {"model": int(version)}
    match = _TREES_WEIGHTS.fullmatch(version)
    if match is None:
        return {}
    return {"trees": int(match[1]), "weights": int(match[2])}


class ServingMetrics:
    """Counters and gauges of ad serving, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("adengine_serving_requests", "Ad requests answered", registry=r)
        self.slots_requested = Counter(
            "adengine_serving_slots_requested", "Ad slots asked for by ad requests", registry=r
        )
        self.slots_filled = Counter(
            "adengine_serving_slots_filled", "Ad slots filled (ads served)", registry=r
        )
        self.candidates = Counter(
            "adengine_serving_candidates",
            "Candidate ads per funnel stage: matched, eligible (throttle and budget), scored",
            ["stage"],
            registry=r,
        )
        self.pctr = Histogram(
            "adengine_serving_pctr", "pCTR of each served ad", buckets=PCTR_BUCKETS, registry=r
        )
        self.fallbacks = Counter(
            "adengine_serving_prior_fallbacks",
            "Ad requests served on the prior CTR because no usable model was available",
            registry=r,
        )
        self.budget_errors = Counter(
            "adengine_serving_budget_check_failures",
            "Ad requests where a budget lookup failed (the campaign was not served)",
            registry=r,
        )
        self.exploration = Counter(
            "adengine_serving_exploration_impressions",
            "Served ads chosen by exploration rather than by the model's ranking",
            registry=r,
        )
        self.expected_spend = Counter(
            "adengine_serving_expected_spend",
            "Expected advertiser charge of served ads: price x pCTR (CPC), price / 1000 (CPM)",
            ["pricing"],
            registry=r,
        )
        self.model_version = Gauge(
            "adengine_serving_model_version",
            "Published model snapshot version last served (0: none yet)",
            registry=r,
        )
        self.tree_version = Gauge(
            "adengine_serving_tree_version", "GBDT version of the model last served", registry=r
        )
        self.weights_version = Gauge(
            "adengine_serving_weights_version",
            "LR weights version of the model last served",
            registry=r,
        )
        for stage in ("matched", "eligible", "scored"):
            self.candidates.labels(stage)
        for pricing in ("cpc", "cpm"):
            self.expected_spend.labels(pricing)

    def observe(self, slots: int, response: AdResponse) -> None:
        """Record one answered ad request that asked for ``slots`` ads."""
        self.requests.inc()
        self.slots_requested.inc(slots)
        self.slots_filled.inc(len(response.ads))
        self.candidates.labels("matched").inc(response.matched)
        self.candidates.labels("eligible").inc(response.eligible)
        self.candidates.labels("scored").inc(response.scored)
        if not response.model_available:
            self.fallbacks.inc()
        if not response.budget_checked:
            self.budget_errors.inc()
        for ad in response.ads:
            self.pctr.observe(ad.pctr)
            if ad.impression.exploration:
                self.exploration.inc()
            charge = ad.price * ad.pctr if ad.pricing == "cpc" else ad.price / 1000.0
            self.expected_spend.labels(ad.pricing).inc(charge)
        if response.model_available:
            versions = parse_model_version(response.model_version)
            if "model" in versions:
                self.model_version.set(versions["model"])
            if "trees" in versions:
                self.tree_version.set(versions["trees"])
                self.weights_version.set(versions["weights"])
