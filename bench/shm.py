"""``python -m bench shm --json``: the shared-memory fast path against the socket, one run.

One daemon (``python -m sidecar serve``, shipped defaults plus one requests limit for the
contention rows) pinned to the first allowed CPU; this process, the client, pinned to the
same CPU ("same-cpu", where a socket round trip is cheapest on these VMs) and then to the
second ("cross-cpu"). The JSON's top-level figures are the same-cpu ones; ``cross_cpu``
holds the others. Every figure comes from this one run:

* ``exact_hit_shm_p50_us``: ``Client.cache_get(model=, text=)`` answered from the segment
  (a 1 KB answer), the whole call as an app makes it: the request struct, the key computed
  in process, the seqlock read, the reply; ``exact_hit_shm_begin_p50_us`` the same for
  ``Client.begin`` (more fields to check);
* ``exact_hit_socket_p50_us``: the same call with ``Client(shared_memory=False)``;
* ``admit_shm_p50_us``: ``Client.admit(user=, model=, input_tokens=)`` taken from an
  admission slice (the slice renewals, a round trip every 64 calls, are in the
  distribution: see ``admit_shm_p99_us``); ``admit_socket_p50_us`` the same call with
  ``Client(shared_memory=False)``; the leases are released in batches, untimed;
* ``contention``: 4 client processes make 40,000 admit attempts in all for one user whose
  limit is 1,000 requests a minute: ``admitted`` must be 1,000 or just under, never more,
  through slices (``shm``) and through the socket (``socket``);
* ``sdk_direct_p50_us``, ``sdk_guarded_miss_p50_us``, ``sdk_guarded_hit_p50_us``: the
  OpenAI SDK against the tests' local stub server (``tests/stub_llm.py``), directly and
  through ``guard_openai``: every miss a new question (interleaved with direct calls), every
  hit a question answered before; ``sdk_guarded_hit_http_requests`` counts the requests the
  stub got during the hits (0 is the target).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import sidecar
from sidecar.wire import Release

from .guard import _daemon, _timed, sdk_asker
from .roundtrip import REPO_ROOT, _placements, host_meta, percentile, pin_process

LIMIT = 1_000
PROCESSES = 4
ATTEMPTS = 40_000
CONFIG = f"""
[[limits.rules]]
name = "bench-per-user"
scope = "user"
metric = "requests"
window = "60s"
amount = {LIMIT}
"""  # the contention processes share one user; the admit rows use a user per round


def _p50(xs: list[int]) -> float:
    xs.sort()
    return round(percentile(xs, 0.5), 2)


def _contender(path: str, attempts: int, cpu: int, user: str, shared: bool, start,
               out) -> None:
    os.sched_setaffinity(0, {cpu})
    admitted = 0
    with sidecar.Client(path, shared_memory=shared) as c:
        start.wait()
        for _ in range(attempts):
            a = c.admit(user=user, input_tokens=1)
            if a.allowed:
                admitted += 1
                c.settle(a.lease, input_tokens=1)
    out.put(admitted)


def _contention(path: str, cpus: list[int], shared: bool) -> dict:
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    user = f"contention-{'shm' if shared else 'socket'}"
    procs = [ctx.Process(target=_contender, args=(path, ATTEMPTS // PROCESSES,
                                                  cpus[i % len(cpus)], user, shared, start,
                                                  out))
             for i in range(PROCESSES)]
    for p in procs:
        p.start()
    t0 = time.perf_counter()
    start.set()
    admitted = sum(out.get(timeout=600) for _ in procs)
    seconds = time.perf_counter() - t0
    for p in procs:
        p.join(30)
    return {"processes": PROCESSES, "attempts": ATTEMPTS, "limit": LIMIT,
            "admitted": admitted, "seconds": round(seconds, 2)}


def _sdk(path: str, calls: int, rounds: int) -> dict:
    import openai

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from stub_llm import StubLLM

    from sidecar.integrations import guard_openai

    counter = [0]
    ask = lambda client, fresh: sdk_asker(client, counter, fresh)  # noqa: E731

    with StubLLM(reply="stub answer") as stub, \
            openai.OpenAI(base_url=stub.openai_base_url, api_key="sk-bench",
                          max_retries=0) as sdk, sidecar.Client(path) as side:
        guarded = guard_openai(sdk, side, user="bench-warm", model="gpt-4o")
        ask(sdk, True)(0)
        ask(guarded, True)(0)  # warm both paths
        series: dict[str, list[int]] = {"direct": [], "miss": [], "hit": []}
        for r in range(rounds):  # a user per round: each stays under the per-user limit
            guarded = guard_openai(sdk, side, user=f"bench{r}", model="gpt-4o")
            series["direct"] += _timed(ask(sdk, True), calls // rounds)
            series["miss"] += _timed(ask(guarded, True), calls // rounds)
        ask(guarded, True)(0)  # a question the guard has stored the answer of
        before = len(stub.requests)
        series["hit"] = _timed(ask(guarded, False), calls)
        http = len(stub.requests) - before
    return {"sdk_direct_p50_us": _p50(series["direct"]),
            "sdk_guarded_miss_p50_us": _p50(series["miss"]),
            "sdk_guarded_hit_p50_us": _p50(series["hit"]),
            "sdk_guarded_hit_http_requests": http}


def _socket_and_shm(path: str, calls: int, rounds: int) -> dict:
    q = dict(model="gpt-4o", text="Please summarise the quarterly report in one line.")
    with sidecar.Client(path) as shm, sidecar.Client(path, shared_memory=False) as sock:
        sock.cache_put("a" * 1000, **q)
        assert shm.cache_get(**q).hit and shm.fast.hits == 1, "no segment to read"
        series: dict[str, list[int]] = {}
        for r in range(rounds):
            for name, fn in (("exact_hit_shm_p50_us", lambda i: shm.cache_get(**q)),
                             ("exact_hit_shm_begin_p50_us", lambda i: shm.begin(user="u", **q)),
                             ("exact_hit_socket_p50_us", lambda i: sock.cache_get(**q))):
                series.setdefault(name, []).extend(_timed(fn, calls // rounds))
            for name, client in (("admit_shm_p50_us", shm), ("admit_socket_p50_us", sock)):
                series.setdefault(name, []).extend(_admits(client, sock, f"{name}{r}",
                                                           calls // rounds // 5))
        assert shm.fast.fallbacks == 0
    out = {name: _p50(xs) for name, xs in series.items()}
    out["admit_shm_p99_us"] = round(percentile(sorted(series["admit_shm_p50_us"]), 0.99), 2)
    return out


def _admits(client: sidecar.Client, sock: sidecar.Client, user: str, n: int) -> list[int]:
    """Times of ``n`` admits through ``client``, their leases released (untimed) by 500."""
    clock = time.perf_counter_ns
    out: list[int] = []
    while len(out) < n:
        leases = []
        for _ in range(min(500, n - len(out))):
            t0 = clock()
            a = client.admit(user=user, model="gpt-4o", input_tokens=40)
            out.append(clock() - t0)
            assert a.allowed, a
            leases.append(a.lease)
        sock.batch([Release(lease=lease) for lease in leases])
    return out


def run(args: argparse.Namespace) -> int:
    calls = 5_000 if args.quick else 50_000
    sdk_calls = 500 if args.quick else 2_000
    rounds = 5 if args.quick else 10
    placements, skipped = _placements()
    same = placements[0]
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-shm-") as workdir:
        daemon = _daemon(workdir, "shm", CONFIG, same.server_cpu)
        try:
            daemon.wait_ready()
            pin_process(daemon.proc.pid, daemon.cpu)
            own = os.sched_getaffinity(0)
            by_placement = {}
            for pl in placements:
                os.sched_setaffinity(0, {pl.client_cpu})
                try:
                    by_placement[pl.name] = _socket_and_shm(daemon.path, calls, rounds)
                finally:
                    os.sched_setaffinity(0, own)
            result.update(by_placement["same-cpu"])
            result["contention"] = {"shm": _contention(daemon.path, sorted(own), True),
                                    "socket": _contention(daemon.path, sorted(own), False)}
            try:
                import openai  # noqa: F401
            except ImportError:
                skipped += "; openai not installed: SDK rows not measured"
            else:
                os.sched_setaffinity(0, {same.client_cpu})
                try:
                    result.update(_sdk(daemon.path, sdk_calls, rounds))
                finally:
                    os.sched_setaffinity(0, own)
            result["cross_cpu"] = by_placement.get("cross-cpu")
        finally:
            daemon.proc.terminate()
            daemon.proc.wait(30)
    hit_ratio = result["exact_hit_socket_p50_us"] / result["exact_hit_shm_p50_us"]
    result["exact_hit_speedup"] = round(hit_ratio, 1)
    if "sdk_direct_p50_us" in result:
        result["sdk_guarded_miss_overhead_us"] = round(
            result["sdk_guarded_miss_p50_us"] - result["sdk_direct_p50_us"], 1)
    result["placement"] = (
        f"daemon pinned to cpu{same.server_cpu}; client (this process) on cpu"
        f"{same.client_cpu} for the top-level figures (same-cpu), on cpu"
        f"{placements[-1].client_cpu} for cross_cpu; contention clients spread over "
        f"cpus {sorted(os.sched_getaffinity(0))}")
    result["admit_speedup"] = round(result["admit_socket_p50_us"] / result["admit_shm_p50_us"],
                                    1)
    result["meta"] = {**host_meta(args.quick), "skipped": skipped}
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0
