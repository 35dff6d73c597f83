"""The limits engine: rate limits and budgets as one model, reserve then settle.

A limit is a rule ``(scope, metric, window, amount)``. The scope says which requests it
covers and how they are keyed: ``global`` (one counter), ``user`` (one per user),
``tier`` (one per user, for requests of that tier: ``authenticated`` when a user id is
given, ``anonymous`` otherwise, keyed by the caller's ``key`` or shared), ``model`` and
``route`` (one per model or route, optionally only those matching ``match``). Metrics are
requests, input/output/total tokens, concurrent requests and USD (kept as integer
micro-dollars). Windows are sliding (``"60s"``, ``"10m"``: ``native/window.pyx``, error
at most ``span / buckets``, never an overshoot; optionally with a ``burst`` allowance that
paces the amount, see that module), calendar (``"hour"``, ``"day"`` in the
configured zone; the period is the local hour or day, DST changes included) or
``"request"`` (a cap on one request's estimate).

``admit`` reserves the estimate on every rule that applies, all or none, and returns a
decision value; ``settle`` replaces the estimate by the real usage (idempotent);
``release`` cancels it; a lease not settled within its TTL expires, keeping its estimate
and freeing its concurrency slot. A retry-loop guard denies the same user repeating the
same prompt fingerprint too often. What settles and expiries add to windows longer than a
minute comes back as ``Spend`` records for the caller to persist (``encode_spend``), and
``snapshot``/``restore`` carry that state across restarts. Every method takes ``now``
(epoch seconds): the engine never reads a clock and does no I/O. The counters, leases and
admit/settle/release are compiled (``Engine`` subclasses the native core); this module
validates rules and owns the public types. Not thread-safe: the daemon calls it from its
event loop.
"""
from __future__ import annotations

import enum
import math
import os
import re
from datetime import datetime, timedelta, timezone
from typing import Iterable, NamedTuple, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from .._native import load
from ..errors import ConfigError

_native = load("window")

MICRO = 1_000_000  # USD amounts are counted in micro-dollars
#: The largest amount a rule may have (in its units): counters are int64, and a counter
#: may exceed its amount by what open leases settle (each bounded by the wire's limits).
MAX_AMOUNT = 2**62


class Scope(enum.Enum):
    GLOBAL = "global"
    USER = "user"
    TIER = "tier"
    MODEL = "model"
    ROUTE = "route"


class Metric(enum.Enum):
    REQUESTS = "requests"
    INPUT_TOKENS = "input_tokens"
    OUTPUT_TOKENS = "output_tokens"
    TOTAL_TOKENS = "total_tokens"
    CONCURRENT = "concurrent"
    USD = "usd"


class Kind(enum.Enum):
    SLIDING = "sliding"
    HOUR = "hour"
    DAY = "day"
    REQUEST = "request"
    GAUGE = "gauge"  # concurrent requests: held from admit to settle/release/expiry


TIERS = ("authenticated", "anonymous")
NEED_AT = {Metric.REQUESTS: 0, Metric.CONCURRENT: 0, Metric.INPUT_TOKENS: 1,
            Metric.OUTPUT_TOKENS: 2, Metric.TOTAL_TOKENS: 3, Metric.USD: 4}
_SPAN_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


class Rule(NamedTuple):
    """One validated limit, amounts in integer units (micro-dollars for USD)."""

    name: str
    scope: Scope
    metric: Metric
    kind: Kind
    span: float  # seconds, for sliding windows
    amount: int
    match: str
    buckets: int
    shadow: bool
    burst: float = 0.0  # sliding windows: seconds a caller may run ahead of the pace

    def window_text(self) -> str:
        return {Kind.SLIDING: f"{self.span:g}s", Kind.GAUGE: "concurrent"}.get(
            self.kind, self.kind.value)

    def describe(self) -> str:
        return f"{self.name} ({self.scope.value}, {self.metric.value}, {self.window_text()})"


def parse_rule(name: str, scope: str, metric: str, window: str, amount: float, match: str = "",
               buckets: int = 60, shadow: bool = False, burst: str = "", *,
               where: str = "") -> Rule:
    """Validate one rule from config; errors name the rule and say how to fix it."""
    key = f"limits.rules.{name}"

    def fail(message: str, hint: str) -> ConfigError:
        return ConfigError(message, source=where, key=key, hint=hint)

    try:
        scope_e = Scope(scope)
    except ValueError:
        raise fail(f"unknown scope {scope!r}", "one of " + ", ".join(s.value for s in Scope)) from None
    try:
        metric_e = Metric(metric)
    except ValueError:
        raise fail(f"unknown metric {metric!r}", "one of " + ", ".join(m.value for m in Metric)) from None
    span = 0.0
    if metric_e is Metric.CONCURRENT:
        if window not in ("", "concurrent"):
            raise fail("a concurrent limit has no window", 'leave window out or "concurrent"')
        kind = Kind.GAUGE
    elif window in ("hour", "day", "request"):
        kind = Kind(window)
        if kind is Kind.REQUEST and metric_e is Metric.REQUESTS:
            raise fail("a per-request cap of requests is always 1", "use a token or usd metric")
    else:
        m = _SPAN_RE.fullmatch(window.strip())
        if not m:
            raise fail(f"invalid window {window!r}",
                       'a span such as "60s", "10m", "1h", or "hour", "day", "request"')
        span = float(m.group(1)) * _UNIT[m.group(2)]
        if not 0 < span <= 7 * 86400:
            raise fail(f"window {window!r} out of range", "from 1s up to 168h")
        kind = Kind.SLIDING
    if not (isinstance(amount, (int, float)) and amount > 0 and math.isfinite(amount)):
        raise fail(f"amount {amount!r} must be a positive number", "e.g. amount = 30")
    if metric_e is not Metric.USD and amount != int(amount):
        raise fail(f"amount {amount!r} must be a whole number for {metric}", "e.g. amount = 30")
    if scope_e is Scope.TIER and match not in TIERS:
        raise fail(f"tier scope needs match = one of {TIERS}", 'e.g. match = "authenticated"')
    if scope_e in (Scope.GLOBAL, Scope.USER) and match:
        raise fail(f"{scope} scope takes no match", "remove match, or use scope model/route")
    if not 1 <= buckets <= 3600:
        raise fail(f"buckets {buckets} out of range", "from 1 to 3600 (default 60)")
    burst_s = 0.0
    if burst:
        m = _SPAN_RE.fullmatch(burst.strip())
        if kind is not Kind.SLIDING:
            raise fail("a burst allowance needs a sliding window", 'remove burst, or window = "60s"')
        if not m:
            raise fail(f"invalid burst {burst!r}", 'a span such as "2s"')
        burst_s = float(m.group(1)) * _UNIT[m.group(2)]
        if not 0 < burst_s <= span:
            raise fail(f"burst {burst!r} out of range", f"above 0s, at most the window ({window})")
    units = round(amount * MICRO) if metric_e is Metric.USD else int(amount)
    if units > MAX_AMOUNT:
        top = MAX_AMOUNT / MICRO if metric_e is Metric.USD else MAX_AMOUNT
        raise fail(f"amount {amount!r} is larger than a limit can count",
                   f"at most {top:.0f}")
    return Rule(name, scope_e, metric_e, kind, span, units, match, buckets, shadow, burst_s)


def compile_rules(config: object, where: str = "") -> list[Rule]:
    """Rules from a ``LimitsConfig``: each validated, names unique, zone known."""
    rules = []
    seen = set()
    for row in config.rules:  # type: ignore[attr-defined]
        if row.name in seen:
            raise ConfigError(f"two rules are named {row.name!r}", source=where,
                              key="limits.rules", hint="give every rule its own name")
        seen.add(row.name)
        rules.append(parse_rule(row.name, row.scope, row.metric, row.window, row.amount,
                                row.match, row.buckets, row.shadow, row.burst, where=where))
    _zone(config.timezone, where)  # type: ignore[attr-defined]
    return rules


class Estimate(NamedTuple):
    input_tokens: int
    output_tokens: int
    micro_usd: int


class Subject(NamedTuple):
    """Who asks, for what: selects and keys the rules."""

    user: str = ""
    key: str = ""  # partitions anonymous callers (API key, client address); "" = shared
    model: str = ""
    route: str = ""

    @property
    def tier(self) -> str:
        return "authenticated" if self.user else "anonymous"


class Denial(NamedTuple):
    limit: str
    reason: str  # "limit" (over its amount), "burst" (ahead of its pace) or "retry_loop"
    used: int
    amount: int
    retry_after: float  # seconds; math.inf when no time can be promised
    never: bool = False  # the request exceeds the amount itself: waiting cannot help


#: The outcome of ``Engine.admit`` (compiled): ``allowed``, ``lease`` ("" when denied),
#: ``denial`` (a ``Denial`` or None), ``estimate``, ``near`` (limits at or above the near
#: fraction after this admit), ``shadow_denials``, ``crossed`` ("name@80%" thresholds).
Decision = _native.Decision


class LimitState(NamedTuple):
    name: str
    scope: str
    key: str
    metric: str
    window: str
    amount: int
    used: int
    shadow: bool


class Usage(NamedTuple):
    input_tokens: int
    output_tokens: int
    micro_usd: int


class Spend(NamedTuple):
    """An amount kept in a long window (over ``DURABLE_SPAN`` seconds, or a calendar
    period): what must survive a crash. ``slot`` is the bucket index or period start."""

    rule: str
    shape: str  # the rule's window, so a changed rule never takes another's spend
    key: str
    slot: float
    amount: int


#: Windows longer than this are persisted; shorter ones may restart empty.
DURABLE_SPAN = 60.0

_SPEND_ENCODER = msgspec.msgpack.Encoder()
_SPEND_DECODER = msgspec.msgpack.Decoder(list[Spend])


def encode_spend(spent: Sequence[Spend]) -> bytes:
    """One journal record: the spend of one settle, expiry or snapshot chunk."""
    return _SPEND_ENCODER.encode(list(spent))


def decode_spend(record: bytes) -> list[Spend]:
    return _SPEND_DECODER.decode(record)


class SettleResult(NamedTuple):
    found: bool
    duplicate: bool  # already settled: nothing changed
    expired: bool  # settled after expiry: the truth replaced the estimate all the same
    spent: tuple[Spend, ...] = ()  # what this settle added to long windows (to persist)
    micro_usd: int = 0  # what the settle recorded (the first one's, for a duplicate)
    released: bool = False  # a duplicate of a release: nothing was ever charged


class Engine(_native.Core):
    """Rules, counters and leases (the compiled core, ``native/window.pyx``) behind the
    engine's Python API: validated rules in, named tuples out."""

    def __init__(self, rules: Sequence[Rule], *, zone: str = "UTC", lease_ttl: float = 300.0,
                 near_fraction: float = 0.8, retry_loop_max: int = 0,
                 retry_loop_window: float = 60.0, retry_loop_max_keys: int = 10_000,
                 remembered_leases: int = 100_000,
                 alert_thresholds: Sequence[float] = (0.5, 0.8, 1.0),
                 max_open_leases_per_uid: int = 0) -> None:
        self._init_core(os.urandom(4).hex(), remembered_leases, Denial, Spend, SettleResult,
                        self._period)
        self.rules: list[Rule] = []
        self._settings(zone, lease_ttl, near_fraction, retry_loop_max, retry_loop_window,
                       retry_loop_max_keys, alert_thresholds, max_open_leases_per_uid)
        self._install(rules, None)

    def reconfigure(self, rules: Sequence[Rule], *, zone: str, lease_ttl: float,
                    near_fraction: float, retry_loop_max: int, retry_loop_window: float,
                    retry_loop_max_keys: int = 10_000,
                    alert_thresholds: Sequence[float] = (0.5, 0.8, 1.0),
                    max_open_leases_per_uid: int = 0) -> None:
        """Take new rules (SIGHUP). Counters and open reservations of a rule that keeps its
        name and shape (scope, metric, window) carry over, whatever its amount; the others
        start empty."""
        shape = lambda r: (r.name, r.scope, r.metric, r.kind, r.span, r.buckets)  # noqa: E731
        new_index = {shape(r): i for i, r in enumerate(rules)}
        remap = [new_index.get(shape(r), -1) for r in self.rules]
        self._settings(zone, lease_ttl, near_fraction, retry_loop_max, retry_loop_window,
                       retry_loop_max_keys, alert_thresholds, max_open_leases_per_uid)
        self._install(rules, remap)

    def _settings(self, zone: str, lease_ttl: float, near_fraction: float,
                  retry_loop_max: int, retry_loop_window: float, retry_loop_max_keys: int,
                  alert_thresholds: Sequence[float], max_open_leases_per_uid: int) -> None:
        if retry_loop_max_keys < 1:
            raise ValueError(f"retry_loop_max_keys must be >= 1, not {retry_loop_max_keys}")
        self.zone = _zone(zone)
        self.lease_ttl = lease_ttl
        self.near_fraction = near_fraction
        self.retry_loop_max = retry_loop_max
        self.retry_loop_window = retry_loop_window
        #: the retry-loop guard tracks at most this many (user, prompt) keys, dropping the
        #: least recently admitted beyond it (``retry_loop_forgotten`` counts those)
        self.retry_loop_max_keys = retry_loop_max_keys
        self.alert_thresholds = tuple(sorted(alert_thresholds))
        #: open leases one peer uid may hold (0: no cap); past it an admit is denied by
        #: the limit "open_leases" until one of its leases ends
        self.max_owned = max_open_leases_per_uid

    def _install(self, rules: Sequence[Rule], remap: list[int] | None) -> None:
        table = [(_native.KINDS[r.kind.value], _native.SPACES[r.scope.value],
                  NEED_AT[r.metric], TIERS.index(r.match) + 1 if r.scope is Scope.TIER else 0,
                  r.span, r.buckets, r.amount, r.shadow, _durable(r), r.burst)
                 for r in rules]
        self._load_rules(table, [r.name for r in rules], [shape_of(r) for r in rules],
                         [r.match for r in rules], self.alert_thresholds, remap)
        self.rules = list(rules)

    def track(self, flags: Sequence[bool]) -> None:
        """Report, in each admit's ``Decision.tracked``, what it reserved on rule ``i``
        when ``flags[i]`` (the rules a cluster shares). Reset by ``reconfigure``."""
        self._track(list(flags))

    def period(self, kind: Kind, now: float) -> tuple[float, float]:
        """``(start, end)`` epoch seconds of the hour or day holding ``now`` in the zone."""
        return self._period(kind is Kind.DAY, now)

    def _period(self, day: bool, now: float) -> tuple[float, float]:
        local = datetime.fromtimestamp(now, self.zone)
        if not day:
            start = local.replace(minute=0, second=0, microsecond=0)
            return start.timestamp(), start.timestamp() + 3600.0
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=1)).replace(tzinfo=None)
        end = datetime.combine(nxt.date(), nxt.time(), self.zone)
        return start.timestamp(), end.timestamp()

    def restore(self, spends: Iterable[Spend], now: float) -> int:
        """Add persisted spend back (at start); skips spend of rules that are gone or
        changed shape, and of periods or buckets already over. Returns how many applied."""
        by_name = {rule.name: (i, rule) for i, rule in enumerate(self.rules)}
        applied = 0
        for spend in spends:
            found = by_name.get(spend.rule)
            if found is not None and shape_of(found[1]) == spend.shape:
                applied += self._restore_one(found[0], spend.key, spend.slot, spend.amount, now)
        return applied

    def budgets(self, who: str, now: float) -> list[tuple[int, int]]:
        """``(used, amount)`` of ``who``'s hour and day budgets (user and tier rules)."""
        return [(used, self.rules[i].amount) for i, used in self.usage_of(who, now)
                if self.rules[i].kind in (Kind.HOUR, Kind.DAY)]

    def state(self, now: float, user: str | None = None) -> list[LimitState]:
        """Current use of every counter (of ``user``'s keyed counters when given)."""
        out = []
        for index, key, used in self.counters(now):
            rule = self.rules[index]
            if user is not None and rule.scope in (Scope.USER, Scope.TIER) and key != user:
                continue
            out.append(LimitState(rule.name, rule.scope.value, key, rule.metric.value,
                                  rule.window_text(), rule.amount, used, rule.shadow))
        return out


def _durable(rule: Rule) -> bool:
    """Whether the rule's spend must survive a crash."""
    return rule.kind in (Kind.HOUR, Kind.DAY) or (
        rule.kind is Kind.SLIDING and rule.span > DURABLE_SPAN)


def shape_of(rule: Rule) -> str:
    """A rule's scope-independent shape (window and metric): counters carry over a
    reconfiguration only to a rule of the same name and shape."""
    return f"{rule.kind.value}:{rule.span:g}:{rule.buckets}:{rule.metric.value}"


def _zone(name: str, where: str = "") -> timezone | ZoneInfo:
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r}", source=where, key="limits.timezone",
                          hint='an IANA name such as "UTC" or "Europe/Berlin"') from None
