"""API keys for the campaign API: per-advertiser keys stored hashed, plus one operator key.

Key format: ``ak_<key_id>.<secret>``. ``key_id`` (16 hex chars) is public and indexes the
stored record, so authentication is one dict lookup plus one hash, never a scan of all
keys. ``secret`` is 32 random bytes (URL-safe base64) and is never stored or logged:
only ``scrypt(secret, salt)`` with a per-key random salt is kept, and the hash is
compared with :func:`hmac.compare_digest` (constant time). The raw key is returned once,
by :meth:`KeyStore.issue`.

The platform operator's key is configured as an encoded hash (see :func:`hash_key`,
``python -m auction.auth`` prints a fresh key and its hash), so the raw operator key
never appears in configuration either. It must not look like an advertiser key
(``ak_...``); the generated one starts with ``op_``.

Unknown key ids still cost one hash (against a dummy record) so response time does not
reveal whether a key id exists.

>>> store = KeyStore(cost=2**4)
>>> issued = store.issue("adv-1")
>>> store.authenticate(issued.raw_key)
Principal(advertiser_id='adv-1')
>>> store.authenticate(issued.raw_key + "x") is None
True
>>> store.revoke(issued.key_id), store.authenticate(issued.raw_key)
(True, None)
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

__all__ = [
    "DEFAULT_COST",
    "OPERATOR",
    "IssuedKey",
    "KeyInfo",
    "KeyStore",
    "Principal",
    "hash_key",
    "verify_key",
]

KEY_PREFIX = "ak_"
DEFAULT_COST = 2**14  # scrypt N (r=8, p=1: 16 MiB, ~40 ms); keys are 256-bit random anyway
_R, _P, _DKLEN = 8, 1, 32


@dataclass(frozen=True)
class Principal:
    """Who is calling: an advertiser (``advertiser_id`` set) or the platform operator."""

    advertiser_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.advertiser_id is None

    def __repr__(self) -> str:
        if self.is_operator:
            return "Principal(operator)"
        return f"Principal(advertiser_id={self.advertiser_id!r})"


OPERATOR = Principal(advertiser_id=None)


@dataclass(frozen=True)
class IssuedKey:
    """A freshly issued key: ``raw_key`` is shown to the caller once and never stored."""

    key_id: str
    advertiser_id: str
    raw_key: str

    def __repr__(self) -> str:  # keep the secret out of logs and tracebacks
        return f"IssuedKey(key_id={self.key_id!r}, advertiser_id={self.advertiser_id!r})"


@dataclass(frozen=True)
class KeyInfo:
    """Public metadata of a stored key (no secret, no hash)."""

    key_id: str
    advertiser_id: str
    created_ts: float
    revoked: bool


@dataclass(frozen=True)
class KeyRecord:
    """One issued key as stored: its id, owner, scrypt salt and digest, never the secret."""

    key_id: str
    advertiser_id: str
    salt: bytes
    digest: bytes
    cost: int
    created_ts: float
    revoked: bool = False


def scrypt_digest(secret: str, salt: bytes, cost: int) -> bytes:
    """The scrypt digest of ``secret`` with ``salt`` and cost ``N``."""
    return hashlib.scrypt(
        secret.encode(), salt=salt, n=cost, r=_R, p=_P, dklen=_DKLEN, maxmem=2**26
    )


def hash_key(raw_key: str, cost: int = DEFAULT_COST) -> str:
    """Encode ``raw_key`` as ``scrypt$<N>$<salt hex>$<hash hex>`` (e.g. the operator key).

    >>> encoded = hash_key("s3cret", cost=2**4)
    >>> verify_key("s3cret", encoded), verify_key("s3cret!", encoded)
    (True, False)
    """
    salt = secrets.token_bytes(16)
    return f"scrypt${cost}${salt.hex()}${scrypt_digest(raw_key, salt, cost).hex()}"


def verify_key(raw_key: str, encoded: str) -> bool:
    """Whether ``raw_key`` matches a :func:`hash_key` encoding (constant-time compare)."""
    try:
        scheme, cost, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            raise ValueError(scheme)
        expected, salt_bytes, n = bytes.fromhex(digest), bytes.fromhex(salt), int(cost)
    except ValueError as exc:
        raise ValueError("malformed key hash: expected 'scrypt$<N>$<salt>$<hash>'") from exc
    return hmac.compare_digest(scrypt_digest(raw_key, salt_bytes, n), expected)


def _parse(raw_key: str) -> tuple[str, str] | None:
    if not raw_key.startswith(KEY_PREFIX) or "." not in raw_key:
        return None
    key_id, _, secret = raw_key[len(KEY_PREFIX) :].partition(".")
    if not key_id or not secret:
        return None
    return key_id, secret


class KeyStore:
    """In-memory store of hashed advertiser keys, plus the operator key hash.

    ``cost`` is the scrypt N parameter for new keys (a power of two); each record keeps
    its own cost, so raising it later does not invalidate existing keys. Thread-safe.

    Successful authentications are cached for ``cache_ttl_s`` (0 disables) so a client
    does not pay one scrypt per request. The cache is keyed by HMAC-SHA256 of the raw key
    under a random per-process pepper (never the raw key) and re-checks revocation on
    every hit, so :meth:`revoke` takes effect immediately. Failures are never cached.
    """

    def __init__(
        self,
        operator_key_hash: str | None = None,
        cost: int = DEFAULT_COST,
        cache_ttl_s: float = 60.0,
        cache_size: int = 10_000,
        clock=time.monotonic,
    ) -> None:
        if cost < 2 or cost & (cost - 1):
            raise ValueError(f"cost must be a power of two >= 2, got {cost}")
        self._cache_ttl_s = float(cache_ttl_s)
        self._cache_size = int(cache_size)
        self._clock = clock
        self._pepper = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[str | None, Principal, float]] = {}
        if operator_key_hash is not None:
            verify_key("", operator_key_hash)  # fail fast on a malformed setting
        self._operator_hash = operator_key_hash or None
        self._cost = cost
        self._keys: dict[str, KeyRecord] = {}
        self._lock = threading.Lock()
        self._dummy = KeyRecord("", "", secrets.token_bytes(16), b"\0" * _DKLEN, cost, 0.0)

    def issue(self, advertiser_id: str) -> IssuedKey:
        """Create a key for ``advertiser_id``; the returned ``raw_key`` is not kept."""
        if not advertiser_id:
            raise ValueError("advertiser_id must be non-empty")
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        digest = scrypt_digest(secret, salt, self._cost)
        with self._lock:
            key_id = secrets.token_hex(8)
            while key_id in self._keys:
                key_id = secrets.token_hex(8)
            self._keys[key_id] = KeyRecord(
                key_id, advertiser_id, salt, digest, self._cost, time.time()
            )
        return IssuedKey(key_id, advertiser_id, f"{KEY_PREFIX}{key_id}.{secret}")

    def revoke(self, key_id: str, advertiser_id: str | None = None) -> bool:
        """Revoke a key (of ``advertiser_id`` when given); False when no such key."""
        with self._lock:
            record = self._keys.get(key_id)
            if record is None or (
                advertiser_id is not None and record.advertiser_id != advertiser_id
            ):
                return False
            self._keys[key_id] = KeyRecord(**{**record.__dict__, "revoked": True})
            return True

    def revoke_all(self, advertiser_id: str) -> int:
        """Revoke every key of an advertiser; returns how many were active."""
        with self._lock:
            ids = [
                k
                for k, r in self._keys.items()
                if r.advertiser_id == advertiser_id and not r.revoked
            ]
        return sum(self.revoke(k) for k in ids)

    def keys_of(self, advertiser_id: str) -> list[KeyInfo]:
        with self._lock:
            records = [r for r in self._keys.values() if r.advertiser_id == advertiser_id]
        return [KeyInfo(r.key_id, r.advertiser_id, r.created_ts, r.revoked) for r in records]

    def cached(self, raw_key: str | None) -> Principal | None:
        """The principal of a key authenticated recently, without hashing; ``None`` on a miss.

        Microseconds, so it may run on an event loop; on ``None`` call :meth:`authenticate`
        (one scrypt, tens of milliseconds) off the loop.
        """
        if not raw_key:
            return None
        return self._lookup(self._cache_key(raw_key))

    def authenticate(self, raw_key: str | None) -> Principal | None:
        """The principal of a valid, unrevoked key; ``None`` otherwise."""
        if not raw_key:
            return None
        cache_key = self._cache_key(raw_key)
        principal = self._lookup(cache_key)
        if principal is not None:
            return principal
        parsed = _parse(raw_key)
        if parsed is not None:
            key_id, secret = parsed
            record = self._keys.get(key_id)
            found = record is not None
            record = record if found else self._dummy
            ok = hmac.compare_digest(scrypt_digest(secret, record.salt, record.cost), record.digest)
            if not (found and ok and not record.revoked):
                return None
            return self._remember(cache_key, key_id, Principal(record.advertiser_id))
        if self._operator_hash is not None and verify_key(raw_key, self._operator_hash):
            return self._remember(cache_key, None, OPERATOR)
        return None

    def _cache_key(self, raw_key: str) -> bytes:
        return hmac.new(self._pepper, raw_key.encode(), hashlib.sha256).digest()

    def _lookup(self, cache_key: bytes) -> Principal | None:
        """A fresh cache entry whose key is still unrevoked (a stale one is dropped)."""
        hit = self._cache.get(cache_key)
        if hit is None:
            return None
        key_id, principal, expires = hit
        record = None if key_id is None else self._keys.get(key_id)
        fresh = self._clock() < expires
        if fresh and (key_id is None or (record is not None and not record.revoked)):
            return principal
        self._cache.pop(cache_key, None)
        return None

    def _remember(self, cache_key: bytes, key_id: str | None, principal: Principal) -> Principal:
        if self._cache_ttl_s > 0:
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # crude but bounded; entries are cheap to rebuild
            self._cache[cache_key] = (key_id, principal, self._clock() + self._cache_ttl_s)
        return principal


def main() -> None:  # pragma: no cover - manual tool
    """Print a new random operator key and its hash (put only the hash in settings)."""
    raw = "op_" + secrets.token_urlsafe(32)
    print(f"operator key (give to the operator, store nowhere): {raw}")
    print(f"operator_key_hash (settings / ADENGINE_AUCTION_OPERATOR_KEY_HASH): {hash_key(raw)}")


if __name__ == "__main__":  # pragma: no cover
    main()
