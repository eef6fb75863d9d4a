"""Open-loop HTTP load generator: requests at a fixed rate, latency from the scheduled time.

Run as its own process by ``bench/http_load.py`` (so the client never shares an event
loop, or a GIL, with the server it measures). It reads one JSON plan on stdin::

    {"rate": 300, "timeout_s": 2.0, "connections": 64, "headers": {...},
     "phases": [{"name": "ads", "method": "POST", "url": "http://...", "bodies": [...],
                 "warmup_s": 2.0, "duration_s": 10.0}, ...]}

and writes one JSON object on stdout: per phase, the latency in milliseconds of every
measured request (in schedule order), its outcome (``ok``, ``status:<code>``,
``timeout``, ``connect``, ``error:<type>``), the achieved rate and the generator's lag.

Schedule: request ``i`` of a phase is due at ``t0 + i / rate`` whatever happened to the
requests before it (open loop), and its latency runs from that due time to the end of
its response body, so a stalled server or a busy client shows up as latency instead of
silently lowering the offered rate (no coordinated omission). Requests due during the
phase's ``warmup_s`` are sent but not recorded. Bodies (``bodies`` for POST, JSON
documents as strings) are used round robin. Connections are kept alive and pooled
(``connections`` at most); a request waiting for a free connection is waiting, so it
counts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp


async def _one(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes | None,
    due: float,
    timeout: aiohttp.ClientTimeout,
) -> tuple[float, str, float]:
    try:
        async with session.request(method, url, data=body, timeout=timeout) as response:
            await response.read()
            outcome = "ok" if 200 <= response.status < 300 else f"status:{response.status}"
    except TimeoutError:
        outcome = "timeout"
    except aiohttp.ClientConnectionError:
        outcome = "connect"
    except aiohttp.ClientError as exc:
        outcome = f"error:{type(exc).__name__}"
    end = time.perf_counter()
    return (end - due) * 1e3, outcome, end


async def run_phase(
    session: aiohttp.ClientSession, phase: dict[str, Any], rate: float, timeout_s: float
) -> dict[str, Any]:
    """Send one phase's requests on schedule; the measured ones' latencies and outcomes."""
    method, url = phase["method"], phase["url"]
    bodies = [b.encode() for b in phase.get("bodies") or []] or [None]
    warmup_n = round(phase["warmup_s"] * rate)
    total = warmup_n + round(phase["duration_s"] * rate)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    tasks: list[asyncio.Task] = []
    lag_ms: list[float] = []  # how late each request left the generator
    t0 = time.perf_counter() + 0.05
    for i in range(total):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i >= warmup_n:
            lag_ms.append((time.perf_counter() - due) * 1e3)
        body = bodies[i % len(bodies)]
        tasks.append(asyncio.create_task(_one(session, method, url, body, due, timeout)))
    results = await asyncio.gather(*tasks)
    measured = results[warmup_n:]
    first_due = t0 + warmup_n / rate
    done = [end for _, outcome, end in measured if outcome == "ok"]
    lag_ms.sort()
    return {
        "name": phase["name"],
        "latency_ms": [round(latency, 3) for latency, _, _ in measured],
        "outcome": [outcome for _, outcome, _ in measured],
        "sent": total,
        "offered_rps": len(measured) / max(total / rate - warmup_n / rate, 1e-9),
        # answered requests over the time from the first measured due time to the last answer
        "achieved_rps": len(done) / (max(done) - first_due) if done else 0.0,
        "send_lag_p99_ms": lag_ms[int(0.99 * (len(lag_ms) - 1))] if lag_ms else 0.0,
    }


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=plan["connections"], keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, headers=plan["headers"]) as session:
        phases = []
        for phase in plan["phases"]:
            cpu = time.process_time()
            result = await run_phase(session, phase, plan["rate"], plan["timeout_s"])
            result["client_cpu_s"] = time.process_time() - cpu
            phases.append(result)
    return {"phases": phases}


def main() -> int:
    plan = json.load(sys.stdin)
    result = asyncio.run(run(plan))
    sys.stdout.write(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
