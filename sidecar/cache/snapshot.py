"""Cache snapshots: the exact tier's entries carried across restarts in one checksummed
file (magic, CRC-32, msgpack body), written atomically; a file that cannot be used
raises ``SnapshotError``.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Iterable

import msgspec

from .exact import Entry

_MAGIC = b"LLMSCACHE3\n"
_ROW = (bytes, str, bytes, bytes, str, str, str, str, float, float, bytes)
#: by magic: version 2 rows lack the answer's usage (restored as unknown, 0)
_BODIES = {
    b"LLMSCACHE2\n": msgspec.msgpack.Decoder(tuple[str, list[tuple[_ROW]]]),  # type: ignore[misc]
    _MAGIC: msgspec.msgpack.Decoder(tuple[str, list[tuple[(*_ROW, int, int)]]]),  # type: ignore[misc]
}
_PLAIN = msgspec.msgpack.Encoder()


class SnapshotError(Exception):
    """A snapshot file that cannot be used (corrupt, truncated, other format)."""


def encode_snapshot(spec: str, entries: Iterable[Entry]) -> bytes:
    """Magic, CRC-32 of the body, body: msgpack ``[spec id, rows]`` (rows least recently
    used first; keys are only comparable under the same normalisation spec)."""
    body = _PLAIN.encode([spec, [e.as_row() for e in entries]])
    return _MAGIC + struct.pack(">I", zlib.crc32(body)) + body


def decode_snapshot(data: bytes) -> tuple[str, list[Entry]]:
    head = len(_MAGIC)
    decoder = _BODIES.get(data[:head])
    if decoder is None or len(data) < head + 4:
        raise SnapshotError("not an llm-sidecar cache snapshot (bad header)")
    (crc,) = struct.unpack(">I", data[head:head + 4])
    body = data[head + 4:]
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch (truncated or corrupt)")
    try:
        spec, rows = decoder.decode(body)
        return spec, [Entry(*row) for row in rows]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"undecodable body ({exc})") from None


def write_snapshot(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, fsync dir).
    Blocking: run it off the event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
