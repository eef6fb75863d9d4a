"""The campaign catalogue kept on the compacted campaigns topic; every replica folds it.

Every change to advertisers, campaigns, ads and advertiser API keys is one record on
``[kafka] campaigns_topic`` (one partition, ``cleanup.policy=compact``), and a serving
replica's catalogue is nothing but that topic read from the beginning, last value per
key winning. Replicas therefore agree with the topic and with each other; budgets and
spend live in Redis (:mod:`auction.budget`), not here.

Record format (key -> value, UTF-8 key, JSON value):

=====================  ===========================================================
``advertiser:<id>``    :class:`~auction.campaigns.Advertiser`
``campaign:<id>``      :class:`~engine.events.Campaign` (targeting included)
``ad:<id>``            :class:`~engine.events.Ad`
``apikey:<key_id>``    :class:`ApiKeyRecord`: the scrypt salt and digest, never a key
``marker:<uuid>``      always a tombstone: a replica's catch-up marker (see below)
=====================  ===========================================================

Each value is the full current record with its ``schema_version``; a deletion is a
tombstone (null value). Deleting a campaign writes its ads' tombstones, then its own.
Records that fail to decode and unknown key kinds are counted and skipped, never fatal.

Writes go to the topic first. :class:`CatalogueReplica` is the ``commit`` hook of its
:class:`~auction.campaigns.CampaignService`: a change is produced with ``acks=all``, and
the API answers only once the broker acknowledged it (durable) and this replica's reader
has applied it back (read-your-writes). A write the broker does not acknowledge within
``timeout_s`` raises :class:`~auction.campaigns.CatalogUnavailableError` (HTTP 503) and
nothing is applied here, so a replica never holds a change its topic lacks. (As with any
timed-out write, a broker that took the record at the last moment still has it; every
replica then applies it like any other record.) Since the topic is the only source of
state, a change written through one replica appears on every other within one fetch
(about 0.1 s).

Readiness: on start a replica writes a tombstone under a fresh ``marker:<uuid>`` key and
is caught up once it has read past that record's offset. This does not rely on
ListOffsets(latest), which tansu answers wrongly after multi-record batches (see
:mod:`streams.broker`); tombstoned marker keys are removed by compaction.

API keys: the topic holds only scrypt hashes of advertiser keys (256-bit random secrets),
so every replica authenticates every key, keys survive restarts, and a revocation reaches
all replicas with the next fetch. The operator key hash stays in settings.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from auction.auth import DEFAULT_COST, KEY_PREFIX, IssuedKey, KeyRecord, KeyStore, scrypt_digest
from auction.campaigns import (
    Advertiser,
    CampaignService,
    CatalogChange,
    CatalogUnavailableError,
)
from engine.config import KafkaSettings, Settings
from engine.events import Ad, Campaign

__all__ = [
    "ApiKeyRecord",
    "CatalogueReplica",
    "ReplicatedKeyStore",
    "decode_record",
    "encode_change",
]

log = logging.getLogger(__name__)

MARKER = "marker"


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An advertiser key as stored: scrypt parameters and digest, hex-encoded."""

    key_id: str
    advertiser_id: str
    salt: str
    digest: str
    cost: int
    created_ts: float
    revoked: bool = False
    schema_version: int = 1


KINDS: dict[str, type[msgspec.Struct]] = {
    "advertiser": Advertiser,
    "campaign": Campaign,
    "ad": Ad,
    "apikey": ApiKeyRecord,
}
_ENCODER = msgspec.json.Encoder()
_DECODERS = {kind: msgspec.json.Decoder(type_) for kind, type_ in KINDS.items()}

Record = tuple[str, bytes | None]  # (topic key, value or None for a tombstone)


def encode_change(kind: str, key: str, record: msgspec.Struct | None) -> Record:
    """The topic record of one change.

    >>> encode_change("ad", "ad1", None)
    ('ad:ad1', None)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown catalogue record kind {kind!r}")
    return f"{kind}:{key}", None if record is None else _ENCODER.encode(record)


def decode_record(key: bytes | str, value: bytes | None) -> tuple[str, str, Any] | None:
    """``(kind, id, record or None)`` of a topic record; ``None`` for markers.

    Raises ``ValueError`` for an unknown kind or a value that does not decode.

    >>> decode_record(b"campaign:c1", None)
    ('campaign', 'c1', None)
    >>> decode_record(b"marker:0f3c", None) is None
    True
    """
    text = key.decode() if isinstance(key, bytes) else key
    kind, sep, ident = text.partition(":")
    if kind == MARKER:
        return None
    if not sep or not ident or kind not in KINDS:
        raise ValueError(f"unknown catalogue key {text!r}")
    if value is None:
        return kind, ident, None
    try:
        return kind, ident, _DECODERS[kind].decode(value)
    except (msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"undecodable {kind} record {ident!r}: {exc}") from exc


class ReplicatedKeyStore(KeyStore):
    """A :class:`~auction.auth.KeyStore` whose keys live on the catalogue topic.

    :meth:`issue` and :meth:`revoke` write the hashed record through ``write(records)``
    (acknowledged and applied back, or :class:`CatalogUnavailableError`); the reader
    calls :meth:`apply_record` for every key record, from any replica.
    """

    def __init__(
        self,
        write: Callable[[list[Record]], None],
        operator_key_hash: str | None = None,
        cost: int = DEFAULT_COST,
        **kwargs: Any,
    ) -> None:
        super().__init__(operator_key_hash, cost, **kwargs)
        self._write = write

    def issue(self, advertiser_id: str) -> IssuedKey:
        if not advertiser_id:
            raise ValueError("advertiser_id must be non-empty")
        secret, salt = secrets.token_urlsafe(32), secrets.token_bytes(16)
        key_id = secrets.token_hex(8)
        while key_id in self._keys:
            key_id = secrets.token_hex(8)
        record = ApiKeyRecord(
            key_id=key_id,
            advertiser_id=advertiser_id,
            salt=salt.hex(),
            digest=scrypt_digest(secret, salt, self._cost).hex(),
            cost=self._cost,
            created_ts=time.time(),
        )
        self._write([encode_change("apikey", record.key_id, record)])
        return IssuedKey(record.key_id, advertiser_id, f"{KEY_PREFIX}{record.key_id}.{secret}")

    def revoke(self, key_id: str, advertiser_id: str | None = None) -> bool:
        with self._lock:
            held = self._keys.get(key_id)
        if held is None or (advertiser_id is not None and held.advertiser_id != advertiser_id):
            return False
        if not held.revoked:
            record = ApiKeyRecord(
                key_id=key_id,
                advertiser_id=held.advertiser_id,
                salt=held.salt.hex(),
                digest=held.digest.hex(),
                cost=held.cost,
                created_ts=held.created_ts,
                revoked=True,
            )
            self._write([encode_change("apikey", key_id, record)])
        return True

    def apply_record(self, key_id: str, record: ApiKeyRecord | None) -> None:
        """Install (or, for a tombstone, forget) one key read from the topic."""
        with self._lock:
            if record is None:
                self._keys.pop(key_id, None)
                return
            self._keys[key_id] = KeyRecord(
                key_id,
                record.advertiser_id,
                bytes.fromhex(record.salt),
                bytes.fromhex(record.digest),
                record.cost,
                record.created_ts,
                record.revoked,
            )


class CatalogueReplica:
    """A :class:`CampaignService` and key store folded from the campaigns topic.

    Their changes are written to the topic (see the module docstring). ``start()`` runs a
    daemon thread with its own event loop: it creates the loop's topics if missing, writes
    the catch-up marker, reads the topic from the beginning and keeps following it.
    :attr:`ready` turns true once the marker is read; while the broker is unreachable it
    keeps retrying (and a ready replica keeps serving what it has). Writes through
    :attr:`service` and :attr:`keys` block the calling thread (never the loop) until
    acknowledged and applied here.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        kafka: KafkaSettings | None = None,
        *,
        operator_key_hash: str | None = None,
        key_cost: int = DEFAULT_COST,
        on_change: Callable[[CatalogChange], None] | None = None,
        timeout_s: float = 5.0,
        fetch_max_wait_ms: int = 100,
        retry_s: float = 1.0,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.kafka = kafka if kafka is not None else KafkaSettings()
        self.topic = self.kafka.campaigns_topic
        self.timeout_s = timeout_s
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.retry_s = retry_s
        self.service = CampaignService(on_change=on_change, commit=self._commit_changes)
        self.keys = ReplicatedKeyStore(self.write, operator_key_hash, cost=key_cost)
        self.applied = 0  # records applied (markers excluded)
        self.skipped = 0  # records that did not decode or apply
        self.last_error: str | None = None
        self._position = 0  # next offset to read
        self._marker: int | None = None  # offset of our catch-up marker
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._producer = None
        self._consumer = None

    @classmethod
    def from_settings(
        cls, bootstrap_servers: str, settings: Settings, **kwargs: Any
    ) -> CatalogueReplica:
        """A replica with ``[kafka]`` topics and the ``[auction]`` key and timeout settings."""
        auction = settings.auction
        kwargs.setdefault("operator_key_hash", auction.operator_key_hash or None)
        kwargs.setdefault("key_cost", auction.key_scrypt_cost)
        kwargs.setdefault("timeout_s", auction.catalogue_timeout_s)
        return cls(bootstrap_servers, settings.kafka, **kwargs)

    # -- state -------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether this replica has read everything written before it started."""
        with self._cond:
            return self._marker is not None and self._position > self._marker

    @property
    def position(self) -> int:
        """The next offset this replica will read (everything before it is applied)."""
        with self._cond:
            return self._position

    def status(self) -> str:
        """A one-line state for probes and logs."""
        with self._cond:
            position, marker = self._position, self._marker
        if marker is not None and position > marker:
            return f"ready at offset {position}"
        state = "connecting" if marker is None else f"catching up: {position}/{marker + 1}"
        return state + (f" (last error: {self.last_error})" if self.last_error else "")

    def wait_ready(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.ready, timeout)

    def wait_applied(self, offset: int, timeout: float) -> bool:
        """Block until the record at ``offset`` is applied here; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._position > offset, timeout)

    # -- writing -----------------------------------------------------------------------
    def _commit_changes(self, changes: list[CatalogChange]) -> None:
        self.write([encode_change(c.kind, c.key, c.record) for c in changes])

    def write(self, records: list[Record]) -> int:
        """Produce ``records`` in order, wait for the acks, then for this replica to apply
        them; returns the last offset. :class:`CatalogUnavailableError` when not acked."""
        if not self.ready:
            raise CatalogUnavailableError(f"the catalogue is not loaded yet ({self.status()})")
        loop = self._loop
        if loop is None or loop.is_closed():
            raise CatalogUnavailableError("the catalogue replica is not running")
        future = asyncio.run_coroutine_threadsafe(self._produce(records), loop)
        try:
            offset = future.result(self.timeout_s + 1.0)
        except Exception as exc:
            future.cancel()
            reason = str(exc) or f"no answer within {self.timeout_s:g}s"
            raise CatalogUnavailableError(
                f"the catalogue topic did not acknowledge the change ({reason}); not applied"
            ) from exc
        if not self.wait_applied(offset, self.timeout_s):
            # durable on the topic, so it stands; it will appear here with the next fetch
            log.warning("catalogue offset %d acknowledged but not yet applied here", offset)
        return offset

    async def _produce(self, records: list[Record]) -> int:
        producer = self._producer
        if producer is None:
            raise ConnectionError("no connection to the broker")
        sent = [
            await producer.send(self.topic, value, key=key.encode(), partition=0)
            for key, value in records
        ]
        metadata = await asyncio.wait_for(asyncio.gather(*sent), self.timeout_s)
        return metadata[-1].offset

    # -- reading -----------------------------------------------------------------------
    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        try:
            decoded = decode_record(key or b"", value)
            if decoded is None:
                return
            kind, ident, record = decoded
            if kind == "apikey":
                self.keys.apply_record(ident, record)
            else:
                self.service.apply(CatalogChange(kind, ident, record))
            self.applied += 1
        except Exception as exc:  # one bad record never stops the replica
            self.skipped += 1
            log.warning("catalogue record %r skipped: %s", key, exc)

    async def _connect(self) -> None:
        from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

        from streams.topics import ensure_topics_async

        await ensure_topics_async(self.bootstrap_servers, self.kafka, timeout_s=self.timeout_s)
        timeout_ms = max(1000, int(self.timeout_s * 1000))
        producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap_servers, acks="all", request_timeout_ms=timeout_ms
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap_servers,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self.fetch_max_wait_ms,
            request_timeout_ms=max(timeout_ms, 2 * self.fetch_max_wait_ms + 1000),
        )
        self._producer, self._consumer = producer, consumer
        await producer.start()
        await consumer.start()
        tp = TopicPartition(self.topic, 0)
        consumer.assign([tp])
        if self._position:
            consumer.seek(tp, self._position)
        else:
            await consumer.seek_to_beginning(tp)
        if self._marker is None:
            key = f"{MARKER}:{uuid.uuid4().hex}".encode()
            meta = await producer.send_and_wait(self.topic, None, key=key, partition=0)
            with self._cond:
                self._marker = meta.offset
                self._cond.notify_all()

    async def _follow(self) -> None:
        consumer = self._consumer
        while True:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    self._apply(record.key, record.value)
                    with self._cond:
                        self._position = record.offset + 1
                        self._cond.notify_all()
            if batches:
                self.last_error = None

    async def _disconnect(self) -> None:
        clients, self._producer, self._consumer = (self._producer, self._consumer), None, None
        for client in clients:
            if client is not None:
                try:
                    await asyncio.wait_for(client.stop(), self.timeout_s)
                except (Exception, asyncio.CancelledError) as exc:  # already broken
                    log.debug("catalogue client stop: %s", exc)

    async def _run(self) -> None:
        while True:
            try:
                await self._connect()
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("catalogue replica: %s; retrying in %gs", self.last_error, self.retry_s)
                await self._disconnect()
                await asyncio.sleep(self.retry_s)

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> CatalogueReplica:
        """Start following the topic in a background thread (returns at once)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._main, name=f"catalogue:{self.topic}", daemon=True
            )
            self._thread.start()
            self._started.wait()
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._task = loop.create_task(self._run())
        self._started.set()
        try:
            loop.run_until_complete(self._task)
        except asyncio.CancelledError:
            pass
        finally:
            loop.run_until_complete(self._disconnect())
            leftovers = asyncio.all_tasks(loop)  # a client's tasks cut short by a dead broker
            for task in leftovers:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
            loop.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following and close the clients (idempotent)."""
        loop, task, thread = self._loop, self._task, self._thread
        if loop is not None and task is not None and not loop.is_closed():
            loop.call_soon_threadsafe(task.cancel)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> CatalogueReplica:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
