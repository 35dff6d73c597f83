"""In-daemon counters and latency histograms, and the ``stats`` snapshot built from them.

Recording is a few integer operations on the event loop's thread (no locks); percentiles
are computed only when ``stats`` asks.
"""
from __future__ import annotations

from .protocol import ErrorCode, OpStats

_SUB_BITS = 4  # 16 sub-buckets per power of two: a bucket is at most 1/16 wide
_SUB = 1 << _SUB_BITS
_LINEAR = 2 * _SUB  # values below this get a bucket each
_BUCKETS = 64 * _SUB


def bucket_of(ns: int) -> int:
    """Bucket index of a duration in nanoseconds (log-linear, monotone in ``ns``)."""
    bits = ns.bit_length()
    if bits <= _SUB_BITS + 1:
        return ns
    shift = bits - _SUB_BITS - 1
    return (shift << _SUB_BITS) + (ns >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """``[low, high)`` nanoseconds covered by bucket ``index``."""
    if index < _LINEAR:
        return index, index + 1
    shift = (index >> _SUB_BITS) - 1
    mantissa = _SUB + (index & (_SUB - 1))
    return mantissa << shift, (mantissa + 1) << shift


class Histogram:
    """Latency histogram with at most 1/16 relative bucket width."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.total = 0

    def record(self, ns: int) -> None:
        self.counts[min(bucket_of(ns), _BUCKETS - 1)] += 1
        self.total += 1

    def quantile(self, q: float) -> float:
        """Midpoint (ns) of the bucket holding the ``q`` quantile; 0.0 when empty."""
        if not self.total:
            return 0.0
        rank = max(1, round(q * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                low, high = bucket_bounds(index)
                return (low + high) / 2
        raise AssertionError("unreachable: counts sum to total")


class OpMetrics:
    __slots__ = ("requests", "errors", "latency")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[ErrorCode, int] = {}
        self.latency = Histogram()

    def observe(self, ns: int, error: ErrorCode | None) -> None:
        self.requests += 1
        self.latency.record(ns)
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1

    def snapshot(self) -> OpStats:
        return OpStats(
            requests=self.requests,
            errors={code.name: n for code, n in sorted(self.errors.items())},
            p50_us=round(self.latency.quantile(0.50) / 1000, 3),
            p99_us=round(self.latency.quantile(0.99) / 1000, 3),
        )


class Metrics:
    """Everything ``stats`` reports about traffic, by op."""

    INVALID = "invalid"  # frames whose op could not be read

    def __init__(self, ops: tuple[str, ...]) -> None:
        self.ops = {name: OpMetrics() for name in (*ops, self.INVALID)}
        self.connections_now = 0
        self.connections_total = 0

    def op(self, name: str) -> OpMetrics:
        return self.ops[name]

    def totals(self) -> tuple[int, int]:
        requests = sum(m.requests for m in self.ops.values())
        errors = sum(sum(m.errors.values()) for m in self.ops.values())
        return requests, errors

    def snapshot(self) -> dict[str, OpStats]:
        return {name: m.snapshot() for name, m in self.ops.items() if m.requests}
