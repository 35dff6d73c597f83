"""The limits engine: rate limits and budgets as one model, reserve then settle.

A limit is a rule ``(scope, metric, window, amount)``. The scope says which requests it
covers and how they are keyed: ``global`` (one counter), ``user`` (one per user),
``tier`` (one per user, for requests of that tier: ``authenticated`` when a user id is
given, ``anonymous`` otherwise, keyed by the caller's ``key`` or shared), ``model`` and
``route`` (one per model or route, optionally only those matching ``match``). Metrics are
requests, input/output/total tokens, concurrent requests and USD (kept as integer
micro-dollars). Windows are sliding (``"60s"``, ``"10m"``: ``native/window.pyx``, error
at most ``span / buckets``, never an overshoot), calendar (``"hour"``, ``"day"`` in the
configured zone; the period is the local hour or day, DST changes included) or
``"request"`` (a cap on one request's estimate).

``admit`` reserves the estimate on every rule that applies, all or none, and returns a
decision value; ``settle`` replaces the estimate by the real usage (idempotent);
``release`` cancels it; a lease not settled within its TTL expires, keeping its estimate
and freeing its concurrency slot. A retry-loop guard denies the same user repeating the
same prompt fingerprint too often. What settles and expiries add to windows longer than a
minute comes back as ``Spend`` records for the caller to persist (``encode_spend``), and
``snapshot``/``restore`` carry that state across restarts. Every method takes ``now``
(epoch seconds): the engine never reads a clock and does no I/O. Not thread-safe: the
daemon calls it from its event loop.
"""
from __future__ import annotations

import enum
import itertools
import math
import os
import re
from collections import OrderedDict, deque
from datetime import datetime, timedelta, timezone
from typing import Iterable, NamedTuple, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from ._native import load
from .errors import ConfigError

_native = load("window")

MICRO = 1_000_000  # USD amounts are counted in micro-dollars


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
_NEED_AT = {Metric.REQUESTS: 0, Metric.CONCURRENT: 0, Metric.INPUT_TOKENS: 1,
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

    def describe(self) -> str:
        window = {Kind.SLIDING: f"{self.span:g}s", Kind.GAUGE: "concurrent"}.get(
            self.kind, self.kind.value)
        return f"{self.name} ({self.scope.value}, {self.metric.value}, {window})"


def parse_rule(name: str, scope: str, metric: str, window: str, amount: float, match: str = "",
               buckets: int = 60, shadow: bool = False, *, where: str = "") -> Rule:
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
    units = round(amount * MICRO) if metric_e is Metric.USD else int(amount)
    return Rule(name, scope_e, metric_e, kind, span, units, match, buckets, shadow)


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
                                row.match, row.buckets, row.shadow, where=where))
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
    reason: str  # "limit" or "retry_loop"
    used: int
    amount: int
    retry_after: float  # seconds; math.inf when no time can be promised
    never: bool = False  # the request exceeds the amount itself: waiting cannot help


class Decision(NamedTuple):
    allowed: bool
    lease: str  # "" when denied
    denial: Denial | None
    estimate: Estimate
    near: tuple[str, ...]  # limits at or above the near fraction after this admit
    shadow_denials: tuple[str, ...]  # shadow rules that would have denied
    crossed: tuple[str, ...] = ()  # alert thresholds this admit crossed: "name@80%"


class LimitState(NamedTuple):
    name: str
    scope: str
    key: str
    metric: str
    window: str
    amount: int
    used: int
    shadow: bool


class _Calendar:
    """Total of the current calendar period."""

    __slots__ = ("period", "total")

    def __init__(self) -> None:
        self.period = -math.inf
        self.total = 0


class _Reservation(NamedTuple):
    counter_key: tuple[int, str]
    kind: Kind
    slot: float  # bucket index (sliding) or period start (calendar); unused for gauges
    amount: int
    metric: Metric


class _Lease:
    __slots__ = ("id", "reservations", "expires", "estimate", "state", "subject")

    def __init__(self, lease_id: str, reservations: list[_Reservation], expires: float,
                 estimate: Estimate, subject: Subject) -> None:
        self.subject = subject
        self.id = lease_id
        self.reservations = reservations
        self.expires = expires
        self.estimate = estimate
        self.state = "open"  # open -> settled | released | expired


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


class Engine:
    def __init__(self, rules: Sequence[Rule], *, zone: str = "UTC", lease_ttl: float = 300.0,
                 near_fraction: float = 0.8, retry_loop_max: int = 0,
                 retry_loop_window: float = 60.0, remembered_leases: int = 100_000,
                 alert_thresholds: Sequence[float] = (0.5, 0.8, 1.0)) -> None:
        self.rules = list(rules)
        self.alert_thresholds = tuple(sorted(alert_thresholds))
        self.zone = _zone(zone)
        self.lease_ttl = lease_ttl
        self.near_fraction = near_fraction
        self.retry_loop_max = retry_loop_max
        self.retry_loop_window = retry_loop_window
        self._counters: dict[tuple[int, str], object] = {}
        # Open leases in admission order, which is expiry order (one TTL for all; after a
        # reload that shortens it, a newer lease may outlive its TTL by the old one).
        self._leases: dict[str, _Lease] = {}
        self._done: OrderedDict[str, _Lease] = OrderedDict()  # settled/expired, for idempotence
        self._remembered = remembered_leases
        self._recent: dict[tuple[str, bytes], deque[float]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()
        self._periods: dict[Kind, tuple[float, float]] = {}
        self._held: dict[tuple[int, str], int] = {}  # counter -> open leases reserving on it
        self._sweep: list[tuple[int, str]] = []  # counters still to look at for eviction
        self._index_rules()

    def reconfigure(self, rules: Sequence[Rule], *, zone: str, lease_ttl: float,
                    near_fraction: float, retry_loop_max: int, retry_loop_window: float,
                    alert_thresholds: Sequence[float] = (0.5, 0.8, 1.0)) -> None:
        """Take new rules (SIGHUP). Counters and open reservations of a rule that keeps its
        name and shape (scope, metric, window) carry over, whatever its amount; the others
        start empty."""
        shape = lambda r: (r.name, r.scope, r.metric, r.kind, r.span, r.buckets)  # noqa: E731
        new_index = {shape(r): i for i, r in enumerate(rules)}
        remap = {i: new_index.get(shape(r)) for i, r in enumerate(self.rules)}
        self._counters = {(remap[i], key): c for (i, key), c in self._counters.items()
                          if remap[i] is not None}
        for lease in itertools.chain(self._leases.values(), self._done.values()):
            lease.reservations = [r._replace(counter_key=(remap[r.counter_key[0]],
                                                          r.counter_key[1]))
                                  for r in lease.reservations
                                  if remap[r.counter_key[0]] is not None]
        self._held = {}
        for lease in self._leases.values():
            self._hold(lease, 1)
        self._sweep = []
        self.rules = list(rules)
        self._index_rules()
        self.zone = _zone(zone)
        self._periods = {}
        self.lease_ttl = lease_ttl
        self.near_fraction = near_fraction
        self.retry_loop_max = retry_loop_max
        self.retry_loop_window = retry_loop_window
        self.alert_thresholds = tuple(sorted(alert_thresholds))

    # -- rules and counters ------------------------------------------------------------

    def _index_rules(self) -> None:
        # Per rule: where its need sits in the tuple admit builds (see _needs).
        self._need_at = [_NEED_AT[r.metric] for r in self.rules]
        self._by_scope: dict[Scope, list[tuple[int, Rule]]] = {s: [] for s in Scope}
        for index, rule in enumerate(self.rules):
            self._by_scope[rule.scope].append((index, rule))

    def _applicable(self, subject: Subject) -> list[tuple[int, Rule, str]]:
        by_scope = self._by_scope
        who = subject.user or subject.key
        tier = subject.tier
        out = [(i, r, "") for i, r in by_scope[Scope.GLOBAL]]
        out += [(i, r, who) for i, r in by_scope[Scope.USER]]
        out += [(i, r, who) for i, r in by_scope[Scope.TIER] if r.match == tier]
        if subject.model:
            out += [(i, r, subject.model) for i, r in by_scope[Scope.MODEL]
                    if subject.model.startswith(r.match)]
        if subject.route:
            out += [(i, r, subject.route) for i, r in by_scope[Scope.ROUTE]
                    if not r.match or subject.route == r.match]
        return out

    @staticmethod
    def _needs(e: Estimate) -> tuple[int, int, int, int, int]:
        """Amounts by ``_NEED_AT`` position: a request, input, output, total, USD."""
        return (1, e.input_tokens, e.output_tokens, e.input_tokens + e.output_tokens,
                e.micro_usd)

    def _counter(self, index: int, key: str, rule: Rule) -> object:
        counter = self._counters.get((index, key))
        if counter is None:
            if rule.kind is Kind.SLIDING:
                counter = _native.SlidingWindow(rule.span, rule.buckets)
            elif rule.kind in (Kind.HOUR, Kind.DAY):
                counter = _Calendar()
            elif rule.kind is Kind.GAUGE:
                counter = [0]
            else:
                return None
            self._counters[(index, key)] = counter
        return counter

    def period(self, kind: Kind, now: float) -> tuple[float, float]:
        """``(start, end)`` epoch seconds of the hour or day holding ``now`` in the zone."""
        cached = self._periods.get(kind)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached
        cached = self._periods[kind] = self._period(kind, now)
        return cached

    def _period(self, kind: Kind, now: float) -> tuple[float, float]:
        local = datetime.fromtimestamp(now, self.zone)
        if kind is Kind.HOUR:
            start = local.replace(minute=0, second=0, microsecond=0)
            return start.timestamp(), start.timestamp() + 3600.0
        start = local.replace(hour=0, minute=0, second=0, microsecond=0)
        nxt = (start + timedelta(days=1)).replace(tzinfo=None)
        end = datetime.combine(nxt.date(), nxt.time(), self.zone)
        return start.timestamp(), end.timestamp()

    def _used(self, rule: Rule, counter: object, now: float) -> int:
        if rule.kind is Kind.SLIDING:
            return counter.used(now)  # type: ignore[attr-defined]
        if rule.kind is Kind.GAUGE:
            return counter[0]  # type: ignore[index]
        start, _ = self.period(rule.kind, now)
        if counter.period != start:  # type: ignore[attr-defined]
            counter.period, counter.total = start, 0  # type: ignore[attr-defined]
        return counter.total  # type: ignore[attr-defined]

    def _retry_after(self, rule: Rule, counter: object, need: int, now: float) -> float:
        if need > rule.amount:
            return math.inf
        if rule.kind is Kind.SLIDING:
            return counter.retry_after(now, need, rule.amount)  # type: ignore[attr-defined]
        if rule.kind is Kind.GAUGE:
            return math.inf  # frees when a lease ends: no time can be promised
        return self.period(rule.kind, now)[1] - now

    # -- admit / settle / release ------------------------------------------------------

    def admit(self, subject: Subject, estimate: Estimate, now: float,
              fingerprint: bytes = b"") -> Decision:
        """Reserve ``estimate`` on every applicable rule, all or none."""
        self.expire(now)
        if fingerprint and self.retry_loop_max:
            denial = self._retry_loop(subject, fingerprint, now)
            if denial is not None:
                return Decision(False, "", denial, estimate, (), ())
        plan = []
        denial: Denial | None = None
        shadow = []
        needs = self._needs(estimate)
        need_at = self._need_at
        for index, rule, key in self._applicable(subject):
            need = needs[need_at[index]]
            counter = self._counter(index, key, rule)
            used = 0 if counter is None else self._used(rule, counter, now)
            if used + need > rule.amount:
                if rule.shadow:
                    shadow.append(rule.name)
                else:
                    never = need > rule.amount
                    wait = math.inf if never else self._retry_after(rule, counter, need, now)
                    if denial is None or (never, wait) > (denial.never, denial.retry_after):
                        denial = Denial(rule.name, "limit", used, rule.amount, wait, never)
            if counter is not None:
                plan.append((index, key, rule, counter, need, used))
        if denial is not None:
            return Decision(False, "", denial, estimate, (), tuple(shadow))
        reservations = []
        near = []
        crossed = []
        for index, key, rule, counter, need, used in plan:
            if rule.kind is Kind.SLIDING:
                slot = float(counter.add(now, need))  # type: ignore[attr-defined]
            elif rule.kind is Kind.GAUGE:
                counter[0] += need  # type: ignore[index]
                slot = 0.0
            else:
                counter.total += need  # type: ignore[attr-defined]
                slot = counter.period  # type: ignore[attr-defined]
            reservations.append(_Reservation((index, key), rule.kind, slot, need, rule.metric))
            after = used + need
            if after >= self.near_fraction * rule.amount:
                near.append(rule.name)
            if self.alert_thresholds and after >= self.alert_thresholds[0] * rule.amount:
                crossed += [f"{rule.name}@{t:.0%}" for t in self.alert_thresholds
                            if used < t * rule.amount <= after]
        lease_id = f"{self._prefix}-{next(self._ids)}"
        lease = _Lease(lease_id, reservations, now + self.lease_ttl, estimate, subject)
        self._leases[lease_id] = lease
        self._hold(lease, 1)
        return Decision(True, lease_id, None, estimate, tuple(near), tuple(shadow),
                        tuple(crossed))

    def _retry_loop(self, subject: Subject, fingerprint: bytes, now: float) -> Denial | None:
        key = (subject.user or subject.key, fingerprint)
        times = self._recent.get(key)
        if times is None:
            times = self._recent[key] = deque()
        while times and times[0] <= now - self.retry_loop_window:
            times.popleft()
        if len(times) >= self.retry_loop_max:
            return Denial("retry_loop", "retry_loop", len(times), self.retry_loop_max,
                          times[0] + self.retry_loop_window - now)
        times.append(now)
        return None

    def settle(self, lease_id: str, usage: Usage, now: float) -> SettleResult:
        """Replace the lease's estimate by ``usage``. Settling again changes nothing."""
        lease = self._leases.pop(lease_id, None)
        expired = False
        if lease is not None:
            self._hold(lease, -1)
        else:
            lease = self._done.get(lease_id)
            if lease is None:
                return SettleResult(False, False, False)
            if lease.state != "expired":
                return SettleResult(True, True, False)
            expired = True
        actual = Estimate(usage.input_tokens, usage.output_tokens, usage.micro_usd)
        spent = []
        for r in lease.reservations:
            if r.kind is Kind.GAUGE:
                if not expired:
                    self._gauge_down(r)
                continue
            amount = r.amount if r.metric is Metric.REQUESTS else self._need_for(r.metric, actual)
            self._adjust(r, amount - r.amount, now)
            # an expired lease's estimate was persisted at expiry: persist the difference
            spend = self._spend(r, amount - r.amount if expired else amount)
            if spend is not None:
                spent.append(spend)
        lease.state = "settled"
        self._remember(lease)
        return SettleResult(True, False, expired, tuple(spent))

    def _spend(self, r: _Reservation, amount: int) -> Spend | None:
        rule = self.rules[r.counter_key[0]]
        if not amount or rule.kind is Kind.REQUEST or (
                rule.kind is Kind.SLIDING and rule.span <= DURABLE_SPAN):
            return None
        return Spend(rule.name, _shape(rule), r.counter_key[1], r.slot, amount)

    def snapshot(self, now: float) -> list[Spend]:
        """Settled and expired spend in long windows now: the counters less the estimates
        of open leases (those become durable only when settled)."""
        held: dict[tuple[tuple[int, str], float], int] = {}
        for lease in self._leases.values():
            for r in lease.reservations:
                if r.kind is not Kind.GAUGE:
                    k = (r.counter_key, r.slot)
                    held[k] = held.get(k, 0) + r.amount
        out = []
        for (index, key), counter in self._counters.items():
            rule = self.rules[index]
            if rule.kind is Kind.SLIDING and rule.span > DURABLE_SPAN:
                slots = counter.buckets_in_window(now)  # type: ignore[attr-defined]
            elif rule.kind in (Kind.HOUR, Kind.DAY) and self._used(rule, counter, now):
                slots = [(counter.period, counter.total)]  # type: ignore[attr-defined]
            else:
                continue
            for slot, total in slots:
                amount = total - held.get(((index, key), float(slot)), 0)
                if amount > 0:
                    out.append(Spend(rule.name, _shape(rule), key, float(slot), amount))
        return out

    def restore(self, spends: Iterable[Spend], now: float) -> int:
        """Add persisted spend back (at start); skips spend of rules that are gone or
        changed shape, and of periods or buckets already over. Returns how many applied."""
        by_name = {rule.name: (i, rule) for i, rule in enumerate(self.rules)}
        applied = 0
        for spend in spends:
            found = by_name.get(spend.rule)
            if found is None or _shape(found[1]) != spend.shape:
                continue
            index, rule = found
            counter = self._counter(index, spend.key, rule)
            if rule.kind is Kind.SLIDING:
                counter.used(now)  # type: ignore[attr-defined]
                applied += counter.adjust(int(spend.slot), spend.amount, now)  # type: ignore
            elif self._used(rule, counter, now) >= 0 and counter.period == spend.slot:  # type: ignore
                counter.total = max(0, counter.total + spend.amount)  # type: ignore[attr-defined]
                applied += 1
        return applied

    def release(self, lease_id: str, now: float) -> bool:
        """Cancel an unused reservation: every amount it reserved is given back."""
        lease = self._leases.pop(lease_id, None)
        if lease is None:
            return False
        self._hold(lease, -1)
        for r in lease.reservations:
            if r.kind is Kind.GAUGE:
                self._gauge_down(r)
            else:
                self._adjust(r, -r.amount, now)
        lease.state = "released"
        self._remember(lease)
        return True

    def expire(self, now: float) -> tuple[int, list[Spend]]:
        """Expire leases past their TTL: the estimate stays spent (returned, to persist),
        the concurrency slot is freed. Returns ``(leases expired, spend)``."""
        spent = []
        count = 0
        leases = self._leases
        while leases:
            lease = next(iter(leases.values()))
            if lease.expires > now:
                break
            del leases[lease.id]
            self._hold(lease, -1)
            for r in lease.reservations:
                if r.kind is Kind.GAUGE:
                    self._gauge_down(r)
                else:
                    spend = self._spend(r, r.amount)
                    if spend is not None:
                        spent.append(spend)
            lease.state = "expired"
            self._remember(lease)
            count += 1
        return count, spent

    def _need_for(self, metric: Metric, e: Estimate) -> int:
        return self._needs(e)[_NEED_AT[metric]]

    def _gauge_down(self, r: _Reservation) -> None:
        counter = self._counters.get(r.counter_key)
        if counter is not None:
            counter[0] = max(0, counter[0] - r.amount)  # type: ignore[index]

    def _adjust(self, r: _Reservation, delta: int, now: float) -> None:
        counter = self._counters.get(r.counter_key)
        if counter is None or not delta:
            return
        if r.kind is Kind.SLIDING:
            counter.adjust(int(r.slot), delta, now)  # type: ignore[attr-defined]
        elif counter.period == r.slot:  # type: ignore[attr-defined]
            counter.total = max(0, counter.total + delta)  # type: ignore[attr-defined]

    def _remember(self, lease: _Lease) -> None:
        self._done[lease.id] = lease
        if len(self._done) > self._remembered:
            self._done.popitem(last=False)

    # -- views and housekeeping --------------------------------------------------------

    def state(self, now: float, user: str | None = None) -> list[LimitState]:
        """Current use of every counter (of ``user``'s keyed counters when given)."""
        out = []
        for (index, key), counter in sorted(self._counters.items()):
            rule = self.rules[index]
            if user is not None and rule.scope in (Scope.USER, Scope.TIER) and key != user:
                continue
            used = self._used(rule, counter, now)
            window = {Kind.SLIDING: f"{rule.span:g}s", Kind.GAUGE: "concurrent"}.get(
                rule.kind, rule.kind.value)
            out.append(LimitState(rule.name, rule.scope.value, key, rule.metric.value, window,
                                  rule.amount, used, rule.shadow))
        return out

    def evict_idle(self, now: float, budget: int = 20_000) -> int:
        """Drop counters whose windows are empty and that no open lease points at,
        looking at up to ``budget`` counters per call (a full pass spans several calls,
        so a sweep never stalls the caller however many keys there are)."""
        if not self._sweep:
            self._sweep = list(self._counters)
            for key in [k for k, t in self._recent.items()
                        if not t or t[-1] <= now - self.retry_loop_window]:
                del self._recent[key]
        batch = self._sweep[-budget:]
        del self._sweep[-budget:]
        evicted = 0
        for k in batch:
            counter = self._counters.get(k)
            if (counter is not None and not self._held.get(k)
                    and self._used(self.rules[k[0]], counter, now) == 0):
                del self._counters[k]
                evicted += 1
        return evicted

    def _hold(self, lease: _Lease, step: int) -> None:
        held = self._held
        for r in lease.reservations:
            count = held.get(r.counter_key, 0) + step
            if count:
                held[r.counter_key] = count
            else:
                del held[r.counter_key]

    @property
    def open_leases(self) -> int:
        return len(self._leases)

    def lease_subject(self, lease_id: str) -> Subject | None:
        """Who a lease (open, or remembered after it ended) was admitted for."""
        lease = self._leases.get(lease_id) or self._done.get(lease_id)
        return None if lease is None else lease.subject


def _shape(rule: Rule) -> str:
    return f"{rule.kind.value}:{rule.span:g}:{rule.buckets}:{rule.metric.value}"


def _zone(name: str, where: str = "") -> timezone | ZoneInfo:
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {name!r}", source=where, key="limits.timezone",
                          hint='an IANA name such as "UTC" or "Europe/Berlin"') from None
