"""``python -m bench guard``: what the guarded call costs an app, over the socket.

One run starts three daemons (``python -m sidecar serve``, temporary state directory, one
per-user requests-per-minute limit too large to deny, no retry-loop guard; no budget of a
durable window, so an ``end`` never waits for the journal's fdatasync, which ``python -m
bench limits`` measures): one with the semantic cache tier off, one with it on
(all-MiniLM-L6-v2), and one with the semantic tier and the request log off. Every daemon
keeps its metrics and cost tracker (they cannot be turned off). ``sidecar.Client`` then
times, per call:

* (a) ``begin`` answered from the exact cache (the app makes no provider call and no
  ``end``);
* (b) ``begin`` + ``end`` of a cache miss with the semantic tier off: exact lookup, token
  count, route, admit; then settle, price, report the attempt, nothing stored;
* (b') the same with the request log off: (b) minus (b') is what writing one JSON line
  per request costs the app (the record is built and queued on the event loop, written
  by the log's thread);
* (c) the same miss with the semantic tier on (the scope holds entries, so every miss is
  embedded and searched: milliseconds, on the daemon's worker threads);
* ``ping`` for context: the bare round trip; (b) is two round trips;
* (d) an OpenAI SDK ``chat.completions.create`` through ``guard_openai`` against the same
  call made directly, both to the local stub server of the tests (``tests/stub_llm.py``,
  an HTTP/1.1 server in this process's threads), interleaved; every question distinct,
  so every guarded call misses the cache and reaches the stub: the difference is what
  the guard adds to a provider call. Skipped when ``openai`` is not installed.

Placements: daemon and client on one CPU ("same-cpu") and on two ("cross-cpu"), rounds
interleaved. Targets: (b) p50 <= 50 us [same-cpu]; (b) within 10% of (b') [same-cpu]; and,
in this process, what the accounting of one call costs (cost tracker, metrics, alert
checks, request log record built and queued: ``Accounting.ended``) against the in-daemon
p50 of begin + end. Reported PASS/MISS, never failing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import sidecar

from .roundtrip import (REPO_ROOT, ServerProcess, _placements, host_meta, percentile,
                        pin_process)

TARGET_MISS_US = 50.0
LIMITS = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "user-rpm"
scope = "user"
metric = "requests"
window = "60s"
amount = 1000000000
"""  # windows of a minute or less: an end is not held for a journal fdatasync (bench limits
# measures that cost)


def _question(i: int) -> str:
    return f"Please summarise ticket number {i} for the support team in one sentence."


def _timed(fn, n: int) -> list[int]:
    clock = time.perf_counter_ns
    out = []
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append(clock() - t0)
    return out


def _sdk_overhead(rows: list, sock: str, pl, calls: int, rounds: int) -> str:
    """(d): the OpenAI SDK through the guard against the SDK alone, same stub, same run."""
    try:
        import openai
    except ImportError:
        return "openai not installed: SDK overhead not measured (pip install -e '.[bench]')"
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from stub_llm import StubLLM

    from sidecar.integrations import guard_openai

    counter = [0]
    ask = lambda client: sdk_asker(client, counter)  # noqa: E731

    with StubLLM(reply="stub answer") as stub, \
            openai.OpenAI(base_url=stub.openai_base_url, api_key="sk-bench",
                          max_retries=0) as sdk, sidecar.Client(sock) as side:
        guarded = guard_openai(sdk, side, user="bench", model="gpt-4o")
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {pl.client_cpu})
        try:
            ask(sdk)(0)
            ask(guarded)(0)  # warm both paths
            series: dict[str, list[int]] = {}
            for _ in range(rounds):
                for name, client in (("(d) OpenAI SDK -> stub, direct", sdk),
                                     ("(d) OpenAI SDK -> stub, guarded", guarded)):
                    series.setdefault(name, []).extend(_timed(ask(client), calls // rounds))
        finally:
            os.sched_setaffinity(0, own)
    for name, xs in series.items():
        xs.sort()
        rows.append({"placement": pl.name, "workload": name, "calls": len(xs),
                     "p50_us": percentile(xs, 0.5), "p99_us": percentile(xs, 0.99)})
    return ""


def sdk_asker(client, counter: list[int], fresh: bool = True) -> callable:
    """A timed call of the OpenAI SDK's chat completion: a new question each time
    (``counter``), or the last one again (``fresh=False``)."""
    def go(i: int) -> None:
        if fresh:
            counter[0] += 1
        client.chat.completions.create(model="gpt-4o", max_tokens=20, messages=[
            {"role": "user", "content": f"Bench question number {counter[0]}?"}])
    return go


def _accounting_cost(calls: int) -> float:
    """p50 microseconds of ``Accounting.ended`` for a one-attempt call with a request log (writing
    to a temporary file on its thread), in this process: what the daemon's loop spends
    accounting a call (cost tracker, metrics, alert checks, the record queued)."""
    from sidecar.ledger.accounting import Accounting, Begun
    from sidecar.ledger.alerts import Alerts
    from sidecar.ledger.settings import AlertsConfig
    from sidecar.ledger import RequestLog
    from sidecar.ledger.costs import CostTracker
    from sidecar.ledger.metrics import Metrics
    from sidecar.wire import OPS, Attempt

    with tempfile.TemporaryDirectory(prefix="sidecar-bench-ledger-") as workdir:
        log = RequestLog(os.path.join(workdir, "requests.jsonl"), queue_max=1_000_000)
        acc = Accounting(CostTracker(), Metrics(OPS), Alerts(AlertsConfig()), log)
        attempts = [Attempt(model="gpt-4o", ok=True, latency=0.8)]
        now = time.time()
        clock = time.perf_counter_ns
        out = []
        try:
            for i in range(calls):
                begun = Begun(until=now + 300, began=now, user=f"user{i % 100}",
                              route="default", chain=("gpt-4o", "gpt-4o-mini"),
                              providers=("openai", "openai"), input_tokens=40,
                              request_id="", template="", template_version="")
                t0 = clock()
                acc.ended(now, lease=f"lease-{i}", begun=begun, user=begun.user,
                          route="default", model="gpt-4o", attempts=attempts,
                          input_tokens=40, output_tokens=40, cached_tokens=0,
                          reasoning_tokens=0, micro_usd=500, error=False)
                out.append(clock() - t0)
        finally:
            log.close()
    out.sort()
    return percentile(out, 0.5)


def _daemon(workdir: str, name: str, config: str, cpu: int) -> ServerProcess:
    path = os.path.join(workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(config)
    sock = os.path.join(workdir, f"{name}.sock")
    return ServerProcess(name, [sys.executable, "-m", "sidecar", "serve", "--socket", sock,
                                "--config", path], sock, workdir, cpu)


def run(args: argparse.Namespace) -> int:
    calls = 1_000 if args.quick else 5_000
    semantic_calls = 50 if args.quick else 300
    rounds = 5 if args.quick else 10
    placements, skipped = _placements()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-guard-") as workdir:
        plain = _daemon(workdir, "plain", LIMITS + "[cache.semantic]\nenabled = false\n",
                        placements[0].server_cpu)
        semantic = _daemon(workdir, "semantic", LIMITS, placements[0].server_cpu)
        unlogged = _daemon(workdir, "unlogged", LIMITS + "[cache.semantic]\nenabled = false\n"
                           "[ledger]\nrequest_log = \"off\"\n", placements[0].server_cpu)
        servers = (plain, semantic, unlogged)
        try:
            for server in servers:
                server.wait_ready()
            # over the socket, all of it (``python -m bench shm`` measures the segment)
            with sidecar.Client(plain.path, shared_memory=False) as c, \
                    sidecar.Client(semantic.path) as s, sidecar.Client(unlogged.path) as u:
                c.cache_put("stored answer", model="gpt-4o", text=_question(-1))
                s.cache_put("stored answer", model="gpt-4o", text=_question(-1),
                            kind="factual_qa")
                while s.stats().cache.semantic == "loading" or s.stats().cache.semantic_pending:
                    time.sleep(0.1)
                for server in servers:
                    pin_process(server.proc.pid, server.cpu)
                counter = [0]

                def hit(i: int) -> None:
                    b = c.begin(user="u", model="gpt-4o", text=_question(-1))
                    assert b.outcome == "hit", b

                def miss(client: sidecar.Client) -> callable:
                    def go(i: int) -> None:
                        counter[0] += 1
                        b = client.begin(user=f"user{counter[0] % 100}", model="gpt-4o",
                                         text=_question(counter[0]), max_tokens=100)
                        assert b.outcome == "go", b
                        client.end(b.lease, model="gpt-4o", input_tokens=b.input_tokens,
                                   output_tokens=40)
                    return go

                for pl in placements:
                    own = os.sched_getaffinity(0)
                    os.sched_setaffinity(0, {pl.client_cpu})
                    try:
                        series: dict[str, list[int]] = {}
                        for _ in range(rounds):
                            for name, fn, n in (("(a) begin, exact hit", hit, calls // rounds),
                                                ("(b) begin+end, miss + admit", miss(c),
                                                 calls // rounds),
                                                ("(b') the same, request log off", miss(u),
                                                 calls // rounds),
                                                ("ping", lambda i: c.ping(), calls // rounds)):
                                series.setdefault(name, []).extend(_timed(fn, n))
                        series["(c) begin+end, miss + semantic search"] = _timed(
                            miss(s), semantic_calls)
                    finally:
                        os.sched_setaffinity(0, own)
                    for name, xs in series.items():
                        xs.sort()
                        rows.append({"placement": pl.name, "workload": name, "calls": len(xs),
                                     "p50_us": percentile(xs, 0.5),
                                     "p99_us": percentile(xs, 0.99)})
                in_daemon = {op: c.stats().ops[op] for op in ("begin", "end")}
                logged = c.stats().request_log
                skipped_sdk = _sdk_overhead(rows, plain.path, placements[0], calls // 5, rounds)
        finally:
            for server in servers:
                server.proc.terminate()
                server.proc.wait(30)
    accounting_us = _accounting_cost(calls)
    same = {r["workload"]: r for r in rows if r["placement"] == "same-cpu"}
    b, ping = same["(b) begin+end, miss + admit"], same["ping"]
    unlogged_b = same["(b') the same, request log off"]
    pair_us = in_daemon["begin"].p50_us + in_daemon["end"].p50_us
    direct = same.get("(d) OpenAI SDK -> stub, direct")
    via = same.get("(d) OpenAI SDK -> stub, guarded")
    if direct and via:
        rows.append({"placement": "same-cpu", "workload": "(d) guard overhead per SDK call "
                     "(p50 difference)", "calls": via["calls"],
                     "p50_us": via["p50_us"] - direct["p50_us"],
                     "p99_us": via["p99_us"] - direct["p99_us"]})
    targets = [{"target": f"(b) begin+end miss p50 <= {TARGET_MISS_US:g} us [same-cpu]",
                "pass": b["p50_us"] <= TARGET_MISS_US,
                "measured": f"{b['p50_us']:.1f} us; floor: two round trips = 2 x ping "
                            f"{ping['p50_us']:.1f} us on this host; in-daemon begin p50 "
                            f"{in_daemon['begin'].p50_us:.1f} us, end p50 "
                            f"{in_daemon['end'].p50_us:.1f} us"},
               {"target": "(b) with the request log within 10% of (b') without [same-cpu]",
                "pass": b["p50_us"] <= 1.1 * unlogged_b["p50_us"],
                "measured": f"{b['p50_us']:.1f} us vs {unlogged_b['p50_us']:.1f} us "
                            f"({b['p50_us'] / unlogged_b['p50_us'] - 1:+.1%}); request log: "
                            f"{logged.written if logged else 0} written, "
                            f"{logged.dropped if logged else 0} dropped"},
               {"target": "accounting of one call (in process) within 10% of in-daemon "
                          "begin+end p50",
                "pass": accounting_us <= 0.1 * pair_us,
                "measured": f"{accounting_us:.2f} us per call vs begin+end "
                            f"{pair_us:.1f} us in the daemon "
                            f"({accounting_us / pair_us:.1%})"}]
    meta = {**host_meta(args.quick), "skipped": "; ".join(x for x in (skipped, skipped_sdk) if x)}
    if args.json:
        json.dump({"meta": meta, "rows": rows, "targets": targets}, sys.stdout, indent=2)
        print()
        return 0
    print(f"llm-sidecar guard benchmark ({'quick' if args.quick else 'default'} run)")
    print(f"host: {meta['cpu_model']}, {meta['nproc']} CPUs; daemons pinned to "
          f"cpu{placements[0].server_cpu}" + (f"; {skipped}" if skipped else ""))
    print(f"{'placement':<10} {'workload':<42} {'calls':>6} {'p50 us':>9} {'p99 us':>9}")
    for r in rows:
        print(f"{r['placement']:<10} {r['workload']:<42} {r['calls']:>6} {r['p50_us']:>9.1f} "
              f"{r['p99_us']:>9.1f}")
    print("targets (reported, not enforced):")
    for t in targets:
        print(f"  {'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['measured']}")
    return 0
