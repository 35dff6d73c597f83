"""Circuit breakers: one per model, fed the outcomes reported after calls.

A breaker opens after ``consecutive_failures`` failures in a row, or when the error ratio
over ``window`` seconds reaches ``error_ratio`` with at least ``min_requests`` outcomes;
and at once, for as long as the provider says, on a failure carrying Retry-After. An open
circuit stays open ``open_for`` seconds (at least the Retry-After); then it is half-open:
up to ``half_open_probes`` chains may include the model at a time; a probe's success
closes the circuit, its failure opens it again. Every method takes ``now``.
"""
from __future__ import annotations

import collections
import enum
import logging

from .settings import CircuitConfig

log = logging.getLogger("sidecar.routing")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Circuit:
    """One model's breaker."""

    __slots__ = ("model", "cfg", "state", "failures", "outcomes", "open_until", "probes",
                 "transitions")

    def __init__(self, model: str, cfg: CircuitConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.state = State.CLOSED
        self.failures = 0  # in a row
        self.outcomes: collections.deque[tuple[float, bool]] = collections.deque()
        self.open_until = 0.0
        self.probes: list[float] = []  # expiry of each probe handed out while half-open
        self.transitions: dict[State, int] = {}  # state entered -> times

    def _to(self, state: State, why: str) -> None:
        if state is not self.state:
            log.warning("circuit %s: %s -> %s (%s)", self.model, self.state.value, state.value,
                        why)
            self.state = state
            self.transitions[state] = self.transitions.get(state, 0) + 1

    def _refresh(self, now: float) -> None:
        if self.state is State.OPEN and now >= self.open_until:
            self._to(State.HALF_OPEN, "open period over")
            self.probes = []
        if self.probes:
            self.probes = [t for t in self.probes if t > now]

    def available(self, now: float) -> bool:
        """Whether a chain may include this model now (without taking a probe)."""
        self._refresh(now)
        if self.state is State.CLOSED:
            return True
        return self.state is State.HALF_OPEN and len(self.probes) < self.cfg.half_open_probes

    def take(self, now: float, until: float) -> None:
        """The model goes into a chain: while half-open that uses one probe, held until
        its outcome is reported or ``until`` passes."""
        if self.state is State.HALF_OPEN:
            self.probes.append(until)

    def retry_at(self, now: float) -> float:
        """When the model may be tried again (``now`` if it may now)."""
        return now if self.available(now) else max(self.open_until, now)

    def record(self, ok: bool, now: float, retry_after: float = 0.0) -> None:
        cfg = self.cfg
        self._refresh(now)
        if self.probes:
            self.probes.pop(0)
        self.outcomes.append((now, ok))
        while self.outcomes and self.outcomes[0][0] <= now - cfg.window:
            self.outcomes.popleft()
        if ok:
            self.failures = 0
            if self.state is State.HALF_OPEN:
                self._to(State.CLOSED, "probe succeeded")
                self.outcomes.clear()
            return
        self.failures += 1
        errors = sum(1 for _, good in self.outcomes if not good)
        if self.state is State.HALF_OPEN:
            why = "probe failed"
        elif self.failures >= cfg.consecutive_failures:
            why = f"{self.failures} failures in a row"
        elif (len(self.outcomes) >= cfg.min_requests
              and errors / len(self.outcomes) >= cfg.error_ratio):
            why = f"error ratio {errors}/{len(self.outcomes)} over {cfg.window:g} s"
        else:
            why = ""
        if not why and retry_after <= 0:
            return
        # open_for when tripped; a provider's Retry-After alone opens it for that long
        period = max(cfg.open_for if why else 0.0, retry_after)
        until = now + period
        self.open_until = max(self.open_until, until) if self.state is State.OPEN else until
        self.probes = []
        self._to(State.OPEN, why or f"provider asked to retry after {retry_after:g} s")
