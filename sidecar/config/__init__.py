"""One typed, frozen configuration: embedded defaults, a TOML file, then environment.

Every setting has a default, so no file is needed. A file (``--config``, else
``LLM_SIDECAR_CONFIG``) overrides defaults; ``LLM_SIDECAR_<SECTION>_<KEY>`` environment
variables override the file. Everything is validated at load; each error names its source
(file or variable), the key and a hint. This is the only module that reads the
environment, including the socket-path resolution shared by the daemon and the clients.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec

from ..errors import ConfigError
from ..wire.framing import DEFAULT_MAX_FRAME
from ..text.normalize import DEFAULT_FILLER_WORDS, canonical_filler_words

ENV_PREFIX = "LLM_SIDECAR_"
KNOWN_ENCODINGS = ("o200k_base", "cl100k_base")
ENV_SOCKET = "LLM_SIDECAR_SOCKET"
ENV_CONFIG = "LLM_SIDECAR_CONFIG"
SYSTEM_SOCKET = Path("/run/llm.sock")
SOCKET_NAME = "llm.sock"


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A config table: frozen, and an unknown key is an error, not ignored."""


Uid = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class AccessConfig(_Section):
    """Who may do what, by the peer's uid and gid (SO_PEERCRED, which the kernel
    vouches for). Apps may connect and use the app ops; operators may also invalidate
    the cache, report circuit outcomes, read per-user costs and every user's limits.
    Root and the daemon's own uid are always operators."""

    #: empty: whoever can open the socket (its mode and group decide); else only these
    app_uids: tuple[Uid, ...] = ()
    app_gids: tuple[Uid, ...] = ()
    operator_uids: tuple[Uid, ...] = ()
    operator_gids: tuple[Uid, ...] = ()
    #: each app uid sees only its own cache entries (namespaces are per uid)
    isolate_cache: bool = False


class ServerConfig(_Section):
    socket: str = ""
    socket_mode: str = "0660"
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = DEFAULT_MAX_FRAME
    frame_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 5.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    #: one user, one process (SO_PEERCRED) may hold this many at once, so a leak or a
    #: hostile peer cannot take every connection; beyond it: OVERLOADED
    max_connections_per_uid: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 2048
    max_connections_per_pid: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024
    #: seconds without a request after which a connection is closed (not one waiting
    #: for a reply; a stalled partial frame is frame_timeout's)
    idle_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    drain_timeout: Annotated[float, msgspec.Meta(ge=0, le=600)] = 5.0
    access: AccessConfig = AccessConfig()


class NormalizeConfig(_Section):
    filler_words: tuple[str, ...] = DEFAULT_FILLER_WORDS


#: Model-name prefixes -> encoding; the longest matching prefix wins.
DEFAULT_MODEL_ENCODINGS: dict[str, str] = {
    "gpt-5": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4.5": "o200k_base",
    "gpt-4o": "o200k_base", "chatgpt-4o": "o200k_base", "gpt-oss": "o200k_base",
    "o1": "o200k_base", "o3": "o200k_base", "o4": "o200k_base",
    "gpt-4": "cl100k_base", "gpt-3.5": "cl100k_base", "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base", "text-embedding-ada-002": "cl100k_base",
}

#: Model-name prefixes without a public tokenizer -> tokens per o200k_base token. These
#: are starting points from public comparisons, not calibrated here: set your own.
DEFAULT_ESTIMATE_RATIOS: dict[str, float] = {
    "claude": 1.20, "gemini": 1.05, "mistral": 1.15, "llama": 1.10, "command": 1.10,
    "default": 1.20,
}

PositiveRatio = Annotated[float, msgspec.Meta(gt=0, le=10)]


class TokensConfig(_Section):
    models: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_MODEL_ENCODINGS))
    estimate_ratios: dict[str, PositiveRatio] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_ESTIMATE_RATIOS))
    #: texts at least this long are counted on a worker thread, off the event loop
    offload_chars: Annotated[int, msgspec.Meta(ge=0)] = 65536


class LimitRuleConfig(_Section, kw_only=True):
    """One row of ``[[limits.rules]]``; validated by ``sidecar.limits.parse_rule``."""

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


class LimitsConfig(_Section):
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


class PriceConfig(_Section):
    """USD per million tokens."""

    input: Rate
    output: Rate
    cached_input: Rate | None = None
    reasoning: Rate | None = None


class PricingConfig(_Section):
    #: a LiteLLM ``model_prices_and_context_window.json`` to load, "" for none
    litellm_json: str = ""
    #: model name (or prefix ending in "*") -> price; beats every other source
    overrides: dict[str, PriceConfig] = msgspec.field(default_factory=dict)
    #: the price of models no source knows (flagged as unknown in replies)
    default: PriceConfig = PriceConfig(input=15.0, output=75.0)


class CachePolicyConfig(_Section, kw_only=True):
    """How one response type is cached: which tiers and for how long."""

    #: "exact" (the normalised request must match), "semantic" (also a verified paraphrase
    #: of the last user turn in the same scope), or "none" (never stored)
    tier: Literal["exact", "semantic", "none"]
    ttl: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600.0  # seconds


#: Response type -> policy (the seeds' table, each TTL the middle of its range).
DEFAULT_CACHE_POLICY: dict[str, CachePolicyConfig] = {
    "classification": CachePolicyConfig(tier="exact", ttl=48 * 3600.0),  # 24-72 h
    "factual_qa": CachePolicyConfig(tier="semantic", ttl=2 * 3600.0),  # 1-4 h
    "summarization": CachePolicyConfig(tier="exact", ttl=8 * 3600.0),  # 4-12 h
    "code": CachePolicyConfig(tier="exact", ttl=3 * 3600.0),  # 1-6 h
    "extraction": CachePolicyConfig(tier="exact", ttl=36 * 3600.0),  # 24-48 h
    "creative": CachePolicyConfig(tier="none", ttl=0.0),
    "general": CachePolicyConfig(tier="exact", ttl=3600.0),  # no type given
}


class SemanticConfig(_Section):
    enabled: bool = True
    #: "minilm" (all-MiniLM-L6-v2 int8, shipped by a PyPI package; real paraphrases) or
    #: "lexical" (hashed n-grams: near-duplicates only, no model)
    embedder: Literal["minilm", "lexical"] = "minilm"
    #: pair verifier after the threshold: "full", "cheap" (numbers, names, question
    #: words only) or "off"
    verifier: Literal["full", "cheap", "off"] = "full"
    #: cosine similarity a hit needs; unset = the measured default for the embedder and
    #: verifier (see sidecar.cache.DEFAULT_THRESHOLDS)
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    #: nearest entries looked at per lookup (the best that passes the verifier is served)
    candidates: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: entries per scope below which search is exact brute force, above it HNSW; unset =
    #: the measured crossover (sidecar.vectors.DEFAULT_EXACT_BELOW)
    exact_below: Annotated[int, msgspec.Meta(ge=0)] | None = None
    #: HNSW storage: "f32", "f16" or "i8"; unset = sidecar.vectors' default (f32: f16 and
    #: i8 were measured to lose recall@1, see python -m bench cache)
    dtype: Literal["f16", "f32", "i8"] | None = None
    #: dimension of client-supplied vectors (0: any, one dimension per scope)
    client_dim: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0


class CacheConfig(_Section):
    enabled: bool = True
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 100_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024 * 1024
    #: an expired entry is kept this long to be served flagged stale when asked
    stale_for: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 86400.0
    #: never store conversations with more user turns than this
    max_turns: Annotated[int, msgspec.Meta(ge=1)] = 8
    #: never store answers sampled at a higher temperature
    max_temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: where the cache is snapshotted; "" = the state directory (one file per socket),
    #: "off" = not persisted
    snapshot: str = ""
    snapshot_interval: Annotated[float, msgspec.Meta(ge=1)] = 300.0
    #: response types; a table given in the file is merged over these defaults
    policy: dict[str, CachePolicyConfig] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_CACHE_POLICY))
    semantic: SemanticConfig = SemanticConfig()


Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]


class RouteModelConfig(_Section, kw_only=True):
    model: str
    provider: str = ""  # "openai", "anthropic", "local", ...: for the app and the logs
    timeout: Seconds = 30.0  # per attempt
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] = 4096


class RouteConfig(_Section, kw_only=True):
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


class RoutingRuleConfig(_Section, kw_only=True):
    """Requests whose task is one of ``tasks`` (any, if empty) and whose input is within
    the token bounds go to ``route``; the first matching rule wins."""

    route: str
    tasks: tuple[str, ...] = ()
    min_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_input_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0  # 0: no bound


class DowngradeConfig(_Section):
    """A user at or past ``budget_fraction`` of any of their hour or day budgets loses
    the ``skip`` leading (dearest) models of the chain."""

    enabled: bool = True
    budget_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8
    skip: Annotated[int, msgspec.Meta(ge=1)] = 1


class RoutingConfig(_Section):
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


class CircuitConfig(_Section):
    consecutive_failures: Annotated[int, msgspec.Meta(ge=1)] = 3
    error_ratio: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    window: Seconds = 60.0
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 10
    open_for: Seconds = 60.0
    half_open_probes: Annotated[int, msgspec.Meta(ge=1)] = 1


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class LedgerConfig(_Section):
    """The request log (JSON lines, size-rotated) and the cost tracker."""

    #: a file path, "" for the state directory, or "off"
    request_log: str = ""
    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024  # per file
    keep: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5  # rotated files kept
    queue: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000  # records waiting
    retention_days: Annotated[int, msgspec.Meta(ge=2, le=400)] = 8  # cost rows by hour
    max_rows: Annotated[int, msgspec.Meta(ge=1000)] = 500_000  # then new users fold


class AlertsConfig(_Section):
    """Thresholds of ``sidecar.alerts`` and where alerts are sent besides the log."""

    cost_increase: Annotated[float, msgspec.Meta(ge=0)] = 0.2  # day over day; 0: off
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20  # calls on each day compared
    zero_price: bool = True
    free_models: tuple[str, ...] = ()  # glob patterns meant to cost $0
    error_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # per model; 0: off
    error_window: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    error_min_calls: Annotated[int, msgspec.Meta(ge=1)] = 20
    repeat: Annotated[float, msgspec.Meta(ge=0)] = 3600.0  # zero-price alerts per model
    command: tuple[str, ...] = ()  # argv; gets each alert as a JSON line on stdin
    webhook: str = ""  # an http(s) URL; each alert is POSTed as JSON
    notify_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0


class ClusterConfig(_Section):
    """Several daemons sharing limits and budgets through Redis (``sidecar.cluster``)."""

    redis_url: str = ""  # "" = standalone; redis://[:password@]host:port/db, rediss://...
    redis_cluster: bool = False  # the URL names a node of a Redis Cluster
    name: str = "default"  # daemons with the same name (and Redis) share their limits
    timeout: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.05  # seconds per Redis call
    degraded: Literal["local_share", "fail_open", "fail_closed"] = "local_share"
    margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1  # local_share keeps this back
    expected_daemons: Annotated[int, msgspec.Meta(ge=1)] = 1  # before Redis was ever seen
    heartbeat: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0  # seconds
    lease_ttl: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0  # unreported lease lives
    divisor: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4  # lease = remaining/(this x live)


class MetricsConfig(_Section):
    #: a loopback port serving GET /metrics for a Prometheus scraper; 0: off
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    http_address: str = "127.0.0.1"


class Config(_Section):
    server: ServerConfig = ServerConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    tokens: TokensConfig = TokensConfig()
    limits: LimitsConfig = LimitsConfig()
    pricing: PricingConfig = PricingConfig()
    cache: CacheConfig = CacheConfig()
    routes: dict[str, RouteConfig] = msgspec.field(default_factory=lambda: dict(DEFAULT_ROUTES))
    routing: RoutingConfig = RoutingConfig()
    circuits: CircuitConfig = CircuitConfig()
    log: LogConfig = LogConfig()
    ledger: LedgerConfig = LedgerConfig()
    alerts: AlertsConfig = AlertsConfig()
    metrics: MetricsConfig = MetricsConfig()
    cluster: ClusterConfig = ClusterConfig()
    #: Where the settings came from (file path or "defaults"); not a setting itself.
    source: str = "defaults"

    @property
    def socket_mode(self) -> int:
        return int(self.server.socket_mode, 8)


#: Hints shown with a validation error, by dotted key.
HINTS: dict[str, str] = {
    "server.socket": "an absolute path such as /run/llm.sock; empty picks the default",
    "server.socket_mode": 'an octal string such as "0660" (owner and group may connect)',
    "server.max_frame_bytes": "bytes, from 1024 to 1073741824; the default is 4194304 (4 MiB)",
    "server.frame_timeout": "seconds a partial frame may stall before its connection is closed",
    "server.max_connections": "connections served at once, from 1 to 1000000",
    "server.max_connections_per_uid": "connections one user may hold at once (SO_PEERCRED)",
    "server.max_connections_per_pid": "connections one process may hold at once",
    "server.idle_timeout": "seconds without a request before a connection is closed",
    "server.drain_timeout": "seconds to answer in-flight requests on SIGTERM",
    "normalize.filler_words": 'a list of single words, e.g. ["please", "just"]',
    "tokens.models": 'a table of model-name prefix = encoding, e.g. "gpt-4o" = "o200k_base"',
    "tokens.estimate_ratios": 'a table of model-name prefix = tokens per o200k token, e.g. claude = 1.2',
    "tokens.offload_chars": "texts at least this long are counted off the event loop",
    "limits.rules": 'a list of [[limits.rules]] tables with name, scope, metric, window, amount',
    "limits.timezone": 'an IANA zone for hour/day budgets, e.g. "UTC" or "Europe/Berlin"',
    "limits.lease_ttl": "seconds a reservation lives without a settle (then it keeps its estimate)",
    "limits.journal": 'a file path, "" for the state directory, or "off"',
    "cache.snapshot": 'a file path, "" for the state directory, or "off"',
    "pricing.litellm_json": "path to a LiteLLM model_prices_and_context_window.json",
    "pricing.overrides": '[pricing.overrides] "my-model" = { input = 1.0, output = 2.0 }',
    "log.level": "one of debug, info, warning, error",
    "log.format": "text for people, json for log collectors",
    "ledger.request_log": 'a file path, "" for the state directory, or "off"',
    "metrics.http_address": "a loopback address (127.0.0.1 or ::1): metrics carry spend",
    "cluster.redis_url": 'redis://host:6379/0 (or rediss:// for TLS); "" runs standalone',
}

# Settings that a SIGHUP reload cannot change (the socket is bound once).
RESTART_ONLY = ("server.socket", "server.socket_mode", "ledger.request_log",
                "metrics.http_port", "metrics.http_address", "cluster.redis_url",
                "cluster.redis_cluster", "cluster.name")

_SECTIONS: dict[str, type[_Section]] = {
    "server": ServerConfig, "normalize": NormalizeConfig, "tokens": TokensConfig,
    "limits": LimitsConfig, "pricing": PricingConfig, "log": LogConfig,
    "ledger": LedgerConfig, "alerts": AlertsConfig, "metrics": MetricsConfig,
    "cluster": ClusterConfig,
}
_MODE_RE = re.compile(r"0?[0-7]{3}")
_PATH_RE = re.compile(r"`\$((?:\.[A-Za-z_]\w*)+)")


def load(path: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Build the config: defaults, then the TOML file, then the environment."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG):
        path = env[ENV_CONFIG]
    raw: dict[str, Any] = {}
    origin: dict[str, str] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read config file: {exc.strerror}", source=source,
                              hint="check the path given to --config") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from None
        for section, values in raw.items():
            if isinstance(values, dict):
                for key in values:
                    origin[f"{section}.{key}"] = source
    _apply_env(raw, origin, env)
    _merge_tables(raw)
    raw["source"] = source
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _explain(exc, origin, source) from None
    return _check(config, origin)


def _apply_env(raw: dict[str, Any], origin: dict[str, str], env: Mapping[str, str]) -> None:
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in (ENV_SOCKET, ENV_CONFIG):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section, _, key = rest.partition("_")
        fields = _SECTIONS[section].__struct_fields__ if section in _SECTIONS else ()
        if key not in fields:
            known = ", ".join(
                f"{ENV_PREFIX}{s.upper()}_{k.upper()}"
                for s, cls in _SECTIONS.items() for k in cls.__struct_fields__)
            raise ConfigError(f"unknown setting {name}", source="environment",
                              hint=f"known variables: {ENV_SOCKET}, {ENV_CONFIG}, {known}")
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table", source=origin.get(section, ""))
        field_type = _SECTIONS[section].__annotations__.get(key, "")
        target[key] = ([w.strip() for w in value.split(",") if w.strip()]
                       if "tuple" in str(field_type) else value)
        origin[f"{section}.{key}"] = name
    if env.get(ENV_SOCKET):
        raw.setdefault("server", {})["socket"] = env[ENV_SOCKET]
        origin["server.socket"] = ENV_SOCKET


def _merge_tables(raw: dict[str, Any]) -> None:
    """Tables of defaults (model maps, cache policies) are extended by the file, not
    replaced."""
    tokens = raw.get("tokens")
    if isinstance(tokens, dict):
        for key, defaults in (("models", DEFAULT_MODEL_ENCODINGS),
                              ("estimate_ratios", DEFAULT_ESTIMATE_RATIOS)):
            if isinstance(tokens.get(key), dict):
                tokens[key] = {**defaults, **tokens[key]}
    cache = raw.get("cache")
    if isinstance(cache, dict) and isinstance(cache.get("policy"), dict):
        cache["policy"] = {**msgspec.to_builtins(DEFAULT_CACHE_POLICY), **cache["policy"]}
    if isinstance(raw.get("routes"), dict):
        raw["routes"] = {**msgspec.to_builtins(DEFAULT_ROUTES), **raw["routes"]}


def _explain(exc: msgspec.ValidationError, origin: dict[str, str], source: str) -> ConfigError:
    message = str(exc)
    match = _PATH_RE.search(message)
    key = match.group(1)[1:] if match else ""
    unknown = re.search(r"unknown field `(\w+)`", message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        section = _SECTIONS.get(key.partition(".")[0])
        known = ", ".join(section.__struct_fields__) if section and "." in key else ", ".join(_SECTIONS)
        return ConfigError("unknown key", source=origin.get(key, source), key=key,
                           hint=f"known keys here: {known}")
    message = message.split(" - at ")[0]
    return ConfigError(message, source=origin.get(key, source), key=key, hint=HINTS.get(key, ""))


def _check(config: Config, origin: dict[str, str]) -> Config:
    """Cross-field and format checks msgspec's constraints cannot express."""
    server = config.server
    if not _MODE_RE.fullmatch(server.socket_mode):
        key = "server.socket_mode"
        raise ConfigError(f"invalid mode {server.socket_mode!r}", source=origin.get(key, ""),
                          key=key, hint=HINTS[key])
    if server.socket:
        _require_absolute(server.socket, origin.get("server.socket", ""))
    for prefix, encoding in config.tokens.models.items():
        if encoding not in KNOWN_ENCODINGS:
            key = "tokens.models"
            raise ConfigError(f"model prefix {prefix!r} maps to unknown encoding {encoding!r}",
                              source=origin.get(key, ""), key=key,
                              hint=f"known encodings: {', '.join(KNOWN_ENCODINGS)}")
    from ..limits.engine import compile_rules

    compile_rules(config.limits, "" if config.source == "defaults" else config.source)
    where = "" if config.source == "defaults" else config.source
    routing = config.routing
    for key, route in [("routing.default_route", routing.default_route)] + [
            (f"routing.rules[{i}].route", r.route) for i, r in enumerate(routing.rules)]:
        if route not in config.routes:
            raise ConfigError(f"route {route!r} is not defined", source=where, key=key,
                              hint="define it as [routes." + route + "] or name one of: "
                                   + ", ".join(sorted(config.routes)))
    for name, route in config.routes.items():
        if not route.models:
            raise ConfigError(f"route {name!r} has no models", source=where,
                              key=f"routes.{name}.models",
                              hint='models = [{model = "gpt-4o", provider = "openai"}]')
    if config.alerts.webhook:
        from ..ledger.alerts import check_webhook

        try:
            check_webhook(config.alerts.webhook)
        except ConfigError as exc:
            raise ConfigError(exc.detail, source=origin.get("alerts.webhook", where),
                              key=exc.key, hint=exc.hint) from None
    if config.cluster.redis_url:
        key = "cluster.redis_url"
        scheme = config.cluster.redis_url.partition("://")[0]
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"not a Redis URL: {config.cluster.redis_url!r}",
                              source=origin.get(key, where), key=key, hint=HINTS[key])
    try:
        loopback = ipaddress.ip_address(config.metrics.http_address).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        key = "metrics.http_address"
        raise ConfigError(f"{config.metrics.http_address!r} is not a loopback address",
                          source=origin.get(key, where), key=key, hint=HINTS[key])
    if "default" not in config.tokens.estimate_ratios:
        key = "tokens.estimate_ratios"
        raise ConfigError("needs a \"default\" ratio for models matching no prefix",
                          source=origin.get(key, ""), key=key, hint=HINTS[key])
    try:
        words = canonical_filler_words(config.normalize.filler_words)
    except ConfigError as exc:
        raise ConfigError(exc.detail, source=origin.get(exc.key, ""), key=exc.key,
                          hint=exc.hint) from None
    return msgspec.structs.replace(
        config, normalize=msgspec.structs.replace(config.normalize, filler_words=words))


def _require_absolute(socket: str, source: str) -> None:
    """The daemon's socket path must not depend on the directory it was started in."""
    if not os.path.isabs(socket):
        key = "server.socket"
        raise ConfigError(f"socket path {socket!r} is not absolute", source=source, key=key,
                          hint=HINTS[key])


def dump(config: Config) -> dict[str, Any]:
    """The effective settings as plain data (for ``config check`` and logs)."""
    data = msgspec.to_builtins(config)
    data.pop("source", None)
    return data


# --- socket path ----------------------------------------------------------------------


def default_socket_candidates(env: Mapping[str, str] | None = None) -> list[Path]:
    """Default socket paths, most preferred first."""
    env = os.environ if env is None else env
    paths = [SYSTEM_SOCKET]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        paths.append(Path(runtime) / SOCKET_NAME)
    paths.append(Path(f"/tmp/llm-sidecar-{os.getuid()}") / SOCKET_NAME)
    return paths


def server_socket_path(config: Config, explicit: str | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon listens: ``--socket``, config/env, else the first default it may
    create (``/run/llm.sock``, ``$XDG_RUNTIME_DIR/llm.sock``, ``/tmp/llm-sidecar-<uid>``)."""
    if explicit:
        _require_absolute(explicit, "--socket")
        return Path(explicit)
    if config.server.socket:
        return Path(config.server.socket)
    for path in default_socket_candidates(env):
        parent = path.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return path
        if not parent.exists() and os.access(parent.parent, os.W_OK | os.X_OK):
            return path
    raise ConfigError("no writable directory for the socket",
                      hint="pass --socket PATH or set LLM_SIDECAR_SOCKET")


def client_socket_path(explicit: str | os.PathLike[str] | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """Where a client connects: explicit, ``LLM_SIDECAR_SOCKET``, else the first default
    path that exists (else the last one, so the error names where a daemon would be)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    candidates = default_socket_candidates(env)
    for path in candidates:
        if path.exists():
            return path
    return candidates[-1]


def inherited_listen_fd(env: Mapping[str, str] | None = None) -> int | None:
    """The listening socket systemd passed by socket activation (fd 3), if it passed
    exactly one to this process (``LISTEN_PID`` is ours, ``LISTEN_FDS=1``)."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    if env.get("LISTEN_FDS") != "1":
        raise ConfigError(f"socket activation passed {env.get('LISTEN_FDS')!r} sockets",
                          source="environment", key="LISTEN_FDS",
                          hint="the .socket unit must have exactly one ListenStream=")
    return 3


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where derived files (compiled rank tables) are cached: systemd's CACHE_DIRECTORY,
    else ``$XDG_CACHE_HOME/llm-sidecar``, else ``~/.cache/llm-sidecar``."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-sidecar"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where durable state lives: systemd's STATE_DIRECTORY, else
    ``$XDG_STATE_HOME/llm-sidecar``, else ``~/.local/state/llm-sidecar``."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "llm-sidecar"


def journal_path(config: Config, socket_path: Path) -> Path | None:
    """The limits journal of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.limits.journal, socket_path, "limits-{}.journal")


def request_log_path(config: Config, socket_path: Path) -> Path | None:
    """The request log of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.ledger.request_log, socket_path, "requests-{}.jsonl")


def cache_snapshot_path(config: Config, socket_path: Path) -> Path | None:
    """The cache snapshot of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.cache.snapshot, socket_path, "cache-{}.snapshot")


def _state_file(setting: str, socket_path: Path, pattern: str) -> Path | None:
    """``setting`` as a path: "off" is None, "" a file of the state directory named by
    ``pattern`` after the socket path (so two daemons never share one)."""
    if setting == "off":
        return None
    if setting:
        return Path(setting)
    digest = hashlib.sha1(str(socket_path).encode()).hexdigest()[:12]
    return state_dir() / pattern.format(digest)


def notify_socket(env: Mapping[str, str] | None = None) -> str | None:
    """systemd's notification socket (``NOTIFY_SOCKET``), if started with Type=notify."""
    env = os.environ if env is None else env
    return env.get("NOTIFY_SOCKET") or None
