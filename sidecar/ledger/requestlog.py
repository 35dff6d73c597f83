"""The daemon's per-request log: one JSON line per request, written off the event loop.

``RequestLog.write`` is called on the event loop for every request; it only appends the
record to a bounded in-memory queue (O(1), no I/O, no serialisation) and drops it when
the queue is full, so a slow or broken disk costs log lines, never latency or memory. One
daemon writer thread drains the queue, serialises each record with msgspec (a record is a
``msgspec.Struct``, such as ``records.RequestRecord``, or a dict), writes each
batch with one ``write`` per file, rotates the file by size with logrotate's numbering
(``requests.log`` -> ``requests.log.1`` -> ... -> ``requests.log.<keep>``), and survives
I/O errors (counted, logged at most once a minute, the file reopened on the next batch).

Durability: there is no fsync. A process crash loses only the records still queued; a
crash of the machine can also lose whatever the OS had not yet written to disk. The log is
an operator's record, not the spend journal (``sidecar.limits.journal`` is the durable one).
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from ..failures import ThrottledLog

log = logging.getLogger("sidecar.ledger")

# Values JSON has no form for (paths, objects) are written as their str(): refusing them
# would lose the whole line for a cosmetic reason.
_ENCODER = msgspec.json.Encoder(enc_hook=str)


class RequestLogStats(NamedTuple):
    """A snapshot of a request log's counters; ``_asdict()`` for a plain dict."""

    path: str
    written: int  # records written to the file since start
    dropped: int  # records refused by ``write``: queue full, or the log closed
    failed_records: int  # records accepted but lost: I/O error, or not serialisable
    rotations: int  # size rotations since start
    queued: int  # records accepted and not yet written or lost (bounded by queue_max)
    high_water: int  # the most ``queued`` has been
    bytes: int  # size of the current file
    error: str  # text of the last error, "" if none ever happened


class RequestLog:
    """An append-only JSON-lines log fed from the event loop and written by one thread.

    Call ``write(record)`` from any thread (normally the event loop's) for each request,
    ``stats()`` for the counters, and ``close()`` (or ``await aclose()``) at shutdown to
    write what is queued. ``max_bytes`` caps each file: a line that would take the current
    file past it rotates first (a single line longer than ``max_bytes`` gets a file of its
    own). ``keep`` is the number of rotated files kept besides the current one; with
    ``keep=0`` the file is removed and restarted instead. ``queue_max`` bounds the records
    accepted but not yet written, which is the log's only buffer.

    The log follows its path, not the open file: when the file is renamed or removed
    behind its back (an external logrotate, an operator), the next batch goes to a new
    file at the path.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 64 * 1024 * 1024,
                 keep: int = 5, queue_max: int = 10_000, linger: float = 0.1) -> None:
        """Create the parent directory (mode 0o700) if missing, open the file for appending
        (mode 0o600 when created) and start the writer thread.

        Raises ``ValueError`` for a non-positive ``max_bytes`` or ``queue_max`` or a
        negative ``keep``, and ``OSError`` when the directory or the file cannot be
        created or opened: an unusable path is a configuration error best seen at start.
        Errors after start are counted instead (see ``stats``).
        """
        if max_bytes <= 0 or queue_max <= 0 or keep < 0:
            raise ValueError("max_bytes and queue_max must be positive and keep not negative "
                             f"(got max_bytes={max_bytes}, queue_max={queue_max}, keep={keep})")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.queue_max = queue_max
        # The writer lets records gather for ``linger`` seconds (or until half the queue
        # is used) before writing them: one wake-up of its thread per batch, not per
        # record, which on a busy host costs the event loop less than the records do.
        self.linger = linger
        self._eager = max(1, min(1024, queue_max // 2))
        self._flushing = 0  # flush() calls waiting: they cut the linger short
        # One lock, two conditions: the writer waits for records, flush() for the writer;
        # a single condition's notify() could wake a flusher instead of the writer.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._settled_cond = threading.Condition(self._lock)
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._inflight = 0  # records taken by the writer and not yet settled
        self._closed = False
        self._accepted = 0
        self._settled = 0  # accepted records written or lost
        self._dropped = 0
        self._high_water = 0
        # writer-thread state (read without the lock by stats(): single int/str stores)
        self._fd: int | None = None
        self._ident: tuple[int, int] = (0, 0)
        self._size = 0
        self._torn = False  # the file ends inside a line (failed write, crash)
        self._written = 0
        self._failed = 0
        self._rotations = 0
        self._error = ""
        self._errors = ThrottledLog(log)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._open()
        self._thread = threading.Thread(target=self._run, name="sidecar-requestlog",
                                        daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<RequestLog {str(self.path)!r} {state} written={self._written}>"

    # --- event loop side ----------------------------------------------------------------

    def write(self, record: dict[str, Any]) -> bool:
        """Queue one record for the log; return False if it was dropped.

        O(1) and never touches the disk: safe on the event loop. The record is serialised
        later on the writer thread, so the caller must not mutate it after this call.
        Values JSON has no form for are written as ``str(value)``. The record is dropped
        (and counted in ``dropped``) when ``queue_max`` records are already waiting or the
        log is closed.
        """
        with self._lock:
            backlog = len(self._queue) + self._inflight
            if self._closed or backlog >= self.queue_max:
                self._dropped += 1
                return False
            self._queue.append(record)
            self._accepted += 1
            if backlog >= self._high_water:
                self._high_water = backlog + 1
            if len(self._queue) in (1, self._eager):
                # The first record wakes an idle writer, which then lingers; reaching
                # ``_eager`` records ends the linger early. Other appends notify nobody.
                self._wake.notify()
        return True

    def stats(self) -> RequestLogStats:
        """The log's counters now (see ``RequestLogStats``)."""
        with self._lock:
            queued = len(self._queue) + self._inflight
            dropped, high_water = self._dropped, self._high_water
        return RequestLogStats(
            path=str(self.path), written=self._written, dropped=dropped,
            failed_records=self._failed, rotations=self._rotations, queued=queued,
            high_water=high_water, bytes=self._size, error=self._error)

    def flush(self, timeout: float | None = 5.0) -> bool:
        """Block until every record accepted before this call is written or counted lost.

        Returns False if ``timeout`` seconds passed first (None waits for ever). Blocks
        the calling thread: not for the event loop (``close``/``aclose`` at shutdown
        already write everything queued).
        """
        with self._lock:
            target = self._accepted
            self._flushing += 1
            self._wake.notify()
            try:
                return self._settled_cond.wait_for(lambda: self._settled >= target, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting records, write everything queued, close the file, join the thread.

        Waits at most ``timeout`` seconds for the writer; if a stuck disk holds it longer,
        the thread goes on writing in the background and closes the file when done (the
        remainder is lost if the process exits first). Idempotent.
        """
        with self._lock:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("request log %s: writer still busy after %.1f s at close, "
                        "%d records not yet written", self.path, timeout,
                        self.stats().queued)

    async def aclose(self, timeout: float = 5.0) -> None:
        """``close`` run in the default executor, so the event loop keeps serving."""
        await asyncio.get_running_loop().run_in_executor(None, self.close, timeout)

    # --- writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._closed:
                        self._wake.wait()
                    if not self._queue:
                        return  # closed and drained
                    end = time.monotonic() + self.linger
                    while (not self._closed and not self._flushing
                           and len(self._queue) < self._eager):
                        left = end - time.monotonic()
                        if left <= 0:
                            break
                        self._wake.wait(left)
                    batch, self._queue = self._queue, collections.deque()
                    self._inflight = len(batch)
                self._write_batch(batch)
                # Free the records before they stop counting against queue_max, so the
                # bound holds for memory too.
                del batch
                with self._lock:
                    self._settled += self._inflight
                    self._inflight = 0
                    self._settled_cond.notify_all()
        finally:
            self._close_fd()

    def _write_batch(self, batch: collections.deque[dict[str, Any]]) -> None:
        lines: list[bytes] = []
        for record in batch:
            try:
                lines.append(_ENCODER.encode(record) + b"\n")
            except (TypeError, ValueError) as exc:
                self._lose(1, f"record not serialisable ({exc})")
        if not lines:
            return
        done = 0
        try:
            self._ensure_open()
            pending: list[bytes] = []
            pending_size = 0
            for line in lines:
                filled = self._size + pending_size
                if filled and filled + len(line) > self.max_bytes:
                    done += self._append(pending)
                    pending, pending_size = [], 0
                    self._rotate()
                pending.append(line)
                pending_size += len(line)
            done += self._append(pending)
        except OSError as exc:
            # Records of a failed write count as lost even if part of them reached the file.
            self._lose(len(lines) - done, exc.strerror or str(exc), exc.filename)
            self._close_fd()

    def _append(self, lines: list[bytes]) -> int:
        """Write ``lines`` with one ``write`` (more only if it comes back short)."""
        if not lines:
            return 0
        data = b"".join(lines)
        if self._torn:
            data = b"\n" + data  # end the torn line so the next one parses on its own
        assert self._fd is not None
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                if n == 0:
                    raise OSError(errno.EIO, "write wrote nothing", str(self.path))
                self._size += n
                view = view[n:]
        except OSError:
            self._torn = self._torn or len(view) < len(data)
            raise
        self._torn = False
        self._written += len(lines)
        return len(lines)

    def _ensure_open(self) -> None:
        if self._fd is not None:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_dev, st.st_ino) == self._ident:
                return
            # Moved away (an external logrotate) or deleted: follow the path, since writes
            # to the old inode would succeed and be lost to the operator.
            self._close_fd()
        self._open()

    def _open(self) -> None:
        # O_RDWR rather than O_WRONLY only to read the last byte: a file ending inside a
        # line (an earlier failed write or a crash) gets a newline before the next record.
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            torn = (stat.S_ISREG(st.st_mode) and st.st_size > 0
                    and os.pread(fd, 1, st.st_size - 1) != b"\n")
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._ident = (st.st_dev, st.st_ino)
        self._size = st.st_size
        self._torn = torn

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as exc:
                # A delayed write error can surface at close; the data is gone either way.
                self._note_error(exc.strerror or str(exc), exc.filename)

    def _rotate(self) -> None:
        self._close_fd()
        base = str(self.path)
        if self.keep == 0:
            # Already gone (removed behind our back) is as good as removed.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base)
        else:
            # os.replace overwrites the target, so base.<keep> (the oldest) goes first.
            for i in range(self.keep - 1, 0, -1):
                # Missing while fewer than keep rotations have happened.
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{base}.{i}", f"{base}.{i + 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(base, f"{base}.1")
        self._rotations += 1
        self._open()

    def _lose(self, records: int, text: str, filename: str | None = None) -> None:
        self._failed += records
        self._note_error(text, filename)

    def _note_error(self, text: str, filename: str | None = None) -> None:
        self._error = f"{text}: {filename}" if filename else text
        self._errors.error("request log %s: %s; %d records lost so far", self.path, self._error,
                           self._failed)
