"""``python -m bench roundtrip``: ping round trips, real daemon vs. the bare floor server.

One run starts two servers as subprocesses on sockets in a temporary directory, both
pinned to the first allowed CPU and started with default config (``LLM_SIDECAR_*`` is
dropped from their environment): the daemon (``python -m sidecar serve --socket P``) and
the floor (``python -m bench.floor P``). The same raw client (``bench.rawclient``) then runs
each workload against both: sequential pings, pipelined batches of 100 pings (one batch
at a time, and streamed with 4 batches in flight so client and server overlap), and two
client processes pinging at once; ``sidecar.Client.ping`` against the daemon joins the
sequential workload. Contenders alternate in interleaved rounds so host-speed drift hits
them alike, and each server's CPU time per request is read from /proc. Every workload runs
in two placements: "same-cpu" (clients on the server's CPU) and "cross-cpu" (clients on a
second CPU), since a cross-CPU wake-up dominates a round trip on small VMs. It prints a
table (or ``--json``) and the performance targets as PASS/MISS; a MISS is reported, never
turned into a failing exit code. Servers get SIGTERM and the temporary directory is removed
on every exit path, Ctrl-C included.
"""
from __future__ import annotations

import argparse
import array
import contextlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import sidecar

from .rawclient import RawClient

REPO_ROOT = Path(__file__).resolve().parent.parent
BATCH = 100

TARGET_P50_RATIO = 1.4
TARGET_PIPELINED_OPS = 400_000

SEQ = "sequential ping"
PIPE = f"pipelined x{BATCH}"
DEPTH = 4
STREAM = f"streamed x{BATCH}, {DEPTH} in flight"
TWO = "two client processes"
CLIENT = "sidecar.Client.ping (daemon only)"


@dataclass(frozen=True)
class Sizes:
    seq: int  # timed sequential pings (per client process in the two-client workload)
    seq_warmup: int
    batches: int  # timed pipelined batches
    batch_warmup: int

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        return cls(3000, 500, 200, 20) if quick else cls(20000, 2000, 2000, 200)


@dataclass
class Row:
    placement: str
    workload: str
    server: str  # "daemon" | "floor"
    requests: int  # timed requests
    p50_us: float  # per request (sequential kinds) or per batch (pipelined)
    p99_us: float
    ops_per_s: float
    ratio: float | None = None  # daemon / floor: p50 (sequential kinds) or ops/s (pipelined)
    ratio_of: str | None = None  # "p50" | "ops/s"
    ratio_rounds: tuple[float, float] | None = None  # lowest and highest per-round ratio
    server_cpu_us: float | None = None  # server CPU time (user + system) per request


@dataclass(frozen=True)
class Placement:
    name: str
    server_cpu: int
    client_cpu: int

    def describe(self) -> str:
        return f"{self.name} (server cpu{self.server_cpu}, clients cpu{self.client_cpu})"


# --- statistics -------------------------------------------------------------------------


def percentile(sorted_ns: list[int], q: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in microseconds."""
    rank = max(1, -(-len(sorted_ns) * q // 1))  # ceil(n * q), at least 1
    return sorted_ns[int(rank) - 1] / 1000


# --- CPU pinning ------------------------------------------------------------------------


def pin_process(pid: int, cpu: int) -> None:
    """Pin every thread of ``pid`` to ``cpu`` (threads started later inherit it)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(tid, {cpu})


# --- servers ----------------------------------------------------------------------------


class ServerProcess:
    """One server subprocess on its own socket, its stderr captured to a log file."""

    def __init__(self, kind: str, argv: list[str], path: str, workdir: str, cpu: int) -> None:
        self.kind = kind
        self.path = path
        self.cpu = cpu
        self.log_path = os.path.join(workdir, f"{kind}.log")
        self.returncode: int | None = None
        # Defaults only: no LLM_SIDECAR_* config from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
        env["XDG_STATE_HOME"] = workdir  # the daemon's limits journal goes in the temp dir
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        with open(self.log_path, "wb") as log:
            # Own session: a terminal Ctrl-C reaches only the benchmark, which then
            # stops the servers itself.
            self.proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        pin_process(self.proc.pid, cpu)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the socket accepts a connection and answers a ping."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited with {self.proc.returncode} "
                                   f"before answering:\n{self.log_tail()}")
            if os.path.exists(self.path):
                try:
                    with RawClient(self.path) as client:
                        client.sock.settimeout(2.0)
                        client.sequential(1)
                    pin_process(self.proc.pid, self.cpu)  # any thread started meanwhile
                    return
                except OSError as exc:
                    last = exc
            time.sleep(0.02)
        raise RuntimeError(f"{self.kind} server did not answer on {self.path} within "
                           f"{timeout:g} s (last error: {last}):\n{self.log_tail()}")

    def cpu_ns(self) -> int:
        """CPU time the server's threads have run so far (scheduler clock, ns)."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0
        return total

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode


# --- workloads --------------------------------------------------------------------------
#
# Host speed on these VMs drifts by up to 2x over tens of seconds, so a contender measured
# after another one would see a different machine. Every workload therefore splits its
# requests into ROUNDS chunks and alternates the contenders chunk by chunk (the order
# reversing every round); ratios compare like time with like time.

ROUNDS = 10

Runner = Callable[[int], list[int]]  # runs n units, returns each one's duration in ns
CpuClock = Callable[[], int]  # the serving process's CPU time so far, ns


@dataclass
class Series:
    """One contender's samples: every latency, and per round its wall time and p50."""

    latencies: list[int] = field(default_factory=list)
    walls: list[int] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)
    server_cpu_ns: int = 0  # spent by the server on this contender's timed requests

    def add_round(self, latencies: list[int], wall: int, server_cpu_ns: int = 0) -> None:
        self.latencies += latencies
        self.walls.append(wall)
        self.round_p50.append(percentile(sorted(latencies), 0.50))
        self.server_cpu_ns += server_cpu_ns


def split(total: int, rounds: int) -> list[int]:
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def interleave(runners: dict[str, tuple[Runner, CpuClock]], total: int,
               warmup: int) -> dict[str, Series]:
    names = list(runners)
    for name in names:
        runners[name][0](warmup)
    series = {name: Series() for name in names}
    clock = time.perf_counter_ns
    for r, n in enumerate(split(total, ROUNDS)):
        for name in (names if r % 2 == 0 else names[::-1]):
            runner, server_cpu = runners[name]
            cpu0 = server_cpu()
            start = clock()
            latencies = runner(n)
            wall = clock() - start
            series[name].add_round(latencies, wall, server_cpu() - cpu0)
    return series


def client_ping_runner(client: sidecar.Client) -> Runner:
    """Times ``sidecar.Client.ping`` from the outside, like the raw client's requests."""
    ping, clock = client.ping, time.perf_counter_ns

    def run(n: int) -> list[int]:
        latencies = [0] * n
        for i in range(n):
            t0 = clock()
            ping()
            latencies[i] = clock() - t0
        return latencies

    return run


def run_sequential(servers: dict[str, ServerProcess], sizes: Sizes) -> dict[str, Series]:
    """Raw client against floor and daemon, plus ``sidecar.Client`` against the daemon."""
    floor_srv, daemon_srv = servers["floor"], servers["daemon"]
    with RawClient(floor_srv.path) as floor, RawClient(daemon_srv.path) as daemon, \
            sidecar.Client(daemon_srv.path) as full:
        return interleave({"floor": (floor.sequential, floor_srv.cpu_ns),
                           "daemon": (daemon.sequential, daemon_srv.cpu_ns),
                           "client": (client_ping_runner(full), daemon_srv.cpu_ns)},
                          sizes.seq, sizes.seq_warmup)


def run_pipelined(servers: dict[str, ServerProcess], sizes: Sizes) -> dict[str, Series]:
    floor_srv, daemon_srv = servers["floor"], servers["daemon"]
    with RawClient(floor_srv.path) as floor, RawClient(daemon_srv.path) as daemon:
        return interleave({"floor": (lambda n: floor.pipelined(n, BATCH), floor_srv.cpu_ns),
                           "daemon": (lambda n: daemon.pipelined(n, BATCH), daemon_srv.cpu_ns)},
                          sizes.batches, sizes.batch_warmup)


def run_streamed(servers: dict[str, ServerProcess], sizes: Sizes) -> dict[str, Series]:
    floor_srv, daemon_srv = servers["floor"], servers["daemon"]
    with RawClient(floor_srv.path) as floor, RawClient(daemon_srv.path) as daemon:
        return interleave(
            {"floor": (lambda n: floor.streamed(n, BATCH, DEPTH), floor_srv.cpu_ns),
             "daemon": (lambda n: daemon.streamed(n, BATCH, DEPTH), daemon_srv.cpu_ns)},
            sizes.batches, sizes.batch_warmup)


def _two_clients_child(paths: dict[str, str], cpu: int, sizes: Sizes, barrier, conn) -> None:
    """One client process: warm up on both servers, then the interleaved rounds, each
    chunk started together with the other process (barrier); reports per-round spans."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        os.sched_setaffinity(0, {cpu})
        clients = {kind: RawClient(path) for kind, path in paths.items()}
        names = list(clients)
        for client in clients.values():
            client.sequential(sizes.seq_warmup)
        rounds: dict[str, list] = {kind: [] for kind in names}
        for r, n in enumerate(split(sizes.seq, ROUNDS)):
            for kind in (names if r % 2 == 0 else names[::-1]):
                barrier.wait(60)
                start = time.perf_counter_ns()  # CLOCK_MONOTONIC: same clock in every process
                latencies = clients[kind].sequential(n)
                end = time.perf_counter_ns()
                rounds[kind].append((start, end, array.array("q", latencies).tobytes()))
        for client in clients.values():
            client.close()
        conn.send(("ok", rounds))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_two_clients(servers: dict[str, ServerProcess], sizes: Sizes,
                    cpu: int) -> dict[str, Series]:
    """The servers' CPU is read around the whole workload (the children alone know the
    chunk boundaries) and prorated: each server is idle while the other one is measured,
    so its share of the timed requests is timed / (timed + warmup)."""
    paths = {kind: server.path for kind, server in servers.items()}
    cpu_before = {kind: server.cpu_ns() for kind, server in servers.items()}
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    children = []
    results = []
    try:
        for _ in range(2):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_two_clients_child,
                               args=(paths, cpu, sizes, barrier, child_end), daemon=True)
            proc.start()
            child_end.close()
            children.append((proc, parent_end))
        for proc, parent_end in children:
            if not parent_end.poll(300):
                raise RuntimeError("a client process did not report within 300 s")
            results.append(parent_end.recv())
        for proc, _ in children:
            proc.join(30)
    finally:
        barrier.abort()  # releases a child still waiting for one that died
        for proc, parent_end in children:
            parent_end.close()
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    errors = [r[1] for r in results if r[0] != "ok"]
    if errors:
        raise RuntimeError("client process failed:\n" + errors[0])
    share = sizes.seq / (sizes.seq + sizes.seq_warmup)
    series = {}
    for kind in paths:
        s = series[kind] = Series()
        s.server_cpu_ns = round((servers[kind].cpu_ns() - cpu_before[kind]) * share)
        for spans in zip(*(r[1][kind] for r in results)):  # one round, both processes
            latencies: list[int] = []
            for _, _, raw in spans:
                latencies.extend(array.array("q", raw))
            s.add_round(latencies, max(e for _, e, _ in spans) - min(b for b, _, _ in spans))
    return series


# --- the run ----------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": f"{platform.python_implementation()} {platform.python_version()}"}
    for dist in ("uvloop", "msgspec", "llm-sidecar"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def _placements() -> tuple[list[Placement], str]:
    allowed = sorted(os.sched_getaffinity(0))
    first = allowed[0]
    if len(allowed) < 2:
        return ([Placement("same-cpu", first, first)],
                f"only CPU {first} is available: same-cpu placement only, cross-cpu skipped")
    second = allowed[1]
    return ([Placement("same-cpu", first, first), Placement("cross-cpu", first, second)], "")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_row(placement: str, workload: str, server: str, s: Series, per_latency: int) -> Row:
    ordered = sorted(s.latencies)
    requests = len(ordered) * per_latency
    return Row(placement, workload, server, requests, percentile(ordered, 0.50),
               percentile(ordered, 0.99), requests / (sum(s.walls) / 1e9),
               server_cpu_us=s.server_cpu_ns / requests / 1000 if s.server_cpu_ns else None)


def _compare(daemon: Row, d: Series, floor: Row, f: Series, of: str) -> None:
    """Fill the daemon row's ratio to the floor, overall and the per-round range."""
    if of == "ops/s":
        daemon.ratio = daemon.ops_per_s / floor.ops_per_s
        per_round = [fw / dw for dw, fw in zip(d.walls, f.walls)]  # equal work per round
    else:
        daemon.ratio = daemon.p50_us / floor.p50_us
        per_round = [dp / fp for dp, fp in zip(d.round_p50, f.round_p50)]
    daemon.ratio_of = of
    daemon.ratio_rounds = (min(per_round), max(per_round))


def measure(servers: dict[str, ServerProcess], placements: list[Placement],
            sizes: Sizes) -> list[Row]:
    servers = {kind: servers[kind] for kind in ("floor", "daemon")}  # fixed order
    rows: list[Row] = []
    own_affinity = os.sched_getaffinity(0)
    try:
        for pl in placements:
            os.sched_setaffinity(0, {pl.client_cpu})  # this process is the client
            _progress(f"  {pl.name}: {SEQ} + {CLIENT}")
            seq = run_sequential(servers, sizes)
            _progress(f"  {pl.name}: {PIPE}")
            pipe = run_pipelined(servers, sizes)
            _progress(f"  {pl.name}: {STREAM}")
            stream = run_streamed(servers, sizes)
            _progress(f"  {pl.name}: {TWO}")
            two = run_two_clients(servers, sizes, pl.client_cpu)
            for workload, series, per_latency, of in ((SEQ, seq, 1, "p50"),
                                                      (PIPE, pipe, BATCH, "ops/s"),
                                                      (STREAM, stream, BATCH, "ops/s"),
                                                      (TWO, two, 1, "p50")):
                floor = make_row(pl.name, workload, "floor", series["floor"], per_latency)
                daemon = make_row(pl.name, workload, "daemon", series["daemon"], per_latency)
                _compare(daemon, series["daemon"], floor, series["floor"], of)
                rows += [floor, daemon]
            floor_seq = next(r for r in rows if r.placement == pl.name and r.workload == SEQ)
            full = make_row(pl.name, CLIENT, "daemon", seq["client"], 1)
            _compare(full, seq["client"], floor_seq, seq["floor"], "p50")
            rows.append(full)
    finally:
        os.sched_setaffinity(0, own_affinity)
    return rows


def _find(rows: list[Row], placement: str, workload: str, server: str) -> Row:
    return next(r for r in rows
                if (r.placement, r.workload, r.server) == (placement, workload, server))


def evaluate_targets(rows: list[Row], placements: list[Placement]) -> list[dict]:
    targets = []
    for pl in placements:
        daemon = _find(rows, pl.name, SEQ, "daemon")
        floor = _find(rows, pl.name, SEQ, "floor")
        assert daemon.ratio is not None and daemon.ratio_rounds is not None
        lo, hi = daemon.ratio_rounds
        targets.append({
            "target": f"sequential ping p50 <= {TARGET_P50_RATIO}x floor (same placement)",
            "placement": pl.name,
            "measured": f"daemon {daemon.p50_us:.1f} us / floor {floor.p50_us:.1f} us "
                        f"= {daemon.ratio:.2f}x (rounds {lo:.2f}-{hi:.2f})",
            "value": daemon.ratio,
            "pass": daemon.ratio <= TARGET_P50_RATIO,
        })
    for workload in (PIPE, STREAM):
        for pl in placements:
            daemon = _find(rows, pl.name, workload, "daemon")
            floor = _find(rows, pl.name, workload, "floor")
            targets.append({
                "target": f"pipelined >= {TARGET_PIPELINED_OPS // 1000}k ops/s on one "
                          f"connection [{workload}]",
                "placement": pl.name,
                "measured": f"daemon {daemon.ops_per_s / 1000:.0f}k ops/s "
                            f"(floor {floor.ops_per_s / 1000:.0f}k ops/s with the same client)",
                "value": daemon.ops_per_s,
                "pass": daemon.ops_per_s >= TARGET_PIPELINED_OPS,
            })
    return targets


def _fmt_ratio(row: Row) -> str:
    if row.ratio is None or row.ratio_rounds is None:
        return ""
    label = "ops/s" if row.ratio_of == "ops/s" else "p50"
    if row.workload == CLIENT:
        label += " vs floor raw"
    lo, hi = row.ratio_rounds
    return f"{row.ratio:.2f}x {label} [{lo:.2f}-{hi:.2f}]"


def print_report(meta: dict, rows: list[Row], targets: list[dict]) -> None:
    v = meta["versions"]
    print(f"llm-sidecar roundtrip benchmark  ({'quick' if meta['quick'] else 'default'} run)")
    print(f"host: nproc {meta['nproc']} (allowed CPUs {meta['allowed_cpus']}), "
          f"{meta['cpu_model']}, Linux {meta['kernel']}")
    print(f"{v['python']}, uvloop {v['uvloop']}, msgspec {v['msgspec']}, "
          f"llm-sidecar {v['llm-sidecar']}")
    s = meta["sizes"]
    print(f"sequential: {s['seq']} pings after {s['seq_warmup']} warmup (per client process "
          f"in '{TWO}'); pipelined: {s['batches']} batches of {BATCH} after "
          f"{s['batch_warmup']} warmup")
    print("placements: " + "; ".join(meta["placements"]))
    if meta["note"]:
        print(f"note: {meta['note']}")
    print(f"p50/p99 are per request, except pipelined/streamed: per batch of {BATCH}; ops/s = timed "
          "requests / wall time")
    print(f"floor and daemon (and sidecar.Client) alternate in {ROUNDS} interleaved rounds; "
          "[lo-hi] = range of the per-round ratio")
    print("srv cpu us/req = server process CPU time (user+system, /proc/PID/schedstat) per "
          "timed request")
    print()
    header = (f"{'placement':<10} {'workload':<34} {'server':<7} {'p50 us':>9} "
              f"{'p99 us':>9} {'ops/s':>10} {'srv cpu us/req':>14}  daemon/floor")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and r.placement != last:
            print()
        last = r.placement
        cpu = "" if r.server_cpu_us is None else f"{r.server_cpu_us:.2f}"
        print(f"{r.placement:<10} {r.workload:<34} {r.server:<7} {r.p50_us:>9.1f} "
              f"{r.p99_us:>9.1f} {r.ops_per_s:>10,.0f} {cpu:>14}  {_fmt_ratio(r)}")
    print()
    print("targets (reported, not enforced):")
    for t in targets:
        verdict = "PASS" if t["pass"] else "MISS"
        print(f"  {verdict}  {t['target']} [{t['placement']}]: {t['measured']}")
    for kind, code in meta["server_exit"].items():
        if code not in (0, None):
            print(f"warning: {kind} server exited with code {code}")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):  # no /proc: fall back to platform
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def host_meta(quick: bool) -> dict:
    """What every benchmark report says about the machine it ran on."""
    return {
        "quick": quick,
        "nproc": os.cpu_count(),
        "allowed_cpus": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
    }


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    sizes = Sizes.pick(args.quick)
    placements, note = _placements()
    server_cpu = placements[0].server_cpu
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    workdir = tempfile.mkdtemp(prefix="sidecar-bench-")
    servers: dict[str, ServerProcess] = {}
    started = time.monotonic()
    try:
        daemon_sock = os.path.join(workdir, "daemon.sock")
        floor_sock = os.path.join(workdir, "floor.sock")
        servers["daemon"] = ServerProcess(
            "daemon", [sys.executable, "-m", "sidecar", "serve", "--socket", daemon_sock],
            daemon_sock, workdir, server_cpu)
        servers["floor"] = ServerProcess(
            "floor", [sys.executable, "-m", "bench.floor", floor_sock],
            floor_sock, workdir, server_cpu)
        for server in servers.values():
            server.wait_ready()
        _progress(f"servers up in {workdir} (pinned to cpu{server_cpu}); measuring:")
        rows = measure(servers, placements, sizes)
        targets = evaluate_targets(rows, placements)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    meta = {
        **host_meta(args.quick),
        "versions": _versions(),
        "sizes": asdict(sizes),
        "batch": BATCH,
        "placements": [pl.describe() for pl in placements],
        "note": note,
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
