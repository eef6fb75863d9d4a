"""`adengine serve` as a real process: HTTP up, ad requests answered, clean shutdown."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from auction.auth import hash_key

OPERATOR_KEY = "op_test-serve-operator-key"
COST = 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_in(directory: Path) -> list[str]:
    """Pids of running processes whose working directory is inside ``directory``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = (proc / "cwd").readlink()
        except OSError:
            continue
        if str(cwd).startswith(str(directory)):
            found.append(proc.name)
    return found


def test_serve_answers_over_http_and_stops_on_sigterm(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADENGINE_")}
    env.pop("REDIS_URL", None)
    env.update(
        ADENGINE_REDIS_EMBEDDED_PATH=str(tmp_path / "redis.db"),
        ADENGINE_AUCTION_OPERATOR_KEY_HASH=hash_key(OPERATOR_KEY, cost=COST),
        ADENGINE_AUCTION_KEY_SCRYPT_COST=str(COST),
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        request = {"request_id": "r1", "ts": 1.7e9, "user": {"user_id": "u1"}, "slots": 1}
        r = httpx.post(f"{base}/v1/ad-requests", json=request, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        assert r.json()["model_available"] is False  # nothing published yet: prior CTR
        bad = httpx.post(f"{base}/v1/ad-requests", json={"slots": 0}, headers=headers)
        assert bad.status_code == 422
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert not processes_in(tmp_path), "the embedded Redis outlived `adengine serve`"
