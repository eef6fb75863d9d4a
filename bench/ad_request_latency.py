"""End-to-end latency of one ad request through ``AdServer.serve``, in process.

The issue's target: an ad request with 10,000 ads in the index and about 1,000 candidates
after phase 1 (targeting match), served in process; p50 and p99 with a target p99 of
10 ms, and the cost of the model stage as a ratio to a prior-CTR-only funnel.

Catalog: a :class:`~auction.campaigns.CampaignService` with ``--ads`` ads spread evenly
over ``--campaigns`` campaigns (50 advertisers). Each campaign targets exactly one of
``--regions`` regions (``r00``, ``r01``, ...), and every request names one of them, so a
request matches ``ads / regions`` ads (1,000 with the defaults); the match count is
measured (``matched_median`` from the responses' funnel counts). Bids vary per campaign
(1 campaign in 10 is CPM) so the prior cut (phase 2, ``bid x prior CTR``) has something
to rank. Ad categories and advertiser ids follow the synthetic log's vocabulary.

Model: a :class:`~engine.model.CtrModel` trained briefly on
:func:`engine.datasets.synthetic_log` as ``tests/test_serving.py`` does (trees on half the
rows, then LR mini-batches), served through ``model.export_scorer()``.

One timed call = ``AdServer.serve(request, rng)``: index match under the catalog lock,
eligibility, prior cut to ``--top-k``, features + pCTR for the survivors, GSP auction and
impression events. With the default ``--top-k 1000`` the model scores every matched ad
(``scored_median``). The same requests then go through a prior-CTR-only funnel (the same
server with ``model_source`` returning ``None``); ``model_stage_ratio`` is
``p50 / prior_only_p50_ms``. The two funnels are timed alternately, request by request,
so both see the same machine load. ``default_top_k`` reports p50/p99 at ``AdServer``'s
default ``top_k=50`` too. Warm-up requests (covering every region, so every ad's feature
rows are cached, as in a long-running server) are not timed. The garbage collector stays
on, as in a server; ``gc_collections_by_generation`` counts the collections started during
the timed loop (all three funnels), since a full (generation 2) collection of this heap
is one long pause.

The process pins itself to its first allowed CPU and sets ``OMP_NUM_THREADS=1`` before
numpy/LightGBM are imported, as ``bench/score_latency.py`` does.

Run (from the repository root)::

    python bench/ad_request_latency.py [--requests 300] [--ads 10000] [--campaigns 200]
        [--regions 10] [--top-k 1000] [--warmup 30] [--profile]

``--profile`` prints the top cProfile entries (cumulative time) of the model funnel over
the timed requests (a separate pass, after timing). The last stdout line is one JSON
object.
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
CPU = min(os.sched_getaffinity(0))
os.sched_setaffinity(0, {CPU})  # before numpy/LightGBM start any thread

import argparse  # noqa: E402
import cProfile  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from auction.auth import OPERATOR  # noqa: E402
from auction.campaigns import CampaignService  # noqa: E402
from auction.serving import AdServer  # noqa: E402
from engine.events import AdRequest, RequestContext, UserProfile  # noqa: E402
from engine.replay import synthetic_model  # noqa: E402

TARGET_P99_MS = 10.0
NOW = 1_800_000_000.0
SALT = "bench-salt"
N_ADVERTISERS = 50
CATEGORIES = ("travel", "health", "games", "finance", "toys", "beauty", "auto", "fashion")
AGES = (20, 30, 40, 50, 60, None)
DEVICES = ("ios", "android", "desktop", None)
QUERIES = ("", "", "shoes", "cheap flights", "red shoes", "games")


def build_catalog(n_ads: int, n_campaigns: int, n_regions: int, seed: int) -> CampaignService:
    """``n_ads`` ads over ``n_campaigns`` campaigns, each campaign targeting one region."""
    rng = random.Random(seed)
    per_campaign, extra = divmod(n_ads, n_campaigns)
    # Readable ids in creation order: advertisers, then each campaign followed by its ads.
    ids: list[str] = [f"adv{a:02d}" for a in range(N_ADVERTISERS)]
    for c in range(n_campaigns):
        ids.append(f"cmp{c:04d}")
        ids.extend(f"b{c:04d}x{k:03d}" for k in range(per_campaign + (c < extra)))
    id_iter = iter(ids)
    service = CampaignService(clock=lambda: NOW, id_factory=lambda: next(id_iter))
    advertisers = [
        service.create_advertiser(OPERATOR, f"advertiser {a}").advertiser_id
        for a in range(N_ADVERTISERS)
    ]
    for c in range(n_campaigns):
        cpm = c % 10 == 9
        campaign = service.create_campaign(
            OPERATOR,
            {
                "name": f"campaign {c}",
                "daily_budget": 100.0,
                "total_budget": 1000.0,
                "start_ts": NOW - 86400,
                "end_ts": NOW + 86400 * 365,
                "pricing": "cpm" if cpm else "cpc",
                "bid": round(rng.uniform(1.0, 30.0) if cpm else rng.uniform(0.05, 2.0), 3),
                "targeting": {"regions": [f"r{c % n_regions:02d}"]},
            },
            advertiser_id=advertisers[c % N_ADVERTISERS],
        )
        for _ in range(per_campaign + (c < extra)):
            service.create_ad(
                OPERATOR,
                campaign.campaign_id,
                {"category": rng.choice(CATEGORIES), "landing_domain": f"{c}.example"},
            )
    return service


def make_requests(n: int, n_regions: int, seed: int, start: int = 0) -> list[AdRequest]:
    rng = random.Random(seed)
    out = []
    for i in range(start, start + n):
        user = UserProfile(
            user_id=f"user{rng.randrange(100_000)}",
            age=rng.choice(AGES),
            gender=rng.choice(["m", "f", None]),
            region=f"r{i % n_regions:02d}",  # cycles, so every region (and ad) is seen
            interests=rng.sample(CATEGORIES, rng.randrange(3)),
        )
        context = RequestContext(
            device=rng.choice(DEVICES),
            placement=rng.choice(["feed", "search"]),
            page_category=rng.choice(CATEGORIES),
        )
        out.append(
            AdRequest(
                request_id=f"req{i}",
                ts=NOW + i,
                user=user,
                context=context,
                query=rng.choice(QUERIES),
                slots=rng.randint(1, 4),
            )
        )
    return out


def ms(ns: list[int]) -> np.ndarray:
    return np.asarray(ns, dtype=np.float64) / 1e6


def pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ads", type=int, default=10_000)
    parser.add_argument("--campaigns", type=int, default=200)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    if min(args.requests, args.ads, args.campaigns, args.regions, args.top_k) < 1:
        parser.error("counts must be >= 1")
    if args.train_rows < 200:
        parser.error("--train-rows must be >= 200")

    t0 = time.perf_counter()
    model = synthetic_model(args.train_rows)
    train_s = time.perf_counter() - t0
    scorer = model.export_scorer()

    def model_source():
        return model, scorer, "bench"

    t0 = time.perf_counter()
    service = build_catalog(args.ads, args.campaigns, args.regions, seed=11)
    build_s = time.perf_counter() - t0
    ads_in_index = len(service.index)

    server = AdServer(service, model_source, salt=SALT, top_k=args.top_k)
    prior_only = AdServer(service, lambda: None, salt=SALT, top_k=args.top_k)
    default_k = AdServer(service, model_source, salt=SALT)  # AdServer's default top_k (50)

    warmup = make_requests(max(args.warmup, args.regions), args.regions, seed=1)
    requests = make_requests(args.requests, args.regions, seed=2, start=len(warmup))

    # Warm-up: fills the pipeline's per-ad row cache for every ad (all regions are visited).
    cold_ns = []
    for request in warmup:
        for srv in (server, prior_only, default_k):
            t0 = time.perf_counter_ns()
            srv.serve(request, random.Random(0))
            cold_ns.append(time.perf_counter_ns() - t0)

    gc.collect()
    gc_runs = [0, 0, 0]  # collections started during the timed loop, by generation

    def count_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_runs[info["generation"]] += 1

    gc.callbacks.append(count_gc)
    model_ns, model_cpu_ns, prior_ns, default_ns = [], [], [], []
    matched, eligible, scored, served, available = [], [], [], [], []
    for k, request in enumerate(requests):
        # Alternate which funnel goes first so neither systematically follows the other.
        order = ("model", "prior") if k % 2 == 0 else ("prior", "model")
        for which in order:
            if which == "model":
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                response = server.serve(request, random.Random(k))
                model_ns.append(time.perf_counter_ns() - t0)
                model_cpu_ns.append(time.thread_time_ns() - c0)
                matched.append(response.matched)
                eligible.append(response.eligible)
                scored.append(response.scored)
                served.append(len(response.ads))
                available.append(response.model_available)
            else:
                t0 = time.perf_counter_ns()
                prior_response = prior_only.serve(request, random.Random(k))
                prior_ns.append(time.perf_counter_ns() - t0)
                assert not prior_response.model_available
        t0 = time.perf_counter_ns()
        default_scored = default_k.serve(request, random.Random(k)).scored
        default_ns.append(time.perf_counter_ns() - t0)
    gc.callbacks.remove(count_gc)
    if not all(available):
        raise SystemExit("the model funnel fell back to priors: see the log above")

    ours, ours_cpu, prior, default = ms(model_ns), ms(model_cpu_ns), ms(prior_ns), ms(default_ns)
    p50, p99 = pct(ours, 50), pct(ours, 99)
    prior_p50 = pct(prior, 50)

    profile_top = None
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for k, request in enumerate(requests):
            server.serve(request, random.Random(k))
        profiler.disable()
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("cumulative").print_stats(30)
        print(buf.getvalue())
        profile_top = "printed above (cumulative, model funnel)"

    result = {
        "benchmark": "ad_request_latency",
        "p50_ms": p50,
        "p99_ms": p99,
        "mean_ms": round(float(ours.mean()), 3),
        "max_ms": round(float(ours.max()), 3),
        "cpu_p50_ms": pct(ours_cpu, 50),
        "cpu_p99_ms": pct(ours_cpu, 99),
        "ads_in_index": ads_in_index,
        "matched_median": float(np.median(matched)),
        "matched_min": int(min(matched)),
        "matched_max": int(max(matched)),
        "eligible_median": float(np.median(eligible)),
        "scored_median": float(np.median(scored)),
        "served_mean": round(float(np.mean(served)), 2),
        "top_k": args.top_k,
        "prior_only_p50_ms": prior_p50,
        "prior_only_p99_ms": pct(prior, 99),
        "prior_only_mean_ms": round(float(prior.mean()), 3),
        "model_stage_ratio": round(p50 / prior_p50, 2),
        "model_stage_p50_ms": round(p50 - prior_p50, 3),
        "default_top_k": {
            "top_k": default_k.top_k,
            "scored": default_scored,
            "p50_ms": pct(default, 50),
            "p99_ms": pct(default, 99),
        },
        "target_p99_ms": TARGET_P99_MS,
        "meets_target": p99 <= TARGET_P99_MS,
        "gc_collections_by_generation": gc_runs,
        "gc_tracked_objects": len(gc.get_objects()),
        "requests": len(requests),
        "warmup_requests": len(warmup),
        "cold_first_request_ms": round(cold_ns[0] / 1e6, 3),
        "campaigns": args.campaigns,
        "regions": args.regions,
        "train_rows": args.train_rows,
        "train_s": round(train_s, 2),
        "catalog_build_s": round(build_s, 2),
        "num_trees": model.trees.num_trees,
        "profile": profile_top,
        "cpu": CPU,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    print(
        f"{ads_in_index} ads, {result['matched_median']:.0f} matched, "
        f"{result['scored_median']:.0f} scored (top_k {args.top_k}), {len(requests)} requests "
        f"on CPU {CPU}: p50 {p50:.2f} ms, p99 {p99:.2f} ms (target <= {TARGET_P99_MS} ms); "
        f"prior-only p50 {prior_p50:.2f} ms, p99 {result['prior_only_p99_ms']:.2f} ms; "
        f"model stage ratio {result['model_stage_ratio']}x; "
        f"top_k {default_k.top_k}: p50 {result['default_top_k']['p50_ms']:.2f} ms"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
