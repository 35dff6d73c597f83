"""The whole configuration as one frozen value: the daemon's own sections (``[server]``,
``[log]``, ``[metrics]``) and each capability's, declared in its package's ``settings``."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..cache.settings import CacheConfig
from ..cluster.settings import ClusterConfig
from ..ledger.settings import AlertsConfig, LedgerConfig
from ..limits.settings import LimitsConfig, PricingConfig
from ..routing.settings import DEFAULT_ROUTES, CircuitConfig, RouteConfig, RoutingConfig
from ..settings import Section
from ..text.settings import NormalizeConfig, TokensConfig
from ..wire.framing import DEFAULT_MAX_FRAME

Uid = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class AccessConfig(Section):
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


class ServerConfig(Section):
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


class LogConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class MetricsConfig(Section):
    #: a loopback port serving GET /metrics for a Prometheus scraper; 0: off
    http_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    http_address: str = "127.0.0.1"


class ShmConfig(Section):
    """The shared-memory segment beside the socket (``<socket>.shm``): clients read
    exact-cache answers from it without a round trip."""

    enabled: bool = True
    size: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 34)] = 64 << 20  # bytes
    #: index slots, a power of two; 64 bytes each, out of ``size``
    slots: Annotated[int, msgspec.Meta(ge=64, le=1 << 24)] = 65536
    #: seconds a client may take calls from an admission slice before it asks again
    #: (short: a slice's calls are counted when it is granted)
    slice_ttl: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 1.0


class Config(Section):
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
    shm: ShmConfig = ShmConfig()
    #: Where the settings came from (file path or "defaults"); not a setting itself.
    source: str = "defaults"

    @property
    def socket_mode(self) -> int:
        return int(self.server.socket_mode, 8)
