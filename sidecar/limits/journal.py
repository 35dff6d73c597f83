"""Crash-safe append-only journal: how the standalone daemon keeps settled spend on disk.

One file holds a versioned, checksummed header followed by records framed as
``length (u32 LE) | CRC-32 of length bytes + payload (u32 LE) | payload``. Payloads are
opaque bytes; their meaning belongs to the caller (the limits engine). ``append`` resolves
only once its record is written and synced; every record appended while the previous
batch is being synced joins the next batch, which costs one ``write`` and one
``fdatasync`` (group commit). Writes and syncs run on one dedicated writer thread, so the
event loop keeps serving while the disk works. ``open`` replays the file and cuts a torn
or corrupt tail; ``compact`` replaces the whole file by a snapshot with the standard
atomic replace (temp file, sync, rename, directory sync).

Crash guarantee: after a crash of the process or of the machine (kill -9, power loss),
``open`` returns a prefix, in call order, of the records appended (the latest completed
``compact`` snapshot standing in for the records before it) that contains every record
whose ``append`` had returned; only records whose ``append`` had not returned can be lost,
which is at most the batch being synced plus the queue behind it (``max_pending_bytes``).
With ``fsync=False`` the same holds for a process crash but not for a machine crash.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import fcntl
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

from ..errors import JournalError, Overloaded

log = logging.getLogger("sidecar.journal")

MAGIC = b"\x89LSJ\r\n\x1a\n"  # PNG-style: catches text-mode mangling and non-journal files
VERSION = 1
# magic, version, flags (0), generation (compactions so far), records in the snapshot
_HEADER = struct.Struct("<8sHHQI")
_U32 = struct.Struct("<I")
HEADER_SIZE = _HEADER.size + _U32.size  # the header ends with its own CRC-32
_RECORD = struct.Struct("<II")
RECORD_OVERHEAD = _RECORD.size
MAX_PAYLOAD = (1 << 32) - 1

# fdatasync is enough for appends: it also flushes the file size needed to read them back.
_datasync = getattr(os, "fdatasync", os.fsync)


class JournalStats(NamedTuple):
    """A snapshot of a journal's counters; ``_asdict()`` for a plain dict."""

    records: int  # records the file holds now (snapshot + appended), durable ones only
    bytes: int  # size of the file, header included
    appends: int  # records made durable since open
    batches: int  # group commits since open (one write + one sync each)
    fsyncs: int  # syncs issued since open (0 with fsync=False)
    group_avg: float  # records per batch
    group_max: int
    last_fsync_s: float  # duration of the latest sync of a batch or snapshot
    max_fsync_s: float
    pending_records: int  # appended, not yet durable
    pending_bytes: int  # their framed size, bounded by max_pending_bytes
    compactions: int  # since open
    generation: int  # compactions over the file's lifetime
    snapshot_records: int  # leading records of the file written by the last compaction
    dropped_bytes: int  # torn or corrupt tail cut by open
    failed: bool  # an I/O error stopped the journal


class _Batch:
    __slots__ = ("payloads", "futures", "nbytes")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.futures: list[asyncio.Future[None]] = []
        self.nbytes = 0


class _Compaction:
    __slots__ = ("snapshot", "future")

    def __init__(self, snapshot: list[bytes], future: asyncio.Future[None]) -> None:
        self.snapshot = snapshot
        self.future = future


class _InstallFailed(Exception):
    """The snapshot replaced the file but its durability is unknown (directory sync)."""


def _frame(payloads: Sequence[bytes]) -> bytes:
    parts: list[bytes] = []
    for p in payloads:
        length = _U32.pack(len(p))
        parts += (length, _U32.pack(zlib.crc32(p, zlib.crc32(length))), p)
    return b"".join(parts)


def _header(generation: int, snapshot_records: int) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, 0, generation, snapshot_records)
    return head + _U32.pack(zlib.crc32(head))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _scan(data: bytes, start: int) -> tuple[list[bytes], int]:
    """Records from ``start`` up to the first incomplete or corrupt one, and where it is."""
    records: list[bytes] = []
    end_of_data = len(data)
    offset = start
    while offset + RECORD_OVERHEAD <= end_of_data:
        length, crc = _RECORD.unpack_from(data, offset)
        end = offset + RECORD_OVERHEAD + length
        if end > end_of_data:
            break
        payload = data[offset + RECORD_OVERHEAD:end]
        # The CRC covers the length too: a zero-filled tail (length 0, CRC 0) never passes.
        if zlib.crc32(payload, zlib.crc32(data[offset:offset + 4])) != crc:
            break
        records.append(payload)
        offset = end
    return records, offset


class Journal:
    """A crash-safe append-only journal of opaque records in one file.

    ``open()`` (sync, once) replays it; then, from one event loop, ``await append(p)`` or
    ``append_nowait(p)``, ``await compact(snapshot)``, and ``await aclose()`` (or
    ``close()``). Records become durable, and their appends resolve, in call order.

    ``max_bytes`` is a hint, not a limit: once the file reaches it ``needs_compaction``
    turns true and the owner should ``compact``; appends never fail because of size.
    ``max_pending_bytes`` bounds the framed bytes appended but not yet durable; an append
    beyond it raises ``errors.Overloaded`` at once (a disk that far behind will not catch
    up by waiting, and a settle that fails fast can be reported and retried).
    """

    def __init__(self, path: Path | str, *, fsync: bool = True, max_bytes: int = 64 << 20,
                 max_pending_bytes: int = 16 << 20) -> None:
        if max_bytes <= 0 or max_pending_bytes <= RECORD_OVERHEAD:
            raise ValueError("max_bytes and max_pending_bytes must be positive "
                             f"(got {max_bytes}, {max_pending_bytes})")
        self.path = Path(path)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.max_pending_bytes = max_pending_bytes
        self._tmp_path = self.path.with_name(self.path.name + ".compact")
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: collections.deque[_Batch | _Compaction] = collections.deque()
        self._inflight: tuple[_Batch | _Compaction, concurrent.futures.Future] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: BaseException | None = None
        # counters (loop thread only)
        self._records = 0
        self._size = 0
        self._appends = 0
        self._batches = 0
        self._fsyncs = 0
        self._group_max = 0
        self._last_fsync = 0.0
        self._max_fsync = 0.0
        self._pending_records = 0
        self._pending_bytes = 0
        self._compactions = 0
        self._generation = 0
        self._snapshot_records = 0
        self._dropped = 0

    def __repr__(self) -> str:
        state = ("failed" if self._failed else "open" if self._fd is not None
                 and not self._closing else "closed")
        return f"<Journal {str(self.path)!r} {state} records={self._records}>"

    # --- open / replay ----------------------------------------------------------------

    def open(self) -> list[bytes]:
        """Lock and replay the journal, creating it if absent; return its records in order.

        A torn or corrupt tail (an incomplete last record, or the first record whose
        checksum fails and everything after it) is cut off and logged: a crash can leave
        one only in records whose append had not returned. A leftover compaction temp file
        is removed (the rename that would have made it the journal never happened).

        Raises ``JournalError`` if the file is not a journal of a supported version or
        another process holds it; the file is then left untouched.
        """
        if self._fd is not None or self._closing:
            raise JournalError(f"journal {self.path} was already opened; "
                               "create a new Journal to open it again")
        self._lock_fd = self._lock()
        try:
            return self._replay()
        except BaseException:
            self._unlock()
            raise

    def _lock(self) -> int:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise JournalError(
                    f"journal {self.path} is in use by another process; two daemons must "
                    "not share one journal (give each its own state directory)") from None
            raise
        return fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _replay(self) -> list[bytes]:
        if self._tmp_path.exists():
            log.warning("journal %s: removing %s left by a compaction that did not finish",
                        self.path, self._tmp_path)
            self._tmp_path.unlink()
        if not self.path.exists():
            # Created through the atomic replace, so a crash never leaves a headerless file.
            os.close(self._write_temp(0, []))
            self._install_path()
        data = self.path.read_bytes()
        self._generation, self._snapshot_records = self._parse_header(data)
        records, end = _scan(data, HEADER_SIZE)
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self._dropped = len(data) - end
            if self._dropped:
                # One batch is the most a crash can leave unsynced; more hints at damage.
                level = (logging.WARNING if self._dropped <= self.max_pending_bytes
                         else logging.ERROR)
                log.log(level, "journal %s: dropped %d bytes of torn or corrupt tail at "
                        "offset %d after %d good records", self.path, self._dropped, end,
                        len(records))
                os.ftruncate(fd, end)
                if self.fsync:
                    self._sync_fd(fd)
            os.lseek(fd, end, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._records = len(records)
        self._size = end
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sidecar-journal")
        return records

    def _parse_header(self, data: bytes) -> tuple[int, int]:
        if len(data) < HEADER_SIZE or data[:len(MAGIC)] != MAGIC:
            raise JournalError(f"{self.path} is not an llm-sidecar journal (bad magic); "
                               "move it aside or point the journal path elsewhere")
        magic, version, _flags, generation, snapshot_records = _HEADER.unpack_from(data)
        if zlib.crc32(data[:_HEADER.size]) != _U32.unpack_from(data, _HEADER.size)[0]:
            raise JournalError(f"journal {self.path} has a corrupt header (checksum); "
                               "restore it from a backup or move it aside")
        if version != VERSION:
            raise JournalError(f"journal {self.path} is version {version}, this build "
                               f"reads version {VERSION}; upgrade llm-sidecar")
        return generation, snapshot_records

    # --- append ----------------------------------------------------------------------

    def append_nowait(self, payload: bytes) -> asyncio.Future[None]:
        """Queue one record; the returned future resolves once it is durable.

        Must be called from the event loop's thread. The record is queued at once and
        written even if the future is cancelled. Raises ``errors.Overloaded`` when the
        records not yet durable would exceed ``max_pending_bytes``, and ``JournalError``
        when the journal is not open, closed, or stopped by an earlier I/O error.
        """
        loop = self._check_usable()
        nbytes = RECORD_OVERHEAD + len(payload)
        if self._pending_bytes + nbytes > self.max_pending_bytes:
            if nbytes > self.max_pending_bytes:
                raise JournalError(f"record of {len(payload)} bytes exceeds the journal's "
                                   f"max_pending_bytes ({self.max_pending_bytes})")
            raise Overloaded(f"journal {self.path} is {self._pending_bytes} bytes behind "
                             f"(limit {self.max_pending_bytes}); the disk is not keeping up")
        tail = self._jobs[-1] if self._jobs else None
        if not isinstance(tail, _Batch):
            tail = _Batch()
            self._jobs.append(tail)
        future: asyncio.Future[None] = loop.create_future()
        tail.payloads.append(bytes(payload))
        tail.futures.append(future)
        tail.nbytes += nbytes
        self._pending_records += 1
        self._pending_bytes += nbytes
        self._kick(loop)
        return future

    async def append(self, payload: bytes) -> None:
        """Append one record and return once it is durable (written and synced).

        Appends from many tasks in the same loop iteration, or while a sync is under
        way, share one write and one sync. Cancelling the caller does not withdraw the
        record. Raises as ``append_nowait`` does, or ``JournalError`` if writing failed.
        """
        await self.append_nowait(payload)

    def compact(self, snapshot: Sequence[bytes]) -> asyncio.Future[None]:
        """Atomically replace every record appended before this call by ``snapshot``.

        Await the returned future: it resolves once the new file is durable. The cut is
        taken at the call, not at the await (a coroutine started later could let appends
        slip in before it that the snapshot does not cover). Records appended before the
        call are still made durable first, in the old file; records appended after it
        follow the snapshot in the new file. A crash at any point leaves either the old
        file or the new one, never a mix. The future fails with ``JournalError`` if the
        snapshot could not be written; the journal then keeps the old file and goes on
        appending to it.
        """
        loop = self._check_usable()
        future: asyncio.Future[None] = loop.create_future()
        self._jobs.append(_Compaction([bytes(p) for p in snapshot], future))
        self._kick(loop)
        return future

    @property
    def needs_compaction(self) -> bool:
        """True once the file has grown to ``max_bytes``."""
        return self._size >= self.max_bytes

    @property
    def stats(self) -> JournalStats:
        return JournalStats(
            records=self._records, bytes=self._size, appends=self._appends,
            batches=self._batches, fsyncs=self._fsyncs,
            group_avg=self._appends / self._batches if self._batches else 0.0,
            group_max=self._group_max, last_fsync_s=self._last_fsync,
            max_fsync_s=self._max_fsync, pending_records=self._pending_records,
            pending_bytes=self._pending_bytes, compactions=self._compactions,
            generation=self._generation, snapshot_records=self._snapshot_records,
            dropped_bytes=self._dropped, failed=self._failed is not None)

    def _check_usable(self) -> asyncio.AbstractEventLoop:
        if self._failed is not None:
            raise JournalError(f"journal {self.path} stopped after an I/O error "
                               f"({self._failed}); restart to replay it") from self._failed
        if self._fd is None or self._closing:
            raise JournalError(f"journal {self.path} is not open (call open() first, "
                               "and not after close())")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise JournalError(f"journal {self.path} is used from a second event loop")
        return loop

    # --- the flusher: one task on the loop, one writer thread ------------------------

    def _kick(self, loop: asyncio.AbstractEventLoop) -> None:
        # The task's first step runs in a later loop iteration, so everything appended
        # in this iteration is already queued and lands in the same batch.
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._jobs and self._failed is None:
                job = self._jobs.popleft()
                assert self._executor is not None
                if isinstance(job, _Batch):
                    cf = self._executor.submit(self._write_batch, job.payloads)
                else:
                    cf = self._executor.submit(self._write_compaction, self._generation + 1,
                                               job.snapshot)
                entry = (job, cf)
                self._inflight = entry
                # asyncio.wait neither raises the job's error (settled below) nor, when the
                # flusher is cancelled, cancels a write the thread already owns.
                done = asyncio.wrap_future(cf)
                await asyncio.wait((done,))
                if not done.cancelled():
                    done.exception()  # retrieved here; cf carries it to _settle
                if self._inflight is not entry:
                    return  # close() waited for this job and settled it
                self._inflight = None
                self._settle(job, cf)
        except asyncio.CancelledError:
            pass  # the loop is shutting down; close() finishes what is queued
        finally:
            self._flusher = None

    def _settle(self, job: _Batch | _Compaction, cf: concurrent.futures.Future) -> None:
        """Account for a finished job and resolve its futures (loop thread)."""
        exc = cf.exception()
        if isinstance(job, _Batch):
            self._pending_records -= len(job.payloads)
            self._pending_bytes -= job.nbytes
            if exc is None:
                latency = cf.result()
                n = len(job.payloads)
                self._records += n
                self._appends += n
                self._size += job.nbytes
                self._batches += 1
                self._group_max = max(self._group_max, n)
                self._note_sync(latency)
                for f in job.futures:
                    _resolve(f)
            else:
                self._fail(exc, job.futures)
            return
        if exc is None:
            size, latency = cf.result()
            self._generation += 1
            self._compactions += 1
            self._records = self._snapshot_records = len(job.snapshot)
            self._size = size
            self._note_sync(latency)
            _resolve(job.future)
        elif isinstance(exc, _InstallFailed):
            self._fail(exc.__cause__ or exc, [job.future])
        else:
            _resolve(job.future, JournalError(
                f"journal {self.path}: compaction failed ({exc}); still appending to the "
                "old file"))

    def _note_sync(self, latency: float | None) -> None:
        if latency is not None:
            self._fsyncs += 1
            self._last_fsync = latency
            self._max_fsync = max(self._max_fsync, latency)

    def _fail(self, exc: BaseException, futures: list[asyncio.Future[None]]) -> None:
        # After a failed write or sync the kernel may have dropped the dirty pages; a
        # retry could report success for data that is gone, so the journal stops here.
        self._failed = exc
        log.error("journal %s: write failed (%s); refusing further appends", self.path, exc)
        err = JournalError(f"journal {self.path}: write failed ({exc}); the record may "
                           "not be durable")
        err.__cause__ = exc
        pending = list(futures)
        while self._jobs:
            job = self._jobs.popleft()
            if isinstance(job, _Batch):
                self._pending_records -= len(job.payloads)
                self._pending_bytes -= job.nbytes
                pending += job.futures
            else:
                pending.append(job.future)
        for f in pending:
            _resolve(f, err)

    # --- work done on the writer thread (or inline by close) -------------------------

    def _sync_fd(self, fd: int) -> None:
        """Make the file's data durable; the one place a sync of journal data happens."""
        _datasync(fd)

    def _write_batch(self, payloads: list[bytes]) -> float | None:
        assert self._fd is not None
        _write_all(self._fd, _frame(payloads))
        if not self.fsync:
            return None
        start = time.perf_counter()
        self._sync_fd(self._fd)
        return time.perf_counter() - start

    def _write_compaction(self, generation: int,
                          snapshot: list[bytes]) -> tuple[int, float | None]:
        data_size = HEADER_SIZE + sum(RECORD_OVERHEAD + len(p) for p in snapshot)
        start = time.perf_counter()
        fd = self._write_temp(generation, snapshot)
        latency = time.perf_counter() - start if self.fsync else None
        try:
            self._install(fd)
        except BaseException as exc:
            raise _InstallFailed() from exc
        return data_size, latency

    def _write_temp(self, generation: int, records: list[bytes]) -> int:
        """Write a complete journal to the temp path and sync it; return its descriptor."""
        fd = os.open(self._tmp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                     0o600)
        try:
            _write_all(fd, _header(generation, len(records)) + _frame(records))
            if self.fsync:
                self._sync_fd(fd)
        except BaseException:
            os.close(fd)
            self._tmp_path.unlink(missing_ok=True)
            raise
        return fd

    def _install(self, fd: int) -> None:
        """Rename the synced temp file over the journal and append to it from now on."""
        try:
            self._install_path()
        except BaseException:
            os.close(fd)
            raise
        old, self._fd = self._fd, fd
        os.lseek(fd, 0, os.SEEK_END)
        if old is not None:
            os.close(old)

    def _install_path(self) -> None:
        os.replace(self._tmp_path, self.path)
        if self.fsync:
            # The rename is durable only once the directory entry is.
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    # --- close -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Make every queued record durable, then close; the loop keeps serving meanwhile."""
        self._closing = True
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        self.close()

    def close(self) -> None:
        """Make every queued record durable, then close the file and release the lock.

        Blocks the calling thread until the last batch is synced: inside a running loop
        prefer ``await aclose()``. Call it from the loop's thread or after the loop ended.
        Idempotent.
        """
        self._closing = True
        if self._executor is not None:
            if self._inflight is not None:
                job, cf = self._inflight
                self._inflight = None
                concurrent.futures.wait([cf])
                self._settle(job, cf)
            while self._jobs and self._failed is None:
                job = self._jobs.popleft()
                cf = concurrent.futures.Future()
                try:
                    if isinstance(job, _Batch):
                        cf.set_result(self._write_batch(job.payloads))
                    else:
                        cf.set_result(self._write_compaction(self._generation + 1,
                                                             job.snapshot))
                except Exception as exc:
                    cf.set_exception(exc)
                self._settle(job, cf)
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._unlock()


def _resolve(future: asyncio.Future[None], exc: BaseException | None = None) -> None:
    # A caller may have cancelled its future, or its loop may be gone (close after run).
    if future.done() or future.get_loop().is_closed():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
