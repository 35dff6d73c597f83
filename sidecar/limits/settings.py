"""Settings of limits and prices: ``[limits]`` with its ``[[limits.rules]]`` and
``[pricing]`` (sources and overrides of model prices)."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..settings import Section


class LimitRuleConfig(Section, kw_only=True):
    """One row of ``[[limits.rules]]``; validated by ``sidecar.limits.engine.parse_rule``."""

    name: str
    scope: str
    metric: str
    window: str = ""
    amount: float
    match: str = ""
    buckets: int = 60
    shadow: bool = False
    burst: str = ""  # sliding windows only: e.g. "2s" (see native/window.pyx, pacing)
    #: cluster mode, Redis unreachable: "local_share", "fail_open", "fail_closed"; ""
    #: follows ``cluster.degraded``
    degraded: Literal["", "local_share", "fail_open", "fail_closed"] = ""


#: The seeds' limits: per-user rates by tier, token rates, per-request cap, budgets.
DEFAULT_LIMIT_RULES: tuple[LimitRuleConfig, ...] = (
    LimitRuleConfig(name="authenticated-rpm", scope="tier", match="authenticated",
                    metric="requests", window="60s", amount=30, burst="2s"),
    LimitRuleConfig(name="anonymous-rpm", scope="tier", match="anonymous",
                    metric="requests", window="60s", amount=5, burst="2s"),
    LimitRuleConfig(name="global-tpm", scope="global", metric="total_tokens", window="60s",
                    amount=150_000),
    LimitRuleConfig(name="user-tpm", scope="user", metric="total_tokens", window="60s",
                    amount=10_000),
    LimitRuleConfig(name="request-tokens", scope="global", metric="total_tokens",
                    window="request", amount=50_000),
    LimitRuleConfig(name="user-hour-tokens", scope="user", metric="total_tokens",
                    window="hour", amount=200_000),
    LimitRuleConfig(name="user-day-tokens", scope="user", metric="total_tokens", window="day",
                    amount=1_000_000),
    LimitRuleConfig(name="global-hour-tokens", scope="global", metric="total_tokens",
                    window="hour", amount=5_000_000),
    LimitRuleConfig(name="global-day-usd", scope="global", metric="usd", window="day",
                    amount=500),
)


class LimitsConfig(Section):
    enabled: bool = True
    timezone: str = "UTC"
    lease_ttl: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    near_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    #: the same user sending the same prompt fingerprint this often within the window is
    #: denied with reason retry_loop; 0 turns the guard off
    retry_loop_max: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5
    retry_loop_window: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    #: (user, prompt) pairs the guard tracks at once (~350 bytes each): past it the least
    #: recently admitted pair is forgotten, so its memory stays bounded
    retry_loop_max_keys: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000
    #: open leases (admitted, not yet settled, released or expired) one peer uid may
    #: hold; past it admits are denied by "open_leases" until one ends. Bounds what one
    #: peer can make the daemon keep (leases, and begin's request for end). 0: no cap
    max_open_leases_per_uid: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 10_000
    #: where settled spend of windows over a minute is persisted; "" = the state
    #: directory, one file per socket path; "off" = not persisted (a crash loses it)
    journal: str = ""
    #: use fractions of a limit that raise a log alert (and a stats counter) when crossed
    alert_thresholds: tuple[Annotated[float, msgspec.Meta(gt=0, le=1)], ...] = (0.5, 0.8, 1.0)
    rules: tuple[LimitRuleConfig, ...] = DEFAULT_LIMIT_RULES


#: USD per million tokens, bounded (the dearest list price is a few hundred) so that
#: no price is taken for a typo of a thousand times.
Rate = Annotated[float, msgspec.Meta(ge=0, le=10_000)]


class PriceConfig(Section):
    """USD per million tokens."""

    input: Rate
    output: Rate
    cached_input: Rate | None = None
    reasoning: Rate | None = None


class PricingConfig(Section):
    #: a LiteLLM ``model_prices_and_context_window.json`` to load, "" for none
    litellm_json: str = ""
    #: model name (or prefix ending in "*") -> price; beats every other source
    overrides: dict[str, PriceConfig] = msgspec.field(default_factory=dict)
    #: the price of models no source knows (flagged as unknown in replies)
    default: PriceConfig = PriceConfig(input=15.0, output=75.0)
