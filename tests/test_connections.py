"""Connection bounds: idle connections are closed, one peer (uid or pid, SO_PEERCRED)
cannot take every connection, and clients never send into a connection the daemon is
closing as idle."""
import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from clirun import cli
from conftest import wait_for
from rawsock import Raw
from sidecar import AsyncClient, Client
from sidecar.wire import Error, ErrorCode, Pong, StatsReply

IDLE = "[server]\nidle_timeout = 0.3\n"


def stats(path) -> StatsReply:
    # a fresh raw connection each time: a client's pooled one would be counted as idle
    with Raw(path) as r:
        r.send({"op": "stats", "id": 1})
        return r.recv()


def closed(path, reason: str) -> int:
    return stats(path).connections_closed.get(reason, 0)


def pinged(path) -> Raw:
    r = Raw(path)
    r.send({"op": "ping", "id": 1})
    assert r.recv() == Pong(id=1)
    return r


def test_idle_connection_is_closed(start_daemon):
    d = start_daemon(IDLE)
    with pinged(d.path) as r:
        assert r.recv() is None  # EOF: closed by the daemon, without a frame
    assert closed(d.path, "idle") == 1
    assert stats(d.path).connections_now == 1  # the stats connection itself


def test_waiting_for_a_reply_is_not_idle(start_daemon):
    # An admit queued behind a concurrency limit waits in the daemon far longer than
    # the idle timeout, and still gets its answer on the same connection.
    d = start_daemon(IDLE + """
[[limits.rules]]
name = "one-at-a-time"
scope = "user"
metric = "concurrent"
amount = 1
""")
    with Client(d.path) as c, Raw(d.path) as waiter:
        first = c.admit(user="u", input_tokens=1)
        assert first.allowed
        waiter.send({"op": "admit", "id": 7, "user": "u", "input_tokens": 1, "wait": 60})
        assert wait_for(lambda: stats(d.path).limit_denials.get("one-at-a-time", 0) >= 1)
        # opened after the waiter's last byte: once it is closed as idle, the waiter has
        # been silent longer than the idle timeout too
        with pinged(d.path) as later:
            assert later.recv() is None
        assert c.release(first.lease).released  # a pooled connection retired, a new one
        reply = waiter.recv()
        assert reply.id == 7 and reply.allowed


def test_idle_connections_at_the_limit_are_reclaimed(start_daemon):
    d = start_daemon("[server]\nmax_connections = 4\nidle_timeout = 0.5\n")
    held = [pinged(d.path) for _ in range(4)]
    try:
        with Raw(d.path) as refused:
            reply = refused.recv()
            assert type(reply) is Error and reply.code == ErrorCode.OVERLOADED
            assert "server.max_connections" in reply.message
        for r in held:
            assert r.recv() is None
        with Client(d.path) as c:  # a new client is served again
            assert c.ping() > 0
            s = c.stats()
        assert s.connections_closed["idle"] >= 4
        assert s.connections_closed["max_connections"] == 1
    finally:
        for r in held:
            r.sock.close()


def test_per_pid_limit(start_daemon):
    d = start_daemon("[server]\nmax_connections_per_pid = 3\n")
    held = [pinged(d.path) for _ in range(3)]
    try:
        with Raw(d.path) as fourth:
            reply = fourth.recv()
            assert type(reply) is Error and reply.code == ErrorCode.OVERLOADED
            assert "server.max_connections_per_pid" in reply.message
            assert f"pid {os.getpid()}" in reply.message
            assert fourth.recv() is None
        held[0].send({"op": "ping", "id": 2})  # the ones it holds still work
        assert held[0].recv() == Pong(id=2)
        r = cli("ping", "--socket", str(d.path))  # another process of the same user
        assert r.returncode == 0, r.stderr
        held.pop().sock.close()  # one given back: room for one more
        assert wait_for(lambda: stats_from(held[0]).connections_now == 2)
        held.append(pinged(d.path))
        assert stats_from(held[0]).connections_closed == {"max_connections_per_pid": 1}
    finally:
        for r in held:
            r.sock.close()


def stats_from(r: Raw) -> StatsReply:
    r.send({"op": "stats", "id": 3})
    return r.recv()


@contextlib.contextmanager
def as_uid(uid: int):
    """Act as ``uid`` for a moment (the effective uid is what SO_PEERCRED records)."""
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as a second user")
def test_per_uid_limit(start_daemon):
    # A directory and socket another user can reach (pytest's tmp dirs are root-only).
    where = Path(tempfile.mkdtemp(prefix="sidecar-uid-"))
    try:
        where.chmod(0o755)
        d = start_daemon('[server]\nsocket_mode = "0666"\nmax_connections_per_uid = 2\n',
                         socket_path=where / "llm.sock")
        held = [pinged(d.path) for _ in range(2)]
        with Raw(d.path) as third:
            reply = third.recv()
            assert type(reply) is Error and reply.code == ErrorCode.OVERLOADED
            assert "server.max_connections_per_uid" in reply.message
            assert "uid 0 " in reply.message
        with as_uid(65534):
            other = Raw(d.path)
        with other:  # another user is served while root is at its bound
            other.send({"op": "ping", "id": 5})
            assert other.recv() == Pong(id=5)
        held[1].send({"op": "ping", "id": 2})
        assert held[1].recv() == Pong(id=2)
        assert stats_from(held[1]).connections_closed == {"max_connections_per_uid": 1}
        for r in held:
            r.sock.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_pooled_client_outlives_idle_closes(start_daemon):
    # A non-idempotent admit is never resent: it must not be sent into a connection the
    # daemon closed as idle. The client retires pooled connections before that.
    d = start_daemon(IDLE)
    with Client(d.path) as c:
        assert c.ping() > 0
        assert wait_for(lambda: closed(d.path, "idle") == 1)  # its pooled connection
        assert c.admit(user="u", input_tokens=1).allowed


def test_async_client_outlives_idle_closes(start_daemon, run_async):
    d = start_daemon(IDLE)

    async def main():
        async with AsyncClient(d.path) as c:
            assert await c.ping() > 0
            while closed(d.path, "idle") < 1:  # its connection (the 60 s bound is run_async's)
                await asyncio.sleep(0.02)
            assert (await c.admit(user="u", input_tokens=1)).allowed

    run_async(main())
