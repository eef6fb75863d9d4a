"""The joiner's table: per-partition join state and consumed offsets in Redis, fenced.

Each partition of the joiner's input topics has, under ``<prefix>:<partition>:``:

* ``state``: a hash, the :class:`streams.join.Join` store of that partition (impressions
  keyed by impression id, held clicks, the event-time watermark);
* ``offsets``: a hash, source topic -> offset of the last event applied to ``state``;
* ``epoch``: a counter bumped by every worker that loads the partition.

A worker loads a partition when the consumer group assigns it (:meth:`JoinStateStore.load`
bumps the epoch), works on an in-memory copy (:class:`ChangeTrackingDict`) and, after
each batch, writes what changed *together with* the offsets it consumed in one Lua script
that first checks that the epoch is still its own (:meth:`JoinStateStore.commit`). So:

* state and offsets can never disagree: a worker killed at any point restarts from a
  state that matches its offsets, skips the events already applied and re-applies the
  rest (outputs of that batch may be produced twice; they carry ``example_id`` and are
  dropped downstream);
* a worker that lost the partition in a rebalance cannot overwrite the new owner's state
  (its commit is refused and it drops its copy).

This replaces a Kafka changelog: the embedded broker reports a wrong end offset after
multi-record batches (see :mod:`streams.broker`), which makes changelog recovery lose the
newest writes unless every write is its own produce request, and a changelog commits
independently of the source offsets, so a kill between the two loses or repeats updates.

>>> store = JoinStateStore(redis_client, "adengine:joiner:demo")  # doctest: +SKIP
>>> part = store.load(0)                                            # doctest: +SKIP
>>> part.state["w:0"] = b"..."; part.offsets["adengine.impressions"] = 41  # doctest: +SKIP
>>> store.commit(part.take_changes())                               # doctest: +SKIP
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis

__all__ = ["ChangeTrackingDict", "JoinStateStore", "PartitionState", "StateChanges"]

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n_set, n_del, n_off = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local i = 5
for _ = 1, n_set do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2 end
for _ = 1, n_del do redis.call('HDEL', KEYS[2], ARGV[i]); i = i + 1 end
for _ = 1, n_off do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]); i = i + 2 end
return 1
"""


class ChangeTrackingDict(dict):
    """A ``dict`` that remembers which keys were set or deleted since :meth:`take_changes`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.changed: set = set()

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        self.changed.add(key)

    def __delitem__(self, key) -> None:
        dict.__delitem__(self, key)
        self.changed.add(key)

    def take_changes(self) -> tuple[dict, list]:
        """``(upserts, deletions)`` since the last call, and start tracking afresh."""
        upserts = {k: self[k] for k in self.changed if k in self}
        deletions = [k for k in self.changed if k not in self]
        self.changed = set()
        return upserts, deletions


@dataclass(frozen=True)
class StateChanges:
    """What one batch changed in a partition, with the offsets the state then reflects."""

    partition: int
    epoch: int
    upserts: dict
    deletions: list
    offsets: dict[str, int]


@dataclass
class PartitionState:
    """One partition as a worker holds it: its state, applied offsets and epoch."""

    partition: int
    epoch: int
    state: ChangeTrackingDict
    offsets: dict[str, int] = field(default_factory=dict)

    def applied(self, topic: str, offset: int) -> bool:
        """Whether the event at ``topic``/``offset`` is already reflected in the state."""
        return offset <= self.offsets.get(topic, -1)

    def take_changes(self) -> StateChanges:
        """The changes since the last call, to :meth:`JoinStateStore.commit` (now or later:
        later batches may go on changing the state meanwhile)."""
        upserts, deletions = self.state.take_changes()
        return StateChanges(self.partition, self.epoch, upserts, deletions, dict(self.offsets))


class JoinStateStore:
    """Load and commit :class:`PartitionState` in Redis under ``prefix``."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._commit = client.register_script(_COMMIT)

    def _keys(self, partition: int) -> tuple[str, str, str]:
        base = f"{self.prefix}:{partition}:"
        return base + "epoch", base + "state", base + "offsets"

    def load(self, partition: int) -> PartitionState:
        """Take the partition over: bump its epoch and read its state and offsets."""
        epoch_key, state_key, offsets_key = self._keys(partition)
        pipe = self.client.pipeline(transaction=True)
        pipe.incr(epoch_key).hgetall(state_key).hgetall(offsets_key)
        epoch, state, offsets = pipe.execute()
        return PartitionState(
            partition=partition,
            epoch=int(epoch),
            state=ChangeTrackingDict((k.decode(), v) for k, v in state.items()),
            offsets={k.decode(): int(v) for k, v in offsets.items()},
        )

    def commit(self, changes: StateChanges) -> bool:
        """Write the changes and the offsets at once; False if another worker loaded the
        partition since (nothing is written then)."""
        args: list = [changes.epoch, len(changes.upserts), len(changes.deletions)]
        args.append(len(changes.offsets))
        for key, value in changes.upserts.items():
            args += (key, value)
        args += changes.deletions
        for topic, offset in changes.offsets.items():
            args += (topic, offset)
        return bool(self._commit(keys=list(self._keys(changes.partition)), args=args))

    def clear(self, partitions: range | list[int]) -> None:
        """Delete the stored state of ``partitions`` (a fresh joiner group)."""
        self.client.delete(*(k for p in partitions for k in self._keys(p)))
