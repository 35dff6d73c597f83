"""Admission from slices: plain admits taken in process from calls the daemon admitted
in advance, never more than the socket path would admit, given back when not taken."""
import multiprocessing
import os
import signal
import stat
import time

import pytest

from conftest import wait_for

from sidecar import Client
from sidecar.wire import Slice

LIMIT = """
[[limits.rules]]
name = "per-user"
scope = "user"
metric = "requests"
window = "60s"
amount = {amount}
"""


def used(path, user: str) -> float:
    with Client(path, shared_memory=False) as c:
        return next(x.used for x in c.limits(user).limits if x.name == "per-user")


def test_admits_come_from_slices_and_settle_over_the_socket(start_daemon):
    """A shape's slices hold one call until it is admitted often: then its calls come
    from the slab, with no round trip, and settle over the socket as any lease."""
    d = start_daemon(LIMIT.format(amount=1000))
    with Client(d.path) as c:
        shape = dict(user="ann", model="gpt-4o", input_tokens=100, max_tokens=50)
        first = c.admit(**shape)
        assert first.allowed and first.input_tokens == 100 and first.output_tokens == 50
        assert used(d.path, "ann") == 1  # nothing held in advance for a cold shape
        leases = [c.admit(**shape).lease for _ in range(4)]
        # 4 one-call slices in a row spent within their TTL: the 5th holds 2 calls
        assert (c.slices.asked, c.slices.admits) == (5, 5)
        assert used(d.path, "ann") == 6
        leases.append(c.admit(**shape).lease)  # the spare: no round trip
        slices = c.stats().ops["slice"].requests
        assert (c.slices.asked, c.slices.admits, slices) == (5, 6, 5)
        assert "admit" not in c.stats().ops or c.stats().ops["admit"].requests == 0
        s = c.settle(first.lease, input_tokens=90, output_tokens=10)
        assert s.found and not s.duplicate and s.usd > 0
        assert all(c.release(lease).released for lease in leases)
        assert used(d.path, "ann") == 1
        assert c.admit(user="ann", model="gpt-4o", text="count me").allowed  # a socket admit
        assert c.slices.admits == 6
        for _ in range(7):  # a hot shape's slice: its spares go back at close
            c.admit(user="bob", input_tokens=1)
        assert used(d.path, "bob") == 10  # 7 taken, 3 spare (4 single calls, then 2 and 4)
    assert wait_for(lambda: used(d.path, "bob") == 7)
    with Client(d.path, shared_memory=False) as c:
        shm = c.stats().shm
        assert (shm.slice_calls, shm.slice_taken, shm.slice_released, shm.slices_open) == (
            6 + 10, 6 + 7, 3, 0)
        assert [x.admits for x in shm.clients if x.pid == os.getpid()] == [13]
    assert d.stop() == 0


def _contender(path: str, attempts: int, shared: bool, start, out) -> None:
    admitted = 0
    with Client(path, shared_memory=shared) as c:
        start.wait()
        for _ in range(attempts):
            a = c.admit(user="crowd", input_tokens=1)
            admitted += a.allowed
    out.put(admitted)


@pytest.mark.parametrize("shared", [True, False], ids=["slices", "socket"])
def test_four_processes_contending_for_one_limit(start_daemon, shared):
    """40,000 attempts from 4 processes on a limit of 1,000: slices admit no more than
    the socket does, and give back what they do not use, so nearly all 1,000 are had."""
    d = start_daemon(LIMIT.format(amount=1000))
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contender, args=(str(d.path), 10_000, shared, start, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    admitted = sum(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert 990 <= admitted <= 1000
    assert used(d.path, "crowd") == admitted  # every admitted call holds its lease
    assert d.stop() == 0


def _holder(path: str, taken: int, ready) -> None:
    c = Client(path)
    for _ in range(taken):
        assert c.admit(user="holder", input_tokens=1).allowed
    ready.set()
    time.sleep(600)


def test_a_killed_client_gives_its_slice_back(start_daemon):
    """kill -9 of a process holding a slice: the calls it took stay taken (their leases
    expire as any), the rest go back at once (its connection closed)."""
    d = start_daemon(LIMIT.format(amount=1000))
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    p = ctx.Process(target=_holder, args=(str(d.path), 7, ready), daemon=True)
    p.start()
    try:
        assert ready.wait(30)
        assert used(d.path, "holder") == 10  # 7 taken (4 single calls, 2, 1 of 4)
    finally:
        os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert wait_for(lambda: used(d.path, "holder") == 7)
    # its slab file was removed as soon as the daemon had mapped it: nothing left behind
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(
        f"llm-sidecar-slab.{os.getuid()}.{p.pid}.")]
    assert d.stop() == 0


def test_a_slice_past_its_ttl_is_given_back(start_daemon):
    d = start_daemon(LIMIT.format(amount=1000) + "[shm]\nslice_ttl = 2\n")
    with Client(d.path) as c:
        for _ in range(5):
            assert c.admit(user="slow", input_tokens=1).allowed
        assert used(d.path, "slow") == 6  # 4 single calls, then a slice of 2
        assert wait_for(lambda: used(d.path, "slow") == 5)  # TTL + grace: 1 went back
        assert c.admit(user="slow", input_tokens=1).allowed  # a new, cold slice
        assert c.slices.asked == 6 and used(d.path, "slow") == 6
    assert d.stop() == 0


def test_a_slab_must_be_the_peers_own_regular_file(start_daemon, tmp_path):
    """The daemon maps only a regular file of the slab's size owned by the peer: not a
    FIFO (opening it must not block the daemon), not a file of another size."""
    from sidecar.errors import BadRequest

    d = start_daemon()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10)
    link = tmp_path / "link"
    link.symlink_to("/dev/null")
    paths = [fifo, small, link, tmp_path / "absent", "/dev/zero"]
    if os.geteuid() == 0:  # a slab-sized file of another uid's
        from sidecar.wire.shm import SLAB_BYTES

        theirs = tmp_path / "theirs"
        theirs.write_bytes(bytes(SLAB_BYTES))
        os.chown(theirs, 65534, 65534)
        paths.append(theirs)
    with Client(d.path, shared_memory=False) as c:
        for path in paths:
            with pytest.raises(BadRequest, match="slab"):
                c.call(Slice(user="x", input_tokens=1, slab=str(path)))
        with pytest.raises(BadRequest, match="names its slab"):
            c.call(Slice(user="x", input_tokens=1))
        assert c.ping() > 0
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert d.stop() == 0


def test_the_async_client_admits_from_slices(start_daemon, run_async):
    """AsyncClient as Client: slices renewed over its own connection; concurrent admits
    take from the same slice; at close the calls not taken go back."""
    import asyncio

    from sidecar import AsyncClient

    d = start_daemon(LIMIT.format(amount=1000))

    async def main():
        async with AsyncClient(d.path) as c:
            for _ in range(7):
                assert (await c.admit(user="amy", input_tokens=3)).allowed
            assert (c.slices.asked, c.slices.admits) == (6, 7)  # 4 singles, 2, then 4
            more = await asyncio.gather(*(c.admit(user="amy", input_tokens=3)
                                          for _ in range(3)))
            assert all(a.allowed for a in more) and c.slices.admits == 10
            assert c.slices.asked == 6  # the 3 spares of the slice of 4
            s = await c.settle(more[0].lease, input_tokens=3)
            assert s.found and not s.duplicate
            assert (await c.admit(user="amy", text="count me")).allowed  # over the socket
        async with AsyncClient(d.path, shared_memory=False) as plain:
            assert plain.slices is None
            assert (await plain.admit(user="amy", input_tokens=3)).allowed

    run_async(main())
    assert used(d.path, "amy") == 12  # 10 from slices, 1 counted, 1 plain: none held
    assert d.stop() == 0


def test_on_the_shipped_defaults_slices_answer_as_the_socket_does(start_daemon):
    """The default rules (a per-user rate with a burst pace, token budgets, the
    retry-loop guard): the same quick admits get the same answers from slices as over
    the socket."""
    d = start_daemon()
    with Client(d.path) as c, Client(d.path, shared_memory=False) as plain:
        fast = [c.admit(user="dee", model="gpt-4o", input_tokens=20).allowed
                for _ in range(8)]
        slow = [plain.admit(user="eve", model="gpt-4o", input_tokens=20).allowed
                for _ in range(8)]
        assert fast == slow and fast[0]
        assert c.slices.admits == sum(fast) and c.slices.asked >= 1
    assert d.stop() == 0
