"""sidecar.ledger.RequestLog: JSON lines in order, size rotation, a bounded queue under a
flood (in records and in memory), I/O errors survived, close. Real files, real threads."""
from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import threading
import tracemalloc
from pathlib import Path

import pytest

from sidecar.ledger import RequestLog, RequestLogStats


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def fixed_record(i: int) -> dict:
    """A record whose JSON line has the same length for every i < 10**6."""
    return {"seq": f"{i:06d}", "model": "gpt-4o", "tokens": 123}


def test_imports_this_worktree():
    import sidecar

    assert Path(sidecar.__file__).resolve().parent == \
        Path(__file__).resolve().parent.parent / "sidecar"


def test_records_round_trip_in_order(tmp_path):
    path = tmp_path / "logs" / "requests.log"
    log = RequestLog(path)
    assert (path.parent.stat().st_mode & 0o777) == 0o700
    assert (path.stat().st_mode & 0o777) == 0o600

    class Kind(enum.Enum):
        CHAT = "chat"

    records = [{"i": i, "model": "gpt-4o-mini", "cost": i / 7, "ok": i % 2 == 0,
                "tags": ["a", "é", None], "nested": {"n": i}} for i in range(2000)]
    assert all(log.write(r) for r in records)
    # Values JSON has no form for are written as their str(); int keys as strings.
    log.write({"kind": Kind.CHAT, "path": Path("/x"), 7: "int key", "obj": object})
    log.close()
    lines = read_lines(path)
    assert lines[:-1] == records
    assert lines[-1] == {"kind": "chat", "path": "/x", "7": "int key",
                         "obj": str(object)}
    stats = log.stats()
    assert isinstance(stats, RequestLogStats)
    assert stats.path == str(path)
    assert (stats.written, stats.dropped, stats.failed_records, stats.rotations,
            stats.queued, stats.error) == (2001, 0, 0, 0, 0, "")
    assert stats.bytes == path.stat().st_size
    assert 1 <= stats.high_water <= 2001


def test_appends_to_an_existing_file_and_mends_a_torn_line(tmp_path):
    path = tmp_path / "requests.log"
    path.write_bytes(b'{"old": 1}\n{"torn": ')  # a crash mid-line
    log = RequestLog(path)
    log.write({"new": 2})
    log.close()
    assert path.read_bytes().splitlines() == [b'{"old": 1}', b'{"torn": ', b'{"new":2}']


def test_rotation_keeps_the_newest_records(tmp_path):
    path = tmp_path / "requests.log"
    max_bytes, keep, n = 1000, 3, 500
    line_len = len(json.dumps(fixed_record(0), separators=(",", ":"))) + 1
    per_file = max_bytes // line_len
    log = RequestLog(path, max_bytes=max_bytes, keep=keep)
    for i in range(n):
        assert log.write(fixed_record(i))
        if i % 97 == 0:
            log.flush()  # vary the batch boundaries: rotation must not depend on them
    log.close()

    files = [path] + [Path(f"{path}.{i}") for i in range(1, keep + 1)]
    assert all(f.exists() for f in files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)
    for f in files:
        assert f.stat().st_size <= max_bytes
    for f in files[1:]:
        assert f.stat().st_size == per_file * line_len  # rotated files are full
    found = [rec for f in reversed(files) for rec in read_lines(f)]  # oldest file first
    expected_rotations = -(-n // per_file) - 1
    kept = n - (expected_rotations - keep) * per_file
    assert found == [fixed_record(i) for i in range(n - kept, n)]
    stats = log.stats()
    assert stats.rotations == expected_rotations
    assert stats.written == n
    assert stats.bytes == path.stat().st_size


def test_keep_zero_truncates_and_restarts(tmp_path):
    path = tmp_path / "requests.log"
    line_len = len(json.dumps(fixed_record(0), separators=(",", ":"))) + 1
    log = RequestLog(path, max_bytes=10 * line_len, keep=0)
    for i in range(35):
        log.write(fixed_record(i))
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["requests.log"]
    assert read_lines(path) == [fixed_record(i) for i in range(30, 35)]
    assert log.stats().rotations == 3


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path):
    path = tmp_path / "requests.log"
    log = RequestLog(path, max_bytes=100, keep=2)
    log.write({"a": 1})
    log.write({"big": "x" * 500})
    log.write({"b": 2})
    log.close()
    assert read_lines(Path(f"{path}.2")) == [{"a": 1}]
    assert read_lines(Path(f"{path}.1")) == [{"big": "x" * 500}]
    assert read_lines(path) == [{"b": 2}]
    assert log.stats().rotations == 2


def test_follows_the_path_when_the_file_is_moved_away(tmp_path):
    # An external logrotate renames the file: later records go to a new file at the path.
    path = tmp_path / "requests.log"
    log = RequestLog(path)
    log.write({"n": 1})
    assert log.flush()
    path.rename(tmp_path / "moved.log")
    log.write({"n": 2})
    log.close()
    assert read_lines(tmp_path / "moved.log") == [{"n": 1}]
    assert read_lines(path) == [{"n": 2}]


def test_flood_against_a_stalled_writer_drops_and_stays_bounded(tmp_path):
    # The log is a FIFO nobody reads yet: once the pipe buffer is full the writer thread
    # blocks in write(), deterministically, and every record beyond queue_max is dropped.
    path = tmp_path / "requests.log"
    os.mkfifo(path)
    reader_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    log = RequestLog(path, queue_max=1000)
    n = 200_000
    accepted = [i for i in range(n) if log.write({"i": i, "pad": "p" * 80})]
    stats = log.stats()
    assert stats.dropped == n - len(accepted) > 0
    assert stats.high_water <= 1000
    assert len(accepted) < 10_000  # the pipe holds ~64 KiB, the queue 1000 records

    chunks: list[bytes] = []

    def drain() -> None:
        os.set_blocking(reader_fd, True)
        while chunk := os.read(reader_fd, 1 << 16):
            chunks.append(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    log.close(timeout=30)
    reader.join(30)
    os.close(reader_fd)
    stats = log.stats()
    assert stats.written + stats.dropped == n
    assert stats.written == len(accepted)
    assert stats.failed_records == 0
    assert stats.high_water <= 1000
    lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
    assert [rec["i"] for rec in lines] == accepted


def test_flood_memory_stays_flat(tmp_path):
    log = RequestLog(tmp_path / "requests.log", queue_max=1000)
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        accepted = sum(log.write({"i": i, "model": "gpt-4o", "pad": "q" * 100})
                       for i in range(300_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    log.close()
    assert peak - base < 20 * 1024 * 1024
    stats = log.stats()
    assert stats.written == accepted
    assert stats.written + stats.dropped == 300_000
    assert stats.high_water <= 1000


def test_io_errors_are_counted_and_survived(tmp_path, caplog):
    # Running as root, permissions would not stop a write; a regular file where the
    # directory should be fails every open and stat (ENOTDIR) for any user.
    logdir = tmp_path / "logs"
    path = logdir / "requests.log"
    log = RequestLog(path)
    log.write({"n": 1})
    assert log.flush()

    shutil.rmtree(logdir)
    logdir.write_text("not a directory")
    caplog.set_level(logging.ERROR, logger="sidecar.ledger")
    assert log.write({"n": 2}) and log.write({"n": 3})
    assert log.flush()
    assert log.write({"n": 4})
    assert log.flush()
    stats = log.stats()
    assert stats.failed_records == 3
    assert stats.written == 1
    assert "Not a directory" in stats.error and str(logdir) in stats.error
    # Logged once for two failed batches: the rest waits out the rate limit.
    errors = [r for r in caplog.records if r.name == "sidecar.ledger"]
    assert len(errors) == 1 and "Not a directory" in errors[0].getMessage()
    assert any(t.name == "sidecar-requestlog" and t.is_alive() for t in threading.enumerate())

    logdir.unlink()
    logdir.mkdir()
    assert log.write({"n": 5})
    log.close()
    assert read_lines(path) == [{"n": 5}]
    stats = log.stats()
    assert (stats.written, stats.failed_records, stats.dropped) == (2, 3, 0)


def test_close_is_idempotent_and_later_writes_are_dropped(tmp_path):
    path = tmp_path / "requests.log"
    log = RequestLog(path)
    log.write({"n": 1})
    log.close()
    log.close()
    assert log.write({"n": 2}) is False
    assert log.write({"n": 3}) is False
    stats = log.stats()
    assert (stats.written, stats.dropped, stats.queued) == (1, 2, 0)
    assert read_lines(path) == [{"n": 1}]
    assert not any(t.name == "sidecar-requestlog" for t in threading.enumerate())


def test_aclose_from_the_event_loop(tmp_path, run_async):
    path = tmp_path / "requests.log"

    async def main() -> None:
        log = RequestLog(path)
        for i in range(100):
            log.write({"i": i})
        await log.aclose()
        await log.aclose()
        assert log.stats().written == 100

    run_async(main())
    assert read_lines(path) == [{"i": i} for i in range(100)]


@pytest.mark.parametrize("kw", [{"max_bytes": 0}, {"queue_max": 0}, {"keep": -1}])
def test_rejects_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        RequestLog(tmp_path / "requests.log", **kw)


def test_unusable_path_fails_at_start(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError):  # the parent "directory" is a file
        RequestLog(tmp_path / "file" / "requests.log")
