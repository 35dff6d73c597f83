"""Routing: which models to call, and in which order.

A route is a named, ordered chain of models (``[routes.NAME]``); a request names its
route, or gets one from the routing rules (task type, input size), or the default
route; a request naming only a model gets a one-model chain. A user past a configured
fraction of a budget is downgraded (the most expensive leading models are dropped).

Models whose circuit (``circuits``) is open are left out of every chain.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from ..errors import InvalidValue
from .circuits import Circuit, State
from .settings import CircuitConfig, RouteConfig, RoutingConfig


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
