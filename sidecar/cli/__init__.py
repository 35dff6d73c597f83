"""Command line: ``llm-sidecar serve | ping | stats [--watch] | costs | metrics |
fingerprint | count | limits | config check | version``.

Wiring only (``render`` lays the replies out): every number comes from the daemon
(``stats``, ``costs``, ``metrics`` ops) or, for ``count``, from the tokenizer in this
process. Exit codes: 0 ok, 1 daemon unreachable, 2 usage or config error.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Sequence

import msgspec

from ..version import __version__
from .. import config as config_mod
from ..errors import (
    BadRequest, ConfigError, DaemonStartError, SidecarError, SidecarTimeout,
    SidecarUnavailable,
)
from .render import utc, render_costs, render_limits, render_stats

if TYPE_CHECKING:
    from ..client.sync import Client

EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE = 0, 1, 2

#: ``stats --watch``: the default and the smallest refresh interval, seconds
WATCH_INTERVAL, WATCH_MIN_INTERVAL = 2.0, 0.2
#: what ``--since`` / ``--until`` accept, for help and error messages
WHEN_FORMS = ("today, yesterday, a duration back from now (30m, 6h, 7d), an ISO date "
              "(2026-11-20, UTC midnight), an ISO date and time (2026-11-20T08:00, UTC "
              "unless it has an offset such as +01:00 or Z), or epoch seconds (1795000000)")


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


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_EPOCH = re.compile(r"\d{10,}(?:\.\d+)?")  # 2001 on: a bare "7" is a missing unit
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str, now: float) -> float | None:
    """The epoch seconds a ``--since`` / ``--until`` WHEN names, ``now`` being the current
    epoch time. ``today`` is None: the daemon's own default (for ``since`` the start of
    today in its limits' zone, which this process cannot know; for ``until``, now).
    ``yesterday`` is UTC midnight a day before today's, as an ISO date is UTC midnight;
    durations (``30m``, ``6h``, ``7d``, ``90s``) count back from ``now``; an ISO date and
    time without an offset is UTC, so the answer never depends on this host's zone.
    Raises ``argparse.ArgumentTypeError`` naming the accepted forms."""
    value = text.strip().lower()
    if value == "today":
        return None
    if value == "yesterday":
        midnight = dt.datetime.fromtimestamp(now, dt.timezone.utc).replace(
            hour=0, minute=0, second=0, microsecond=0)
        return (midnight - dt.timedelta(days=1)).timestamp()
    if m := _DURATION.fullmatch(value):
        return now - float(m[1]) * _UNIT_S[m[2]]
    if _EPOCH.fullmatch(value):
        return float(value)
    # fromisoformat also takes compact and week dates; only the documented forms are let
    # through, so a typo such as "2026-1120" is refused rather than read as something else.
    if _DATE.fullmatch(value) or (_DATE.match(value) and value[10:11] in ("t", " ")):
        try:
            when = dt.datetime.fromisoformat(value.upper())
        except ValueError:
            raise _when_error(text) from None  # ours names every accepted form
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return when.timestamp()
    raise _when_error(text)


def _when_error(text: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"cannot read {text!r} as a time; use {WHEN_FORMS}")


def _interval(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds >= WATCH_MIN_INTERVAL):
        raise argparse.ArgumentTypeError(
            f"{text!r}: the interval is seconds, at least {WATCH_MIN_INTERVAL:g}")
    return seconds


def _positive(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least 1")
    return int(text)


def _parser(now: float) -> argparse.ArgumentParser:
    """The argument parser; ``now`` (epoch seconds) anchors relative WHENs."""
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

    sp = sub.add_parser(
        "stats", help="the operator's dashboard: daemon, ops, limits, caches, circuits, "
        "spend today, latency, alerts, build",
        description="Print the daemon's statistics, one section per concern. --json prints "
        "the stats reply as is; its fields are only ever added, never renamed or removed, "
        "so scripts may rely on the ones they read.")
    client_args(sp)
    sp.add_argument("--json", action="store_true",
                    help="the stats reply as JSON (fields are only ever added); with "
                    "--watch one document per line")
    sp.add_argument("--watch", action="store_true",
                    help="refresh every --interval seconds until Ctrl-C (or --count frames); "
                    "exits 1 when no frame reached the daemon, else 0")
    sp.add_argument("--interval", type=_interval, default=None, metavar="SECONDS",
                    help=f"with --watch: seconds between frames (default {WATCH_INTERVAL:g}, "
                    f"at least {WATCH_MIN_INTERVAL:g})")
    sp.add_argument("--count", type=_positive, default=None, metavar="N",
                    help="with --watch: stop after N frames (default: until Ctrl-C)")
    sp.set_defaults(command_parser=sp)  # to report misuse under this command's usage

    sp = sub.add_parser(
        "costs", help="spend, tokens and cache savings by model, user or route",
        description=f"Spend since --since until --until. WHEN is {WHEN_FORMS}. Periods "
        "are counted by the hour that holds --since.")
    client_args(sp)
    sp.add_argument("--since", type=lambda text: parse_when(text, now), default=None,
                    metavar="WHEN", help="default: the start of today in the daemon's "
                    "limits.timezone")
    sp.add_argument("--until", type=lambda text: parse_when(text, now), default=None,
                    metavar="WHEN", help="default: now")
    sp.add_argument("--by", choices=("model", "user", "route"), default="model",
                    help="group by (default model)")
    sp.add_argument("--top", type=_positive, default=10, metavar="N",
                    help="groups to list, by spend (default 10)")
    sp.add_argument("--per", choices=("day", "hour"), default="day",
                    help="the period of the series table (default day)")
    sp.add_argument("--json", action="store_true", help="the costs reply as JSON")

    sp = sub.add_parser("metrics", help="every metric in the Prometheus text format")
    client_args(sp)

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
    from ..daemon import service as daemon

    cfg = config_mod.load(args.config)
    setup_logging(args.log_level or cfg.log.level, args.log_format or cfg.log.format)
    inherited = None if args.socket else config_mod.inherited_listen_fd()
    path = None if inherited is not None else config_mod.server_socket_path(cfg, args.socket)
    return daemon.run(cfg, path, args.config)


def _count(args: argparse.Namespace) -> int:
    from ..text.tokens import Tokenizer

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




def _unreachable(exc: SidecarError) -> str:
    if isinstance(exc, SidecarUnavailable):
        return f"daemon unreachable: {exc.path}: {exc.reason}"
    return f"daemon unreachable: {exc}"


def _watch_stats(client: Client, args: argparse.Namespace) -> int:
    """Frames of ``stats`` every interval until Ctrl-C or ``--count`` frames.

    A frame that cannot reach the daemon shows why and the next interval tries again;
    the full error (with its hint) goes to stderr once per outage. In JSON mode stdout
    carries only stats documents, one per line, so a failed frame prints nothing there.
    Exits 0 when at least one frame reached the daemon, else 1."""
    interval = args.interval or WATCH_INTERVAL
    tty = sys.stdout.isatty()
    frames = reached = 0
    outage: str | None = None  # the error already reported on stderr
    error: SidecarError | None = None
    start = time.monotonic()
    try:
        while True:
            try:
                stats, error = client.stats(), None
            except SidecarError as exc:
                stats, error = None, exc
            if error is None:
                reached += 1
                outage = None
            elif outage != str(error):
                outage = str(error)
                print(f"llm-sidecar: {error} (retrying every {interval:g} s)",
                      file=sys.stderr, flush=True)
            if args.json:
                if stats is not None:
                    print(json.dumps(msgspec.to_builtins(stats)), flush=True)
            else:
                body = _unreachable(error) if error is not None else render_stats(stats)
                header = (f"llm-sidecar stats at {utc(time.time(), '%H:%M:%S')} UTC, "
                          f"every {interval:g} s (Ctrl-C quits)")
                clear = "\x1b[H\x1b[2J" if tty else ("\n" if frames else "")
                sys.stdout.write(f"{clear}{header}\n\n{body}\n")
                sys.stdout.flush()
            frames += 1
            if args.count is not None and frames >= args.count:
                break
            # Ticks on a fixed schedule so frames do not drift by the time each one takes;
            # a frame slower than the interval starts the next one at once.
            time.sleep(max(0.0, start + frames * interval - time.monotonic()))
    except KeyboardInterrupt:
        # Ctrl-C is how a watch ends: the exit code says whether the daemon was seen.
        if tty:
            sys.stdout.write("\n")
    except BrokenPipeError:
        # The reader left (``| head``): point stdout at /dev/null so the interpreter's
        # flush at exit does not fail a second time with a traceback.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_OK if reached else EXIT_UNREACHABLE


def _client_command(args: argparse.Namespace) -> int:
    from ..client.sync import Client

    with Client(args.socket, timeout=args.timeout) as client:
        if args.command == "ping":
            for _ in range(max(1, args.count)):
                print(f"{client.ping() * 1e6:.1f} us")
        elif args.command == "stats":
            if args.watch:
                return _watch_stats(client, args)
            stats = client.stats()
            if args.json:
                print(json.dumps(msgspec.to_builtins(stats), indent=2))
            else:
                print(render_stats(stats))
        elif args.command == "costs":
            reply = client.costs(since=args.since, until=args.until, by=args.by, top=args.top)
            if args.json:
                print(json.dumps(msgspec.to_builtins(reply), indent=2))
            else:
                print(render_costs(reply, args.per))
        elif args.command == "metrics":
            sys.stdout.write(client.metrics())
        elif args.command == "limits":
            reply = client.limits(args.user)
            if args.json:
                print(json.dumps(msgspec.to_builtins(reply), indent=2))
            else:
                print(render_limits(reply))
        elif args.command == "fingerprint":
            fp = client.fingerprint(args.text)
            if args.json:
                print(json.dumps({"normalized": fp.normalized, "key": fp.key.hex(),
                                  "spec": fp.spec}))
            else:
                print(f"{fp.key.hex()}  {fp.normalized}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(time.time())
    args = parser.parse_args(argv)
    if args.command == "stats" and not args.watch and (
            args.interval is not None or args.count is not None):
        args.command_parser.error("--interval and --count only apply with --watch")
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
    except (ConfigError, DaemonStartError, BadRequest) as exc:
        # BadRequest: the daemon refused what the command line asked (e.g. --top 20000)
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


