"""Every op through both clients against a real daemon subprocess."""
import asyncio
import threading

import pytest

import sidecar._native
from sidecar import AsyncClient, Client
from sidecar.errors import FrameTooLarge, SidecarTimeout, SidecarUnavailable
from sidecar.text.normalize import Normalizer
from sidecar.wire import (
    OPS, PROTOCOL_VERSION, Fingerprint, FingerprintReply, HelloReply, Ping, Pong, StatsReply,
)

TEXTS = ["Can you tell me the capital of France, please?", "What is -5 squared?",
         "ＦＵＬＬ width", "", "x" * 10_000, "Learn C# fast"]


def test_every_op_sync(daemon):
    local = Normalizer()
    with Client(daemon.path) as c:
        hello = c.hello()
        assert isinstance(hello, HelloReply)
        assert hello.protocol == PROTOCOL_VERSION
        assert hello.features == list(OPS)
        assert hello.max_frame == 4 * 1024 * 1024
        assert hello.pid == daemon.pid
        assert c.ping() > 0
        for text in TEXTS:
            fp = c.fingerprint(text)
            assert isinstance(fp, FingerprintReply)
            assert (fp.normalized, fp.key, fp.spec) == tuple(local.fingerprint(text))
        stats = c.stats()
    assert isinstance(stats, StatsReply)
    assert stats.pid == daemon.pid
    assert stats.socket == str(daemon.path)
    assert stats.ops["fingerprint"].requests == len(TEXTS)
    assert stats.ops["ping"].requests == 1
    assert stats.ops["hello"].requests >= 2  # handshake + explicit hello
    assert stats.ops["ping"].p50_us > 0 and stats.ops["ping"].p99_us >= stats.ops["ping"].p50_us
    assert stats.errors_total == 0
    assert stats.connections_now >= 1 and stats.connections_total >= 1
    assert set(stats.build.native) == set(sidecar._native.MODULES)
    assert all(p.endswith(".so") for p in stats.build.native.values())
    assert stats.build.libraries["msgspec"] and stats.build.libraries["uvloop"]


def test_every_op_async(daemon, run_async):
    local = Normalizer()

    async def main():
        async with AsyncClient(daemon.path) as c:
            hello = await c.hello()
            assert hello.protocol == PROTOCOL_VERSION
            assert await c.ping() > 0
            fps = await asyncio.gather(*(c.fingerprint(t) for t in TEXTS))
            for text, fp in zip(TEXTS, fps):
                assert (fp.normalized, fp.key) == tuple(local.fingerprint(text))[:2]
            stats = await c.stats()
            assert stats.ops["fingerprint"].requests == len(TEXTS)

    run_async(main())


def test_sync_batch_keeps_order(daemon):
    texts = [f"Question number {i}, please" for i in range(2000)]
    with Client(daemon.path) as c:
        replies = c.batch([Fingerprint(text=t) for t in texts] + [Ping()])
    assert [r.normalized for r in replies[:-1]] == [f"question number {i}" for i in range(2000)]
    assert isinstance(replies[-1], Pong)
    assert [r.id for r in replies] == sorted(r.id for r in replies)


def test_async_batch_and_concurrent_calls(daemon, run_async):
    async def main():
        async with AsyncClient(daemon.path) as c:
            replies = await c.batch([Fingerprint(text=str(i)) for i in range(1000)])
            assert [r.normalized for r in replies] == [str(i) for i in range(1000)]
            many = await asyncio.gather(*(c.fingerprint(f"t{i}") for i in range(500)))
            assert [r.normalized for r in many] == [f"t{i}" for i in range(500)]

    run_async(main())


def test_client_is_thread_safe(daemon):
    local = Normalizer()
    errors = []
    with Client(daemon.path) as c:
        def worker(n):
            try:
                for i in range(300):
                    text = f"thread {n} asks question {i}"
                    assert c.fingerprint(text).key == local.fingerprint(text).key
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_oversize_request_fails_locally_and_connection_survives(daemon):
    with Client(daemon.path) as c:
        with pytest.raises(FrameTooLarge):
            c.fingerprint("x" * (5 * 1024 * 1024))
        assert c.fingerprint("still fine").normalized == "still fine"
        assert c.stats().ops.get("invalid") is None


def test_large_value_under_the_limit(daemon):
    text = "Word, " * 500_000  # 3 MB
    with Client(daemon.path, timeout=30) as c:
        fp = c.fingerprint(text)
    assert fp.normalized == ("word " * 500_000).strip()


def test_unreachable_daemon_says_how_to_start(tmp_path):
    with pytest.raises(SidecarUnavailable, match="llm-sidecar serve"):
        Client(tmp_path / "none.sock").ping()


def test_async_unreachable(tmp_path, run_async):
    async def main():
        with pytest.raises(SidecarUnavailable):
            await AsyncClient(tmp_path / "none.sock").ping()

    run_async(main())


def test_timeouts_then_recovery(daemon):
    import signal

    with Client(daemon.path, timeout=5) as c:
        c.ping()
        daemon.signal(signal.SIGSTOP)
        try:
            with pytest.raises(SidecarTimeout):
                c.ping(timeout=0.3)
        finally:
            daemon.signal(signal.SIGCONT)
        assert c.ping() > 0


def test_async_timeout_keeps_connection_in_step(daemon, run_async):
    import signal

    async def main():
        async with AsyncClient(daemon.path) as c:
            await c.ping()
            daemon.signal(signal.SIGSTOP)
            try:
                with pytest.raises(SidecarTimeout):
                    await c.fingerprint("late", timeout=0.3)
            finally:
                daemon.signal(signal.SIGCONT)
            # The late reply is skipped; the next call gets its own.
            assert (await c.fingerprint("next")).normalized == "next"

    run_async(main())


def test_reconnects_after_daemon_restart(start_daemon, run_async):
    d = start_daemon()
    c = Client(d.path)
    assert c.ping() > 0
    assert d.stop() == 0
    with pytest.raises(SidecarUnavailable):
        c.ping()
    d2 = start_daemon(socket_path=d.path)
    assert c.fingerprint("Back again").normalized == "back again"
    assert c.stats().pid == d2.pid
    c.close()

    async def across_restart():
        async with AsyncClient(d.path) as ac:
            await ac.ping()
            assert d2.stop() == 0
            with pytest.raises(SidecarUnavailable):
                await ac.ping()
            d3 = start_daemon(socket_path=d.path)
            assert (await ac.stats()).pid == d3.pid

    run_async(across_restart())


def test_daemon_decodes_any_split_of_a_pipelined_stream(daemon):
    import random
    import time as _time

    import msgspec

    from rawsock import Raw

    seed = 20261123
    rng = random.Random(seed)
    print(f"seed {seed}")
    local = Normalizer()
    for _ in range(20):
        texts = [rng.choice(TEXTS[:4]) + str(rng.randint(0, 99)) for _ in range(rng.randint(1, 40))]
        stream = b"".join(
            len(b).to_bytes(4, "big") + b
            for b in (msgspec.msgpack.encode({"op": "fingerprint", "id": i, "text": t})
                      for i, t in enumerate(texts)))
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randint(0, 12))))
        with Raw(daemon.path) as r:
            start = 0
            for cut in [*cuts, len(stream)]:
                r.send_bytes(stream[start:cut])
                start = cut
                _time.sleep(0.0005)  # let the daemon see each piece on its own
            for i, text in enumerate(texts):
                reply = r.recv()
                assert reply.id == i and reply.normalized == local.normalize(text)
