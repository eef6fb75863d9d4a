"""The whole online loop, end to end: broker + joiner worker + trainer + serving subscriber.

Impressions and clicks go in at the front (the impressions and engagements topics); the
test reads the result where the auction would, from the serving
:class:`~streams.publish.ModelSubscriber`. Harness: :class:`bench.freshness.Loop` (default
settings; the joiner and the trainer run as subprocesses, everything is stopped in its
``__aexit__``).
"""

import asyncio

import pytest

from bench.freshness import Loop

pytestmark = pytest.mark.filterwarnings(r"ignore:(read|open)_text is deprecated:DeprecationWarning")

T0 = 1_700_000_000.0  # event time of the first impression (the window is 900 s)


def test_impressions_and_clicks_reach_serving_as_exactly_the_expected_examples():
    n, clicked_every = 60, 4
    ids = [f"loop-{k}" for k in range(n)]
    clicked = set(ids[::clicked_every])
    m = len(clicked)

    async def scenario():
        async with Loop() as loop:
            settings, sub = loop.settings, loop.subscriber
            assert settings.calibration.negative_downsampling_rate == 1.0  # all negatives kept
            features = loop.impressions(ids)
            for k, iid in enumerate(ids):
                await loop.send_impression(iid, features[iid], T0 + k)
            for k, iid in enumerate(ids):
                if iid in clicked:
                    await loop.send_engagement(iid, T0 + k + 30.0)
            # a second copy of a click: must not make a second positive
            first = ids[0]
            await loop.send_engagement(first, T0 + 31.0)
            await loop.wait_for(
                lambda: clicked <= set(sub.state.get("seen", ())), 60, "the positives to serve"
            )
            # positives only so far: the window has not closed for any impression
            assert sub.current.model.learner.n_examples == m
            assert sub.state["pv"]["_swy"] == m
            # advance event time on every partition: the unclicked impressions expire
            end = T0 + n + 10 * settings.joiner.window_s
            for p in range(settings.kafka.impressions_partitions):
                tick = f"tick-{p}"
                await loop.send_impression(tick, features[first], end, partition=p)
                await loop.send_engagement(tick, end, kind="hide", partition=p)
            await loop.wait_for(
                lambda: sub.current.model.learner.n_examples >= n, 60, "the negatives to serve"
            )
            await asyncio.sleep(2.5)  # one more publication interval: nothing else may arrive
            await loop.wait_for(lambda: not sub.refresh(), 10, "serving to settle")
            return sub.current, sub.state

    serving, state = asyncio.run(asyncio.wait_for(scenario(), 150))
    model = serving.model
    assert model.learner.n_examples == n  # every impression labelled and learnt once
    assert state["pv"]["n"] == n and state["pv"]["_swy"] == m  # exactly m positives
    assert state["pv"]["_sw"] == n  # weight 1 each: nothing downsampled
    assert set(ids) <= set(state["seen"]) and not any(s.startswith("tick") for s in state["seen"])
    stats = state["stats"]
    assert stats["learned"] == n and stats["duplicates"] == 0 and stats["malformed"] == 0
    assert stats["paused"] == 0
