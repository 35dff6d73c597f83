"""Cluster mode: three daemons share limits and budgets through a real redis-server (and a
real 3-node Redis Cluster), exactly; Redis killed or paused mid-load; a daemon killed
holding a lease."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import redis

from conftest import wait_for
from sidecar import Client

pytestmark = pytest.mark.timeout(120)

RULES = {
    "global": ('name = "shared"\nscope = "global"\nmetric = "requests"\nwindow = "60s"\n'
               'amount = {amount}\n'),
    "user": ('name = "shared"\nscope = "user"\nmetric = "requests"\nwindow = "60s"\n'
             'amount = {amount}\n'),
    "usd_day": ('name = "shared"\nscope = "global"\nmetric = "usd"\nwindow = "day"\n'
                'amount = {amount}\n'),
}


def config(url: str, rule: str, amount: float, *, cluster: bool = False,
           extra: str = "") -> str:
    return (f"[limits]\nretry_loop_max = 0\n[[limits.rules]]\n"
            + RULES[rule].format(amount=amount)
            + f'[cluster]\nredis_url = "{url}"\nredis_cluster = {str(cluster).lower()}\n'
              "heartbeat = 0.2\nlease_ttl = 1.0\ntimeout = 0.1\n" + extra)


def start_three(start_daemon, tmp_path, text: str):
    daemons = []
    for i in range(3):
        daemons.append(start_daemon(text, socket_path=tmp_path / f"d{i}.sock", wait=False,
                                    env={"XDG_STATE_HOME": str(tmp_path / f"state{i}")}))
    for d in daemons:
        d.wait_ready()
    return daemons


def cluster_of(d) -> object:
    with Client(d.path) as c:
        return c.stats().cluster


def wait_connected(daemons, live: int = 3) -> None:
    assert wait_for(lambda: all(
        (s := cluster_of(d)) is not None and not s.degraded and s.live_daemons == live
        for d in daemons)), [cluster_of(d) for d in daemons]


class Hammer:
    """Threads admitting (and settling) as fast as they can against each daemon."""

    def __init__(self, daemons, *, users=("u",), usd: float | None = None,
                 threads: int = 2) -> None:
        self.allowed = [0] * len(daemons)
        self.denied = [0] * len(daemons)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i, d, users, usd, t))
                         for i, d in enumerate(daemons) for t in range(threads)]

    def _run(self, i, d, users, usd, t) -> None:
        try:
            with Client(d.path) as c:
                n = t
                while not self._stop.is_set():
                    user = users[n % len(users)]
                    n += 1
                    fields = dict(user=user, input_tokens=1)
                    if usd is not None:
                        fields["usd"] = usd
                    r = c.admit(**fields)
                    with self._lock:
                        if r.allowed:
                            self.allowed[i] += 1
                        else:
                            self.denied[i] += 1
                    if r.allowed:
                        c.settle(r.lease, input_tokens=1, usd=usd)
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def __enter__(self) -> Hammer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not self.errors, self.errors

    def __exit__(self, *exc) -> None:
        self.stop()

    def run_until(self, predicate, timeout: float = 20.0) -> None:
        assert wait_for(predicate, timeout)

    @property
    def total(self) -> int:
        return sum(self.allowed)


def redis_usage(url: str, cluster: bool = False) -> int:
    """What Redis counts as used, over every shared counter."""
    client = (redis.cluster.RedisCluster.from_url(url, decode_responses=True) if cluster
              else redis.Redis.from_url(url, decode_responses=True))
    with client:
        keys = list(client.scan_iter(match="llms:*:u"))
        return sum(int(v) for k in keys for v in client.hgetall(k).values())


@pytest.mark.parametrize("rule,amount,users,usd,expected", [
    ("global", 300, ("u", "v"), None, 300),
    ("user", 120, ("u",), None, 120),
    ("usd_day", 2.5, ("u", "v"), 0.01, 250),
], ids=["global-requests", "user-requests", "usd-day-budget"])
def test_three_daemons_share_a_limit_exactly(start_daemon, tmp_path, redis_server, rule,
                                              amount, users, usd, expected):
    daemons = start_three(start_daemon, tmp_path, config(redis_server.url, rule, amount))
    wait_connected(daemons)
    with Hammer(daemons, users=users, usd=usd) as h:
        h.run_until(lambda: sum(h.denied) > 300)  # demand well past the limit
        time.sleep(0.5)
    assert 0.97 * expected <= h.total <= 1.01 * expected, (h.allowed, h.denied)
    assert all(n > 0 for n in h.allowed), h.allowed  # every daemon got its part
    unit = round(usd * 1_000_000) if usd else 1  # Redis counts USD in micro-dollars
    assert wait_for(lambda: redis_usage(redis_server.url) == h.total * unit)
    for d in daemons:
        assert d.stop() == 0


def test_redis_killed_mid_load_degrades_then_reconciles(start_daemon, tmp_path,
                                                         redis_server):
    amount = 600
    daemons = start_three(start_daemon, tmp_path, config(redis_server.url, "global", amount))
    wait_connected(daemons)
    with Hammer(daemons, users=("u",)) as h:
        h.run_until(lambda: h.total >= 60)
        redis_server.kill()
        h.run_until(lambda: all((s := cluster_of(d)).degraded and s.reason for d in daemons))
        before = list(h.allowed)
        h.run_until(lambda: sum(h.denied) > 2000)  # each daemon is at its share now
        during = [a - b for a, b in zip(h.allowed, before)]
    share = int(amount * 0.9 / 3)  # local_share: the limit less the margin, over 3 daemons
    for used_before, extra in zip(before, during):
        # each daemon's window may hold its share, counting what it admitted before
        assert extra <= max(0, share - used_before) + 2, (before, during)
    stats = [cluster_of(d) for d in daemons]
    assert all(s.degraded and "onnect" in s.reason for s in stats), stats
    with Client(daemons[0].path) as c:
        text = c.metrics()
    assert "llm_sidecar_cluster_degraded 1.0" in text
    shown = subprocess.run([sys.executable, "-m", "sidecar", "stats", "--socket",
                            str(daemons[0].path)], capture_output=True, text=True, cwd="/")
    assert re.search(r"^  state +DEGRADED since .*: .*onnect", shown.stdout, re.M), shown.stdout
    redis_server.restart()  # empty: what the daemons admitted while it was away comes back
    assert wait_for(lambda: not any(cluster_of(d).degraded for d in daemons))
    # Redis restarted empty: it learns the admits made while it was away, and the ones
    # made before that no report had told it of, each once (never more than were made)
    assert wait_for(lambda: all((s := cluster_of(d)).pending_adjustments == 0
                                and s.leases_open == 0 for d in daemons))
    usage = redis_usage(redis_server.url)
    assert usage >= sum(during), (usage, during)
    assert usage <= h.total, (usage, h.total)
    time.sleep(1.0)  # another round of heartbeats and flushes adds nothing
    assert redis_usage(redis_server.url) == usage
    assert "cluster degraded" in daemons[0].log() and "cluster recovered" in daemons[0].log()
    for d in daemons:
        assert d.stop() == 0


def test_redis_paused_keeps_daemons_answering(start_daemon, tmp_path, redis_server):
    daemons = start_three(start_daemon, tmp_path, config(redis_server.url, "global", 900))
    wait_connected(daemons)
    with Hammer(daemons, users=("u",)) as h:
        h.run_until(lambda: h.total >= 30)
        redis_server.pause()
        h.run_until(lambda: all(cluster_of(d).degraded for d in daemons))
        answered = h.total + sum(h.denied)
        h.run_until(lambda: h.total + sum(h.denied) > answered + 500)  # still answering
        pending = [cluster_of(d).pending_adjustments for d in daemons]
        time.sleep(2.0)
        later = [cluster_of(d).pending_adjustments for d in daemons]
        redis_server.resume()
        h.run_until(lambda: not any(cluster_of(d).degraded for d in daemons))
    # one adjustment per counter and one-second slot in the window: bounded, not one per admit
    assert all(n <= 61 for n in pending + later), (pending, later)
    assert wait_for(lambda: all(cluster_of(d).pending_adjustments == 0 for d in daemons))
    assert wait_for(lambda: redis_usage(redis_server.url) == h.total)
    for d in daemons:
        assert d.stop() == 0


def test_redis_cluster_exactness(start_daemon, tmp_path, redis_cluster):
    users = tuple(f"user{i}" for i in range(6))  # counters spread over the three nodes
    daemons = start_three(start_daemon, tmp_path,
                          config(redis_cluster.url, "user", 40, cluster=True))
    wait_connected(daemons)
    with Hammer(daemons, users=users) as h:
        h.run_until(lambda: sum(h.denied) > 600)
        time.sleep(0.5)
    assert 0.97 * 40 * len(users) <= h.total <= 1.01 * 40 * len(users), h.allowed
    assert wait_for(lambda: redis_usage(redis_cluster.url, cluster=True) == h.total)
    for d in daemons:
        assert d.stop() == 0


def test_a_killed_daemons_lease_returns_after_its_ttl(start_daemon, tmp_path, redis_server):
    text = config(redis_server.url, "global", 100).replace(
        'window = "60s"', 'window = "day"').replace("lease_ttl = 1.0", "lease_ttl = 3.0")
    a = start_daemon(text, socket_path=tmp_path / "a.sock",
                     env={"XDG_STATE_HOME": str(tmp_path / "sa")})
    b = start_daemon(text, socket_path=tmp_path / "b.sock",
                     env={"XDG_STATE_HOME": str(tmp_path / "sb")})
    wait_connected([a, b], live=2)
    with Client(a.path) as c:
        for _ in range(10):  # a leases a chunk (a share of what remains), uses 10
            assert c.admit(user="u", input_tokens=1).allowed
    time.sleep(0.6)  # three heartbeats: a has reported its use (and holds its lease: an
    # idle lease is returned after half its TTL, 1.5 s)
    assert redis_usage(redis_server.url) > 10  # the unused part of a's chunk is charged
    a.proc.kill()
    a.proc.wait()
    admitted = 0
    with Client(b.path) as c:
        deadline = time.monotonic() + 20
        while admitted < 90 and time.monotonic() < deadline:
            if c.admit(user="u", input_tokens=1).allowed:
                admitted += 1
            else:
                time.sleep(0.05)  # a's unused chunk comes back after its lease TTL (3 s)
        assert admitted == 90
        assert not c.admit(user="u", input_tokens=1).allowed  # 100 in all, never more
    assert b.stop() == 0


def test_start_with_redis_absent_is_degraded_and_serves(start_daemon, tmp_path):
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    d = start_daemon(config(f"redis://127.0.0.1:{port}/0", "global", 100))
    with Client(d.path) as c:
        allowed = sum(c.admit(user="u", input_tokens=1).allowed for _ in range(120))
        s = c.stats().cluster
    assert s is not None and s.degraded and s.live_daemons == 1
    assert allowed == 90  # local_share: 100 x (1 - 0.1) over the 1 daemon expected
    assert d.stop() == 0


@pytest.mark.parametrize("policy,expected", [("fail_open", 100), ("fail_closed", 0)])
def test_degraded_policies(start_daemon, tmp_path, policy, expected):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = config(f"redis://127.0.0.1:{port}/0", "global", 100).replace(
        "[cluster]", f'degraded = "{policy}"\n[cluster]')
    d = start_daemon(text)
    with Client(d.path) as c:
        replies = [c.admit(user="u", input_tokens=1) for _ in range(120)]
    assert sum(r.allowed for r in replies) == expected
    if policy == "fail_closed":
        assert {r.reason for r in replies} == {"unavailable"}
        assert all(r.limit == "shared" and r.retry_after > 0 for r in replies)
    assert d.stop() == 0


def test_standalone_never_imports_redis():
    code = ("import sys, sidecar.daemon.service, sidecar.daemon.handlers, sidecar.cli; "
            "assert 'redis' not in sys.modules, 'redis imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_reload_keeps_sharing(start_daemon, tmp_path, redis_server):
    """SIGHUP with a new amount: the counter and its leases carry over, the new amount
    holds across the cluster from the next lease on."""
    import signal

    a, b = (start_daemon(config(redis_server.url, "global", 50), socket_path=tmp_path / n,
                         env={"XDG_STATE_HOME": str(tmp_path / f"s{n}")}) for n in "ab")
    wait_connected([a, b], live=2)
    with Client(a.path) as ca, Client(b.path) as cb:
        assert sum(ca.admit(user="u", input_tokens=1).allowed for _ in range(20)) == 20
        for d in (a, b):
            d.config.write_text(config(redis_server.url, "global", 80))
            d.signal(signal.SIGHUP)
        assert wait_for(lambda: ca.stats().config_epoch == 1 and cb.stats().config_epoch == 1)
        allowed = 0
        for _ in range(200):
            allowed += ca.admit(user="u", input_tokens=1).allowed
            allowed += cb.admit(user="u", input_tokens=1).allowed
        assert allowed == 60  # 80 in all over the window, 20 of them before the reload
    for d in (a, b):
        assert d.stop() == 0


def test_admit_waits_out_a_cluster_refusal(start_daemon, tmp_path, redis_server):
    text = config(redis_server.url, "global", 4).replace('window = "60s"', 'window = "4s"')
    a, b = (start_daemon(text, socket_path=tmp_path / n,
                         env={"XDG_STATE_HOME": str(tmp_path / f"s{n}")}) for n in "ab")
    wait_connected([a, b], live=2)
    with Client(a.path) as ca, Client(b.path) as cb:
        assert sum(ca.admit(user="u", input_tokens=1).allowed for _ in range(2)) == 2
        assert sum(cb.admit(user="u", input_tokens=1).allowed for _ in range(3)) == 2
        refused = cb.admit(user="u", input_tokens=1)
        assert not refused.allowed and 0 < refused.retry_after <= 4.0
        assert refused.limit == "shared" and refused.reason == "limit"
        waited = cb.admit(user="u", input_tokens=1, wait=8.0)  # the window moves on
        assert waited.allowed, waited
    for d in (a, b):
        assert d.stop() == 0

