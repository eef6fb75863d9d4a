"""The pure event-time join (streams.join) on a plain dict store."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.calibration import NegativeDownsampler
from engine.events import Engagement, Impression, ScoredFeatures, decode, encode
from streams.join import Join, SideClick, join_events
from tests.support import engagement, impression

WINDOW, GRACE = 100.0, 10.0


def imp(iid: str, ts: float) -> Impression:
    return impression(
        iid,
        ts,
        model_version="m7",
        pctr=0.05,
        features=ScoredFeatures(indices=[1, len(iid)], values=[1.0, 0.5], dense=[0.25]),
    )


click = engagement


def ticks(ts: float, part: int = 0) -> list[tuple[int, object]]:
    """Advance both streams of ``part`` to ``ts`` (the watermark is their minimum)."""
    return [
        (part, imp(f"tick-{part}-{ts}", ts)),
        (part, click(f"tick-{part}-{ts}", "none", ts, "hide")),
    ]


def examples(out) -> dict[str, tuple[int, float]]:
    got = {}
    for o in out:
        if o.kind == "example" and not o.key.startswith("tick"):
            assert o.key not in got, f"{o.key} labelled twice"
            got[o.key] = (o.record.label, o.record.weight)
    return got


def side(out) -> list[tuple[str, str]]:
    return [(o.record.reason, o.record.engagement.engagement_id) for o in out if o.kind == "side"]


def run(events, **kw):
    kw.setdefault("window_s", WINDOW)
    kw.setdefault("grace_s", GRACE)
    return join_events(events, **kw)


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_n_impressions_m_clicks(rate):
    n, m = 200, 37
    rng = random.Random(3)
    events = [(0, imp(f"i{k}", float(k))) for k in range(n)]
    clicked = rng.sample(range(n), m)
    for k in sorted(clicked):
        events.append((0, click(f"e{k}", f"i{k}", k + rng.uniform(0, WINDOW))))
    events.sort(key=lambda pe: pe[1].ts)
    out, counts = run(events + ticks(n + WINDOW + 1), rate=rate, seed=11)
    got = examples(out)
    positives = {k for k, (label, _) in got.items() if label == 1}
    assert positives == {f"i{k}" for k in clicked}
    ds = NegativeDownsampler(rate, seed=11)
    expected_neg = {f"i{k}" for k in range(n) if k not in clicked and ds.keep(0, key=f"i{k}")}
    assert {k for k, (label, _) in got.items() if label == 0} == expected_neg
    assert all(w == (1.0 if label else 1 / rate) for label, w in got.values())
    assert counts["positives"] == m
    assert counts["negatives"] - 1 == len(expected_neg) or counts["negatives"] == len(
        expected_neg
    )  # the tick impression itself may not have expired yet
    assert counts["negatives_dropped"] == n - m - len(expected_neg)
    if rate < 1:
        assert 0 < len(expected_neg) < n - m


def test_positive_copies_the_impression():
    i = imp("i1", 10.0)
    out, _ = run([(0, i), (0, click("e1", "i1", 42.0))])
    [o] = out
    ex = o.record
    assert (o.kind, o.key, ex.example_id, ex.impression_id) == ("example", "i1", "i1", "i1")
    assert (ex.label, ex.weight, ex.impression_ts, ex.label_ts) == (1, 1.0, 10.0, 42.0)
    assert ex.features == i.features and ex.model_version == "m7"
    assert decode(encode(ex), type(ex)) == ex


def test_negative_only_after_the_window_passes():
    join = Join({}, window_s=WINDOW, grace_s=GRACE)
    assert join.process(imp("i1", 0.0), 0) == []
    for p, e in ticks(WINDOW):  # watermark == ts + window: not yet expired
        assert all(o.key != "i1" for o in join.process(e, p))
    out = [o for p, e in ticks(WINDOW + 0.5) for o in join.process(e, p)]
    [neg] = [o for o in out if o.key == "i1"]
    assert (neg.record.label, neg.record.weight, neg.record.label_ts) == (0, 1.0, WINDOW)


def test_impressions_alone_do_not_advance_the_watermark():
    join = Join({}, window_s=WINDOW, grace_s=GRACE)
    join.process(imp("i1", 0.0), 0)
    assert join.process(imp("i2", 10 * WINDOW), 0) == []
    assert join.watermark(0) == float("-inf") and join.pending() == 2
    join.process(click("h", "x", 5 * WINDOW, "hide"), 0)
    assert join.watermark(0) == 5 * WINDOW and join.pending() == 1


def test_bad_parameters_and_events():
    with pytest.raises(ValueError):
        Join({}, window_s=0, grace_s=1)
    with pytest.raises(TypeError):
        Join({}, window_s=1, grace_s=1).process("not an event", 0)


def test_click_before_its_impression_within_grace_is_positive():
    events = [(0, click("e1", "i1", 50.0)), *ticks(55.0), (0, imp("i1", 49.0))]
    out, counts = run(events)
    assert examples(out) == {"i1": (1, 1.0)}
    assert counts["held"] == 1 and counts["orphans"] == 0


def test_held_click_without_impression_becomes_an_orphan():
    events = [(0, click("e1", "i1", 50.0)), (0, click("e1", "i1", 50.0)), *ticks(60.0)]
    out, counts = run(events)
    assert side(out) == []  # watermark 60 == ts + grace: still held
    out2, counts = run(events + ticks(60.5) + [(0, imp("i1", 49.0))])
    assert side(out2) == [("no_impression", "e1")]
    assert counts["orphans"] == 1 and counts["duplicates"] == 1
    # the impression that arrives after its click was given up on becomes a negative
    out3, _ = run(events + ticks(60.5) + [(0, imp("i1", 49.0))] + ticks(200.0))
    assert examples(out3) == {"i1": (0, 1.0)}


def test_duplicate_clicks_are_ignored():
    events = [
        (0, imp("i1", 0.0)),
        (0, click("e1", "i1", 5.0)),
        (0, click("e1", "i1", 5.0)),  # redelivered
        (0, click("e2", "i1", 7.0)),  # second click on a clicked impression
        *ticks(WINDOW + 1),
        (0, click("e3", "i1", 8.0)),  # still remembered after the window
    ]
    out, counts = run(events)
    assert examples(out) == {"i1": (1, 1.0)}
    assert counts["duplicates"] == 3 and counts["clicks"] == 4 and side(out) == []


def test_click_after_the_window_is_late():
    events = [(0, imp("i1", 0.0)), (0, click("e1", "i1", WINDOW + 0.5)), *ticks(2 * WINDOW)]
    out, counts = run(events)
    assert side(out) == [("after_window", "e1")]
    assert examples(out) == {"i1": (0, 1.0)}
    assert counts["late"] == 1 and counts["positives"] == 0
    late = next(o.record for o in out if o.kind == "side")
    assert isinstance(late, SideClick) and late.impression_ts == 0.0


def test_in_window_click_seen_after_expiry_is_late_not_a_second_label():
    events = [(0, imp("i1", 0.0)), *ticks(WINDOW + 1), (0, click("e1", "i1", 50.0))]
    out, counts = run(events)
    assert examples(out) == {"i1": (0, 1.0)}
    assert side(out) == [("after_expiry", "e1")]


def test_duplicate_impression_and_hides_reports():
    events = [
        (0, imp("i1", 0.0)),
        (0, imp("i1", 0.0)),
        (0, click("h1", "i1", 1.0, "hide")),
        (0, click("r1", "i1", 2.0, "report")),
        *ticks(WINDOW + 1),
    ]
    out, counts = run(events)
    assert examples(out) == {"i1": (0, 1.0)}
    assert counts["duplicate_impressions"] == 1
    assert (counts["hides"], counts["reports"]) == (2, 1)  # the tick is a hide


def test_tombstones_are_forgotten_after_retention():
    store: dict = {}
    events = [(0, imp("i1", 0.0)), (0, click("e1", "i1", 1.0)), *ticks(2 * WINDOW + 5)]
    run(events, store=store)
    assert "i:i1" not in store
    assert any(k.startswith("i:tick") for k in store)


def _stream(seed: int, n: int = 120):
    rng = random.Random(seed)
    imps, engs = [], []
    for k in range(n):
        ts = k * 3.0
        imps.append(imp(f"i{k}", ts))
        if rng.random() < 0.3:
            engs.append(click(f"e{k}", f"i{k}", ts + rng.uniform(0, WINDOW)))
        if rng.random() < 0.05:
            engs.append(click(f"e{k}", f"i{k}", ts + rng.uniform(0, WINDOW)))  # duplicate
        if rng.random() < 0.05:
            engs.append(click(f"late{k}", f"i{k}", ts + WINDOW + rng.uniform(1, 50)))
        if rng.random() < 0.05:
            engs.append(click(f"orphan{k}", f"nope{k}", ts))
    engs.sort(key=lambda e: e.ts)
    end = n * 3.0 + 3 * WINDOW
    imps.append(imp("tick-end", end))
    engs.append(click("tick-end", "none", end, "hide"))
    return imps, engs


def _merge(imps, engs, choices):
    """Interleave the two topics as ``choices`` says (cycled), each topic kept in order."""
    out, i, e, k = [], 0, 0, 0
    while i < len(imps) or e < len(engs):
        pick = choices[k % len(choices)]
        k += 1
        if (pick and e < len(engs)) or i >= len(imps):
            out.append((0, engs[e]))
            e += 1
        else:
            out.append((0, imps[i]))
            i += 1
    return out


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10**6), st.lists(st.booleans(), min_size=1, max_size=300))
def test_examples_do_not_depend_on_how_the_topics_interleave(seed, choices):
    imps, engs = _stream(seed % 50)
    by_time = sorted(
        [(0, e) for e in imps + engs], key=lambda pe: (pe[1].ts, isinstance(pe[1], Engagement))
    )
    ref, ref_counts = run(by_time, rate=0.5, seed=1)
    got, counts = run(_merge(imps, engs, choices), rate=0.5, seed=1)
    assert examples(got) == examples(ref)
    assert sorted(side(got)) == sorted(side(ref))
    for name in ("positives", "negatives", "negatives_dropped", "late", "orphans", "duplicates"):
        assert counts[name] == ref_counts[name], name


def test_replay_gives_identical_examples():
    imps, engs = _stream(5)
    events = sorted([(0, e) for e in imps + engs], key=lambda pe: pe[1].ts)
    first, _ = run(events, rate=0.4, seed=2)
    again, _ = run(events, rate=0.4, seed=2)
    assert [(o.kind, o.key, encode(o.record)) for o in first] == [
        (o.kind, o.key, encode(o.record)) for o in again
    ]


def test_restart_on_the_same_store_and_at_least_once_redelivery():
    """A new Join over the surviving store (index rebuilt) plus re-delivered events."""
    imps, engs = _stream(9)
    events = sorted([(0, e) for e in imps + engs], key=lambda pe: pe[1].ts)
    whole, _ = run(events, rate=0.5, seed=3)
    store: dict = {}
    cut = len(events) // 2
    part1, _ = run(events[:cut], rate=0.5, seed=3, store=store)
    part2, counts = run(events[cut - 40 :], rate=0.5, seed=3, store=store)  # 40 re-delivered
    assert examples(part1 + part2) == examples(whole)
    assert counts["duplicate_impressions"] > 0


def test_partitions_are_independent():
    events = [(0, imp("a", 0.0)), (1, imp("b", 0.0)), *ticks(WINDOW + 1, part=0)]
    out, _ = run(events)
    assert examples(out) == {"a": (0, 1.0)}
    out, _ = run(events + ticks(WINDOW + 1, part=1))
    assert examples(out) == {"a": (0, 1.0), "b": (0, 1.0)}
