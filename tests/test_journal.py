"""sidecar.journal: round trips, group commit, torn tails, kill -9 safety, compaction,
syncs off the loop thread. Async tests run under asyncio and uvloop (``run_async``)."""
from __future__ import annotations

import asyncio
import os
import random
import selectors
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from sidecar.errors import Overloaded
from sidecar.limits.journal import (
    HEADER_SIZE, MAGIC, RECORD_OVERHEAD, Journal, JournalError, _HEADER,
)

SEED = int(os.environ.get("JOURNAL_TEST_SEED", "20240611"))


def payloads(n: int, seed: int = SEED) -> list[bytes]:
    rng = random.Random(seed)
    return [b"%d:" % i + rng.randbytes(rng.randrange(0, 200)) for i in range(n)]


def reopen(path: Path, **kw) -> tuple[list[bytes], Journal]:
    j = Journal(path, **kw)
    return j.open(), j


async def append_all(j: Journal, records: list[bytes]) -> None:
    await asyncio.gather(*(j.append(r) for r in records))


def write_journal(path: Path, records: list[bytes], run_async) -> None:
    """A journal at ``path`` holding ``records``, closed."""
    _, j = reopen(path)

    async def fill():
        await append_all(j, records)
        await j.aclose()

    run_async(fill())


class HookedJournal(Journal):
    """Records which thread syncs and can stall or fail the sync like a slow or bad disk."""

    def __init__(self, *args, delay: float = 0.0, **kw) -> None:
        super().__init__(*args, **kw)
        self.delay = delay
        self.fail = False
        self.sync_threads: list[int] = []
        self.syncing = threading.Event()

    def _sync_fd(self, fd: int) -> None:
        self.sync_threads.append(threading.get_ident())
        self.syncing.set()
        time.sleep(self.delay)
        if self.fail:
            raise OSError(5, "Input/output error (injected)")
        super()._sync_fd(fd)


# --- 1. round trip -----------------------------------------------------------------


def test_round_trip(tmp_path, run_async):
    path = tmp_path / "spend.journal"
    records = payloads(500) + [b""]  # an empty payload is a record too
    first, j = reopen(path)
    assert first == []

    async def main():
        for r in records[:10]:
            await j.append(r)
        await append_all(j, records[10:])
        assert j.stats.records == len(records)
        await j.aclose()

    run_async(main())
    again, j2 = reopen(path)
    assert again == records
    assert j2.stats.bytes == path.stat().st_size == HEADER_SIZE + sum(
        RECORD_OVERHEAD + len(r) for r in records)
    j2.close()


def test_reopen_appends_after_replayed_records(tmp_path, run_async):
    path = tmp_path / "j"
    for part in range(3):
        before, j = reopen(path)
        assert before == payloads(30 * part)[:30 * part]

        async def main():
            await append_all(j, payloads(30 * (part + 1))[30 * part:])
            await j.aclose()

        run_async(main())


@settings(max_examples=40, deadline=None)
@given(records=st.lists(st.binary(max_size=300), max_size=40), data=st.data())
def test_any_cut_replays_the_records_before_it(records, data):
    """Property: a file cut anywhere replays exactly the records that fit before the cut."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "j"
        _, j = reopen(path, fsync=False)

        async def main():
            await append_all(j, records)
            await j.aclose()

        asyncio.run(main())
        full = path.read_bytes()
        cut = data.draw(st.integers(HEADER_SIZE, len(full)), label="cut")
        path.write_bytes(full[:cut])
        ends, offset = [], HEADER_SIZE
        for r in records:
            offset += RECORD_OVERHEAD + len(r)
            ends.append(offset)
        expect = [r for r, end in zip(records, ends) if end <= cut]
        got, j2 = reopen(path, fsync=False)
        assert got == expect
        assert j2.stats.dropped_bytes == cut - (HEADER_SIZE + sum(
            RECORD_OVERHEAD + len(r) for r in expect))
        j2.close()


# --- 2. group commit ---------------------------------------------------------------


def test_group_commit(tmp_path, run_async):
    path = tmp_path / "j"
    records = payloads(1000)
    _, j = reopen(path)

    async def main():
        await append_all(j, records)
        s = j.stats
        assert s.appends == 1000 and s.pending_records == 0
        assert 1 <= s.fsyncs == s.batches <= 10, s  # one per batch, not one per record
        assert s.group_max >= 100 and s.group_avg >= 100, s
        await j.aclose()

    run_async(main())
    assert reopen(path)[0] == records


def test_appends_during_a_sync_form_the_next_batch(tmp_path, run_async):
    j = HookedJournal(tmp_path / "j", delay=0.2)
    j.open()

    async def main():
        first = j.append_nowait(b"first")
        while not j.syncing.is_set():  # the first batch is being synced
            await asyncio.sleep(0.005)
        assert not first.done()
        await append_all(j, payloads(100))
        assert first.done()
        s = j.stats
        assert (s.batches, s.group_max, s.fsyncs) == (2, 100, 2), s
        await j.aclose()

    run_async(main())


# --- 3. torn and corrupt tails -------------------------------------------------------


def _last_record_offset(records: list[bytes]) -> int:
    return HEADER_SIZE + sum(RECORD_OVERHEAD + len(r) for r in records[:-1])


def _truncate_mid_payload(data, last):
    return data[:last + RECORD_OVERHEAD + 5]


def _truncate_mid_frame_header(data, last):
    return data[:last + 3]


def _flip_payload_byte(data, last):
    b = bytearray(data)
    b[-7] ^= 0x40
    return bytes(b)


def _flip_crc_byte(data, last):
    b = bytearray(data)
    b[last + 5] ^= 0x01
    return bytes(b)


def _shrink_length(data, last):
    b = bytearray(data)
    struct.pack_into("<I", b, last, 3)
    return bytes(b)


def _grow_length(data, last):
    b = bytearray(data)
    struct.pack_into("<I", b, last, 1 << 30)
    return bytes(b)


@pytest.mark.parametrize("damage", [_truncate_mid_payload, _truncate_mid_frame_header,
                                    _flip_payload_byte, _flip_crc_byte, _shrink_length,
                                    _grow_length])
def test_damaged_last_record_is_dropped_alone(tmp_path, run_async, damage):
    path = tmp_path / "j"
    records = [b"%d:" % i + b"x" * 50 for i in range(20)]
    write_journal(path, records, run_async)
    last = _last_record_offset(records)
    damaged = damage(path.read_bytes(), last)
    path.write_bytes(damaged)

    got, j2 = reopen(path)
    assert got == records[:-1]
    assert j2.stats.dropped_bytes == len(damaged) - last
    assert path.stat().st_size == last  # the tail is cut on disk, not just skipped

    async def more():
        await j2.append(b"after")
        await j2.aclose()

    run_async(more())
    assert reopen(path)[0] == records[:-1] + [b"after"]


def test_zero_filled_tail_is_dropped(tmp_path, run_async):
    """A length-0 record with CRC 0 must not pass: the CRC covers the length bytes."""
    path = tmp_path / "j"
    write_journal(path, [b"a", b"b"], run_async)
    with open(path, "ab") as f:
        f.write(bytes(4096))
    got, j2 = reopen(path)
    assert got == [b"a", b"b"]
    assert j2.stats.dropped_bytes == 4096
    j2.close()


def _header(version: int = 1, generation: int = 0, snapshot: int = 0) -> bytes:
    head = _HEADER.pack(MAGIC, version, 0, generation, snapshot)
    return head + struct.pack("<I", zlib.crc32(head))


@pytest.mark.parametrize("content,fragment", [
    (b"", "not an llm-sidecar journal"),
    (b"hello world, not a journal at all", "not an llm-sidecar journal"),
    (_header()[:-1] + b"\x00", "corrupt header"),
    (_header(version=2), "version 2"),
])
def test_bad_header_is_refused_and_left_untouched(tmp_path, content, fragment):
    path = tmp_path / "j"
    path.write_bytes(content)
    j = Journal(path)
    with pytest.raises(JournalError, match=fragment):
        j.open()
    assert path.read_bytes() == content
    j2 = Journal(path)  # the failed open released its lock
    with pytest.raises(JournalError):
        j2.open()


def test_second_opener_is_refused(tmp_path):
    _, j = reopen(tmp_path / "j")
    with pytest.raises(JournalError, match="in use by another process"):
        Journal(tmp_path / "j").open()
    j.close()
    reopen(tmp_path / "j")[1].close()


# --- 4. kill -9 ----------------------------------------------------------------------

CHILD = r'''
import asyncio, os, signal, sys
from pathlib import Path
import uvloop
from sidecar.limits.journal import Journal

path, loop_name, crash_at = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
compact_every, workers = int(sys.argv[4]), int(sys.argv[5])


class CrashingJournal(Journal):
    def _install(self, fd):
        if crash_at == "before_rename":
            os.kill(os.getpid(), signal.SIGKILL)
        super()._install(fd)
        if crash_at == "after_rename":
            os.kill(os.getpid(), signal.SIGKILL)


def next_seq(records):
    if not records:
        return 0
    last = records[-1]
    return int(last[1:]) if last.startswith(b"S") else int(last.split(b"|")[0]) + 1


async def main():
    j = CrashingJournal(path)
    seq = next_seq(j.open())
    print("ready", seq, flush=True)

    async def appender():
        nonlocal seq
        while True:
            mine = seq
            seq += 1
            await j.append(b"%d|" % mine + b"." * (mine % 37))
            print(mine, flush=True)  # only after append() returned

    async def compactor():
        while compact_every:
            await asyncio.sleep(compact_every / 1000)
            n = seq  # every record numbered below n was appended before this call
            await j.compact([b"S%d" % n])
            print("C", n, flush=True)

    await asyncio.gather(compactor(), *(appender() for _ in range(workers)))


(uvloop.run if loop_name == "uvloop" else asyncio.run)(main())
'''


def _spawn(tmp_path: Path, path: Path, loop: str, crash_at: str = "-",
           compact_every_ms: int = 0, workers: int = 8) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen(
        [sys.executable, str(script), str(path), loop, crash_at, str(compact_every_ms),
         str(workers)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_acks(proc: subprocess.Popen, want: int, timeout: float = 20.0
               ) -> tuple[list[int], list[int]]:
    """Acknowledged sequence numbers and compactions, read until ``want`` acks or EOF."""
    acks: list[int] = []
    compactions: list[int] = []
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(acks) < want and time.monotonic() < deadline:
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")  # a partial last line is not an ack yet
            for line in lines:
                word = line.split()
                if word[0] == b"C":
                    compactions.append(int(word[1]))
                elif word[0] != b"ready":
                    acks.append(int(word[0]))
    return acks, compactions


def _check_state(records: list[bytes], acks: list[int], compactions: list[int]) -> int:
    """The replay is snapshot + consecutive records with intact payloads, covering every
    acknowledged append and compaction; returns the next sequence number."""
    base, rest = 0, records
    if records and records[0].startswith(b"S"):
        base, rest = int(records[0][1:]), records[1:]
    seqs = [int(r.split(b"|")[0]) for r in rest]
    assert seqs == list(range(base, base + len(seqs))), "replay is not a prefix in order"
    for r, s in zip(rest, seqs):
        assert r == b"%d|" % s + b"." * (s % 37)
    end = base + len(seqs)
    missing = [a for a in acks if a >= end]
    assert not missing, f"acknowledged records lost: {missing[:10]} (replay ends at {end})"
    assert all(c <= base for c in compactions), "an acknowledged compaction was lost"
    return end


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("compact_every_ms", [0, 3], ids=["append", "append+compact"])
def test_kill_9_keeps_every_acknowledged_record(tmp_path, loop, compact_every_ms):
    path = tmp_path / "spend.journal"
    rng = random.Random(SEED)
    all_acks: list[int] = []
    all_compactions: list[int] = []
    print("seed", SEED)
    for _ in range(3):
        proc = _spawn(tmp_path, path, loop, compact_every_ms=compact_every_ms)
        try:
            acks, compactions = _read_acks(proc, want=rng.randrange(300, 3000))
            assert acks, proc.stderr.read().decode()
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
            proc.stderr.close()
        all_acks += acks
        all_compactions += compactions
        records, j = reopen(path)
        j.close()
        assert _check_state(records, all_acks, all_compactions) > max(all_acks)
    if compact_every_ms:
        assert all_compactions and j.stats.generation >= 1


# --- 5. compaction -------------------------------------------------------------------


def test_compaction_replaces_history(tmp_path, run_async):
    path = tmp_path / "j"
    _, j = reopen(path, max_bytes=4096)
    before, after = payloads(100), payloads(10, seed=SEED + 1)

    async def main():
        await append_all(j, before)
        assert j.needs_compaction
        await j.compact([b"state-1", b"state-2"])
        assert not j.needs_compaction
        assert (j.stats.records, j.stats.snapshot_records, j.stats.generation) == (2, 2, 1)
        await append_all(j, after)
        await j.aclose()

    run_async(main())
    got, j2 = reopen(path)
    assert got == [b"state-1", b"state-2"] + after
    assert (j2.stats.generation, j2.stats.snapshot_records) == (1, 2)
    assert not (tmp_path / "j.compact").exists()
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    j2.close()


def test_compaction_orders_with_concurrent_appends(tmp_path, run_async):
    """Appends queued before compact() are superseded; those after it follow the snapshot."""
    path = tmp_path / "j"
    _, j = reopen(path)

    async def main():
        early = [j.append_nowait(b"early%d" % i) for i in range(50)]
        compaction = j.compact([b"snap"])  # the cut is the call
        late = [j.append_nowait(b"late%d" % i) for i in range(50)]
        await asyncio.gather(*early, compaction, *late)
        await j.aclose()

    run_async(main())
    assert reopen(path)[0] == [b"snap"] + [b"late%d" % i for i in range(50)]


def test_leftover_temp_file_leaves_the_old_state(tmp_path, run_async):
    """A compaction that wrote its temp file but never renamed it changes nothing."""
    path = tmp_path / "j"
    write_journal(path, [b"a", b"b"], run_async)
    tmp = tmp_path / "j.compact"
    tmp.write_bytes(_header(generation=1, snapshot=1))  # a complete-looking snapshot
    got, j2 = reopen(path)
    assert got == [b"a", b"b"] and j2.stats.generation == 0
    assert not tmp.exists()
    j2.close()


@pytest.mark.parametrize("crash_at,new_state", [("before_rename", False),
                                                ("after_rename", True)])
def test_kill_9_inside_compaction(tmp_path, crash_at, new_state):
    """The child SIGKILLs itself between temp-file sync and rename, or just after it."""
    path = tmp_path / "j"
    proc = _spawn(tmp_path, path, "uvloop", crash_at, compact_every_ms=50, workers=4)
    acks, compactions = _read_acks(proc, want=10**9, timeout=30)  # until it dies
    assert proc.wait(10) == -signal.SIGKILL, proc.stderr.read().decode()
    proc.stdout.close()
    proc.stderr.close()
    assert acks and not compactions
    assert (tmp_path / "j.compact").exists() != new_state
    records, j = reopen(path)
    j.close()
    assert _check_state(records, acks, compactions)
    assert records[0].startswith(b"S") == new_state
    assert j.stats.generation == int(new_state)
    assert not (tmp_path / "j.compact").exists()


def test_failed_compaction_keeps_appending_to_the_old_file(tmp_path, run_async):
    path = tmp_path / "j"
    _, j = reopen(path)
    (tmp_path / "j.compact").mkdir()  # the temp file cannot be created

    async def main():
        await j.append(b"a")
        with pytest.raises(JournalError, match="compaction failed"):
            await j.compact([b"snap"])
        await j.append(b"b")
        await j.aclose()

    run_async(main())
    (tmp_path / "j.compact").rmdir()
    assert reopen(path)[0] == [b"a", b"b"]


# --- 6. syncs off the loop; bounds and failures --------------------------------------


def test_sync_runs_off_the_loop_thread(tmp_path, run_async):
    j = HookedJournal(tmp_path / "j", delay=0.3)
    j.open()
    j.sync_threads.clear()  # open() creates the file on the caller's thread, before serving

    async def main():
        ticks = 0
        stop = False

        async def ticker():
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.005)

        t = asyncio.ensure_future(ticker())
        await asyncio.sleep(0)
        start = ticks
        await append_all(j, [os.urandom(100) for _ in range(20000)])  # one 2 MB batch
        stop = True
        await t
        assert j.sync_threads and threading.get_ident() not in j.sync_threads
        assert ticks - start >= 20, f"loop starved: {ticks - start} ticks in a 0.3 s sync"
        assert j.stats.batches <= 2
        await j.aclose()

    run_async(main())


def test_pending_bound_raises_overloaded(tmp_path, run_async):
    j = HookedJournal(tmp_path / "j", delay=0.2, max_pending_bytes=10 * (RECORD_OVERHEAD + 100))
    j.open()

    async def main():
        queued = [j.append_nowait(bytes(100)) for _ in range(10)]
        assert j.stats.pending_bytes == j.max_pending_bytes
        with pytest.raises(Overloaded, match="not keeping up"):
            j.append_nowait(b"x")
        with pytest.raises(JournalError, match="exceeds"):
            j.append_nowait(bytes(2000))
        await asyncio.gather(*queued)
        await j.append(b"room again")
        await j.aclose()

    run_async(main())
    assert len(reopen(tmp_path / "j")[0]) == 11


def test_sync_failure_stops_the_journal(tmp_path, run_async):
    j = HookedJournal(tmp_path / "j")
    j.open()

    async def main():
        await j.append(b"durable")
        j.fail = True
        with pytest.raises(JournalError, match="write failed"):
            await j.append(b"maybe")
        j.fail = False
        assert j.stats.failed
        with pytest.raises(JournalError, match="stopped after an I/O error"):
            await j.append(b"refused")
        await j.aclose()

    run_async(main())
    got = reopen(tmp_path / "j")[0]
    assert got[0] == b"durable" and b"refused" not in got


def test_close_drains_appends_left_by_a_finished_loop(tmp_path):
    """asyncio.run cancels the flusher; close() still writes what was queued."""
    _, j = reopen(tmp_path / "j")

    async def main():
        for i in range(100):
            j.append_nowait(b"%d" % i)

    asyncio.run(main())
    j.close()
    assert reopen(tmp_path / "j")[0] == [b"%d" % i for i in range(100)]


def test_misuse_is_reported(tmp_path, run_async):
    j = Journal(tmp_path / "j")

    async def before_open():
        with pytest.raises(JournalError, match="not open"):
            await j.append(b"x")

    run_async(before_open())
    j.open()
    with pytest.raises(JournalError, match="already opened"):
        j.open()
    j.close()
    j.close()  # idempotent

    async def after_close():
        with pytest.raises(JournalError, match="not open"):
            j.append_nowait(b"x")

    run_async(after_close())
