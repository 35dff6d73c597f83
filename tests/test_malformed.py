"""Bad input: each case gets a typed error or a closed connection, never a sick daemon."""
import os
import random
import socket
import time

import msgspec
import psutil
import pytest

from rawsock import Raw
from sidecar import Client
from sidecar.wire import Error, ErrorCode, Pong

SEED = int(os.environ.get("LLM_SIDECAR_TEST_SEED", "20261123"))


def still_serving(daemon) -> None:
    with Client(daemon.path, timeout=5) as c:
        assert c.ping() > 0


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@pytest.mark.parametrize("obj,code,echo_id", [
    ({"op": "nope", "id": 7}, ErrorCode.UNKNOWN_OP, 7),
    ({"id": 8}, ErrorCode.MISSING_FIELD, 8),
    ({"op": "fingerprint", "id": 9}, ErrorCode.MISSING_FIELD, 9),
    ({"op": "fingerprint", "id": 10, "text": 5}, ErrorCode.WRONG_TYPE, 10),
    ({"op": "ping", "id": "eleven"}, ErrorCode.WRONG_TYPE, None),
    ({"op": "ping", "id": -1}, ErrorCode.WRONG_TYPE, None),
    ([1, 2, 3], ErrorCode.WRONG_TYPE, None),
    ("just a string", ErrorCode.WRONG_TYPE, None),
    ({"op": 5, "id": 12}, ErrorCode.UNKNOWN_OP, 12),
])
def test_wrong_shapes_get_typed_errors(daemon, obj, code, echo_id):
    with Raw(daemon.path) as r:
        r.send(obj)
        r.send({"op": "ping", "id": 99})
        reply = r.recv()
        assert type(reply) is Error and reply.code == code and reply.id == echo_id
        assert reply.message
        assert r.recv() == Pong(id=99)  # the connection stays usable
    still_serving(daemon)


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x82\xa2op\xa4ping", b"\x81\xa2op\xa4ping\x00"])
def test_malformed_msgpack(daemon, body):
    with Raw(daemon.path) as r:
        r.send(body, raw=True)
        reply = r.recv()
        assert type(reply) is Error and reply.code == ErrorCode.MALFORMED
        r.send({"op": "ping", "id": 1})
        assert r.recv() == Pong(id=1)


def test_errors_keep_pipeline_order(daemon):
    with Raw(daemon.path) as r:
        stream = b"".join([
            frame(msgspec.msgpack.encode({"op": "ping", "id": 1})),
            frame(b"\xc1"),
            frame(msgspec.msgpack.encode({"op": "nope", "id": 3})),
            frame(msgspec.msgpack.encode({"op": "ping", "id": 4})),
        ])
        r.send_bytes(stream)
        replies = [r.recv() for _ in range(4)]
    assert replies[0] == Pong(id=1)
    assert replies[1].code == ErrorCode.MALFORMED and replies[1].id is None
    assert replies[2].code == ErrorCode.UNKNOWN_OP and replies[2].id == 3
    assert replies[3] == Pong(id=4)


def test_length_over_max_gets_error_then_close(daemon):
    with Raw(daemon.path) as r:
        r.send_bytes((4 * 1024 * 1024 + 1).to_bytes(4, "big") + b"xx")
        reply = r.recv()
        assert type(reply) is Error and reply.code == ErrorCode.TOO_LARGE and reply.id is None
        assert r.recv() is None  # closed
    still_serving(daemon)
    with Client(daemon.path) as c:
        assert c.stats().ops["invalid"].errors["TOO_LARGE"] == 1


def test_truncated_frame_at_eof(daemon):
    with Raw(daemon.path) as r:
        r.send_bytes((100).to_bytes(4, "big") + b"only ten b")
        r.sock.shutdown(socket.SHUT_WR)
        assert r.recv() is None
    with Raw(daemon.path) as r:
        r.send_bytes(b"\x00\x00")  # half a length prefix
        r.sock.shutdown(socket.SHUT_WR)
        assert r.recv() is None
    still_serving(daemon)


def test_random_bytes(daemon):
    rng = random.Random(SEED)
    print(f"seed {SEED}")
    for _ in range(50):
        with Raw(daemon.path, timeout=10) as r:
            r.send_bytes(rng.randbytes(rng.randint(1, 4096)))
            r.sock.shutdown(socket.SHUT_WR)
            r.closed_by_peer()
    still_serving(daemon)


def test_deeply_nested_values(daemon):
    depth = 1_000_000
    with Raw(daemon.path) as r:
        # An unknown field holding a million nested arrays (skipped), then as the request.
        body = b"\x83\xa2op\xa4ping\xa2id\x01\xa1x" + b"\x91" * depth + b"\xc0"
        r.send(body, raw=True)
        first = r.recv()
        r.send(b"\x91" * depth + b"\xc0", raw=True)
        second = r.recv()
        r.send({"op": "ping", "id": 2})
        assert r.recv() == Pong(id=2)
    assert first == Pong(id=1) or (type(first) is Error and first.code in
                                   (ErrorCode.MALFORMED, ErrorCode.WRONG_TYPE))
    assert type(second) is Error and second.code in (ErrorCode.MALFORMED, ErrorCode.WRONG_TYPE)
    still_serving(daemon)


def test_huge_map_of_unknown_fields(daemon):
    with Raw(daemon.path) as r:
        extra = {f"k{i}": "v" * 10 for i in range(100_000)}
        r.send({"op": "ping", "id": 1, **extra})
        assert r.recv() == Pong(id=1)


def test_stalled_partial_frame_is_closed(start_daemon):
    d = start_daemon("[server]\nframe_timeout = 0.5\n")
    with Raw(d.path) as stalled:
        stalled.send_bytes((50).to_bytes(4, "big") + b"\x82")
        # Others are served while that one stalls.
        still_serving(d)
        reply = stalled.recv()  # within the socket's 10 s timeout
        assert type(reply) is Error and reply.code == ErrorCode.MALFORMED
        assert "stalled" in reply.message
        assert stalled.recv() is None
    still_serving(d)


def test_slow_but_steady_writer_is_served(start_daemon):
    d = start_daemon("[server]\nframe_timeout = 2\n")
    body = msgspec.msgpack.encode({"op": "fingerprint", "id": 5, "text": "slow"})
    with Raw(d.path) as r:
        for byte in frame(body):
            r.send_bytes(bytes([byte]))
            time.sleep(0.01)
        assert r.recv().normalized == "slow"


def test_connection_limit(start_daemon):
    d = start_daemon("[server]\nmax_connections = 2\n")
    a, b = Raw(d.path), Raw(d.path)
    try:
        a.send({"op": "ping", "id": 1})
        b.send({"op": "ping", "id": 1})
        assert a.recv() == Pong(id=1) and b.recv() == Pong(id=1)
        with Raw(d.path) as third:
            reply = third.recv()
            assert type(reply) is Error and reply.code == ErrorCode.OVERLOADED
            assert third.recv() is None
    finally:
        a.sock.close()
        b.sock.close()
    time.sleep(0.2)
    still_serving(d)


def test_rss_stays_flat_under_10000_bad_frames(daemon):
    proc = psutil.Process(daemon.pid)
    rng = random.Random(SEED)
    bad = [
        frame(b"\xc1"),
        frame(msgspec.msgpack.encode({"op": "nope", "id": 1})),
        frame(msgspec.msgpack.encode({"op": "fingerprint", "id": 2})),
        frame(msgspec.msgpack.encode([1, 2, 3])),
        frame(msgspec.msgpack.encode({"op": "fingerprint", "id": 3, "text": b"x" * 2000})),
    ]

    def blast(n: int) -> None:
        with Raw(daemon.path) as r:
            for start in range(0, n, 500):
                batch = [rng.choice(bad) for _ in range(min(500, n - start))]
                r.send_bytes(b"".join(batch))
                for _ in batch:
                    assert type(r.recv()) is Error
            # an oversize prefix costs the connection; a new one carries on
            r.send_bytes((1 << 31).to_bytes(4, "big"))
            assert r.recv().code == ErrorCode.TOO_LARGE

    daemon.wait_semantic_ready()  # its model loads in the background after start
    blast(1000)  # warm up caches and allocator pools
    before = proc.memory_info().rss
    for _ in range(10):
        blast(1000)
    grown = proc.memory_info().rss - before
    print(f"RSS grew by {grown / 1e6:.2f} MB over 10,000 bad frames")
    assert grown < 10 * 1024 * 1024
    still_serving(daemon)


def test_busy_pipeline_ending_reads_mid_frame_is_not_a_stall(start_daemon):
    # Every write ends in the middle of a frame, for longer than frame_timeout in total.
    d = start_daemon("[server]\nframe_timeout = 0.3\n")
    frames = b"".join(frame(msgspec.msgpack.encode({"op": "ping", "id": i})) for i in range(2))
    with Raw(d.path) as r:
        r.send_bytes(frames[:5])
        sent = 1
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            # finish the pending frame, send one whole, and start the next: a partial
            # frame is always pending, but each one completes within the timeout
            r.send_bytes(frames[5:len(frames) // 2] + frames[:5])
            assert r.recv() == Pong(id=0)
            sent += 1
            time.sleep(0.1)
        assert sent > 5
