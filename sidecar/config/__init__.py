"""One typed, frozen configuration: embedded defaults, a TOML file, then environment.

Every setting has a default, so no file is needed. A file (``--config``, else
``LLM_SIDECAR_CONFIG``) overrides defaults; ``LLM_SIDECAR_<SECTION>_<KEY>`` environment
variables override the file. Everything is validated at load; each error names its source
(file or variable), the key and a hint. The sections are declared by the capabilities that
use them (``sidecar.<capability>.settings``, assembled in ``root``); this module loads
them and checks what msgspec's constraints cannot express, asking the owner where a
value is one's own language (limit rules, webhook URLs, filler words). ``paths`` says
where the daemon's socket and files are.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from typing import Any, Mapping

import msgspec

from ..cache.settings import DEFAULT_CACHE_POLICY
from ..cluster.settings import ClusterConfig
from ..errors import ConfigError
from ..ledger.alerts import check_webhook
from ..ledger.settings import AlertsConfig, LedgerConfig
from ..limits.engine import compile_rules
from ..limits.settings import LimitsConfig, PricingConfig
from ..routing.settings import DEFAULT_ROUTES
from ..settings import Section
from ..text.normalize import canonical_filler_words
from ..text.settings import (
    DEFAULT_ESTIMATE_RATIOS, DEFAULT_MODEL_ENCODINGS, KNOWN_ENCODINGS, NormalizeConfig,
    TokensConfig,
)
from ..wire.address import ENV_SOCKET, SYSTEM_SOCKET, client_socket_path, default_socket_candidates
from .paths import (
    SOCKET_HINT, cache_snapshot_path, inherited_listen_fd, journal_path, notify_socket,
    request_log_path, require_absolute, server_socket_path, state_dir,
)
from .root import Config, LogConfig, MetricsConfig, ServerConfig, ShmConfig

__all__ = [
    "Config", "ENV_CONFIG", "ENV_SOCKET", "HINTS", "RESTART_ONLY", "SYSTEM_SOCKET",
    "cache_snapshot_path", "client_socket_path", "default_socket_candidates", "dump",
    "inherited_listen_fd", "journal_path", "load", "notify_socket", "request_log_path",
    "server_socket_path", "state_dir",
]

ENV_PREFIX = "LLM_SIDECAR_"
ENV_CONFIG = "LLM_SIDECAR_CONFIG"

#: Hints shown with a validation error, by dotted key.
HINTS: dict[str, str] = {
    "server.socket": SOCKET_HINT,
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
    "shm.slots": "a power of two, e.g. 65536; the index (64 bytes a slot) must leave room "
                 "in shm.size for answers",
}

# Settings that a SIGHUP reload cannot change (the socket is bound once).
RESTART_ONLY = ("server.socket", "server.socket_mode", "ledger.request_log",
                "metrics.http_port", "metrics.http_address", "cluster.redis_url",
                "cluster.redis_cluster", "cluster.name", "shm.enabled", "shm.size",
                "shm.slots")

_SECTIONS: dict[str, type[Section]] = {
    "server": ServerConfig, "normalize": NormalizeConfig, "tokens": TokensConfig,
    "limits": LimitsConfig, "pricing": PricingConfig, "log": LogConfig,
    "ledger": LedgerConfig, "alerts": AlertsConfig, "metrics": MetricsConfig,
    "cluster": ClusterConfig, "shm": ShmConfig,
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
        require_absolute(server.socket, origin.get("server.socket", ""))
    for prefix, encoding in config.tokens.models.items():
        if encoding not in KNOWN_ENCODINGS:
            key = "tokens.models"
            raise ConfigError(f"model prefix {prefix!r} maps to unknown encoding {encoding!r}",
                              source=origin.get(key, ""), key=key,
                              hint=f"known encodings: {', '.join(KNOWN_ENCODINGS)}")
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
    shm = config.shm
    if shm.slots & (shm.slots - 1) or shm.slots * 64 + (1 << 20) > shm.size:
        key = "shm.slots"
        raise ConfigError(f"{shm.slots} slots in {shm.size} bytes", source=origin.get(key, where),
                          key=key, hint=HINTS[key])
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


def dump(config: Config) -> dict[str, Any]:
    """The effective settings as plain data (for ``config check`` and logs)."""
    data = msgspec.to_builtins(config)
    data.pop("source", None)
    return data
