"""What ``bench limits`` and ``bench cluster`` share: the seed's Redis baseline and the harness
that times the daemon against it.

The baseline is a ``redis-server`` on a free loopback port (no persistence, pinned like the
daemon) running the seed's token-weighted sliding window: a Lua script run by SHA through
redis-py's blocking client, WEIGHT tokens per call over USERS keys round-robin, a limit
that never denies. The harness runs contenders in interleaved rounds so host-speed drift
hits them alike, keeps each series' samples, per-round p50 and server CPU time, and turns
them into the rows and the table both benchmarks print (the daemon's ping row among them,
for context), with the versions both reports name.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import sidecar

from .roundtrip import ROUNDS, ServerProcess, percentile, pin_process, split

REDIS_SERVER = "/usr/bin/redis-server"
USERS = 1000
INPUT_TOKENS, MAX_TOKENS = 500, 200  # the estimate of a daemon admit in bench limits
WEIGHT = INPUT_TOKENS + MAX_TOKENS  # tokens charged per call by the Redis baselines
WINDOW_S = 60
BIG = 10**12  # rule amounts: nothing is ever denied


# KEYS[1]: the user's sorted set. ARGV: now (ms), window (ms), limit, weight, unique id.
# Members are "weight:id", scored by their time; returns {allowed, used after this call}.
LUA_SLIDING_WINDOW = """\
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local weight = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local used = 0
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for i = 1, #members do
  local m = members[i]
  used = used + tonumber(string.sub(m, 1, string.find(m, ':', 1, true) - 1))
end
if used + weight > limit then
  return {0, used}
end
redis.call('ZADD', KEYS[1], now, weight .. ':' .. ARGV[5])
redis.call('PEXPIRE', KEYS[1], window)
return {1, used + weight}
"""

PING = "daemon ping (context: bare round trip)"
LUA = "redis Lua sliding window (EVALSHA)"


# --- rows and rounds --------------------------------------------------------------------


@dataclass
class Row:
    placement: str  # "same-cpu" | "cross-cpu" | "in-process"
    workload: str
    unit: str  # what one latency sample covers
    samples: int
    p50_us: float
    p99_us: float
    ops_per_s: float  # operations / summed time of the timed samples
    round_p50_us: tuple[float, float] | None = None  # lowest and highest per-round p50
    server_cpu_us: float | None = None  # server CPU time per operation


@dataclass
class Series:
    latencies: list[int] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    server_cpu_ns: int = 0

    def add_round(self, latencies: list[int], server_cpu_ns: int) -> None:
        self.latencies += latencies
        self.round_p50.append(percentile(sorted(latencies), 0.50))
        self.server_cpu_ns += server_cpu_ns


# A contender runs n units and returns each of its series' latencies (ns) by name.
Runner = Callable[[int], dict[str, list[int]]]
CpuClock = Callable[[], int]


def interleave(runners: dict[str, tuple[Runner, CpuClock]], calls: dict[str, int],
               warmup: dict[str, int]) -> dict[str, Series]:
    """Warm every contender up, then ROUNDS chunks alternating them (order reversing every
    round). The server CPU clock read around a chunk is credited to each of its series."""
    for name, (runner, _) in runners.items():
        runner(warmup[name])
    names = list(runners)
    series: dict[str, Series] = {}
    chunks = {name: split(calls[name], ROUNDS) for name in names}
    for r in range(ROUNDS):
        for name in (names if r % 2 == 0 else names[::-1]):
            runner, cpu_ns = runners[name]
            cpu0 = cpu_ns()
            out = runner(chunks[name][r])
            spent = cpu_ns() - cpu0
            for key, latencies in out.items():
                series.setdefault(key, Series()).add_round(latencies, spent)
    return series


def make_row(placement: str, workload: str, unit: str, s: Series, ops_per_sample: int = 1) -> Row:
    ordered = sorted(s.latencies)
    ops = len(ordered) * ops_per_sample
    return Row(placement, workload, unit, len(ordered), percentile(ordered, 0.50),
               percentile(ordered, 0.99), ops / (sum(ordered) / 1e9),
               (min(s.round_p50), max(s.round_p50)) if s.round_p50 else None,
               s.server_cpu_ns / ops / 1000 if s.server_cpu_ns else None)


def _find(rows: list[Row], placement: str, workload: str) -> Row | None:
    return next((r for r in rows if (r.placement, r.workload) == (placement, workload)), None)


def print_rows(rows: list[Row], third: str, cell: Callable[[Row], str], *, digits: int,
               workload: int, ops_width: int) -> None:
    """The rows as an aligned table, a blank line between placements; ``third`` names
    the column ``cell`` renders (already padded) after the workload."""
    width = len(cell(rows[0])) if rows else len(third)
    header = (f"{'placement':<10} {'workload':<{workload}} {third:<{width}} {'p50 us':>9} "
              f"{'p99 us':>9} {'ops/s':>{ops_width}} {'srv cpu us/op':>13}  p50 rounds")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and r.placement != last:
            print()
        last = r.placement
        cpu = "" if r.server_cpu_us is None else f"{r.server_cpu_us:.{digits}f}"
        rounds = "" if r.round_p50_us is None else \
            f"[{r.round_p50_us[0]:.{digits}f}-{r.round_p50_us[1]:.{digits}f}]"
        print(f"{r.placement:<10} {r.workload:<{workload}} {cell(r)} {r.p50_us:>9.{digits}f} "
              f"{r.p99_us:>9.{digits}f} {r.ops_per_s:>{ops_width},.0f} {cpu:>13}  {rounds}")


# --- contenders -------------------------------------------------------------------------


def call_runner(label: str, call: Callable[[], object]) -> Runner:
    """``call`` timed alone, each time (a ping of the daemon or of Redis, for context)."""
    clock = time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        latencies = [0] * n
        for j in range(n):
            t0 = clock()
            call()
            latencies[j] = clock() - t0
        return {label: latencies}

    return run


def ping_runner(client: sidecar.Client) -> Runner:
    return call_runner(PING, client.ping)


def lua_runner(r: Any, prefix: str, counter: list[int]) -> Runner:
    script = r.register_script(LUA_SLIDING_WINDOW)  # EVALSHA, EVAL once on NOSCRIPT
    window_ms = WINDOW_S * 1000
    clock = time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        latencies = [0] * n
        i = counter[0]
        for j in range(n):
            t0 = clock()
            allowed, _used = script(keys=[f"{prefix}sw:user{i % USERS}"],
                                    args=[int(time.time() * 1000), window_ms, BIG, WEIGHT, i])
            latencies[j] = clock() - t0
            if not allowed:
                raise RuntimeError("the Lua window denied: the bench limit must not deny")
            i += 1
        counter[0] = i
        return {LUA: latencies}

    return run


# --- redis-server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer(ServerProcess):
    """``redis-server`` on a loopback port, no persistence, pinned like the daemon."""

    def __init__(self, workdir: str, cpu: int) -> None:
        self.port = free_port()
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", workdir, "--logfile", ""]
        super().__init__("redis", argv, f"127.0.0.1:{self.port}", workdir, cpu)

    def wait_ready(self, timeout: float = 15.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} before "
                                   f"answering:\n{self.log_tail()}")
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0)
                try:
                    if client.ping():
                        pin_process(self.proc.pid, self.cpu)  # threads started meanwhile
                        return
                finally:
                    client.close()
            except redis.exceptions.RedisError as exc:
                last = exc
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} within "
                           f"{timeout:g} s (last error: {last}):\n{self.log_tail()}")


def redis_unavailable() -> str:
    """Why the Redis rows are skipped, or "" when they can run."""
    if not os.access(REDIS_SERVER, os.X_OK):
        return f"{REDIS_SERVER} not found: Redis baselines skipped"
    if importlib.util.find_spec("redis") is None:
        return ("the redis package is not installed (pip install -e .): "
                "Redis baselines skipped")
    return ""


def _redis_server_version() -> str:
    import subprocess

    try:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip() or "unknown"


def _versions() -> dict[str, str]:
    out = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    for dist in ("uvloop", "msgspec", "llm-sidecar", "redis"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
