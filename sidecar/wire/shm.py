"""The shared-memory segment beside the daemon's socket: the public face of
``sidecar._native.shm``.

The daemon publishes exact-cache answers in it (``Publisher``); a client maps it
read-only and looks answers up by exact key without a system call (``Segment``). The file
is ``<socket>.shm``, created by the daemon under a temporary name and renamed into place
once formatted, so a client never maps a half-made segment. Its mode is the socket's
without any write bit for group or others: whoever may talk to the daemon may read the
answers, and only the daemon may write them (a writable segment would let one peer serve
another a forged answer). ``generation`` is new for every segment the daemon makes: a
client that sees another generation at the path maps the new file.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Protocol

import msgspec

from .._native import load

_native = load("shm")

SUFFIX = ".shm"
KEY_SIZE: int = _native.KEY_SIZE


class Answer(msgspec.Struct, array_like=True, frozen=True):
    """What the segment holds under a key: the answer as stored (msgpack) and what a hit
    reply tells besides it."""

    response: msgspec.Raw
    query: str
    cached_at: float
    input_tokens: int
    output_tokens: int


ANSWER_ENCODER = msgspec.msgpack.Encoder()
ANSWER_DECODER = msgspec.msgpack.Decoder(Answer)


class Publishing(Protocol):
    """What the exact tier needs of a segment to keep it true (``Publisher``)."""

    def put(self, key: bytes, body: bytes, expires: float, stale_until: float) -> bool: ...
    def remove(self, key: bytes) -> bool: ...
    def clear(self) -> None: ...


def segment_path(socket_path: str | os.PathLike[str]) -> Path:
    """Where the segment of the daemon listening on ``socket_path`` lives."""
    return Path(os.fspath(socket_path) + SUFFIX)


class Publisher:
    """The daemon's segment: created at ``path`` with ``mode`` (write bits for group and
    others cleared), formatted with ``slots`` index slots (a power of two) and the rest of
    ``size`` bytes as the answer arena. One thread writes."""

    def __init__(self, path: str | os.PathLike[str], *, size: int, slots: int,
                 mode: int = 0o640, gid: int | None = None) -> None:
        self.path = Path(path)
        _close_leftover(self.path)
        self.generation = secrets.randbits(63) | 1  # never 0: 0 reads as "no segment"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            if gid is not None and gid != os.getegid():
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode & 0o755 & ~0o022)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._inode = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        try:
            self._writer = _native.Writer(self._map, self.generation, slots)
            self.slots, self.arena_bytes = self._writer.slot_count, self._writer.arena_bytes
        except ValueError:
            self._map.close()
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)

    def put(self, key: bytes, body: bytes, expires: float, stale_until: float) -> bool:
        """Publish ``body`` under the exact ``key``; False when the segment cannot hold it
        (too large, or the key's slots all hold live entries that expire later)."""
        return self._writer.put(key, body, expires, stale_until)

    def remove(self, key: bytes) -> bool:
        return self._writer.remove(key)

    def clear(self) -> None:
        self._writer.clear()

    def set_epoch(self, epoch: int) -> None:
        self._writer.set_epoch(epoch)

    def close(self) -> None:
        """Remove the file (clients holding a map keep reading the last answers until
        they see no segment, or another generation, at the path)."""
        self._writer.mark_closed()  # before the unlink: a reader may have it mapped
        with contextlib.suppress(OSError):  # already gone
            if os.stat(self.path).st_ino == self._inode:  # not a newer daemon's file
                self.path.unlink()
        self._writer = None
        self._map.close()

    def set_meta(self, meta: bytes) -> None:
        """What clients need to compute keys as the daemon does (at most 3840 bytes)."""
        self._writer.set_meta(meta)


def _close_leftover(path: Path) -> None:
    """Mark closed the segment a killed daemon left at ``path``, so clients still mapping
    it stop serving from it (its answers are no longer kept up to date)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        size = os.fstat(fd).st_size
        if size:
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
                try:
                    _native.mark_closed(m)
                except ValueError:
                    pass  # not a segment: it is replaced all the same
    finally:
        os.close(fd)


class Segment:
    """A client's read-only map of the daemon's segment."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Map ``path``; ``OSError`` when it cannot be opened, ``ValueError`` when it is
        not a segment this build reads."""
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            self.owner = st.st_uid
            self.inode = st.st_ino
            self._map = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        try:
            self._reader = _native.Reader(self._view)
        except ValueError:
            self.close()
            raise
        self.generation: int = self._reader.generation
        #: ``get(key, now, allow_stale=False, epoch=-1)``: ``(body, stale)`` of the live
        #: answer under the exact ``key``, or None (also when the segment is closed, or
        #: its config epoch is not ``epoch`` when one is given); the native call itself
        self.get = self._reader.get
        #: ``find(key, now, allow_stale=False, epoch=-1)``: the arena position of that
        #: answer without copying it, or -1; a body ``get`` returned at the same position
        #: of this segment is still the answer's (the arena never reuses a position)
        self.find = self._reader.find

    def current(self) -> bool:
        """Whether the file at the path is still this segment (the daemon may have
        restarted and made another)."""
        try:
            return os.stat(self.path).st_ino == self.inode
        except OSError:
            return False

    @property
    def pos(self) -> int:
        """The position of what the last ``find`` or ``get`` found."""
        return self._reader.pos

    @property
    def stale(self) -> bool:
        """Whether what the last ``find`` or ``get`` found was past its expiry."""
        return self._reader.stale

    @property
    def closed(self) -> bool:
        """Its daemon no longer serves it: map the file at the path again."""
        return self._reader.closed

    def meta(self) -> bytes:
        return self._reader.meta()

    @property
    def epoch(self) -> int:
        return self._reader.epoch

    @property
    def retries(self) -> int:
        return self._reader.retries

    @property
    def torn(self) -> int:
        return self._reader.torn

    def close(self) -> None:
        self._reader = self.get = self.find = None  # type: ignore[assignment]
        self._view.release()
        self._map.close()


# --- admission slices: the client's slab ----------------------------------------------

SLAB_BYTES: int = _native.SLAB_BYTES
SLAB_SLOTS: int = _native.SLAB_SLOT_COUNT


def _slab_dir() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else \
        tempfile.gettempdir()


class ClientSlab:
    """A client process's slab: the counters of its admission slices, in a file it
    creates (mode 0644: the daemon reads it whatever its uid; only this uid writes) and
    maps read-write. ``slab`` is the native view (``install``, ``take``, ``state``)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.path = os.path.join(_slab_dir(), f"llm-sidecar-slab.{os.getuid()}.{self.pid}."
                                 f"{secrets.token_hex(8)}")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            os.ftruncate(fd, SLAB_BYTES)
            self._map = mmap.mmap(fd, SLAB_BYTES, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(self.path)
            raise
        finally:
            os.close(fd)
        self.slab = _native.Slab(self._map, True, self.pid)

    def unlink(self) -> None:
        """Remove the file (the maps stay): once the daemon has mapped it, nothing needs
        the path, and a process that never closes its client leaves nothing behind."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def close(self) -> None:
        self.unlink()
        self.slab = None
        self._map.close()


class DaemonSlab:
    """The daemon's read-only map of a client's slab."""

    def __init__(self, m: mmap.mmap) -> None:
        self._map = m
        self._slab = _native.Slab(m)
        self.state = self._slab.state  # (grant, granted, used, settled, input, output)

    def close(self) -> None:
        self._slab = self.state = None  # type: ignore[assignment]
        self._map.close()


def open_slab(path: str, uid: int) -> DaemonSlab:
    """Map the slab at ``path`` read-only, if it is a regular file of the slab's size
    owned by ``uid`` (the peer, as SO_PEERCRED says): ``OSError`` or ``ValueError``
    otherwise. Anything else at the path (a device, a FIFO, a link) is refused before it
    is opened, and the file opened must be the one checked."""
    first = os.lstat(path)  # never open a device, FIFO or someone else's file at all
    if not stat.S_ISREG(first.st_mode) or first.st_uid != uid:
        raise ValueError("not a regular file of the peer's")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (first.st_dev, first.st_ino):
            raise ValueError("replaced while opened")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file")
        if st.st_uid != uid:
            raise ValueError(f"owned by uid {st.st_uid}, not by the peer (uid {uid})")
        if st.st_size != SLAB_BYTES:
            raise ValueError(f"{st.st_size} bytes, not {SLAB_BYTES}")
        m = mmap.mmap(fd, SLAB_BYTES, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        return DaemonSlab(m)
    except ValueError:
        m.close()
        raise
