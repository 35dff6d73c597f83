"""Command line of the benchmark package: ``python -m bench COMMAND [--quick] [--json]``.

Dispatches on a subcommand name with argparse; each subcommand lives in its own module and
exposes ``run(args) -> int``. Only wiring here. The ``__main__`` guard matters: the
``roundtrip`` workloads start client processes with the multiprocessing 'spawn' context,
which re-imports this module in each child.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="llm-sidecar benchmarks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sp = sub.add_parser("roundtrip", help="ping round trips: daemon vs. bare floor server, "
                        "same-cpu and cross-cpu placements")
    sp.add_argument("--quick", action="store_true", help="short run (fewer requests)")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("tokens", help="token counting: MB/s, tokens/s and per-call latency "
                        "against tiktoken and bpe-openai")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("stall", help="ping round trips while another connection's long "
                        "count (admit, begin) runs, against pings with nothing running")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("limits", help="limits engine admit+settle: daemon over the socket and "
                        "in-process, against the seed's Redis Lua and INCRBY+EXPIRE baselines")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("cache", help="response cache: exact hits over the socket, vector "
                        "search latency (exact vs HNSW, f32/f16/i8), recall@1, memory per "
                        "entry, build time; semantic quality on labelled pairs (--pairs)")
    sp.add_argument("--quick", action="store_true", help="short run (10k entries)")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp.add_argument("--sizes", help="comma-separated entry counts (default 10000,100000,1000000)")
    sp.add_argument("--dtypes", help="comma-separated HNSW dtypes (default f32,f16,i8)")
    sp.add_argument("--sections", help="comma-separated sections (default exact,search,quality)")
    sp.add_argument("--pairs", help="labelled question pairs (JSON lines a, b, label) for the "
                    "quality section; read in place, never copied")
    sp.add_argument("--audit", help="label audit for --pairs (default: audit_neg.jsonl beside it)")
    sp = sub.add_parser("guard", help="guarded call: begin (+end) over the socket for an exact "
                        "hit, a miss + admit, a miss with the semantic tier")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("cluster", help="cluster mode: admit against a standalone daemon and "
                        "a Redis Lua round trip per admit; 1 and 3 daemons; over-admission")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print all rows as JSON")
    sp = sub.add_parser("shm", help="shared-memory fast path against the socket: exact hits, "
                        "admits, contention on one limit, the OpenAI SDK direct and guarded")
    sp.add_argument("--quick", action="store_true", help="short run")
    sp.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "roundtrip":
            from . import roundtrip

            return roundtrip.run(args)
        if args.command == "tokens":
            from . import tokens

            return tokens.run(args)
        if args.command == "stall":
            from . import stall

            return stall.run(args)
        if args.command == "limits":
            from . import limits

            return limits.run(args)
        if args.command == "guard":
            from . import guard

            return guard.run(args)
        if args.command == "cluster":
            from . import cluster

            return cluster.run(args)
        if args.command == "cache":
            from . import cache

            return cache.run(args)
        if args.command == "shm":
            from . import shm

            return shm.run(args)
    except KeyboardInterrupt:
        print("interrupted (servers stopped, temporary files removed)", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
