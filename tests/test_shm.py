"""The shared-memory segment: answers published by one writer, read by other processes
without a system call; a torn, overwritten, expired or scribbled-on read is a miss, never
an answer."""
import asyncio
import hashlib
import multiprocessing
import os
import random
import stat
import struct
import time

import pytest

from sidecar.wire.shm import Publisher, Segment, segment_path

MiB = 1 << 20


def key(n: int) -> bytes:
    return hashlib.blake2b(str(n).encode(), digest_size=16).digest()


@pytest.fixture
def pub(tmp_path):
    p = Publisher(tmp_path / "llm.sock.shm", size=4 * MiB, slots=1024)
    yield p
    p.close()


def test_put_get_remove_and_expiry(pub):
    seg = Segment(pub.path)
    now = 1000.0
    assert pub.put(key(1), b"first answer", now + 10, now + 20)
    assert seg.get(key(1), now) == (b"first answer", False)
    assert seg.get(key(2), now) is None
    assert pub.put(key(1), b"second answer", now + 10, now + 20)  # replaced in place
    assert seg.get(key(1), now) == (b"second answer", False)
    assert seg.get(key(1), now + 10) is None  # expired
    assert seg.get(key(1), now + 15, allow_stale=True) == (b"second answer", True)
    assert seg.get(key(1), now + 20, allow_stale=True) is None  # past its stale window
    assert pub.remove(key(1)) and seg.get(key(1), now) is None
    assert not pub.remove(key(1))
    assert pub.put(key(3), b"", now + 1, now + 1) and seg.get(key(3), now) == (b"", False)
    pub.clear()
    assert seg.get(key(3), now) is None
    assert seg.generation == pub.generation != 0
    seg.close()


def test_the_file_is_private_to_writers_and_replaced_whole(tmp_path):
    path = segment_path(tmp_path / "llm.sock")
    assert path.name == "llm.sock.shm"
    first = Publisher(path, size=MiB, slots=64, mode=0o660)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # nobody but the daemon writes
    seg = Segment(path)
    assert seg.current() and seg.owner == os.getuid()
    second = Publisher(path, size=MiB, slots=64)  # a restarted daemon
    assert not seg.current() and Segment(path).generation == second.generation
    assert second.generation != first.generation
    first.close()  # the old daemon's exit leaves the new file alone
    assert path.exists()
    second.close()
    assert not path.exists() and not seg.current()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary left behind


def test_a_wrapped_arena_never_serves_an_overwritten_body(tmp_path):
    pub = Publisher(tmp_path / "s.shm", size=256 * 1024, slots=512)
    seg = Segment(pub.path)
    bodies = {}
    for n in range(2000):  # ~8 laps of the arena
        body = bytes([n % 251]) * random.Random(n).randrange(1, 3000)
        assert pub.put(key(n), body, 1e9, 1e9)
        bodies[n] = body
    served = 0
    for n, body in bodies.items():
        got = seg.get(key(n), 0.0)
        if got is not None:
            assert got == (body, False)
            served += 1
    assert 0 < served < len(bodies)  # the newest answers, and only they
    assert seg.get(key(1999), 0.0) == (bodies[1999], False)
    assert not pub.put(key(-1), b"x" * 100_000, 1e9, 1e9)  # over a quarter of the arena
    pub.close()
    with pytest.raises(ValueError, match="too small"):
        Publisher(tmp_path / "t.shm", size=64 * 1024, slots=1024)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_full_probe_window_replaces_the_entry_expiring_first(tmp_path):
    pub = Publisher(tmp_path / "s.shm", size=MiB, slots=16)  # one window: every key collides
    seg = Segment(pub.path)
    for n in range(16):
        assert pub.put(key(n), b"%d" % n, 100.0 + n, 100.0 + n)
    assert pub.put(key(99), b"new", 500.0, 500.0)
    assert seg.get(key(0), 0.0) is None  # expired first, replaced
    assert seg.get(key(99), 0.0) == (b"new", False)
    assert all(seg.get(key(n), 0.0) == (b"%d" % n, False) for n in range(1, 16))
    pub.close()


def test_a_scribbled_segment_is_refused_or_misses(tmp_path):
    path = tmp_path / "s.shm"
    path.write_bytes(b"\0" * MiB)
    with pytest.raises(ValueError, match="magic"):
        Segment(path)
    pub = Publisher(path, size=MiB, slots=256)
    for n in range(200):
        pub.put(key(n), os.urandom(50), 1e9, 1e9)
    with open(path, "r+b") as f:  # garbage over the whole index, header intact
        rng = random.Random(7)
        f.seek(4096)
        f.write(bytes(rng.randrange(256) for _ in range(256 * 64)))
    seg = Segment(path)
    for n in range(300):
        got = seg.get(key(n), 0.0)  # anything may miss; nothing may crash or overrun
        assert got is None or isinstance(got[0], bytes)
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(struct.pack("=Q", 3))  # slots not a power of two
    with pytest.raises(ValueError):
        Segment(path)
    pub.close()


def _writer(path: str, keys: int, seconds: float, ready) -> None:
    pub = Publisher(path, size=512 * 1024, slots=1024)
    ready.set()
    version, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        version += 1
        n = version % keys
        # a body that proves itself: its key, its version, and a length and fill that
        # follow from both
        fill = bytes([(n * 31 + version) % 256])
        body = struct.pack("=qq", n, version) + fill * ((version * 7919) % 4000)
        pub.put(key(n), body, 1e12, 1e12)
        if version % 97 == 0:
            pub.remove(key((n + 1) % keys))
    pub.close()  # the reader keeps its own map of the file


def _reader(path: str, keys: int, seconds: float, out) -> None:
    seg = Segment(path)
    served = bad = 0
    deadline = time.monotonic() + seconds
    rng = random.Random(os.getpid())
    while time.monotonic() < deadline:
        n = rng.randrange(keys)
        got = seg.get(key(n), 0.0)
        if got is None:
            continue
        body = got[0]
        k, version = struct.unpack_from("=qq", body)
        fill = bytes([(n * 31 + version) % 256])
        if k != n or body[16:] != fill * ((version * 7919) % 4000):
            bad += 1
        served += 1
    out.put((served, bad, seg.retries, seg.torn))


def test_a_reader_racing_a_writer_never_gets_a_torn_body(tmp_path):
    """10 s of a writer republishing 64 keys as fast as it can (the arena wraps every few
    hundred puts) against a reader in another process checking every body it gets."""
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "race.shm")
    ready, out = ctx.Event(), ctx.Queue()
    w = ctx.Process(target=_writer, args=(path, 64, 10.5, ready))
    w.start()
    assert ready.wait(10)
    r = ctx.Process(target=_reader, args=(path, 64, 10.0, out))
    r.start()
    served, bad, retries, torn = out.get(timeout=60)
    r.join(10)
    w.join(10)
    assert bad == 0
    assert served > 10_000
    assert retries + torn > 0  # the race really happened


def test_closed_segments_and_meta(tmp_path):
    path = tmp_path / "llm.sock.shm"
    killed = Publisher(path, size=MiB, slots=64)
    killed.set_meta(b'{"filler_words": ["please"]}')
    killed.put(key(1), b"answer", 1e12, 1e12)
    seg = Segment(path)
    assert seg.meta() == b'{"filler_words": ["please"]}' and not seg.closed
    with pytest.raises(ValueError):
        killed.set_meta(b"x" * 4000)
    # a daemon killed without closing: the next one marks its segment closed
    successor = Publisher(path, size=MiB, slots=64)
    assert seg.closed and seg.get(key(1), 0.0) is None  # no longer kept true: never served
    fresh = Segment(path)
    assert not fresh.closed and fresh.meta() == b"" and fresh.get(key(1), 0.0) is None
    successor.close()  # a clean stop marks its own
    assert fresh.closed and not path.exists()
    path.write_bytes(b"junk")  # not a segment: replaced all the same
    Publisher(path, size=MiB, slots=64).close()


def test_the_daemon_publishes_its_exact_answers(start_daemon):
    """On the shipped defaults the daemon makes the segment beside its socket, readable
    by the socket's readers only, and keeps it true: stores, invalidations, a clean stop."""
    import json

    import msgspec

    from sidecar import Client
    from sidecar.wire.shm import ANSWER_DECODER

    d = start_daemon()
    path = segment_path(d.path)
    assert stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(os.stat(d.path).st_mode) & ~0o022
    seg = Segment(path)
    meta = json.loads(seg.meta())
    assert meta["isolate_cache"] is False and "please" in meta["filler_words"]
    with Client(d.path) as c:
        put = c.cache_put({"answer": 42}, model="gpt-4o", text="What is six times seven?")
        assert put.stored
        got = seg.get(put.key, time.time())
        assert got is not None and not got[1]
        answer = ANSWER_DECODER.decode(got[0])
        assert msgspec.msgpack.decode(answer.response) == {"answer": 42}
        assert answer.query and answer.cached_at <= time.time()
        hit = c.cache_get(model="gpt-4o", text="What is six times seven?")
        assert hit.hit and hit.key == put.key and bytes(hit.response) == bytes(answer.response)
        assert c.cache_invalidate(key=put.key) == 1
        assert seg.get(put.key, time.time()) is None
        refused = c.cache_put("no", model="gpt-4o", text="tell me a story", kind="creative")
        assert not refused.stored and seg.get(refused.key, time.time()) is None
    assert d.stop() == 0
    assert seg.closed and not path.exists()


def test_a_client_takes_exact_hits_from_the_segment(start_daemon, tmp_path):
    """Hits without a round trip (the daemon sees no begin), the same answer the socket
    gives; an invalidation, a restart and shared_memory=False all go back to the socket."""
    from sidecar import Client

    d = start_daemon()
    q = dict(model="gpt-4o", text="Please, what is the capital of France?")
    with Client(d.path) as c, Client(d.path, shared_memory=False) as plain:
        c.cache_put({"answer": "Paris"}, **q)
        assert plain.begin(user="u", **q).outcome == "hit"
        before = c.stats().ops["begin"].requests
        assert before == 1
        for _ in range(50):
            b = c.begin(user="u", **{**q, "text": "what is the capital of france"})
            assert b.outcome == "hit" and b.tier == "exact" and b.value() == {"answer": "Paris"}
        assert c.stats().ops["begin"].requests == before and c.fast.hits == 50
        via_socket = plain.begin(user="u", **q)
        assert via_socket.outcome == "hit" and via_socket.key == b.key
        assert bytes(via_socket.response) == bytes(b.response)
        got = c.cache_get(**q)
        assert got.hit and got.value() == {"answer": "Paris"} and got.query
        c.cache_invalidate(key=b.key)
        assert c.begin(user="u", **q).outcome == "go"
    assert d.stop() == 0


def test_hits_from_the_segment_are_accounted(start_daemon):
    """The daemon hears of segment hits in batches (at close here, else every 256 hits or
    at the first hit a second after the oldest untold one): stats count them, costs count
    the savings, and the request log gets a line for each begin."""
    from conftest import wait_for

    from sidecar import Client

    d = start_daemon()
    q = dict(model="gpt-4o", text="Which planet is the largest?")
    with Client(d.path) as plain:
        plain.cache_put("Jupiter", input_tokens=1000, output_tokens=100, **q)
        base = plain.stats().cache.tiers["exact"].hits
        logged = plain.stats().request_log.written
    with Client(d.path) as c:
        for _ in range(10):
            assert c.begin(user="ann", **q).outcome == "hit"
        assert c.cache_get(**q).hit
        assert c.fast.hits == 11 and len(c.fast.pending) == 11
    with Client(d.path, shared_memory=False) as plain:
        assert plain.stats().cache.tiers["exact"].hits == base + 11
        saved = plain.costs(by="user").totals.saved_usd
        assert saved > 0
        assert wait_for(lambda: plain.stats().request_log.written == logged + 10)  # the begins
    assert d.stop() == 0


def _restart_client(path: str, seconds: float, out) -> None:
    """Ask 40 questions over and over; store the answer on a miss, check it on a hit."""
    from sidecar import Client
    from sidecar.errors import SidecarUnavailable, SidecarTimeout

    rng = random.Random(os.getpid())
    hits: dict[int, int] = {}  # by segment generation
    misses = wrong = unavailable = 0
    deadline = time.monotonic() + seconds
    with Client(path, timeout=2.0) as c:
        while time.monotonic() < deadline:
            i = rng.randrange(40)
            try:
                b = c.begin(user=f"p{os.getpid()}", model="m", text=f"question {i}?")
                if b.outcome == "hit":
                    wrong += b.value() != f"answer {i}"
                    gen = c.fast.segment.generation if c.fast and c.fast.segment else 0
                    hits[gen] = hits.get(gen, 0) + 1
                else:
                    misses += 1
                    c.end(b.lease, model="m", input_tokens=5, output_tokens=3,
                          response=f"answer {i}")
            except (SidecarUnavailable, SidecarTimeout):
                unavailable += 1
                time.sleep(0.005)
    out.put((hits, misses, wrong, unavailable))


def test_clients_live_through_a_daemon_restart(start_daemon, tmp_path):
    """4 client processes keep asking while the daemon is stopped and a new one starts on
    the same socket: each maps the new segment (its hits come from both generations), keeps
    working, and never gets an answer to another question."""
    ctx = multiprocessing.get_context("fork")
    d = start_daemon()
    first = Segment(segment_path(d.path)).generation
    out = ctx.Queue()
    procs = [ctx.Process(target=_restart_client, args=(str(d.path), 6.0, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    time.sleep(2.0)
    assert d.stop() == 0
    d2 = start_daemon(socket_path=d.path)
    second = Segment(segment_path(d2.path)).generation
    assert second != first
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    for hits, misses, wrong, unavailable in results:
        assert wrong == 0
        assert hits.get(first, 0) > 0 and hits.get(second, 0) > 0, (hits, first, second)
    assert d2.stop() == 0


def _socket_only_client(path: str, q: dict, out) -> None:
    from sidecar import Client

    with Client(path) as c:
        answers = [c.begin(user="u", **q).value() for _ in range(3)]
        answers.append(c.cache_get(**q).value())
        out.put((answers, c.fast.hits, c.fast.fallbacks, c.fast.segment is None,
                 c.stats().ops["begin"].requests))


def test_a_client_that_may_not_read_the_segment_uses_the_socket(start_daemon):
    """A client that may talk to the daemon but not open its segment (a member of the
    socket's group, the segment made owner-only; as root the client drops to nobody in
    that group) is no error: begins and cache gets go through the socket."""
    ctx = multiprocessing.get_context("fork")
    from sidecar import Client

    import shutil
    import tempfile
    from pathlib import Path

    where = Path(tempfile.mkdtemp(prefix="shm-perm-"))  # reachable by nobody, unlike tmp_path
    where.chmod(0o755)
    d = start_daemon(socket_path=where / "llm.sock")
    q = dict(model="gpt-4o", text="Who wrote Hamlet?")
    with Client(d.path, shared_memory=False) as plain:
        plain.cache_put("Shakespeare", **q)
    path = segment_path(d.path)
    os.chmod(path, 0o600 if os.geteuid() == 0 else 0)
    out = ctx.Queue()

    def as_another_user() -> None:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(os.stat(d.path).st_gid)
            os.setuid(65534)
        assert not os.access(path, os.R_OK) and os.access(d.path, os.W_OK)
        _socket_only_client(str(d.path), q, out)

    p = ctx.Process(target=as_another_user)
    p.start()
    answers, hits, fallbacks, unmapped, begins = out.get(timeout=30)
    p.join(10)
    assert p.exitcode == 0
    assert answers == ["Shakespeare"] * 4
    assert (hits, fallbacks, unmapped, begins) == (0, 4, True, 3)
    assert d.stop() == 0
    shutil.rmtree(where)


def test_a_reload_that_changes_the_keys_or_isolates_users(start_daemon):
    """New filler words: the client reloads the meta (the epoch moved) and keys as the
    daemon now does, its hits still from the segment. isolate_cache on: the daemon takes
    every answer out of the segment and clients ask the socket (each uid its own cache)."""
    import signal

    from conftest import wait_for

    from sidecar import Client

    d = start_daemon('[normalize]\nfiller_words = ["please"]\n')
    seg = Segment(segment_path(d.path))
    with Client(d.path) as c:
        c.cache_put("four", model="m", text="please what is 2+2")
        assert c.cache_get(model="m", text="what is 2+2").hit and c.fast.hits == 1
        d.config.write_text('[normalize]\nfiller_words = ["kindly"]\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: c.stats().config_epoch == 1)
        assert not c.cache_get(model="m", text="what is 2+2").hit  # "please" counts now
        c.cache_put("four", model="m", text="kindly what is 2+2")
        hit = c.cache_get(model="m", text="what is 2+2")
        assert hit.hit and c.fast.hits == 2 and c.fast.epoch == 1
        assert seg.get(hit.key, time.time()) is not None
        d.config.write_text('[server.access]\nisolate_cache = true\n')
        d.signal(signal.SIGHUP)
        assert wait_for(lambda: c.stats().config_epoch == 2)
        assert seg.get(hit.key, time.time()) is None  # no answer left for all to read
        c.cache_put("four", model="m", text="what is 2+2")
        got = c.cache_get(model="m", text="what is 2+2")
        assert got.hit and got.key != hit.key and c.fast.hits == 2  # from the socket
        assert seg.get(got.key, time.time()) is None
        assert json_meta(seg)["isolate_cache"] is True
    assert d.stop() == 0


def json_meta(seg: Segment) -> dict:
    import json
    return json.loads(seg.meta())


def test_a_request_the_daemon_refuses_is_not_answered_from_the_segment(start_daemon):
    """The fields the segment path checks itself: a name past its bound, a temperature
    out of range, a wrong type: the socket refuses them, so the segment must not answer."""
    from sidecar import Client
    from sidecar.errors import BadRequest

    d = start_daemon()
    q = dict(model="m", text="Name a prime number.")
    with Client(d.path) as c:
        c.cache_put("7", **q)
        assert c.begin(user="u", **q).outcome == "hit" and c.fast.hits == 1
        for bad in (dict(user="u" * 513), dict(request_id="r" * 129), dict(max_tokens=-1),
                    dict(temperature=101.0), dict(threshold=0.0), dict(no_store="yes")):
            with pytest.raises(BadRequest):
                c.begin(**{"user": "u", **q, **bad})
        with pytest.raises(BadRequest):
            c.cache_get(namespace="n" * 513, **q)
        assert c.fast.hits == 1
        # an int temperature is decoded as a float, as the daemon decodes it
        c.cache_put("11", temperature=1.0, **q)
        assert c.begin(user="u", temperature=1, **q).value() == "11" and c.fast.hits == 2
    assert d.stop() == 0


def test_the_async_client_takes_exact_hits_from_the_segment(start_daemon, run_async):
    """AsyncClient as Client: hits with no round trip, told ahead of its next request."""
    from sidecar import AsyncClient

    d = start_daemon()
    q = dict(model="gpt-4o", text="What colour is the sky?")

    async def main():
        async with AsyncClient(d.path) as c:
            await c.cache_put("blue", **q)
            begins = (await c.stats()).ops.get("begin")
            hits = await asyncio.gather(*(c.begin(user="u", **q) for _ in range(20)))
            assert all(h.outcome == "hit" and h.value() == "blue" for h in hits)
            assert (await c.cache_get(**q)).value() == "blue"
            assert c.fast.hits == 21 and len(c.fast.pending) == 21
            stats = await c.stats()  # the hits rode ahead of it
            assert stats.ops.get("begin") == begins and stats.cache.tiers["exact"].hits == 21
            assert not c.fast.pending
            assert [s.hits for s in stats.shm.clients] == [21]
        async with AsyncClient(d.path, shared_memory=False) as plain:
            assert (await plain.begin(user="u", **q)).value() == "blue"
            assert plain.fast is False
            assert (await plain.stats()).ops["begin"].requests == 1

    run_async(main())
    assert d.stop() == 0
