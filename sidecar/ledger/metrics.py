"""In-daemon metrics: latency of each op, provider latency by model and input size, token
usage and event counters; the ``stats`` views and the Prometheus exposition built from them.

Recording runs on the event loop for every request, so it is a few list stores: a
histogram's bucket counter (for Prometheus) and a ring of its ``WINDOW`` most recent
samples (for exact p50/p95/p99 in ``stats``). The Prometheus text is built only when
scraped: a collector on a private ``prometheus_client`` registry turns these counters into
metric families, so the hot path never takes that library's locks. Label values are
bounded: models past ``MAX_MODELS`` are reported as ``other`` and users are never labels
(the per-user view is ``costs``). Names follow Prometheus conventions (``_total``,
``_seconds``, base units); the provider histograms use the OpenTelemetry GenAI names
``gen_ai.client.operation.duration`` and ``gen_ai.client.token.usage`` with dots as
underscores, as OpenTelemetry's Prometheus exporter writes them.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterator, NamedTuple, Sequence

from prometheus_client.core import (
    CollectorRegistry, CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric,
)
from prometheus_client.exposition import generate_latest

from ..failures import TaskFailures
from ..wire import ClusterStats, ErrorCode, LatencyStats, OpStats

#: Samples kept per histogram for percentiles (a power of two: ring index ``n & MASK``).
WINDOW = 4096
MASK = WINDOW - 1
#: Distinct models with their own label values; later ones share ``other``.
MAX_MODELS = 64
OTHER = "other"

#: The daemon's own op latency, nanoseconds (exposed in seconds).
OP_BOUNDS_NS = (10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
                5_000_000, 10_000_000, 25_000_000, 100_000_000, 1_000_000_000)
#: Provider call latency, seconds (OpenTelemetry's advice for gen_ai durations).
PROVIDER_BOUNDS_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                     20.48, 40.96, 81.92)
#: Tokens per call (OpenTelemetry's advice for gen_ai.client.token.usage).
TOKEN_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                16777216, 67108864)
#: Input-size classes of the provider latency histograms: (upper bound, label).
INPUT_CLASSES = ((1_000, "0-1K"), (10_000, "1K-10K"), (50_000, "10K-50K"),
                 (math.inf, "50K+"))
_INPUT_LIMITS = [bound for bound, _ in INPUT_CLASSES]
#: ``Metrics.usage`` columns: the token types (``llm_sidecar_tokens_total{type}``), then
#: micro-dollars
_USAGE = ("input", "output", "cached_input", "reasoning", "micro_usd")


def input_class(input_tokens: int) -> str:
    """The latency histogram class of a request with ``input_tokens`` (0-1K means fewer
    than 1,000)."""
    return INPUT_CLASSES[bisect.bisect_right(_INPUT_LIMITS, input_tokens)][1]


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank ``q`` quantile of a non-empty sequence."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(len(ordered) * q))
    return ordered[rank - 1]


class Histogram:
    """Bucket counts since start (``le`` semantics) plus, for ``quantiles``, a ring of
    the latest samples."""

    __slots__ = ("bounds", "counts", "sum", "count", "ring")

    def __init__(self, bounds: Sequence[float], ring: bool = True) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.ring = [0.0] * WINDOW if ring else None

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        if self.ring is not None:
            self.ring[self.count & MASK] = value
        self.count += 1

    def quantiles(self) -> tuple[float, float, float]:
        """p50, p95, p99 of the latest ``WINDOW`` samples (zeros when empty)."""
        recent = self.ring[:min(self.count, WINDOW)] if self.ring is not None else []
        if not recent:
            return 0.0, 0.0, 0.0
        ordered = sorted(recent)
        n = len(ordered)
        return tuple(ordered[max(1, math.ceil(n * q)) - 1] for q in (0.5, 0.95, 0.99))  # type: ignore[return-value]

    def buckets(self, scale: float = 1.0) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs for the exposition, bounds times ``scale``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts):
            running += n
            out.append(("+Inf" if math.isinf(bound) else repr(float(bound * scale)), running))
        return out


class OpMetrics:
    """One op's counters. The server updates ``requests``, ``latency_ns``, ``buckets``
    and ``sum_ns`` inline (its hot path); everything else calls ``observe``."""

    __slots__ = ("requests", "errors", "latency_ns", "buckets", "sum_ns")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[ErrorCode, int] = {}
        self.latency_ns = [0] * WINDOW
        self.buckets = [0] * (len(OP_BOUNDS_NS) + 1)
        self.sum_ns = 0

    def observe(self, ns: int, error: ErrorCode | None = None) -> None:
        count = self.requests
        self.latency_ns[count & MASK] = ns
        self.buckets[bisect.bisect_left(OP_BOUNDS_NS, ns)] += 1
        self.sum_ns += ns
        self.requests = count + 1
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1

    def snapshot(self) -> OpStats:
        recent = self.latency_ns[:min(self.requests, WINDOW)]
        p50, p95, p99 = ((percentile(recent, q) for q in (0.5, 0.95, 0.99)) if recent
                         else (0, 0, 0))
        return OpStats(
            requests=self.requests,
            errors={code.name: n for code, n in sorted(self.errors.items())},
            p50_us=round(p50 / 1000, 3), p95_us=round(p95 / 1000, 3),
            p99_us=round(p99 / 1000, 3),
        )


class Metrics:
    """Everything measured about traffic: by op (the server records), by model (the
    guarded-call ops record), and event counters."""

    INVALID = "invalid"  # frames whose op could not be read

    def __init__(self, ops: tuple[str, ...]) -> None:
        self.ops = {name: OpMetrics() for name in (*ops, self.INVALID)}
        self.connections_now = 0
        self.connections_total = 0
        #: reason ("idle" or the config key of the bound refused at) -> connections
        self.connections_closed: dict[str, int] = {}
        self._models: set[str] = set()
        #: (model, input class) -> provider call latency, seconds
        self.provider: dict[tuple[str, str], Histogram] = {}
        #: (model, "input" | "output") -> tokens per call
        self.tokens: dict[tuple[str, str], Histogram] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (route, outcome) -> guarded requests
        self.denials: dict[tuple[str, str], int] = {}  # (reason, limit) -> denials
        self.fallbacks: dict[str, int] = {}  # route -> answered by a later model of its chain
        #: model -> tokens (input, output, cached input, reasoning) and micro-dollars
        self.usage: dict[str, list[int]] = {}
        self.saved: dict[str, int] = {}  # model -> micro-dollars the cache saved
        #: failures of the daemon's periodic tasks, by task (each survives its own)
        self.task_failures = TaskFailures()

    def op(self, name: str) -> OpMetrics:
        return self.ops[name]

    def totals(self) -> tuple[int, int]:
        requests = sum(m.requests for m in self.ops.values())
        errors = sum(sum(m.errors.values()) for m in self.ops.values())
        return requests, errors

    def snapshot(self) -> dict[str, OpStats]:
        return {name: m.snapshot() for name, m in self.ops.items() if m.requests}

    # -- recording (the guarded-call ops) -------------------------------------------

    def model(self, name: str) -> str:
        """``name`` as a label value: the first ``MAX_MODELS`` models keep theirs."""
        if name in self._models:
            return name
        if len(self._models) < MAX_MODELS:
            self._models.add(name)
            return name
        return OTHER

    def attempt(self, model: str, input_tokens: int, seconds: float) -> None:
        key = (self.model(model), input_class(input_tokens))
        hist = self.provider.get(key)
        if hist is None:
            hist = self.provider[key] = Histogram(PROVIDER_BOUNDS_S)
        hist.observe(seconds)

    def usage_of(self, model: str, input_tokens: int, output_tokens: int, cached: int,
                 reasoning: int, micro_usd: int) -> None:
        """A provider call's tokens and cost (the model that answered)."""
        label = self.model(model)
        sums = self.usage.get(label)
        if sums is None:
            sums = self.usage[label] = [0] * len(_USAGE)
            self.tokens[(label, "input")] = Histogram(TOKEN_BOUNDS, ring=False)
            self.tokens[(label, "output")] = Histogram(TOKEN_BOUNDS, ring=False)
        self.tokens[(label, "input")].observe(input_tokens)
        self.tokens[(label, "output")].observe(output_tokens)
        sums[0] += input_tokens
        sums[1] += output_tokens
        sums[2] += cached
        sums[3] += reasoning
        sums[4] += micro_usd

    def latency(self) -> list[LatencyStats]:
        rows = []
        for (model, klass), hist in sorted(self.provider.items()):
            p50, p95, p99 = hist.quantiles()
            rows.append(LatencyStats(model=model, input_tokens=klass, calls=hist.count,
                                     p50_ms=round(p50 * 1e3, 3), p95_ms=round(p95 * 1e3, 3),
                                     p99_ms=round(p99 * 1e3, 3)))
        return rows


class Gauges(NamedTuple):
    """State owned by other components, read at scrape time."""

    uptime_s: float
    open_leases: int
    cache_entries: dict[str, int]  # tier -> entries
    cache_bytes: dict[str, int]
    cache_hits: dict[str, int]  # tier -> hits since start
    cache_misses: dict[str, int]
    semantic_pending: int
    circuits: dict[str, str]  # model -> state value
    transitions: dict[tuple[str, str], int]  # (model, state entered) -> times
    log_written: int
    log_dropped: int
    log_failed: int
    notify_dropped: int
    limit_alerts: dict[str, int]  # "limit@80%" -> times crossed
    alert_counts: dict[str, int]  # alert kind -> alerts fired
    cluster: ClusterStats | None  # None: standalone


_CIRCUIT_STATES = ("closed", "open", "half_open")


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.gauges: Gauges | None = None

    def collect(self) -> Iterator[Metric]:
        m, g = self.metrics, self.gauges
        assert g is not None
        ops = HistogramMetricFamily("llm_sidecar_op_duration_seconds",
                                    "Time the daemon took to answer a request, by op.",
                                    labels=["op"])
        errors = CounterMetricFamily("llm_sidecar_op_errors", "Error replies, by op and code.",
                                     labels=["op", "code"])
        for name, op in m.ops.items():
            if not op.requests:
                continue
            cumulative, running = [], 0
            for bound, n in zip((*OP_BOUNDS_NS, math.inf), op.buckets):
                running += n
                cumulative.append(("+Inf" if math.isinf(bound) else repr(bound / 1e9), running))
            ops.add_metric([name], cumulative, op.sum_ns / 1e9)
            for code, n in op.errors.items():
                errors.add_metric([name, code.name], n)
        yield ops
        yield errors
        duration = HistogramMetricFamily(
            "gen_ai_client_operation_duration_seconds",
            "Provider call latency seen by the client, by model and input size.",
            labels=["gen_ai_request_model", "input_tokens"])
        for (model, klass), hist in sorted(m.provider.items()):
            duration.add_metric([model, klass], hist.buckets(), hist.sum)
        yield duration
        usage = HistogramMetricFamily("gen_ai_client_token_usage",
                                      "Tokens per provider call, by model and token type.",
                                      labels=["gen_ai_request_model", "gen_ai_token_type"])
        for (model, kind), hist in sorted(m.tokens.items()):
            usage.add_metric([model, kind], hist.buckets(), hist.sum)
        yield usage
        yield _counter("llm_sidecar_tokens", "Tokens of provider calls, by model and type.",
                       ["model", "type"], {(model, kind): sums[i]
                                           for model, sums in m.usage.items()
                                           for i, kind in enumerate(_USAGE[:4])})
        yield _counter("llm_sidecar_cost_usd", "Spend on provider calls, by model.",
                       ["model"], {k: sums[4] / 1e6 for k, sums in m.usage.items()})
        yield _counter("llm_sidecar_cache_saved_usd",
                       "What cache hits would have cost, by the model that would have been "
                       "called.", ["model"], {k: v / 1e6 for k, v in m.saved.items()})
        yield _counter("llm_sidecar_requests", "Guarded requests, by route and outcome.",
                       ["route", "outcome"], m.requests)
        yield _counter("llm_sidecar_denials", "Denied requests, by reason and limit.",
                       ["reason", "limit"], m.denials)
        yield _counter("llm_sidecar_fallbacks",
                       "Requests answered by a later model of their chain.", ["route"],
                       m.fallbacks)
        yield _counter("llm_sidecar_alerts", "Alerts fired, by kind.", ["kind"], g.alert_counts)
        yield _counter("llm_sidecar_limit_alerts", "Budget thresholds crossed.",
                       ["threshold"], g.limit_alerts)
        yield _counter("llm_sidecar_cache_hits", "Cache hits, by tier.", ["tier"],
                       g.cache_hits)
        yield _counter("llm_sidecar_cache_misses", "Cache misses, by tier.", ["tier"],
                       g.cache_misses)
        yield _counter("llm_sidecar_circuit_transitions",
                       "Circuit breaker state changes, by model and state entered.",
                       ["model", "state"], g.transitions)
        yield _counter("llm_sidecar_request_log_records", "Request log records, by fate.",
                       ["result"], {"written": g.log_written, "dropped": g.log_dropped,
                                    "failed": g.log_failed})
        yield _counter("llm_sidecar_alert_notifications_dropped",
                       "Alert notifications dropped because the queue was full.", [],
                       {(): g.notify_dropped})
        yield _counter("llm_sidecar_task_failures",
                       "Failures of the daemon's periodic tasks (each keeps running), by "
                       "task.", ["task"], m.task_failures.counts)
        yield _counter("llm_sidecar_connections", "Connections accepted.", [],
                       {(): m.connections_total})
        yield _counter("llm_sidecar_connections_closed",
                       "Connections the daemon closed: idle, or refused at a bound.",
                       ["reason"], m.connections_closed)
        yield _gauge("llm_sidecar_connections_open", "Connections open now.", [],
                     {(): m.connections_now})
        yield _gauge("llm_sidecar_uptime_seconds", "Seconds since the daemon started.", [],
                     {(): g.uptime_s})
        yield _gauge("llm_sidecar_leases_open", "Admitted requests not yet settled.", [],
                     {(): g.open_leases})
        yield _gauge("llm_sidecar_cache_entries", "Cache entries, by tier.", ["tier"],
                     g.cache_entries)
        yield _gauge("llm_sidecar_cache_bytes", "Cache size, by tier.", ["tier"],
                     g.cache_bytes)
        yield _gauge("llm_sidecar_semantic_pending", "Semantic cache writes queued.", [],
                     {(): g.semantic_pending})
        if g.cluster is not None:
            c = g.cluster
            yield _gauge("llm_sidecar_cluster_degraded",
                         "1 while Redis is unreachable and shared limits follow their "
                         "degraded policy.", [], {(): int(c.degraded)})
            yield _gauge("llm_sidecar_cluster_live_daemons",
                         "Daemons sharing the limits, at the last heartbeat.", [],
                         {(): c.live_daemons})
            yield _gauge("llm_sidecar_cluster_pending_adjustments",
                         "Adjustments waiting to reach Redis.", [],
                         {(): c.pending_adjustments})
            yield _counter("llm_sidecar_cluster_lease_requests",
                           "Lease requests sent to Redis, by result.", ["result"],
                           {"granted": c.grants, "refused": c.refusals})
            yield _counter("llm_sidecar_cluster_transitions",
                           "Changes into or out of degraded mode.", [],
                           {(): c.transitions})
        yield _gauge("llm_sidecar_circuit_state",
                     "1 for the state each model's circuit is in.", ["model", "state"],
                     {(model, s): int(state == s) for model, state in g.circuits.items()
                      for s in _CIRCUIT_STATES})


def _labels(key: object) -> list[str]:
    if isinstance(key, tuple):
        return [str(k) for k in key]
    return [str(key)]


def _counter(name: str, doc: str, labels: list[str], values: dict) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(_labels(key) if labels else [], value)
    return family


def _gauge(name: str, doc: str, labels: list[str], values: dict) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(_labels(key) if labels else [], value)
    return family


class Exposition:
    """The Prometheus text of ``metrics`` plus the ``Gauges`` given at each scrape."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self, metrics: Metrics) -> None:
        self._collector = _Collector(metrics)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self._collector)  # type: ignore[arg-type]

    def render(self, gauges: Gauges) -> bytes:
        self._collector.gauges = gauges
        return generate_latest(self.registry)

