"""Routing: which models to call, in which order, and circuit breakers that take failing
models out of every chain for a while.

A route is a named, ordered chain of models (``[routes.NAME]``); a request names its
route, or gets one from the routing rules (task type, input size), or the default
route; a request naming only a model gets a one-model chain. A user past a configured
fraction of a budget is downgraded (the most expensive leading models are dropped).

A circuit breaker per model counts outcomes reported after calls: it opens after
``consecutive_failures`` failures in a row, or when the error ratio over ``window``
seconds reaches ``error_ratio`` with at least ``min_requests`` outcomes; and at once, for
as long as the provider says, on a failure carrying Retry-After. An open circuit stays
open ``open_for`` seconds (at least the Retry-After); then it is half-open: up to
``half_open_probes`` chains may include the model at a time; a probe's success closes
the circuit, its failure opens it again. Every method takes ``now``.
"""
from __future__ import annotations

import collections
import enum
import logging
from typing import NamedTuple, Sequence

from ..config import CircuitConfig, RouteConfig, RoutingConfig
from ..errors import InvalidValue

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


class ChainModel(NamedTuple):
    model: str
    provider: str
    timeout: float
    max_tokens: int


class Chain(NamedTuple):
    route: str
    models: tuple[ChainModel, ...]
    skipped: tuple[str, ...]  # models left out because their circuit is open
    downgraded: bool
    retry_after: float  # when the chain is empty: seconds until a model may be tried


class Router:
    """Routes from config, circuit breakers by model."""

    def __init__(self, routing: RoutingConfig, routes: dict[str, RouteConfig],
                 circuits: CircuitConfig) -> None:
        self.circuits: dict[str, Circuit] = {}
        self.reconfigure(routing, routes, circuits)

    def reconfigure(self, routing: RoutingConfig, routes: dict[str, RouteConfig],
                    circuits: CircuitConfig) -> None:
        """New routes and rules (SIGHUP); circuits keep their state."""
        self.routing = routing
        self.routes = routes
        self.circuit_config = circuits
        for circuit in self.circuits.values():
            circuit.cfg = circuits

    def circuit(self, model: str) -> Circuit:
        c = self.circuits.get(model)
        if c is None:
            c = self.circuits[model] = Circuit(model, self.circuit_config)
        return c

    def pick_route(self, route: str, model: str, task: str, input_tokens: int) -> str:
        """The route a request runs on ("" for a model-only request)."""
        if route:
            if route not in self.routes:
                raise InvalidValue(f"unknown route {route!r}; known: "
                                   + ", ".join(sorted(self.routes)))
            return route
        if model:
            return ""
        for rule in self.routing.rules:
            if rule.tasks and task not in rule.tasks:
                continue
            if input_tokens < rule.min_input_tokens:
                continue
            if rule.max_input_tokens and input_tokens > rule.max_input_tokens:
                continue
            return rule.route
        return self.routing.default_route

    def chain(self, route: str, model: str, task: str, input_tokens: int,
              budget_used: float, now: float, deadline: float) -> Chain:
        """The models to try, in order: circuits open now are skipped (a half-open one
        takes a probe), a user at ``budget_used`` >= the downgrade fraction loses the
        leading models."""
        name = self.pick_route(route, model, task, input_tokens)
        if not name:
            models = [ChainModel(model, "", self.routing.model_timeout,
                                 self.routing.model_max_tokens)]
        else:
            cfg = self.routes[name]
            models = [ChainModel(m.model, m.provider, m.timeout, m.max_tokens)
                      for m in cfg.models]
        downgrade = self.routing.downgrade
        downgraded = False
        if (downgrade.enabled and len(models) > 1
                and budget_used >= downgrade.budget_fraction):
            models = models[min(downgrade.skip, len(models) - 1):]
            downgraded = True
        chosen, skipped = [], []
        for m in models:
            circuit = self.circuit(m.model)
            if circuit.available(now):
                circuit.take(now, deadline)
                chosen.append(m)
            else:
                skipped.append(m.model)
        retry_after = 0.0
        if not chosen:
            retry_after = min(self.circuit(m).retry_at(now) for m in skipped) - now
        return Chain(name, tuple(chosen), tuple(skipped), downgraded, max(0.0, retry_after))

    def report(self, model: str, ok: bool, now: float, retry_after: float = 0.0) -> State:
        circuit = self.circuit(model)
        circuit.record(ok, now, retry_after)
        return circuit.state

    def states(self, now: float) -> dict[str, str]:
        out = {}
        for name, c in sorted(self.circuits.items()):
            c._refresh(now)
            out[name] = c.state.value
        return out

    def transitions(self) -> dict[tuple[str, str], int]:
        """``(model, state entered) -> times`` since start."""
        return {(name, state.value): n for name, c in sorted(self.circuits.items())
                for state, n in c.transitions.items()}


def backoff_schedule(base: float, cap: float, attempts: int) -> list[float]:
    """Upper bounds of the pause before each retry (exponential); the client draws each
    pause uniformly below its bound ("full jitter")."""
    return [min(cap, base * 2 ** i) for i in range(max(0, attempts - 1))]


def budget_fraction(rows: Sequence[tuple[int, int]]) -> float:
    """The highest use/amount among ``(used, amount)`` rows (0 when none)."""
    return max((used / amount for used, amount in rows if amount > 0), default=0.0)
