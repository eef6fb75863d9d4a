"""Helpers shared by the tests: sample events and worker processes run as children."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from engine.events import Engagement, Impression, ScoredFeatures

REPO = Path(__file__).resolve().parents[1]


def impression(iid: str, ts: float = 1.7e9, **fields) -> Impression:
    """An impression with small scored features; any field can be overridden."""
    values = {
        "impression_id": iid,
        "request_id": "r-" + iid,
        "ts": ts,
        "ad_id": "ad",
        "campaign_id": "c",
        "advertiser_id": "a",
        "position": 0,
        "price": 0.1,
        "model_version": "m1",
        "exploration": False,
        "pctr": 0.1,
        "features": ScoredFeatures(indices=[1, 2], values=[1.0, 1.0], dense=[0.5]),
    }
    values.update(fields)
    return Impression(**values)


def engagement(eid: str, iid: str, ts: float, kind: str = "click") -> Engagement:
    return Engagement(engagement_id=eid, impression_id=iid, ts=ts, kind=kind)


class ChildProcess:
    """``python <args>`` as a child process (own session) logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def assignment(self) -> str:
        """The partitions of the consumer group's latest assignment, as logged."""
        block = self.tail(400_000).rsplit("Setting newly assigned partitions", 1)
        return block[1].split("for group", 1)[0] if len(block) == 2 else ""
