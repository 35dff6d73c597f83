"""``python -m bench stall``: round trips while another connection's long count runs.

A count of a text past ``tokens.offload_chars`` runs on a worker thread; the issue's
target is that it never delays a concurrent ping beyond 5 ms. One run starts the daemon
(``python -m sidecar serve``, defaults with the semantic tier off so no model loads,
``LLM_SIDECAR_*`` dropped) and measures, for each placement, one connection's sequential
requests, a ping then a short count (~2,000 chars, o200k_base) in turn, framed by hand as
``bench.rawclient`` does: with nothing else running (the baseline) and while a second
client process sends, back to back, a long request on its own connection: a ``count``,
then an ``admit`` and a ``begin`` with the same text (each counts it too). The text is 3.8
MB of distinct random words (few piece-cache hits: a slow count), under the default 4 MiB
frame limit; a second count takes such words with accented letters (Latin-1 text, which
the daemon converts to UTF-8 before counting). For reference, the count with an unknown
encoding ("frame only"): the daemon reads and decodes the frame on its loop, then refuses
it at once, so its row is what receiving such a frame costs the other clients, without any
counting. A round trip counts as "during" when it was sent while a long request was in
flight (after it was sent, before its reply arrived; both processes read CLOCK_MONOTONIC),
however late it was answered: one held up until the long request ends counts. Baseline and
loaded phases alternate in interleaved rounds so host-speed drift hits them alike.
Placements: "same-cpu" (every daemon thread and both clients on one CPU), "cross-cpu"
(daemon on one CPU, clients on another) and "unpinned" (the scheduler's choice). It prints
a table (or ``--json``) and the target as PASS/MISS, never as an exit code. Servers and
the client process are stopped and the temporary directory removed on every exit path.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass

import msgspec

from sidecar.wire.framing import FrameReader
from sidecar.wire import REPLY_DECODER, CountReply, Error, Pong

from .roundtrip import ROUNDS, ServerProcess, _raise_on_sigterm, _versions, host_meta, percentile

TARGET_MAX_MS = 5.0
ASCII = "abcdefghijklmnopqrstuvwxyz"
ACCENTED = ASCII + "éèàöüçñ"  # Latin-1: the daemon converts such text to UTF-8 to count it
LONG_BYTES = 3_800_000  # under the default 4 MiB frame limit
#: load name -> (op, letters, extra fields, requests per loaded round (x the size's))
LOADS = {
    "count": ("count", ASCII, {"encoding": "o200k_base"}, 1),
    "count, accented": ("count", ACCENTED, {"encoding": "o200k_base"}, 1),
    "admit": ("admit", ASCII, {"model": "gpt-4o", "user": "b"}, 1),
    "begin": ("begin", ASCII, {"model": "gpt-4o", "user": "b"}, 1),
    "frame only": ("count", ASCII, {"encoding": "unknown"}, 20),  # refused once decoded
}
SHORT_CHARS = 2000
CONFIG = "[cache.semantic]\nenabled = false\n"
PING, COUNT = 0, 1  # what a probe round trip was


@dataclass(frozen=True)
class Sizes:
    rounds: int
    baseline_pairs: int  # ping + short count pairs per baseline round
    long_requests: int  # per loaded round

    @classmethod
    def pick(cls, quick: bool) -> Sizes:
        return cls(3, 1000, 1) if quick else cls(ROUNDS, 2000, 2)


@dataclass
class Stats:
    n: int
    p50_us: float
    p99_us: float
    max_us: float

    @classmethod
    def of(cls, ns: list[int]) -> Stats:
        xs = sorted(ns) or [0]
        return cls(len(ns), percentile(xs, 0.50), percentile(xs, 0.99), xs[-1] / 1000)


@dataclass
class Row:
    placement: str
    load: str  # "none" (the baseline) or the long op running meanwhile
    ping: Stats
    count: Stats  # the short count
    long_requests: int = 0
    long_p50_ms: float | None = None  # send to reply of the long request


def words(size: int, seed: int = 20261123, letters: str = ASCII) -> str:
    """Distinct random words (seeded) up to ``size`` UTF-8 bytes: nearly every piece
    misses the piece cache."""
    rng = random.Random(seed)
    out = []
    total = 0
    while total < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 12)))
        out.append(word)
        total += len(word.encode()) + 1
    return " ".join(out)


def _frame(encoder: msgspec.msgpack.Encoder, fields: dict) -> bytes:
    body = encoder.encode(fields)
    return len(body).to_bytes(4, "big") + body


class Prober:
    """One connection sending a ping, then a short count, one at a time: every round trip
    as (kind, sent, answered) in perf_counter_ns. Frames are encoded once, up front."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = FrameReader()
        encoder = msgspec.msgpack.Encoder()
        self.frames = (_frame(encoder, {"op": "ping", "id": 1}),
                       _frame(encoder, {"op": "count", "id": 2, "text": words(SHORT_CHARS, 7),
                                        "encoding": "o200k_base"}))

    def close(self) -> None:
        self.sock.close()

    def pair(self, out: list[tuple[int, int, int]]) -> None:
        sock, clock = self.sock, time.perf_counter_ns
        for kind, want in ((PING, Pong), (COUNT, CountReply)):
            t0 = clock()
            sock.sendall(self.frames[kind])
            got: list = []
            while not got:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the daemon closed the probe connection")
                got = self.reader.feed(data)
            t1 = clock()
            reply = REPLY_DECODER.decode(got[0])
            if type(reply) is not want or len(got) != 1:
                raise RuntimeError(f"unexpected reply {reply!r} to a {want.__name__} request")
            out.append((kind, t0, t1))


def _long_client(path: str, conn) -> None:
    """Child process: on ("run", op, n) sends n long requests back to back, one at a
    time, and answers with each one's (sent, answered) perf_counter_ns; ("pin", cpus)
    moves it; ("stop",) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        texts = {letters: words(LONG_BYTES, letters=letters) for letters in (ASCII, ACCENTED)}
        encoder = msgspec.msgpack.Encoder()
        frames = {load: _frame(encoder, {"op": op, "id": 1, "text": texts[letters], **fields})
                  for load, (op, letters, fields, _) in LOADS.items()}  # encoded once, up front
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        reader = FrameReader()
        conn.send(("ready", len(texts[ASCII])))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "pin":
                os.sched_setaffinity(0, command[1])
                conn.send(("pinned",))
                continue
            _, load, n = command
            spans = []
            for _ in range(n):
                t0 = time.perf_counter_ns()
                sock.sendall(frames[load])
                got: list = []
                while not got:
                    data = sock.recv(1 << 16)
                    if not data:
                        raise ConnectionError("the daemon closed the long request's connection")
                    got = reader.feed(data)
                t1 = time.perf_counter_ns()
                reply = REPLY_DECODER.decode(got[0])
                if (type(reply) is Error) != (load == "frame only"):
                    raise RuntimeError(f"long request ({load}) answered {reply!r}")
                spans.append((t0, t1))
            conn.send(("done", spans))
        sock.close()
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _expect(conn, what: str, timeout: float = 300.0):
    if not conn.poll(timeout):
        raise RuntimeError(f"the long-request client did not report {what} within {timeout:g} s")
    message = conn.recv()
    if message[0] == "error":
        raise RuntimeError("the long-request client failed:\n" + message[1])
    if message[0] != what:
        raise RuntimeError(f"the long-request client said {message[0]!r}, wanted {what!r}")
    return message


def _during(prober: Prober, conn, load: str, n: int) -> tuple[list, list[int]]:
    """Probe until the child reports its ``n`` long requests done; returns the round
    trips sent while one of them was in flight, and the long requests' durations."""
    stamps: list[tuple[int, int, int]] = []
    conn.send(("run", load, n))
    while not conn.poll():
        prober.pair(stamps)
    spans = _expect(conn, "done")[1]
    inside = [(k, s, e) for k, s, e in stamps if any(a <= s < b for a, b in spans)]
    return inside, [b - a for a, b in spans]


def _row(placement: str, load: str, stamps: list, longs: list[int]) -> Row:
    longs = sorted(longs)
    return Row(placement, load, Stats.of([e - s for k, s, e in stamps if k == PING]),
               Stats.of([e - s for k, s, e in stamps if k == COUNT]), len(longs),
               longs[len(longs) // 2] / 1e6 if longs else None)


def _pin_all(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (the loop's and the count workers')."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:
            continue  # the thread ended meanwhile


def _cpus(cpus: set[int]) -> str:
    return "cpu" + ",".join(map(str, sorted(cpus)))


def measure(daemon: ServerProcess, conn, sizes: Sizes) -> tuple[list[Row], list[str]]:
    allowed = sorted(os.sched_getaffinity(0))
    first = allowed[0]
    placements: list[tuple[str, set[int], set[int]]] = [("same-cpu", {first}, {first})]
    if len(allowed) > 1:
        placements.append(("cross-cpu", {first}, {allowed[1]}))
    placements.append(("unpinned", set(allowed), set(allowed)))
    described = [f"{name} (daemon {_cpus(d)}, clients {_cpus(c)})" for name, d, c in placements]
    rows: list[Row] = []
    own = os.sched_getaffinity(0)
    prober = Prober(daemon.path)
    try:
        for name, daemon_cpus, client_cpus in placements:
            _pin_all(daemon.proc.pid, daemon_cpus)
            os.sched_setaffinity(0, client_cpus)
            conn.send(("pin", client_cpus))
            _expect(conn, "pinned")
            warm: list = []
            for _ in range(200):
                prober.pair(warm)
            base: list = []
            for load, (_, _, _, times) in LOADS.items():
                print(f"  {name}: round trips alone and during: {load}", file=sys.stderr,
                      flush=True)
                during: list = []
                longs: list[int] = []
                for r in range(sizes.rounds):
                    for phase in (("base", "load") if r % 2 == 0 else ("load", "base")):
                        if phase == "base":
                            for _ in range(sizes.baseline_pairs):
                                prober.pair(base)
                        else:
                            inside, spans = _during(prober, conn, load,
                                                    sizes.long_requests * times)
                            during += inside
                            longs += spans
                            _pin_all(daemon.proc.pid, daemon_cpus)  # a worker just started
                rows.append(_row(name, f"during: {load}", during, longs))
            rows.insert(len(rows) - len(LOADS), _row(name, "none (baseline)", base, []))
    finally:
        prober.close()
        os.sched_setaffinity(0, own)
    return rows, described


def print_report(meta: dict, rows: list[Row]) -> None:
    v = meta["versions"]
    print(f"llm-sidecar stall benchmark  ({'quick' if meta['quick'] else 'default'} run)")
    print(f"host: nproc {meta['nproc']} (allowed CPUs {meta['allowed_cpus']}), "
          f"{meta['cpu_model']}, Linux {meta['kernel']}")
    print(f"{v['python']}, uvloop {v['uvloop']}, msgspec {v['msgspec']}, "
          f"llm-sidecar {v['llm-sidecar']}")
    s = meta["sizes"]
    print(f"long request: {meta['text_chars']:,} chars of distinct words (count, admit or "
          f"begin, model gpt-4o; 'accented': {LONG_BYTES:,} UTF-8 bytes), back to back, "
          f"{s['long_requests']} per loaded round ('frame only': x20); {s['rounds']} rounds "
          f"per load, baseline {s['baseline_pairs']} pairs per round")
    print(f"probe: one connection, a ping then a count of {SHORT_CHARS:,} chars in turn; "
          "'during' = sent while a long request was in flight, however late answered")
    print("placements: " + "; ".join(meta["placements"]))
    print()
    header = (f"{'placement':<10} {'load':<22} {'pings':>6} {'ping p50/p99/max us':>25} "
              f"{'short count p50/p99/max us':>28} {'long ms p50':>12}")
    print(header)
    print("-" * len(header))
    last = None
    for r in rows:
        if last is not None and r.placement != last:
            print()
        last = r.placement
        long_ms = "" if r.long_p50_ms is None else f"{r.long_p50_ms:.0f} (x{r.long_requests})"
        ping = f"{r.ping.p50_us:.1f} / {r.ping.p99_us:.1f} / {r.ping.max_us:.0f}"
        count = f"{r.count.p50_us:.1f} / {r.count.p99_us:.1f} / {r.count.max_us:.0f}"
        print(f"{r.placement:<10} {r.load:<22} {r.ping.n:>6} {ping:>25} {count:>28} "
              f"{long_ms:>12}")
    print()
    print("targets (reported, not enforced):")
    for r in rows:
        if not r.load.startswith("during"):
            continue
        base = next(b for b in rows if b.placement == r.placement and b.load.startswith("none"))
        worst = max(r.ping.max_us, r.count.max_us) / 1000
        line = (f"max round trip <= {TARGET_MAX_MS:g} ms {r.load} [{r.placement}]: ping "
                f"{r.ping.max_us / 1000:.2f} ms, short count {r.count.max_us / 1000:.2f} ms "
                f"(baseline {base.ping.max_us / 1000:.2f} / {base.count.max_us / 1000:.2f} ms)")
        if r.load == "during: frame only":
            print(f"  ref   {line}")  # what the frame alone costs: no target of its own
        else:
            print(f"  {'PASS' if r.ping.n and worst <= TARGET_MAX_MS else 'MISS'}  {line}")


def run(args: argparse.Namespace) -> int:
    sizes = Sizes.pick(args.quick)
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    workdir = tempfile.mkdtemp(prefix="sidecar-bench-stall-")
    daemon = None
    child = None
    parent_end = None
    started = time.monotonic()
    try:
        path = os.path.join(workdir, "daemon.sock")
        config = os.path.join(workdir, "sidecar.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        daemon = ServerProcess("daemon", [sys.executable, "-m", "sidecar", "serve", "--socket",
                                          path, "--config", config], path, workdir,
                               min(os.sched_getaffinity(0)))
        daemon.wait_ready()
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        child = ctx.Process(target=_long_client, args=(path, child_end), daemon=True)
        child.start()
        child_end.close()
        text_chars = _expect(parent_end, "ready")[1]
        print(f"daemon up in {workdir}; measuring:", file=sys.stderr, flush=True)
        rows, placements = measure(daemon, parent_end, sizes)
        parent_end.send(("stop",))
    finally:
        if child is not None:
            child.join(10)
            if child.is_alive():
                child.terminate()
                child.join(5)
        if parent_end is not None:
            parent_end.close()
        if daemon is not None:
            daemon.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous_sigterm)
    meta = {
        **host_meta(args.quick),
        "versions": _versions(),
        "sizes": asdict(sizes),
        "text_chars": text_chars,
        "placements": placements,
        "daemon_exit": daemon.returncode,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if args.json:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, sys.stdout, indent=2)
        print()
    else:
        print_report(meta, rows)
    return 0
