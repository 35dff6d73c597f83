"""How the command line shows the daemon's replies: the ``stats`` dashboard, the ``costs``
report and the ``limits`` table, as plain-text sections of aligned columns. Text only:
nothing here talks to the daemon or reads the command line (``cli`` does both).
"""
from __future__ import annotations

import datetime as dt
import re
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from ..wire import CostsReply, CostTotals, LimitsReply, StatsReply

#: ``stats``: how many of the latest alerts the dashboard lists
LATEST_ALERTS = 5

# A cell that reads as a number: 1,234  12.5  $0.006300  88.2%  -3
_NUMERIC = re.compile(r"[-+]?\$?\d[\d,]*(?:\.\d+)?%?")
_INDENT = "  "


def _table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None) -> str:
    """``rows`` as aligned columns sized to their content, under ``header`` when given.

    A column whose cells all read as numbers is right-aligned (header too); others are
    left-aligned. Ints get thousands separators; other values are printed with ``str``,
    so callers format floats (USD, percentages) themselves. No rows: the line "none",
    so an empty section says so instead of showing a bare header."""
    body = [[f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)
             for v in row] for row in rows]
    if not body:
        return _INDENT + "none"
    lines = [list(header)] + body if header else body
    columns = len(lines[0])
    widths = [max(len(line[i]) for line in lines) for i in range(columns)]
    right = [all(_NUMERIC.fullmatch(row[i]) or not row[i] for row in body)
             and any(row[i] for row in body) for i in range(columns)]
    return "\n".join(
        (_INDENT + "  ".join(cell.rjust(w) if r else cell.ljust(w)
                             for cell, w, r in zip(line, widths, right))).rstrip()
        for line in lines)


def _usd(value: float) -> str:
    return f"${value:,.6f}"  # to the micro-dollar, the daemon's unit of account


def _pct(fraction: float) -> str:
    return f"{fraction * 100:.1f}%"


def _ms(value: float) -> str:
    return f"{value:,.1f}"


def utc(epoch: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime(fmt)


def _uptime(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    clock = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {clock}" if days else clock


def _pairs(values: dict[str, int]) -> str:
    return ", ".join(f"{k}={v:,}" for k, v in values.items())


def _totals_rows(t: CostTotals) -> list[tuple[str, str]]:
    """A ``CostTotals`` as label/value rows, shared by ``stats`` and ``costs``."""
    return [
        ("requests", f"{t.requests:,}"), ("errors", f"{t.errors:,}"),
        ("hits exact", f"{t.hits_exact:,}"), ("hits semantic", f"{t.hits_semantic:,}"),
        ("hit rate", _pct(t.hit_rate)), ("denials", f"{t.denials:,}"),
        ("tokens in", f"{t.input_tokens:,}"), ("tokens out", f"{t.output_tokens:,}"),
        ("tokens cached", f"{t.cached_tokens:,}"),
        ("tokens reasoning", f"{t.reasoning_tokens:,}"),
        ("USD", _usd(t.usd)), ("saved USD", _usd(t.saved_usd)),
        ("cost per request", _usd(t.cost_per_request)),
    ]


def _section(title: str, body: str) -> str:
    return f"== {title} ==\n{body}"


def _render_cluster(stats: StatsReply) -> str:
    c = stats.cluster
    if c is None:
        return _INDENT + "standalone (no cluster.redis_url)"
    since = utc(c.degraded_since) + " UTC" if c.degraded_since else "start"
    state = f"DEGRADED since {since}: {c.reason}" if c.degraded else "ok"
    return _table([
        ("redis", c.redis), ("name", c.name), ("daemon", c.daemon), ("state", state),
        ("live daemons", f"{c.live_daemons:,}"), ("shared limits", f"{c.shared_limits:,}"),
        ("leases open", f"{c.leases_open:,}"),
        ("pending", f"{c.pending_adjustments:,} adjustments"),
        ("lease requests", f"{c.acquires:,} ({c.grants:,} granted, {c.refusals:,} refused)"),
        ("transitions", f"{c.transitions:,}"),
    ])


def render_stats(stats: StatsReply) -> str:
    """The dashboard: one headed section per concern, tables aligned, build last."""
    log = stats.request_log
    log_line = "off" if log is None else (
        f"{log.path} (written {log.written:,}, dropped {log.dropped:,}, failed "
        f"{log.failed:,}, rotations {log.rotations:,})" + (f"; {log.error}" if log.error else ""))
    daemon = _table([
        ("version", stats.build.version), ("pid", str(stats.pid)), ("socket", stats.socket),
        ("uptime", _uptime(stats.uptime_s)),
        ("connections", f"{stats.connections_now:,} now, {stats.connections_total:,} total"
         + (f"; closed {_pairs(stats.connections_closed)}" if stats.connections_closed else "")),
        ("requests", f"{stats.requests_total:,}"), ("errors", f"{stats.errors_total:,}"),
        ("config epoch", str(stats.config_epoch)), ("request log", log_line),
        ("task failures", _pairs(dict(sorted(stats.task_failures.items()))) or "none"),
    ])
    ops = _table(
        [(name, op.requests, sum(op.errors.values()), _ms(op.p50_us), _ms(op.p95_us),
          _ms(op.p99_us), _pairs(op.errors)) for name, op in stats.ops.items()],
        ("op", "requests", "errors", "p50 us", "p95 us", "p99 us", "error codes"))

    alerts_by_limit: dict[str, list[str]] = {}
    for key, times in stats.limit_alerts.items():
        name, _, threshold = key.partition("@")
        alerts_by_limit.setdefault(name, []).append(f"{threshold or key} x{times:,}")
    names = list(dict.fromkeys([*stats.limit_denials, *stats.limit_near,
                                *stats.limit_shadow, *alerts_by_limit]))
    limits = (f"{_INDENT}open leases: {stats.open_leases:,}\n"
              f"{_INDENT}retry-loop guard: {stats.retry_loop_keys:,} of "
              f"{stats.retry_loop_max_keys:,} (user, prompt) keys tracked, "
              f"{stats.retry_loop_forgotten:,} forgotten at the cap\n") + _table(
        [(n, stats.limit_denials.get(n, 0), stats.limit_near.get(n, 0),
          stats.limit_shadow.get(n, 0), ", ".join(alerts_by_limit.get(n, ())))
         for n in names],
        ("limit", "denials", "near", "shadow", "alerts crossed"))

    return "\n\n".join([
        _section("daemon", daemon), _section("ops", ops), _section("limits", limits),
        _section("cluster", _render_cluster(stats)),
        _section("caches", _render_cache(stats)),
        _section("shared memory", _render_shm(stats)),
        _section("routes and circuits",
                 _table(sorted(stats.circuits.items()), ("model", "circuit"))),
        _section("spend today", _INDENT + "none" if stats.spend_today is None
                 else _table(_totals_rows(stats.spend_today))),
        _section("latency", _table(
            [(r.model, r.input_tokens, r.calls, _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.p99_ms))
             for r in stats.latency],
            ("model", "input tokens", "calls", "p50 ms", "p95 ms", "p99 ms"))),
        _section("alerts", _render_alerts(stats)),
        _section("build", _table([
            ("version", stats.build.version), ("python", stats.build.python),
            ("protocol", str(stats.build.protocol)),
            *stats.build.libraries.items(),
            *((f"native {name}", path) for name, path in stats.build.native.items()),
        ])),
    ])


def _render_cache(stats: StatsReply) -> str:
    cache = stats.cache
    if cache is None:
        return _INDENT + "none"
    summary = _table([
        ("cache", "on" if cache.enabled else "off"),
        ("max", f"{cache.max_entries:,} entries, {cache.max_bytes:,} bytes"),
        ("stores", f"{cache.stores:,} (bypassed {cache.bypassed:,})"),
        ("not stored", _pairs(cache.not_stored) or "0"),
        ("snapshot", cache.snapshot + (f", at {utc(cache.snapshot_at)} UTC"
                                       if cache.snapshot_at else "")),
        ("semantic", f"{cache.semantic or 'off'}, threshold {cache.threshold:g}, "
                     f"{cache.semantic_pending:,} writes pending"),
    ])
    tiers = _table(
        [(name, t.entries, t.bytes, t.hits, t.misses, f"{t.hit_rate_pct:.1f}%", t.stale_serves,
          t.evictions, t.expirations, t.verifier_refusals) for name, t in cache.tiers.items()],
        ("tier", "entries", "bytes", "hits", "misses", "hit rate", "stale", "evicted",
         "expired", "refused"))
    return f"{summary}\n\n{tiers}"


def _render_shm(stats: StatsReply) -> str:
    shm = stats.shm
    if shm is None:
        return _INDENT + "off (every cache hit goes through the socket)"
    summary = _table([
        ("segment", f"{shm.path} (generation {shm.generation:x})"),
        ("size", f"{shm.slots:,} slots, {shm.arena_bytes:,} bytes of answers"),
        ("answers", f"{shm.published:,} published, {shm.not_published:,} too large or "
                    "crowded (socket only)"),
        ("admission", f"{shm.slice_calls:,} calls in slices: {shm.slice_taken:,} taken, "
                      f"{shm.slice_released:,} given back; {shm.slices_open:,} slices open"),
    ])
    clients = _table(
        [(str(c.pid), str(c.uid), c.hits, c.fallbacks, c.unknown, c.admits,
          utc(c.told_at, "%H:%M:%S")) for c in shm.clients],
        ("client pid", "uid", "shm hits", "fallbacks", "gone", "shm admits", "told (UTC)"))
    return f"{summary}\n\n{clients}"


def _render_alerts(stats: StatsReply) -> str:
    if not stats.alert_counts and not stats.alerts:
        return _INDENT + "none"
    counts = _table(sorted(stats.alert_counts.items()), ("kind", "fired"))
    latest = _table(
        [(utc(a.at, "%H:%M:%S"), a.kind, a.message) for a in stats.alerts[-LATEST_ALERTS:]],
        ("UTC", "kind", "message"))
    return f"{counts}\n\n{latest}"


def render_costs(reply: CostsReply, per: str) -> str:
    """Totals, the top groups with their share of the spend, and the per-day (or per-hour)
    series, all times in UTC."""
    t = reply.totals
    head = (f"costs by {reply.by} from {utc(reply.since, '%Y-%m-%d %H:%M')} to "
            f"{utc(reply.until, '%Y-%m-%d %H:%M')} UTC")
    groups = _table(
        [(g.key or "(none)", g.totals.requests, g.totals.hits_exact + g.totals.hits_semantic,
          g.totals.input_tokens, g.totals.output_tokens, _usd(g.totals.usd),
          _pct(g.totals.usd / t.usd) if t.usd else "-", _usd(g.totals.cost_per_request))
         for g in reply.groups],
        (reply.by, "requests", "hits", "tokens in", "tokens out", "USD", "share",
         "cost/request"))
    if reply.other_groups:
        groups += f"\n{_INDENT}... and {reply.other_groups:,} more"
    if per == "hour":
        # HH:MM, not HH:00: a zone such as +05:30 starts its hours on the half hour in UTC.
        series = [(utc(p.start, "%Y-%m-%d %H:%M"), p.totals) for p in reply.hours]
    else:
        # A day starts at midnight in the daemon's zone; its midday falls on the same date
        # in UTC for any offset within 12 hours, so that names the day the daemon counted.
        series = [(utc(p.start + 43200, "%Y-%m-%d"), p.totals) for p in reply.days]
    periods = _table(
        [(start, p.requests, p.hits_exact + p.hits_semantic, _usd(p.usd))
         for start, p in series],
        (per, "requests", "hits", "USD"))
    return "\n\n".join([head, _section("totals", _table(_totals_rows(t))),
                        _section(f"top {reply.by}s", groups),
                        _section(f"per {per}", periods)])


def _num(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.6f}".rstrip("0")


def render_limits(reply: LimitsReply) -> str:
    """Each limit's use against its amount, then how many leases are open."""
    table = _table(
        [(row.name + (" (shadow)" if row.shadow else ""), row.scope, row.key,
          row.metric, row.window, _num(row.used), _num(row.amount),
          f"{row.used / row.amount if row.amount else 0.0:.0%}")
         for row in reply.limits],
        ("limit", "scope", "key", "metric", "window", "used", "amount", "use"))
    return f"{table}\nopen leases: {reply.open_leases}"
