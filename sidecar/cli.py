"""Command line: ``llm-sidecar serve | ping | stats | fingerprint | count | config check |
version``.

Wiring only. Exit codes: 0 ok, 1 daemon unreachable, 2 usage or config error.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Sequence

import msgspec

from . import __version__
from . import config as config_mod
from .errors import (
    ConfigError, DaemonStartError, InvalidValue, SidecarError, SidecarTimeout,
    SidecarUnavailable,
)

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-sidecar", description="Host-local LLM traffic guard.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def client_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", help="daemon socket (default: $LLM_SIDECAR_SOCKET, "
                        "else /run/llm.sock, $XDG_RUNTIME_DIR/llm.sock, /tmp/llm-sidecar-<uid>)")
        sp.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")

    sp = sub.add_parser("serve", help="run the daemon in the foreground")
    sp.add_argument("--socket", help="socket path (overrides config and LLM_SIDECAR_SOCKET)")
    sp.add_argument("--config", help="TOML config file (default: $LLM_SIDECAR_CONFIG, else "
                    "embedded defaults)")
    sp.add_argument("--log-format", choices=("text", "json"), help="overrides log.format")
    sp.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    sp = sub.add_parser("ping", help="round trip to the daemon; prints microseconds")
    client_args(sp)
    sp.add_argument("-n", "--count", type=int, default=1, help="pings to send (default 1)")

    sp = sub.add_parser("stats", help="daemon statistics")
    client_args(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("fingerprint", help="normalised form and 128-bit key of TEXT")
    client_args(sp)
    sp.add_argument("text", metavar="TEXT")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("count", help="count tokens of FILE (or stdin), in this process")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--model", default="", help="model name (mapped to its encoding, "
                       "or estimated when it has no public tokenizer)")
    group.add_argument("--encoding", default="", help="o200k_base or cl100k_base")
    sp.add_argument("--special", action="store_true",
                    help="count special-token text (<|endoftext|>) as special tokens")
    sp.add_argument("--config", help="TOML config file (model map, estimate ratios)")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("file", metavar="FILE", nargs="?", default="-", help="default: stdin")

    sp = sub.add_parser("limits", help="current use of every limit (or of one user's)")
    client_args(sp)
    sp.add_argument("--user", help="only this user's keyed limits (and the shared ones)")
    sp.add_argument("--json", action="store_true")

    sp = sub.add_parser("config", help="configuration tools")
    csub = sp.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    cp = csub.add_parser("check", help="validate FILE (with the environment) and print it")
    cp.add_argument("file", metavar="FILE")

    sub.add_parser("version", help="print the version")
    return p


def _serve(args: argparse.Namespace) -> int:
    from . import daemon

    cfg = config_mod.load(args.config)
    setup_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    inherited = None if args.socket else config_mod.inherited_listen_fd()
    path = None if inherited is not None else config_mod.server_socket_path(cfg, args.socket)
    return daemon.run(cfg, path, args.config)


def _count(args: argparse.Namespace) -> int:
    from .tokens import Tokenizer

    cfg = config_mod.load(args.config)
    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read()
        except OSError as exc:
            print(f"llm-sidecar: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
            return EXIT_USAGE
    tokenizer = Tokenizer(cfg.tokens.models, cfg.tokens.estimate_ratios)
    result = tokenizer.count(text, model=args.model,
                             encoding=args.encoding or ("" if args.model else "o200k_base"),
                             special=args.special)
    if args.json:
        print(json.dumps(result._asdict()))
    else:
        print(result.input_tokens)
    return EXIT_OK


def _num(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.6f}".rstrip("0")


def _print_stats(stats: object) -> None:
    from .protocol import StatsReply

    assert isinstance(stats, StatsReply)
    print(f"llm-sidecar {stats.build.version}  pid {stats.pid}  socket {stats.socket}")
    print(f"uptime {stats.uptime_s:.1f} s  connections {stats.connections_now} now / "
          f"{stats.connections_total} total  requests {stats.requests_total}  "
          f"errors {stats.errors_total}  config epoch {stats.config_epoch}")
    print()
    print(f"{'op':<14}{'requests':>10}{'errors':>8}{'p50 us':>10}{'p99 us':>10}  error codes")
    for name, op in stats.ops.items():
        codes = ", ".join(f"{c}={n}" for c, n in op.errors.items())
        print(f"{name:<14}{op.requests:>10}{sum(op.errors.values()):>8}"
              f"{op.p50_us:>10.1f}{op.p99_us:>10.1f}  {codes}")
    if stats.limit_denials or stats.limit_alerts:
        print()
        print(f"open leases {stats.open_leases}; denials: "
              + (", ".join(f"{k}={v}" for k, v in stats.limit_denials.items()) or "none")
              + "; alerts: " + (", ".join(f"{k}={v}" for k, v in stats.limit_alerts.items())
                                or "none"))
    if stats.cache is not None:
        cache = stats.cache
        print()
        print(f"cache {'on' if cache.enabled else 'off'}: max {cache.max_entries:,} entries, "
              f"{cache.max_bytes:,} bytes; stores {cache.stores}, bypassed {cache.bypassed}; "
              f"snapshot {cache.snapshot}")
        print(f"semantic tier: {cache.semantic}, threshold {cache.threshold:g}, "
              f"{cache.semantic_pending} writes pending")
        print(f"{'tier':<10}{'entries':>9}{'bytes':>12}{'hits':>8}{'misses':>8}{'hit %':>7}"
              f"{'stale':>7}{'evicted':>9}{'expired':>9}{'refused':>9}")
        for name, t in cache.tiers.items():
            print(f"{name:<10}{t.entries:>9}{t.bytes:>12}{t.hits:>8}{t.misses:>8}"
                  f"{t.hit_rate_pct:>7.1f}{t.stale_serves:>7}{t.evictions:>9}"
                  f"{t.expirations:>9}{t.verifier_refusals:>9}")
        if cache.not_stored:
            print("not stored: " + ", ".join(f"{k}={v}" for k, v in cache.not_stored.items()))
    if stats.circuits:
        print()
        print("circuits: " + ", ".join(f"{m} {state}" for m, state in stats.circuits.items()))
    print()
    print(f"build: {stats.build.python}; protocol {stats.build.protocol}; "
          + ", ".join(f"{k} {v}" for k, v in stats.build.libraries.items()))
    for name, path in stats.build.native.items():
        print(f"native {name}: {path}")


def _client_command(args: argparse.Namespace) -> int:
    from .client import Client

    with Client(args.socket, timeout=args.timeout) as client:
        if args.command == "ping":
            for _ in range(max(1, args.count)):
                print(f"{client.ping() * 1e6:.1f} us")
        elif args.command == "stats":
            stats = client.stats()
            if args.json:
                print(json.dumps(msgspec.to_builtins(stats), indent=2))
            else:
                _print_stats(stats)
        elif args.command == "limits":
            reply = client.limits(args.user)
            if args.json:
                print(json.dumps(msgspec.to_builtins(reply), indent=2))
            else:
                print(f"{'limit':<22}{'scope':<8}{'key':<16}{'metric':<14}{'window':<12}"
                      f"{'used':>12}{'amount':>12}{'use':>7}")
                for row in reply.limits:
                    share = row.used / row.amount if row.amount else 0.0
                    mark = " (shadow)" if row.shadow else ""
                    print(f"{row.name:<22}{row.scope:<8}{row.key[:15]:<16}{row.metric:<14}"
                          f"{row.window:<12}{_num(row.used):>12}{_num(row.amount):>12}"
                          f"{share:>7.0%}{mark}")
                print(f"open leases: {reply.open_leases}")
        elif args.command == "fingerprint":
            fp = client.fingerprint(args.text)
            if args.json:
                print(json.dumps({"normalized": fp.normalized, "key": fp.key.hex(),
                                  "spec": fp.spec}))
            else:
                print(f"{fp.key.hex()}  {fp.normalized}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            print(f"llm-sidecar {__version__}")
            return EXIT_OK
        if args.command == "config":
            cfg = config_mod.load(args.file)
            print(f"{args.file}: ok")
            print(json.dumps(config_mod.dump(cfg), indent=2))
            return EXIT_OK
        if args.command == "serve":
            return _serve(args)
        if args.command == "count":
            return _count(args)
        return _client_command(args)
    except (ConfigError, DaemonStartError, InvalidValue) as exc:
        print(f"llm-sidecar: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SidecarUnavailable, SidecarTimeout) as exc:
        print(f"llm-sidecar: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except SidecarError as exc:
        print(f"llm-sidecar: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    sys.exit(main())


