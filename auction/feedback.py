"""Ad quality from hide and report feedback, for the ad server's ``quality`` hook.

The billing worker (:mod:`auction.billing`) counts, per ad, the impressions, hides and
reports it consumes, each once whatever the redeliveries, in one Redis hash per ad
(:func:`feedback_key`: fields ``impressions``, ``hides``, ``reports``). Every
``[auction] quality_interval_s`` a :class:`FeedbackQuality` reads the counters of the
catalogue's ads in pipelined round trips and turns them into
:func:`~auction.auction.quality_score` multipliers (smoothed negative-feedback rate,
parameters ``[auction] quality_*``). :meth:`FeedbackQuality.quality` is the
``quality(ad_id) -> multiplier`` hook of :class:`~auction.serving.AdServer`.

Qualities are a pure function of the shared counters, so every replica reading the same
Redis serves with the same qualities; an ad with no counters (new, or never shown) gets
the prior's quality, 1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import redis

from auction.auction import quality_score
from auction.periodic import Periodic

__all__ = ["COUNTERS", "FeedbackQuality", "catalogue_ads", "feedback_key"]

log = logging.getLogger(__name__)

COUNTERS = ("impressions", "hides", "reports")
"""Fields of an ad's feedback hash."""


def feedback_key(prefix: str, ad_id: str) -> str:
    """The Redis hash of ``ad_id``'s feedback counters.

    >>> feedback_key("adengine:feedback:", "ad7")
    'adengine:feedback:ad:ad7'
    """
    return f"{prefix}ad:{ad_id}"


def catalogue_ads(service) -> Callable[[], list[str]]:
    """Ids of every ad in a :class:`~auction.campaigns.CampaignService` (for
    :class:`FeedbackQuality`); a campaign deleted while listing is skipped."""
    from auction.auth import OPERATOR
    from auction.campaigns import NotFoundError

    def ids() -> list[str]:
        out = []
        for campaign in service.list_campaigns(OPERATOR):
            try:
                out.extend(ad.ad_id for ad in service.list_ads(OPERATOR, campaign.campaign_id))
            except NotFoundError:
                continue
        return out

    return ids


def _count(value: bytes | str | None) -> float:
    return 0.0 if value is None else float(value)


class FeedbackQuality:
    """Quality multipliers of the catalogue's ads, refreshed every ``interval_s``.

    ``ads()`` returns the ids to read. :meth:`refresh` reads the counters once and
    serves the new qualities from then on (the thread of :meth:`start` calls it; tests
    call it directly). When a refresh fails the previous qualities stay.
    """

    def __init__(
        self,
        client: redis.Redis,
        ads: Callable[[], Iterable[str]],
        *,
        interval_s: float = 10.0,
        prefix: str = "adengine:feedback:",
        prior_strength: float = 1000.0,
        prior_rate: float = 0.005,
        report_weight: float = 5.0,
        penalty: float = 50.0,
        chunk_size: int = 1000,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        if not prior_strength > 0:
            raise ValueError(f"prior_strength must be > 0, got {prior_strength}")
        if not 0.0 <= prior_rate <= 1.0:
            raise ValueError(f"prior_rate must be within [0, 1], got {prior_rate}")
        if report_weight < 0 or penalty < 0:
            raise ValueError("report_weight and penalty must be >= 0")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.redis = client
        self.ads = ads
        self.interval_s = float(interval_s)
        self.prefix = prefix
        self.params = {
            "prior_strength": float(prior_strength),
            "prior_rate": float(prior_rate),
            "report_weight": float(report_weight),
            "penalty": float(penalty),
        }
        self.chunk_size = chunk_size
        self._quality: dict[str, float] = {}
        self._loop = Periodic(self.refresh, self.interval_s, "feedback")

    @classmethod
    def from_settings(cls, client: redis.Redis, ads, settings) -> FeedbackQuality:
        """From :class:`engine.config.Settings`: ``[auction] quality_*`` and the counters'
        ``[billing] feedback_prefix``."""
        auction = settings.auction
        return cls(
            client,
            ads,
            interval_s=auction.quality_interval_s,
            prefix=settings.billing.feedback_prefix,
            prior_strength=auction.quality_prior_strength,
            prior_rate=auction.quality_prior_rate,
            report_weight=auction.quality_report_weight,
            penalty=auction.quality_penalty,
        )

    # -- serving hook -------------------------------------------------------------------
    def quality(self, ad_id: str) -> float:
        """Quality multiplier of ``ad_id`` in ``(0, 1]`` (1 when it has no feedback)."""
        return self._quality.get(ad_id, 1.0)

    @property
    def qualities(self) -> dict[str, float]:
        return dict(self._quality)

    # -- refresh ------------------------------------------------------------------------
    def counts(self, ad_ids: list[str]) -> np.ndarray:
        """``(len(ad_ids), 3)`` impressions, hides and reports, ``chunk_size`` ads a trip."""
        out = np.zeros((len(ad_ids), len(COUNTERS)), dtype=np.float64)
        for start in range(0, len(ad_ids), self.chunk_size):
            chunk = ad_ids[start : start + self.chunk_size]
            pipe = self.redis.pipeline(transaction=False)
            for ad_id in chunk:
                pipe.hmget(feedback_key(self.prefix, ad_id), COUNTERS)
            for row, values in enumerate(pipe.execute(), start=start):
                out[row] = [_count(v) for v in values]
        return out

    def refresh(self) -> dict[str, float]:
        """Read the counters of ``ads()``; returns (and serves from then on) their qualities."""
        ad_ids = sorted(set(self.ads()))
        impressions, hides, reports = self.counts(ad_ids).T
        scores = np.atleast_1d(quality_score(impressions, hides, reports, **self.params))
        quality = dict(zip(ad_ids, scores.tolist(), strict=True))
        self._quality = quality  # one reference swap: readers never see a half update
        return quality

    def start(self) -> FeedbackQuality:
        """Refresh now, then every ``interval_s`` in a daemon thread until :meth:`stop`."""
        self._loop.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._loop.stop(timeout)
