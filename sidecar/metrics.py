"""In-daemon counters and latency samples, and the ``stats`` snapshot built from them.

Recording happens on the event loop's thread for every request, so it is kept to a store
into a preallocated ring of the most recent ``WINDOW`` latencies per op plus a counter;
percentiles are computed only when ``stats`` asks, over that window.
"""
from __future__ import annotations

from .protocol import ErrorCode, OpStats

#: Latency samples kept per op (a power of two: the ring index is ``count & MASK``).
WINDOW = 4096
MASK = WINDOW - 1


def percentile(samples: list[int], q: float) -> int:
    """Nearest-rank ``q`` quantile of a non-empty list."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * q // 1))
    return ordered[int(rank) - 1]


class OpMetrics:
    """Counters of one op. The server updates ``requests`` and ``latency_ns`` inline."""

    __slots__ = ("requests", "errors", "latency_ns")

    def __init__(self) -> None:
        self.requests = 0
        self.errors: dict[ErrorCode, int] = {}
        self.latency_ns = [0] * WINDOW

    def observe(self, ns: int, error: ErrorCode | None = None) -> None:
        count = self.requests
        self.latency_ns[count & MASK] = ns
        self.requests = count + 1
        if error is not None:
            self.errors[error] = self.errors.get(error, 0) + 1

    def snapshot(self) -> OpStats:
        recent = self.latency_ns[:min(self.requests, WINDOW)]
        p50 = percentile(recent, 0.50) if recent else 0
        p99 = percentile(recent, 0.99) if recent else 0
        return OpStats(
            requests=self.requests,
            errors={code.name: n for code, n in sorted(self.errors.items())},
            p50_us=round(p50 / 1000, 3),
            p99_us=round(p99 / 1000, 3),
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
