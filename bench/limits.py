"""``python -m bench limits``: the limits engine's admit+settle cost vs. the seed's Redis baselines.

One run measures, in the same run and on the same rules:

* **daemon over the socket**: ``python -m sidecar serve --socket P --config C`` as a
  subprocess (temporary directory, ``LLM_SIDECAR_*`` dropped from its environment; C sets
  ``retry_loop_max = 0`` and four rules with amounts too big to ever deny: per-user
  requests and total tokens over sliding 60 s windows, global total tokens per hour,
  global USD per day). ``sidecar.Client.admit(user=f"user{i % 1000}", model="gpt-4o",
  input_tokens=500, max_tokens=200)`` and ``settle(lease, input_tokens=480,
  output_tokens=150)``, timed per call: a round's admits back to back, then their settles
  (an admit is never timed right behind a durable settle's fdatasync); the admit row, and
  admit+settle per pair. Also
  pipelined: 100 admits in one ``Client.batch``, then their 100 settles in another; and
  ``Client.ping`` for context (the bare round trip an admit cannot beat).
* **in-process decision**: ``sidecar.limits.engine.Engine`` built from the same config file, called
  directly: ``admit(Subject(user, model="gpt-4o"), Estimate(500, 200, 0), now)`` and
  ``settle(lease, Usage(480, 150, 0), now)``. ``now = time.time()`` is read once per
  iteration, outside the timed calls (both calls get the same ``now``).
* **the seed's baselines** through redis-py's blocking client against a real
  ``/usr/bin/redis-server`` started on a free loopback port (no persistence):
  (a) a per-user token-weighted sliding window as a Lua script run by SHA (EVALSHA): a
  sorted set of entries scored by time in ms, ZREMRANGEBYSCORE the expired ones, sum the
  remaining entries' weights (encoded in the member as ``weight:id``), compare with the
  limit, ZADD the new entry, PEXPIRE the key; (b) a fixed-window counter: ``INCRBY key
  tokens`` + ``EXPIRE key 60`` in one non-transactional pipeline. Skipped (and said so)
  when redis-server or the ``redis`` package is missing.

Socket and Redis workloads run in two placements: "same-cpu" (servers and this client on
one CPU) and "cross-cpu" (client on a second CPU; skipped with one allowed CPU), since a
cross-CPU wake-up dominates a round trip on small VMs. The contenders alternate in
interleaved rounds so host-speed drift hits them alike. It prints a table (or ``--json``)
and the targets as PASS/MISS; a MISS is reported, never turned into a failing exit code.
Servers are stopped and the temporary directory removed on every exit path, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import sidecar
from sidecar import config as sidecar_config
from sidecar.limits.engine import Engine, Estimate, Subject, Usage, compile_rules
from sidecar.wire import Admit, Settle

from .baseline import (BIG, INPUT_TOKENS, LUA, MAX_TOKENS, PING, USERS, WEIGHT, WINDOW_S,
                       CpuClock, RedisServer, Row, Runner, Series, _find, _redis_server_version,
                       _versions, interleave, lua_runner, make_row, ping_runner, print_rows,
                       redis_unavailable)
from .roundtrip import (ROUNDS, Placement, ServerProcess, _placements, _progress,
                        _raise_on_sigterm, host_meta, split)

MODEL = "gpt-4o"
USED_INPUT, USED_OUTPUT = 480, 150  # the settled usage
BATCH = 100

TARGET_LUA_RATIO = 6.0
TARGET_FIXED_RATIO = 3.0
TARGET_INPROC_US = 1.0

#: (name, scope, metric, window) of the rules the bench runs with, each at amount BIG
RULES = (
    ("user-rpm", "user", "requests", "60s"),
    ("user-tpm", "user", "total_tokens", "60s"),
    ("global-hour-tokens", "global", "total_tokens", "hour"),
    ("global-day-usd", "global", "usd", "day"),
)


def config_toml(journal: str) -> str:
    """The daemon's config: the rules above, no retry-loop guard, the journal at
    ``journal`` (in the bench's temp dir, never the user's state directory)."""
    rules = "".join(
        f'\n[[limits.rules]]\nname = "{name}"\nscope = "{scope}"\nmetric = "{metric}"\n'
        f'window = "{window}"\namount = {BIG}\n' for name, scope, metric, window in RULES)
    return (f"# written by python -m bench limits\n[limits]\nretry_loop_max = 0\n"
            f"journal = {json.dumps(journal)}\n{rules}")


def _fs_type(path: str) -> str:
    """File system type of ``path`` (from /proc/self/mounts), e.g. "ext4"."""
    best, kind = "", "unknown fs"
    with contextlib.suppress(OSError):  # no /proc: the type stays unknown
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and path.startswith(parts[1]) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    return kind


ADMIT = "daemon admit"
ADMIT_SETTLE = "daemon admit+settle"
PIPE = f"daemon admit+settle, Client.batch x{BATCH}"
FIXED = "redis INCRBY+EXPIRE pipeline"
IN_ADMIT = "Engine.admit"
IN_SETTLE = "Engine.settle"
IN_BOTH = "Engine.admit + Engine.settle"


@dataclass(frozen=True)
class Sizes:
    calls: int  # timed iterations per socket/Redis contender and placement
    warmup: int
    batches: int  # timed pipelined batches (BATCH admits + BATCH settles each)
    batch_warmup: int
    inproc: int  # timed in-process iterations
    inproc_warmup: int

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(3000, 300, 30, 5, 30_000, 3000)
        return cls(20_000, 2000, 200, 20, 200_000, 20_000)


# --- contenders -------------------------------------------------------------------------


def daemon_runner(client: sidecar.Client, counter: list[int], seen: dict) -> Runner:
    """Per round: ``n`` admits timed one by one, then their ``n`` settles timed one by
    one. An admit is never timed right behind a durable settle, whose fdatasync aftermath
    (journal thread, the file system's own work) would be charged to it on a shared CPU;
    the admit+settle row adds each admit to its own settle."""
    admit, settle, clock = client.admit, client.settle, time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        admits = [0] * n
        both = [0] * n
        leases = [""] * n
        i = counter[0]
        for j in range(n):
            t0 = clock()
            r = admit(user=f"user{(i + j) % USERS}", model=MODEL, input_tokens=INPUT_TOKENS,
                      max_tokens=MAX_TOKENS)
            admits[j] = clock() - t0
            if not r.allowed:
                raise RuntimeError(f"admit denied by {r.limit!r}: the bench rules must not deny")
            leases[j] = r.lease
        settled = None
        for j in range(n):
            t0 = clock()
            settled = settle(leases[j], input_tokens=USED_INPUT, output_tokens=USED_OUTPUT)
            both[j] = admits[j] + clock() - t0
        counter[0] = i + n
        if settled is not None:
            seen["settle_durable"] = settled.durable
        return {ADMIT: admits, ADMIT_SETTLE: both}

    return run


def daemon_pipelined_runner(client: sidecar.Client, counter: list[int]) -> Runner:
    batch, clock = client.batch, time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        latencies = [0] * n
        i = counter[0]
        for b in range(n):
            t0 = clock()
            replies = batch([Admit(user=f"user{(i + k) % USERS}", model=MODEL,
                                   input_tokens=INPUT_TOKENS, max_tokens=MAX_TOKENS)
                             for k in range(BATCH)])
            batch([Settle(lease=r.lease, input_tokens=USED_INPUT, output_tokens=USED_OUTPUT)
                   for r in replies])
            latencies[b] = clock() - t0
            if not all(r.allowed for r in replies):
                raise RuntimeError("an admit was denied: the bench rules must not deny")
            i += BATCH
        counter[0] = i
        return {PIPE: latencies}

    return run


def fixed_runner(r: Any, prefix: str, counter: list[int]) -> Runner:
    clock = time.perf_counter_ns

    def run(n: int) -> dict[str, list[int]]:
        latencies = [0] * n
        i = counter[0]
        for j in range(n):
            t0 = clock()
            key = f"{prefix}fw:user{i % USERS}:{int(time.time()) // WINDOW_S}"
            pipe = r.pipeline(transaction=False)
            pipe.incrby(key, WEIGHT)
            pipe.expire(key, WINDOW_S)
            total, _ = pipe.execute()
            allowed = total <= BIG
            latencies[j] = clock() - t0
            if not allowed:
                raise RuntimeError("the fixed window denied: the bench limit must not deny")
            i += 1
        counter[0] = i
        return {FIXED: latencies}

    return run


# --- measuring --------------------------------------------------------------------------


def measure_socket(daemon: ServerProcess, redis_srv: RedisServer | None,
                   placements: list[Placement], sizes: Sizes, seen: dict) -> list[Row]:
    rows: list[Row] = []
    own_affinity = os.sched_getaffinity(0)
    counter = [0]
    try:
        for pl in placements:
            os.sched_setaffinity(0, {pl.client_cpu})  # this process is the client
            _progress(f"  {pl.name}: daemon admit/settle, pipelined"
                      + (", Redis Lua, INCRBY+EXPIRE" if redis_srv else ""))
            with sidecar.Client(daemon.path) as client:
                runners: dict[str, tuple[Runner, CpuClock]] = {
                    "daemon": (daemon_runner(client, counter, seen), daemon.cpu_ns),
                    "pipelined": (daemon_pipelined_runner(client, counter), daemon.cpu_ns),
                    "ping": (ping_runner(client), daemon.cpu_ns),
                }
                calls = {"daemon": sizes.calls, "pipelined": sizes.batches,
                         "ping": sizes.calls // 2}
                warm = {"daemon": sizes.warmup, "pipelined": sizes.batch_warmup,
                        "ping": sizes.warmup // 2}
                r = None
                if redis_srv is not None:
                    import redis

                    r = redis.Redis(host="127.0.0.1", port=redis_srv.port)
                    prefix = f"{pl.name}:"  # each placement starts with empty windows
                    runners["lua"] = (lua_runner(r, prefix, counter), redis_srv.cpu_ns)
                    runners["fixed"] = (fixed_runner(r, prefix, counter), redis_srv.cpu_ns)
                    calls.update(lua=sizes.calls, fixed=sizes.calls)
                    warm.update(lua=sizes.warmup, fixed=sizes.warmup)
                try:
                    series = interleave(runners, calls, warm)
                finally:
                    if r is not None:
                        r.close()
            # Server CPU of one admit+settle iteration is charged to both daemon rows.
            rows.append(make_row(pl.name, ADMIT, "admit", series[ADMIT]))
            both = make_row(pl.name, ADMIT_SETTLE, "admit+settle", series[ADMIT_SETTLE])
            rows.append(both)
            rows[-2].server_cpu_us = None  # the CPU clock covers admit and settle together
            rows.append(make_row(pl.name, PIPE, f"batch of {BATCH}+{BATCH}", series[PIPE],
                                 ops_per_sample=BATCH))
            rows[-1].server_cpu_us = (series[PIPE].server_cpu_ns / (len(series[PIPE].latencies)
                                      * BATCH) / 1000)  # per admit+settle pair
            rows.append(make_row(pl.name, PING, "ping", series[PING]))
            if redis_srv is not None:
                rows.append(make_row(pl.name, LUA, "call", series[LUA]))
                rows.append(make_row(pl.name, FIXED, "call", series[FIXED]))
    finally:
        os.sched_setaffinity(0, own_affinity)
    return rows


def measure_inprocess(config_path: str, cpu: int, sizes: Sizes) -> list[Row]:
    """The engine called directly; ``now`` read once per iteration outside the timed calls."""
    cfg = sidecar_config.load(config_path, env={})
    lc = cfg.limits
    engine = Engine(compile_rules(lc, config_path), zone=lc.timezone, lease_ttl=lc.lease_ttl,
                    near_fraction=lc.near_fraction, retry_loop_max=lc.retry_loop_max,
                    retry_loop_window=lc.retry_loop_window)
    subjects = [Subject(user=f"user{u}", model=MODEL) for u in range(USERS)]
    estimate = Estimate(INPUT_TOKENS, MAX_TOKENS, 0)
    usage = Usage(USED_INPUT, USED_OUTPUT, 0)
    admit, settle = engine.admit, engine.settle
    clock, wall = time.perf_counter_ns, time.time

    def run(n: int, start: int) -> tuple[list[int], list[int]]:
        admits = [0] * n
        settles = [0] * n
        for i in range(n):
            subject = subjects[(start + i) % USERS]
            now = wall()
            t0 = clock()
            d = admit(subject, estimate, now)
            t1 = clock()
            settle(d.lease, usage, now)
            t2 = clock()
            admits[i] = t1 - t0
            settles[i] = t2 - t1
        return admits, settles

    own_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        run(sizes.inproc_warmup, 0)
        s_admit, s_settle, s_both = Series(), Series(), Series()
        done = sizes.inproc_warmup
        for n in split(sizes.inproc, ROUNDS):
            admits, settles = run(n, done)
            done += n
            s_admit.add_round(admits, 0)
            s_settle.add_round(settles, 0)
            s_both.add_round([a + s for a, s in zip(admits, settles)], 0)
    finally:
        os.sched_setaffinity(0, own_affinity)
    return [make_row("in-process", IN_ADMIT, "call", s_admit),
            make_row("in-process", IN_SETTLE, "call", s_settle),
            make_row("in-process", IN_BOTH, "admit+settle", s_both)]


# --- targets and report -----------------------------------------------------------------


def evaluate_targets(rows: list[Row], placements: list[Placement], skipped: str) -> list[dict]:
    targets = []
    for name, workload, factor in (("Lua script", LUA, TARGET_LUA_RATIO),
                                   ("fixed-window pipeline", FIXED, TARGET_FIXED_RATIO)):
        for pl in placements:
            admit = _find(rows, pl.name, ADMIT)
            base = _find(rows, pl.name, workload)
            target = f"daemon admit p50 >= {factor:g}x faster than the seed's {name}"
            if admit is None or base is None:
                targets.append({"target": target, "placement": pl.name, "value": None,
                                "pass": None, "measured": skipped or "not measured"})
                continue
            ratio = base.p50_us / admit.p50_us
            ping = _find(rows, pl.name, PING)
            # the bare round trip bounds any socket admit: say how far off the floor it is
            floor = "" if ping is None else (
                f"; floor: ping {ping.p50_us:.1f} us, so at most {base.p50_us / ping.p50_us:.2f}x"
                f" here; admit - ping = {admit.p50_us - ping.p50_us:.1f} us")
            targets.append({
                "target": target, "placement": pl.name, "value": ratio,
                "pass": ratio >= factor,
                "measured": f"{workload} {base.p50_us:.1f} us / admit {admit.p50_us:.1f} us "
                            f"= {ratio:.2f}x{floor}",
            })
    inproc = _find(rows, "in-process", IN_ADMIT)
    assert inproc is not None
    targets.append({
        "target": f"in-process decision (Engine.admit p50) <= {TARGET_INPROC_US:g} us",
        "placement": "in-process", "value": inproc.p50_us,
        "pass": inproc.p50_us <= TARGET_INPROC_US,
        "measured": f"{inproc.p50_us:.2f} us (p99 {inproc.p99_us:.2f} us; settle p50 "
                    f"{_find(rows, 'in-process', IN_SETTLE).p50_us:.2f} us)",  # type: ignore
    })
    return targets


def print_report(meta: dict, rows: list[Row], targets: list[dict]) -> None:
    v = meta["versions"]
    s = meta["sizes"]
    print(f"llm-sidecar limits benchmark  ({'quick' if meta['quick'] else 'default'} run)")
    print(f"host: nproc {meta['nproc']} (allowed CPUs {meta['allowed_cpus']}), "
          f"{meta['cpu_model']}, Linux {meta['kernel']}")
    print(f"{v['python']}, uvloop {v['uvloop']}, msgspec {v['msgspec']}, "
          f"llm-sidecar {v['llm-sidecar']}, redis-py {v['redis']}, "
          f"redis-server {meta['redis_server']}")
    print(f"rules: {meta['rules']} (amounts {BIG:,}: never denied); retry_loop_max = 0; "
          f"{USERS} users round-robin, model {MODEL}, estimate {INPUT_TOKENS}+{MAX_TOKENS} "
          f"tokens, settled {USED_INPUT}+{USED_OUTPUT}")
    print(f"socket/Redis: {s['calls']} timed calls per contender and placement after "
          f"{s['warmup']} warmup; pipelined: {s['batches']} batches after {s['batch_warmup']} "
          f"warmup; in-process: {s['inproc']} iterations after {s['inproc_warmup']} warmup")
    print("placements: " + "; ".join(meta["placements"])
          + f"; in-process on cpu{meta['inproc_cpu']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    print(f"contenders alternate in {ROUNDS} interleaved rounds; [lo-hi] = range of the "
          "per-round p50")
    print("ops/s = operations / summed time of the timed samples (admit+settle rows: one op = "
          f"one admit and its settle; the batch row: {BATCH} such pairs per sample)")
    print("srv cpu us/op = server CPU time (user+system, /proc/PID/schedstat) per op; the "
          "daemon's is per admit+settle pair")
    print("in-process: now = time.time() read once per iteration, outside the timed calls")
    print(f"wall time {meta['wall_s']} s")
    print(f"Lua: sorted set per user, weight {WEIGHT} per entry, 60 s window; each key holds "
          f"at most ~{meta['lua_entries']} live entries in this run")
    print()
    print_rows(rows, "per sample", lambda r: f"{r.unit:<14}", digits=2, workload=40,
               ops_width=11)
    print()
    print("targets (reported, not enforced; same placement, same run):")
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "SKIP"}[t["pass"]]
        print(f"  {verdict}  {t['target']} [{t['placement']}]: {t['measured']}")
    for kind, code in meta["server_exit"].items():
        if code not in (0, None):
            print(f"warning: {kind} server exited with code {code}")


def run(args: argparse.Namespace) -> int:
    sizes = Sizes.pick(args.quick)
    placements, note = _placements()
    notes = [note] if note else []
    skipped = redis_unavailable()
    if skipped:
        notes.append(skipped)
    server_cpu = placements[0].server_cpu
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    workdir = tempfile.mkdtemp(prefix="sidecar-bench-limits-")
    servers: dict[str, ServerProcess] = {}
    started = time.monotonic()
    try:
        config_path = os.path.join(workdir, "limits.toml")
        with open(config_path, "w") as f:
            f.write(config_toml(os.path.join(workdir, "limits.journal")))
        notes.append(f"limits journal in the temporary directory ({_fs_type(workdir)}); "
                     "a settle is answered once its spend is synced (fdatasync)")
        sock = os.path.join(workdir, "daemon.sock")
        servers["daemon"] = ServerProcess(
            "daemon", [sys.executable, "-m", "sidecar", "serve", "--socket", sock,
                       "--config", config_path], sock, workdir, server_cpu)
        if not skipped:
            servers["redis"] = RedisServer(workdir, server_cpu)
        for server in servers.values():
            server.wait_ready()
        _progress(f"servers up in {workdir} (pinned to cpu{server_cpu}); measuring:")
        redis_srv = servers.get("redis")
        seen: dict = {}
        rows = measure_socket(servers["daemon"], redis_srv,  # type: ignore[arg-type]
                              placements, sizes, seen)
        if seen.get("settle_durable") is not None:
            notes.append(f"daemon settle replies durable={seen['settle_durable']}")
        _progress("  in-process engine")
        rows += measure_inprocess(config_path, server_cpu, sizes)
        targets = evaluate_targets(rows, placements, skipped)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    meta = {
        **host_meta(args.quick),
        "versions": _versions(),
        "redis_server": "skipped" if skipped else _redis_server_version(),
        "rules": ", ".join(f"{n} ({sc}, {m}, {w})" for n, sc, m, w in RULES),
        "sizes": asdict(sizes),
        "batch": BATCH,
        "placements": [pl.describe() for pl in placements],
        "inproc_cpu": server_cpu,
        "notes": notes,
        "lua_entries": -(-(sizes.calls + sizes.warmup) // USERS),
        "server_exit": {kind: s.returncode for kind, s in servers.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets},
                  sys.stdout, indent=2)
        print()
    else:
        print_report(meta, rows, targets)
    return 0
