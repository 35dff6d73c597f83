"""``python -m bench cluster``: what cluster mode (limits shared through Redis) costs an admit,
against a standalone daemon and a naive Redis round trip per admit, and how exact it is.

One run starts a ``redis-server`` on a free loopback port (no persistence; the runner of
``bench limits``) and daemons (``python -m sidecar serve``, each with its own socket and
``XDG_STATE_HOME`` in a temporary directory, ``LLM_SIDECAR_*`` dropped from their
environment). Every daemon's rule set is one rule, ``bench``: global requests over a
sliding 60 s window (60 buckets of 1 s), ``retry_loop_max = 0``; cluster daemons add
``[cluster] redis_url`` and ``timeout = 0.2`` (so a loaded 2-vCPU VM does not tip them into
degraded mode; everything else at its default: heartbeat 1 s, lease TTL 5 s, divisor 4).
It measures, in this order:

1. **standalone** (no Redis) and 2. **cluster, 1 daemon**, amount 10^12 (never denies):
   ``sidecar.Client.admit(user=..., input_tokens=1)`` then ``settle(lease,
   input_tokens=1, output_tokens=0)``, back to back, each call timed on its own (rows
   "admit" and "settle"), in interleaved rounds with 4. **the naive baseline**, one
   EVALSHA of the seed's token-weighted sliding-window script per admit
   (``bench.baseline.LUA_SLIDING_WINDOW`` through redis-py's blocking client, spread over
   1,000 keys like ``bench limits`` does so no sorted set grows past a few dozen entries:
   the baseline pays its round trip, not a long ZRANGE);
3. **cluster, 3 daemons** sharing that Redis (the first one plus two more): three client
   *processes*, one per daemon, started together per round (barrier), in interleaved
   rounds with the naive baseline from three client processes at once;
5. **over-admission**: three fresh daemons (cluster name ``overadmit``, new counters) share
   a global limit of L requests per 60 s (2,000; 600 with ``--quick``); once all three see
   three live daemons, three client processes hammer them (admit, settle when allowed)
   until each saw more than L/3 denials and at least 2 s passed; then, after the idle
   leases closed (4 s), it reports the admitted sum against L, each daemon's
   ``stats().cluster`` (acquires, grants, refusals, live daemons, degraded, transitions),
   the counter Redis holds, and the Redis script calls (EVALSHA, from ``INFO
   commandstats``: heartbeats, reports and closes included) per admitted request.

Placements: the daemons and Redis are pinned to one CPU; the client(s) run on the same
CPU ("same-cpu") and on the other ("cross-cpu"; skipped with one allowed CPU). With three
daemons, Redis and three clients on 2 vCPUs, "same-cpu" means all seven processes on one
CPU and "cross-cpu" the three clients together on the second. The over-admission phase
runs in the cross-cpu placement only (same-cpu when there is one CPU): it counts, it does
not time. Targets (reported PASS/MISS, never failing): cluster admit p50 (1 daemon)
within 1.3x the standalone p50; at least 4x faster than the naive Lua round trip; and
over-admission <= 1%. Servers are stopped and the temporary directory removed on every
exit path, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import array
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

from .baseline import (LUA, LUA_SLIDING_WINDOW, PING, REDIS_SERVER, USERS, RedisServer, Row,
                       Series, _find, _redis_server_version, _versions, interleave, lua_runner,
                       make_row, ping_runner, print_rows, redis_unavailable)
from .cluster_clients import (CLUSTER3, LUA3, REDIS_PING, Clients, admit_runner,
                              redis_ping_runner)
from .roundtrip import (ROUNDS, Placement, ServerProcess, _placements, _progress,
                        _raise_on_sigterm, host_meta, split)

BIG = 10**12  # the throughput rule's amount: never denied
WINDOW = "60s"
TARGET_STANDALONE_RATIO = 1.3
TARGET_LUA_RATIO = 4.0
TARGET_OVER_PCT = 1.0
OVER_SETTLE_S = 4.0  # after the hammer: idle leases close (heartbeat 1 s, idle > 2.5 s)

STANDALONE = "standalone"
CLUSTER1 = "cluster, 1 daemon"
LUA1 = LUA  # the single-client naive baseline's series (bench.baseline.lua_runner)


@dataclass(frozen=True)
class Sizes:
    calls: int  # timed admits per single-client contender and placement
    warmup: int
    concurrent: int  # timed calls per client process, 3-client workloads, per placement
    limit: int  # L of the over-admission phase

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        if quick:
            return cls(3000, 300, 1500, 600)
        return cls(20_000, 2000, 10_000, 2000)


def config_toml(amount: int, redis_url: str = "", name: str = "") -> str:
    """One global requests rule over a sliding 60 s window; cluster mode when
    ``redis_url`` is given (the rest of ``[cluster]`` at its defaults but the timeout)."""
    text = ("# written by python -m bench cluster\n[limits]\nretry_loop_max = 0\n"
            f'[[limits.rules]]\nname = "bench"\nscope = "global"\nmetric = "requests"\n'
            f'window = "{WINDOW}"\namount = {amount}\n')
    if redis_url:
        text += f'[cluster]\nredis_url = "{redis_url}"\nname = "{name}"\ntimeout = 0.2\n'
    return text


def _daemon(workdir: str, kind: str, config: str, cpu: int) -> ServerProcess:
    """A daemon in its own directory (its XDG_STATE_HOME, socket, config and log)."""
    home = os.path.join(workdir, kind)
    os.mkdir(home)
    path = os.path.join(home, "sidecar.toml")
    with open(path, "w") as f:
        f.write(config)
    sock = os.path.join(home, "sidecar.sock")
    return ServerProcess(kind, [sys.executable, "-m", "sidecar", "serve", "--socket", sock,
                                "--config", path], sock, home, cpu)


def _wait_cluster(daemons: list[ServerProcess], live: int, timeout: float = 10.0) -> None:
    """Until every daemon left its initial degraded state and sees ``live`` daemons."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for d in daemons:
            with sidecar.Client(d.path) as c:
                states.append(c.stats().cluster)
        if all(s is not None and not s.degraded and s.live_daemons >= live for s in states):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"cluster daemons not ready within {timeout:g} s: {states}")
        time.sleep(0.1)


def _cluster_stats(d: ServerProcess) -> dict[str, Any]:
    with sidecar.Client(d.path) as c:
        s = c.stats().cluster
    assert s is not None, f"{d.kind} is not in cluster mode"
    return {"daemon": d.kind, "live_daemons": s.live_daemons, "acquires": s.acquires,
            "grants": s.grants, "refusals": s.refusals, "leases_open": s.leases_open,
            "pending_adjustments": s.pending_adjustments, "degraded": s.degraded,
            "reason": s.reason, "transitions": s.transitions}


def _log_findings(servers: dict[str, ServerProcess]) -> list[str]:
    """The cluster's warnings, errors and tracebacks in the daemons' logs (the initial
    connect is logged at INFO and is left out)."""
    found = []
    for kind, server in servers.items():
        if kind == "redis":
            continue
        try:
            with open(server.log_path, errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        hits = [line.strip() for line in lines if "INFO" not in line
                and any(w in line for w in ("sidecar.cluster", "ERROR", "Traceback"))]
        found += [f"{kind}: {line[:200]}" for line in hits[:5]]
        if len(hits) > 5:
            found.append(f"{kind}: ... {len(hits) - 5} more")
    return found


def _script_calls(r: Any) -> int:
    """EVALSHA + EVAL calls Redis has served (a pipelined script counts once)."""
    stats = r.info("commandstats")
    return sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha", "cmdstat_eval"))


# --- measuring --------------------------------------------------------------------------


def measure_single(standalone: ServerProcess, cluster: ServerProcess, redis_srv: RedisServer,
                   placements: list[Placement], sizes: Sizes) -> tuple[list[Row], dict]:
    """Workloads 1, 2 and the single-client naive baseline, interleaved per placement."""
    import redis

    rows: list[Row] = []
    own = os.sched_getaffinity(0)
    counter = [0]
    with sidecar.Client(cluster.path) as c:
        acquires0 = c.stats().cluster.acquires  # type: ignore[union-attr]
    try:
        for pl in placements:
            os.sched_setaffinity(0, {pl.client_cpu})
            _progress(f"  {pl.name}: standalone, cluster (1 daemon), Redis Lua; one client")
            with sidecar.Client(standalone.path) as sa, sidecar.Client(cluster.path) as cl:
                r = redis.Redis(host="127.0.0.1", port=redis_srv.port)
                runners = {
                    STANDALONE: (admit_runner(sa, STANDALONE, counter), standalone.cpu_ns),
                    CLUSTER1: (admit_runner(cl, CLUSTER1, counter),
                               lambda: cluster.cpu_ns() + redis_srv.cpu_ns()),
                    "lua": (lua_runner(r, f"{pl.name}:", counter), redis_srv.cpu_ns),
                    "ping": (ping_runner(cl), cluster.cpu_ns),
                    "redis ping": (redis_ping_runner(r), redis_srv.cpu_ns),
                }
                calls = dict.fromkeys(runners, sizes.calls)
                warm = dict.fromkeys(runners, sizes.warmup)
                calls.update({"ping": sizes.calls // 2, "redis ping": sizes.calls // 2})
                try:
                    series = interleave(runners, calls, warm)
                finally:
                    r.close()
            for label in (STANDALONE, CLUSTER1):
                rows.append(make_row(pl.name, f"{label}: admit", "admit",
                                     series[f"{label} admit"]))
                rows.append(make_row(pl.name, f"{label}: settle", "settle",
                                     series[f"{label} settle"]))
                rows[-1].server_cpu_us = None  # the CPU clock covers admit+settle: on admit
            rows.append(make_row(pl.name, f"naive: {LUA1}", "call", series[LUA1]))
            rows.append(make_row(pl.name, PING, "ping", series[PING]))
            rows.append(make_row(pl.name, REDIS_PING, "ping", series[REDIS_PING]))
    finally:
        os.sched_setaffinity(0, own)
    with sidecar.Client(cluster.path) as c:
        acquires = c.stats().cluster.acquires - acquires0  # type: ignore[union-attr]
    admits = len(placements) * (sizes.calls + sizes.warmup)
    return rows, {"acquires": acquires, "admits": admits}


def measure_three(clients: Clients, daemons: list[ServerProcess], redis_srv: RedisServer,
                  placements: list[Placement], sizes: Sizes) -> tuple[list[Row], dict]:
    """Workload 3 and the 3-client naive baseline, interleaved per placement. ops/s is
    aggregate: every process's timed calls over the rounds' wall spans (first start to
    last end)."""
    rows: list[Row] = []
    before = sum(_cluster_stats(d)["acquires"] for d in daemons)
    names = [CLUSTER3, LUA3]
    for pl in placements:
        _progress(f"  {pl.name}: cluster (3 daemons), Redis Lua; three client processes")
        clients.ask([("pin", pl.client_cpu, f"{pl.name}:3:")] * 3)
        for name in names:  # warm up
            clients.ask([("run", name, sizes.warmup)] * 3)
        series = {name: Series() for name in names}
        walls = dict.fromkeys(names, 0)
        for r, n in enumerate(split(sizes.concurrent, ROUNDS)):
            for name in (names if r % 2 == 0 else names[::-1]):
                cpu0 = sum(d.cpu_ns() for d in daemons) + redis_srv.cpu_ns()
                spans = clients.ask([("run", name, n)] * 3)
                cpu = sum(d.cpu_ns() for d in daemons) + redis_srv.cpu_ns() - cpu0
                latencies: list[int] = []
                for _, _, raw in spans:
                    latencies.extend(array.array("q", raw))
                walls[name] += max(e for _, e, _ in spans) - min(b for b, _, _ in spans)
                series[name].add_round(latencies, cpu)
        for name, unit in ((CLUSTER3, "admit"), (LUA3, "call")):
            row = make_row(pl.name, name, unit, series[name])
            row.ops_per_s = len(series[name].latencies) / (walls[name] / 1e9)
            rows.append(row)
    acquires = sum(_cluster_stats(d)["acquires"] for d in daemons) - before
    admits = len(placements) * 3 * (sizes.concurrent + sizes.warmup)
    return rows, {"acquires": acquires, "admits": admits}


def _usage_keys(r: Any) -> set[bytes]:
    return set(r.scan_iter(match="llms:*:u", count=1000))


def measure_overadmission(clients: Clients, daemons: list[ServerProcess],
                          redis_srv: RedisServer, pl: Placement, limit: int) -> dict:
    """Workload 5: three daemons, one global limit, demand well over it."""
    import redis

    _progress(f"  over-admission: 3 daemons, limit {limit} per {WINDOW}, clients on "
              f"cpu{pl.client_cpu}")
    _wait_cluster(daemons, live=3)
    r = redis.Redis(host="127.0.0.1", port=redis_srv.port)
    try:
        keys_before = _usage_keys(r)
        calls0 = _script_calls(r)
        stats0 = [_cluster_stats(d) for d in daemons]
        clients.ask([("pin", pl.client_cpu, "over:")] * 3)
        loads = clients.ask([("hammer", d.path, limit) for d in daemons])
        time.sleep(OVER_SETTLE_S)  # reports, closes of the idle leases, adjustments
        calls = _script_calls(r) - calls0
        stats = [_cluster_stats(d) for d in daemons]
        new_keys = sorted(_usage_keys(r) - keys_before)
        redis_used = sum(int(v) for k in new_keys for v in r.hvals(k))
    finally:
        r.close()
    for s, s0 in zip(stats, stats0):
        for k in ("acquires", "grants", "refusals"):
            s[k] -= s0[k]  # the phase's own (the heartbeats before it asked nothing)
    admitted = sum(x["allowed"] for x in loads)
    return {
        "limit": limit, "window": WINDOW, "admitted": admitted,
        "denied": sum(x["denied"] for x in loads),
        "over_pct": max(0, admitted - limit) / limit * 100,
        "under_pct": max(0, limit - admitted) / limit * 100,
        "redis_counter": redis_used, "redis_counters": len(new_keys),
        "script_calls": calls,
        "script_calls_per_admitted": calls / admitted if admitted else None,
        "acquires_per_admitted": (sum(s["acquires"] for s in stats) / admitted
                                  if admitted else None),
        "clients": loads, "daemons": stats, "placement": pl.describe(),
    }


# --- targets and report -----------------------------------------------------------------


def evaluate_targets(rows: list[Row], placements: list[Placement], over: dict) -> list[dict]:
    targets = []
    for pl in placements:
        cl = _find(rows, pl.name, f"{CLUSTER1}: admit")
        sa = _find(rows, pl.name, f"{STANDALONE}: admit")
        lua = _find(rows, pl.name, f"naive: {LUA1}")
        assert cl is not None and sa is not None and lua is not None
        ratio = cl.p50_us / sa.p50_us
        targets.append({
            "target": f"cluster admit p50 (1 daemon) within {TARGET_STANDALONE_RATIO:g}x "
                      "standalone p50", "placement": pl.name, "value": ratio,
            "pass": ratio <= TARGET_STANDALONE_RATIO,
            "measured": f"{cl.p50_us:.1f} us / {sa.p50_us:.1f} us = {ratio:.2f}x "
                        f"(p99 {cl.p99_us:.1f} vs {sa.p99_us:.1f} us)"})
        ratio = lua.p50_us / cl.p50_us
        ping = _find(rows, pl.name, PING)
        rping = _find(rows, pl.name, REDIS_PING)
        assert ping is not None and rping is not None
        targets.append({
            "target": f"cluster admit p50 (1 daemon) >= {TARGET_LUA_RATIO:g}x faster than "
                      "one Redis Lua round trip", "placement": pl.name, "value": ratio,
            "pass": ratio >= TARGET_LUA_RATIO,
            "measured": f"Lua {lua.p50_us:.1f} us / admit {cl.p50_us:.1f} us = {ratio:.2f}x; "
                        f"floor: daemon ping {ping.p50_us:.1f} us, so at most "
                        f"{lua.p50_us / ping.p50_us:.2f}x here (redis-py PING "
                        f"{rping.p50_us:.1f} us)"})
    targets.append({
        "target": f"over-admission <= {TARGET_OVER_PCT:g}% (3 daemons, one global limit)",
        "placement": over["placement"].split(" ")[0], "value": over["over_pct"],
        "pass": over["over_pct"] <= TARGET_OVER_PCT,
        "measured": f"admitted {over['admitted']} of limit {over['limit']}: over "
                    f"{over['over_pct']:.2f}%, under {over['under_pct']:.2f}%"})
    return targets


def print_report(meta: dict, rows: list[Row], targets: list[dict], over: dict) -> None:
    v, s = meta["versions"], meta["sizes"]
    print(f"llm-sidecar cluster benchmark  ({'quick' if meta['quick'] else 'default'} run)")
    print(f"host: nproc {meta['nproc']} (allowed CPUs {meta['allowed_cpus']}), "
          f"{meta['cpu_model']}, Linux {meta['kernel']}")
    print(f"{v['python']}, uvloop {v['uvloop']}, msgspec {v['msgspec']}, "
          f"llm-sidecar {v['llm-sidecar']}, redis-py {v['redis']}, "
          f"redis-server {meta['redis_server']}")
    print(f"rule: bench (global, requests, sliding {WINDOW} in 60 buckets), amount {BIG:,} "
          "for the timed rows; retry_loop_max = 0; [cluster] timeout = 0.2, other settings "
          "default")
    print(f"single client: {s['calls']} timed admits per contender and placement after "
          f"{s['warmup']} warmup; 3 clients: {s['concurrent']} timed calls per process and "
          f"placement after {s['warmup']} warmup; {ROUNDS} interleaved rounds")
    print("placements: " + "; ".join(meta["placements"]) + "; every daemon and redis-server "
          f"pinned to cpu{meta['server_cpu']}")
    for note in meta["notes"]:
        print(f"note: {note}")
    print("admit and settle timed separately, each call alone (client side, "
          "sidecar.Client); naive = one EVALSHA of the seed's script via redis-py")
    print("ops/s: single-client rows = calls / summed time of the timed calls; 3-process "
          "rows = all processes' calls / wall time of the rounds (the cluster row's loop "
          "also settles)")
    print("srv cpu us/op: CPU of the daemon(s) + redis-server per loop iteration (daemon "
          "rows: admit+settle, shown on the admit row)")
    print(f"wall time {meta['wall_s']} s")
    print()
    print_rows(rows, " calls", lambda r: f"{r.samples:>6}", digits=1, workload=46,
               ops_width=9)
    print()
    rc = meta["redis_calls"]
    for label, x in (("cluster, 1 daemon", rc["single"]), ("cluster, 3 daemons", rc["three"])):
        print(f"lease acquires ({label}): {x['acquires']} for {x['admits']} admits "
              f"(warmup included) = {x['acquires'] / x['admits']:.5f} per admit")
    print()
    print(f"over-admission [{over['placement']}]: limit {over['limit']} per {over['window']}, "
          f"admitted {over['admitted']}, denied {over['denied']} "
          f"-> over {over['over_pct']:.2f}%, under {over['under_pct']:.2f}%; "
          f"Redis counter after the closes {over['redis_counter']}")
    print(f"  Redis script calls during the phase (EVALSHA, all daemons, heartbeats included): "
          f"{over['script_calls']} = {over['script_calls_per_admitted']:.3f} per admitted; "
          f"lease acquires {over['acquires_per_admitted']:.3f} per admitted")
    for c, d in zip(over["clients"], over["daemons"]):
        print(f"  {d['daemon']}: client allowed {c['allowed']}, denied {c['denied']} in "
              f"{c['seconds']} s {c['reasons']}; acquires {d['acquires']}, grants "
              f"{d['grants']}, refusals {d['refusals']}, live {d['live_daemons']}, "
              f"leases open {d['leases_open']}, pending {d['pending_adjustments']}")
    print()
    print("degraded mode (transitions: into or out of degraded mode during the run):")
    for d in meta["daemon_states"]:
        flag = f"DEGRADED ({d['reason']})" if d["degraded"] else "not degraded"
        print(f"  {d['daemon']}: {flag}, transitions {d['transitions']}")
    print("daemon logs (cluster warnings, errors): "
          + ("none" if not meta["daemon_log"] else ""))
    for line in meta["daemon_log"]:
        print(f"  {line}")
    print()
    print("targets (reported, not enforced; same placement, same run):")
    for t in targets:
        verdict = {True: "PASS", False: "MISS", None: "SKIP"}[t["pass"]]
        print(f"  {verdict}  {t['target']} [{t['placement']}]: {t['measured']}")
    for kind, code in meta["server_exit"].items():
        if code not in (0, None):
            print(f"warning: {kind} server exited with code {code}")


# --- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    skipped = redis_unavailable()
    if skipped:
        message = skipped.replace("Redis baselines skipped", "cluster benchmark skipped")
        if args.json:
            json.dump({"skipped": message}, sys.stdout)
            print()
        else:
            print(message)
        return 0
    sizes = Sizes.pick(args.quick)
    placements, note = _placements()
    notes = [note] if note else []
    server_cpu = placements[0].server_cpu
    over_pl = placements[-1]
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    workdir = tempfile.mkdtemp(prefix="sidecar-bench-cluster-")
    servers: dict[str, ServerProcess] = {}
    clients: Clients | None = None
    started = time.monotonic()
    daemon_states: list[dict] = []
    log_findings: list[str] = []
    try:
        redis_srv = RedisServer(workdir, server_cpu)
        servers["redis"] = redis_srv
        redis_srv.wait_ready()
        url = f"redis://127.0.0.1:{redis_srv.port}/0"
        servers["standalone"] = _daemon(workdir, "standalone", config_toml(BIG), server_cpu)
        servers["c1"] = _daemon(workdir, "c1", config_toml(BIG, url, "bench"), server_cpu)
        for kind in ("standalone", "c1"):
            servers[kind].wait_ready()
        _wait_cluster([servers["c1"]], live=1)
        _progress(f"servers up in {workdir} (pinned to cpu{server_cpu}); measuring:")
        rows, single_calls = measure_single(servers["standalone"], servers["c1"], redis_srv,
                                            placements, sizes)

        for kind in ("c2", "c3"):
            servers[kind] = _daemon(workdir, kind, config_toml(BIG, url, "bench"), server_cpu)
        three = [servers["c1"], servers["c2"], servers["c3"]]
        for d in three[1:]:
            d.wait_ready()
        _wait_cluster(three, live=3)
        clients = Clients([d.path for d in three], redis_srv.port)
        three_rows, three_calls = measure_three(clients, three, redis_srv, placements, sizes)
        rows += three_rows
        daemon_states += [_cluster_stats(d) for d in three]
        for kind in ("standalone", "c1", "c2", "c3"):  # free the CPU for the next phase
            servers[kind].stop()
        clients.close()

        over_daemons = []
        for i in range(3):
            kind = f"over{i + 1}"
            servers[kind] = _daemon(workdir, kind, config_toml(sizes.limit, url, "overadmit"),
                                    server_cpu)
            over_daemons.append(servers[kind])
        for d in over_daemons:
            d.wait_ready()
        clients = Clients([d.path for d in over_daemons], redis_srv.port)
        over = measure_overadmission(clients, over_daemons, redis_srv, over_pl, sizes.limit)
        daemon_states += [_cluster_stats(d) for d in over_daemons]
        targets = evaluate_targets(rows, placements, over)
        redis_version = _redis_server_version()
    finally:
        if clients is not None:
            clients.close()
        for server in reversed(servers.values()):  # daemons first: they return leases
            server.stop()
        log_findings = _log_findings(servers)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    meta = {
        **host_meta(args.quick),
        "versions": _versions(),
        "redis_server": f"{redis_version} ({REDIS_SERVER})",
        "sizes": asdict(sizes),
        "placements": [pl.describe() for pl in placements],
        "server_cpu": server_cpu,
        "notes": notes + [
            "naive baseline: bench.baseline.LUA_SLIDING_WINDOW (ZREMRANGEBYSCORE, ZRANGE, "
            f"ZADD, PEXPIRE) on {USERS} keys round-robin, as in bench limits "
            f"({len(LUA_SLIDING_WINDOW)} bytes of Lua run by SHA)",
            "3-process rows: daemons c1-c3 share one Redis counter; each process talks to "
            "its own daemon; the naive row's processes share Redis"],
        "redis_calls": {"single": single_calls, "three": three_calls},
        "daemon_states": daemon_states,
        "daemon_log": log_findings,
        "server_exit": {kind: s.returncode for kind, s in servers.items()},
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows], "targets": targets,
                   "overadmission": over}, sys.stdout, indent=2)
        print()
    else:
        print_report(meta, rows, targets, over)
    return 0
