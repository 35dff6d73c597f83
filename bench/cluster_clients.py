"""The client side of ``python -m bench cluster``: what one client does, and the client
processes that do it together.

``admit_runner`` and ``redis_ping_runner`` are contenders for ``bench.baseline``'s
interleaved rounds: an admit and its settle through ``sidecar.Client``, each call timed
alone, and a redis-py PING for context. ``Clients`` spawns three client processes, one per
daemon, and drives them over pipes: pinned to a CPU, they run a chunk of the three-daemon
workload or of the naive Lua baseline together (started at a barrier, each replying its
span and latencies), or hammer the over-admission daemons, admitting until well over the
limit.
"""
from __future__ import annotations

import array
import contextlib
import multiprocessing
import os
import signal
import time
import traceback
from collections import Counter
from typing import Any

import sidecar

from .baseline import LUA, USERS, Runner, call_runner, lua_runner

OVER_MIN_S = 2.0  # the hammer lasts at least this long (leases roll over, others close)
OVER_CAP_S = 30.0  # ... and at most this long (well inside the 60 s window)

CLUSTER3 = "cluster, 3 daemons, 3 client procs"
LUA3 = "redis Lua sliding window, 3 client procs"
REDIS_PING = "redis PING (context: redis-py round trip)"


# --- contenders -------------------------------------------------------------------------


def admit_runner(client: sidecar.Client, label: str, counter: list[int]) -> Runner:
    """Per iteration one admit then its settle, each timed alone."""
    admit, settle, clock = client.admit, client.settle, time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        admits = [0] * n
        settles = [0] * n
        i = counter[0]
        for j in range(n):
            t0 = clock()
            r = admit(user=f"user{(i + j) % USERS}", input_tokens=1)
            t1 = clock()
            if not r.allowed:
                raise RuntimeError(f"{label}: admit denied by {r.limit!r} ({r.reason}): the "
                                   "bench rule must not deny")
            settle(r.lease, input_tokens=1, output_tokens=0)
            admits[j] = t1 - t0
            settles[j] = clock() - t1
        counter[0] = i + n
        return {f"{label} admit": admits, f"{label} settle": settles}

    return run


def redis_ping_runner(r: Any) -> Runner:
    return call_runner(REDIS_PING, r.ping)


# --- client processes -------------------------------------------------------------------


def _client_child(index: int, daemon_path: str, redis_port: int, barrier, conn) -> None:
    """One client process, driven by the parent's commands: ``("pin", cpu, prefix)``,
    ``("run", workload, n, timed)`` (a chunk started with the other processes at the
    barrier; replies its span and latencies), ``("hammer", path, limit)`` (the
    over-admission load on the daemon at ``path``), ``("stop",)``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import redis

        client = sidecar.Client(daemon_path)
        r = redis.Redis(host="127.0.0.1", port=redis_port)
        counter = [index * 10**9]  # distinct users' rotation and Lua member ids per process
        runners: dict[str, Runner] = {}
        while True:
            cmd = conn.recv()
            if cmd[0] == "stop":
                break
            if cmd[0] == "pin":
                os.sched_setaffinity(0, {cmd[1]})
                runners = {CLUSTER3: admit_runner(client, CLUSTER3, counter),
                           LUA3: lua_runner(r, cmd[2], counter)}
                conn.send(("ok", None))
            elif cmd[0] == "run":
                _, workload, n = cmd
                barrier.wait(60)
                start = time.perf_counter_ns()  # CLOCK_MONOTONIC: one clock for all processes
                out = runners[workload](n)
                end = time.perf_counter_ns()
                latencies = out[f"{CLUSTER3} admit"] if workload == CLUSTER3 else out[LUA]
                conn.send(("ok", (start, end, array.array("q", latencies).tobytes())))
            elif cmd[0] == "hammer":
                _, path, limit = cmd
                conn.send(("ok", _hammer(path, limit, barrier)))
        client.close()
        r.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _hammer(path: str, limit: int, barrier) -> dict[str, Any]:
    """Admit (and settle what is allowed) until more than ``limit / 3`` denials and at
    least OVER_MIN_S seconds, or OVER_CAP_S seconds."""
    allowed = denied = 0
    reasons: Counter[str] = Counter()
    with sidecar.Client(path) as c:
        admit, settle = c.admit, c.settle
        barrier.wait(60)
        start = time.monotonic()
        i = 0
        while True:
            i += 1
            r = admit(user=f"user{i % USERS}", input_tokens=1)
            if r.allowed:
                allowed += 1
                settle(r.lease, input_tokens=1, output_tokens=0)
            else:
                denied += 1
                reasons[f"{r.limit}/{r.reason}"] += 1
            if i % 64 == 0:
                elapsed = time.monotonic() - start
                if (denied > limit // 3 and elapsed >= OVER_MIN_S) or elapsed >= OVER_CAP_S:
                    break
    return {"allowed": allowed, "denied": denied, "reasons": dict(reasons),
            "seconds": round(time.monotonic() - start, 2)}


class Clients:
    """Three client processes (spawned), one per daemon, told what to run."""

    def __init__(self, paths: list[str], redis_port: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.barrier = ctx.Barrier(len(paths))
        self.children = []
        for i, path in enumerate(paths):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=_client_child,
                               args=(i, path, redis_port, self.barrier, child_end), daemon=True)
            proc.start()
            child_end.close()
            self.children.append((proc, parent_end))

    def ask(self, cmds: list[tuple]) -> list[Any]:
        for (_, conn), cmd in zip(self.children, cmds):
            conn.send(cmd)
        out = []
        for _, conn in self.children:
            if not conn.poll(300):
                raise RuntimeError("a client process did not answer within 300 s")
            status, value = conn.recv()
            if status != "ok":
                raise RuntimeError("client process failed:\n" + value)
            out.append(value)
        return out

    def close(self) -> None:
        self.barrier.abort()  # releases a child waiting for one that died
        children, self.children = self.children, []
        for proc, conn in children:
            with contextlib.suppress(OSError):  # a child that died needs no stop
                conn.send(("stop",))
            proc.join(10)
            conn.close()
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
