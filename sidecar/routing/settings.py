"""Settings of routing: ``[routes.NAME]`` chains, ``[routing]`` rules and downgrades,
and ``[circuits]``."""
from __future__ import annotations

from typing import Annotated

import msgspec

from ..settings import Section

Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class RouteModelConfig(Section, kw_only=True):
    model: str
    provider: str = ""  # "openai", "anthropic", "local", ...: for the app and the logs
    timeout: Seconds = 30.0  # per attempt
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096


class RouteConfig(Section, kw_only=True):
    """A named chain of models, tried in order."""

    models: tuple[RouteModelConfig, ...]
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=20)] = 4  # per call, all models
    deadline: Seconds = 60.0  # for the whole call: every attempt and pause
    backoff_base: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.25  # seconds
    backoff_max: Annotated[float, msgspec.Meta(ge=0, le=600)] = 8.0
    #: served (flagged) when every attempt failed and no stale cache entry exists; "" none
    static_fallback: str = ""


def _chain(*specs: tuple[str, str]) -> tuple[RouteModelConfig, ...]:
    return tuple(RouteModelConfig(model=m, provider=p) for m, p in specs)


#: The seeds' chains: frontier first, then cheaper, then a local model.
DEFAULT_ROUTES: dict[str, RouteConfig] = {
    "default": RouteConfig(models=_chain(("claude-sonnet-4", "anthropic"), ("gpt-4o", "openai"),
                                         ("gpt-4o-mini", "openai"), ("local", "local"))),
    "small": RouteConfig(models=_chain(("gpt-4o-mini", "openai"), ("claude-haiku", "anthropic"),
                                       ("local", "local"))),
    "frontier": RouteConfig(models=_chain(("claude-sonnet-4", "anthropic"), ("gpt-4o", "openai"))),
}


class RoutingRuleConfig(Section, kw_only=True):
    """Requests whose task is one of ``tasks`` (any, if empty) and whose input is within
    the token bounds go to ``route``; the first matching rule wins."""

    route: str
    tasks: tuple[str, ...] = ()
    min_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no bound


class DowngradeConfig(Section):
    """A user at or past ``budget_fraction`` of any of their hour or day budgets loses
    the ``skip`` leading (dearest) models of the chain."""

    enabled: bool = True
    budget_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    skip: Annotated[int, msgspec.Meta(ge=1)] = 1


class RoutingConfig(Section):
    default_route: str = "default"
    rules: tuple[RoutingRuleConfig, ...] = (
        RoutingRuleConfig(route="small", tasks=("classify", "extract", "yes_no", "sentiment",
                                                "short_qa")),
        RoutingRuleConfig(route="frontier", tasks=("code", "reasoning", "analysis")),
        RoutingRuleConfig(route="frontier", min_input_tokens=10_000),
    )
    downgrade: DowngradeConfig = DowngradeConfig()
    #: for a request naming a model and no route (a one-model chain)
    model_timeout: Seconds = 30.0
    model_max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096


class CircuitConfig(Section):
    consecutive_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    error_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    window: Seconds = 60.0
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 10
    open_for: Seconds = 60.0
    half_open_probes: Annotated[int, msgspec.Meta(ge=1)] = 1
