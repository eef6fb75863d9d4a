"""A function run now and then every few seconds in a daemon thread (pacing, quality)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``fn()`` at :meth:`start` and then every ``interval_s`` until :meth:`stop`.

    A failing call is logged and the next one goes ahead on schedule: what ``fn`` serves
    (throttles, qualities) stays at its last good value meanwhile.
    """

    def __init__(self, fn: Callable[[], object], interval_s: float, name: str) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.fn, self.interval_s, self.name = fn, interval_s, name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.fn()
            except Exception:  # Redis or the catalogue failing must not end the loop
                log.exception("%s failed: keeping the previous values", self.name)
            self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
