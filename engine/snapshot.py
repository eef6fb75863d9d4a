"""Atomic, versioned, checksummed model snapshots.

A snapshot file is ``MAGIC | sha256(body) | len(body) | body`` where the body is an
``.npz`` archive of named arrays plus a JSON ``meta`` entry. Files are written to a
temporary name, flushed to disk and renamed into place, so a reader sees either the
old snapshot or the new one, never half of one. A file whose checksum or length does
not match is refused with :class:`SnapshotError`, and the caller keeps its model.

>>> import tempfile, numpy as np
>>> store = SnapshotStore(tempfile.mkdtemp())
>>> path = store.save({"w": np.arange(3.0)}, {"model": "demo"})
>>> arrays, meta = store.load_latest()
>>> meta["version"], arrays["w"].tolist()
(1, [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
from pathlib import Path

import numpy as np

MAGIC = b"ADENGSNP"
_HEADER = struct.Struct(">32sQ")
_NAME = re.compile(r"^snapshot-(\d{8})\.snap$")


class SnapshotError(ValueError):
    """A snapshot that is missing, truncated, corrupt or of another format."""


def dumps(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    buffer = io.BytesIO()
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    np.savez(buffer, **payload)
    body = buffer.getvalue()
    return MAGIC + _HEADER.pack(hashlib.sha256(body).digest(), len(body)) + body


def loads(data: bytes, source: str = "snapshot") -> tuple[dict[str, np.ndarray], dict]:
    """Parse and verify snapshot bytes; raises :class:`SnapshotError` when damaged."""
    head = len(MAGIC) + _HEADER.size
    if len(data) < head or not data.startswith(MAGIC):
        raise SnapshotError(f"{source}: not an adengine snapshot (bad magic or too short)")
    digest, length = _HEADER.unpack(data[len(MAGIC) : head])
    body = data[head:]
    if len(body) != length:
        raise SnapshotError(f"{source}: truncated ({len(body)} of {length} body bytes)")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError(f"{source}: checksum mismatch, the file is corrupt")
    with np.load(io.BytesIO(body), allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    return arrays, meta


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never observe a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class SnapshotStore:
    """A directory of numbered snapshots; the highest valid number is the latest."""

    def __init__(self, directory: str | Path, keep: int = 5):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep

    def versions(self) -> list[int]:
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, version: int) -> Path:
        return self.directory / f"snapshot-{version:08d}.snap"

    def save(self, arrays: dict[str, np.ndarray], meta: dict) -> Path:
        """Write the next version atomically; old versions beyond ``keep`` are pruned."""
        versions = self.versions()
        version = versions[-1] + 1 if versions else 1
        path = self.path(version)
        write_atomic(path, dumps(arrays, {**meta, "version": version}))
        for old in versions[: max(0, len(versions) + 1 - self.keep)]:
            self.path(old).unlink(missing_ok=True)
        return path

    def load(self, version: int) -> tuple[dict[str, np.ndarray], dict]:
        path = self.path(version)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SnapshotError(f"{path}: no such snapshot") from exc
        return loads(data, str(path))

    def load_latest(self) -> tuple[dict[str, np.ndarray], dict]:
        """The newest snapshot; raises :class:`SnapshotError` if it is damaged."""
        versions = self.versions()
        if not versions:
            raise SnapshotError(f"{self.directory}: no snapshot yet")
        return self.load(versions[-1])
