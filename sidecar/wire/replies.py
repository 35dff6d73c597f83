"""Every reply the daemon sends: one frozen msgspec Struct per op (tagged like its request)
plus ``Error``, and the structs that nest in them (stats, costs, cache and limit rows)."""
from __future__ import annotations

import msgspec

from .values import NIL_RAW, ErrorCode, RequestId


# --- replies --------------------------------------------------------------------------


class Reply(msgspec.Struct, tag_field="op", frozen=True, kw_only=True):
    id: RequestId = 0


class HelloReply(Reply, tag="hello"):
    protocol: int
    server: str
    features: list[str]
    max_frame: int
    pid: int
    #: seconds of silence after which the daemon closes a connection (0: never); clients
    #: retire pooled connections well before, so a request never races the close
    idle_timeout: float = 0.0


class Pong(Reply, tag="ping"):
    """The reply to ``Ping``."""


class FingerprintReply(Reply, tag="fingerprint"):
    normalized: str
    key: bytes  # 16 bytes, big-endian XXH3-128
    spec: str  # spec id: keys are comparable only under the same spec


class OpStats(msgspec.Struct, frozen=True):
    requests: int
    errors: dict[str, int]  # ErrorCode name -> count
    p50_us: float
    p99_us: float
    p95_us: float = 0.0


class LatencyStats(msgspec.Struct, frozen=True, kw_only=True):
    """Provider call latency of one model for one input size class, over its latest
    calls (``metrics.WINDOW``)."""

    model: str
    input_tokens: str  # "0-1K", "1K-10K", "10K-50K", "50K+"
    calls: int  # since start
    p50_ms: float
    p95_ms: float
    p99_ms: float


class AlertInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An alert as it fired (see ``sidecar.ledger.alerts``)."""

    kind: str  # "cost_per_request", "budget", "zero_price", "error_ratio"
    subject: str  # the model, or the limit and threshold
    message: str
    at: float  # epoch seconds
    value: float = 0.0
    threshold: float = 0.0


class LogStats(msgspec.Struct, frozen=True, kw_only=True):
    """The request log's writer (``path`` "off" when disabled)."""

    path: str
    written: int = 0
    dropped: int = 0  # the queue was full
    failed: int = 0  # lost to write errors
    rotations: int = 0
    error: str = ""


class ClusterStats(msgspec.Struct, frozen=True, kw_only=True):
    """Cluster mode (``sidecar.cluster``): where the shared limits live and how it goes."""

    redis: str  # the Redis URL, password removed
    name: str
    daemon: str  # this daemon's member id
    degraded: bool
    reason: str = ""  # why degraded ("" when not)
    degraded_since: float = 0.0  # epoch seconds
    live_daemons: int = 0  # at the last heartbeat
    shared_limits: int = 0
    leases_open: int = 0  # counters this daemon holds a Redis lease on
    pending_adjustments: int = 0  # (counter, slot) adjustments not yet in Redis
    acquires: int = 0  # lease requests sent since start
    grants: int = 0  # of those, granted
    refusals: int = 0  # of those, refused because the cluster's limit was reached
    transitions: int = 0  # into or out of degraded mode


class CostTotals(msgspec.Struct, frozen=True, kw_only=True):
    """Sums over some guarded requests and the unit economics derived from them."""

    requests: int = 0  # provider calls that ended (cache hits and denials excluded)
    errors: int = 0  # of those, the ones no model answered
    hits_exact: int = 0
    hits_semantic: int = 0
    denials: int = 0
    input_tokens: int = 0  # includes cached input tokens
    output_tokens: int = 0  # includes reasoning tokens
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usd: float = 0.0
    saved_usd: float = 0.0  # what the cache hits would have cost
    cost_per_request: float = 0.0  # usd / requests
    hit_rate: float = 0.0  # hits / (hits + requests)


class CostGroup(msgspec.Struct, frozen=True, kw_only=True):
    key: str  # a model, user or route
    totals: CostTotals


class CostPeriod(msgspec.Struct, frozen=True, kw_only=True):
    start: float  # epoch seconds: the hour's or the day's start in the limits' zone
    totals: CostTotals


class BuildInfo(msgspec.Struct, frozen=True):
    version: str
    protocol: int
    python: str
    native: dict[str, str]  # compiled module -> file it was loaded from
    libraries: dict[str, str]  # dependency -> version


class StatsReply(Reply, tag="stats"):
    uptime_s: float
    pid: int
    socket: str
    config_epoch: int
    connections_now: int
    connections_total: int
    requests_total: int
    errors_total: int
    ops: dict[str, OpStats]  # op name ("invalid" for frames with no readable op)
    build: BuildInfo
    limit_alerts: dict[str, int] = {}  # "limit@80%" -> times an admit crossed it
    limit_denials: dict[str, int] = {}  # limit name or "retry_loop" -> denials
    limit_near: dict[str, int] = {}  # limit name -> admits that left it >= near_fraction
    limit_shadow: dict[str, int] = {}  # shadow limit -> admits it would have denied
    open_leases: int = 0
    retry_loop_keys: int = 0  # (user, prompt) pairs the retry-loop guard tracks now
    retry_loop_max_keys: int = 0  # its cap (limits.retry_loop_max_keys)
    retry_loop_forgotten: int = 0  # pairs still in their window dropped at the cap
    task_failures: dict[str, int] = {}  # periodic task -> failures (each keeps running)
    cache: CacheStats | None = None
    circuits: dict[str, str] = {}  # model -> "closed" | "open" | "half_open"
    latency: list[LatencyStats] = []  # provider calls by model and input size
    spend_today: CostTotals | None = None
    alerts: list[AlertInfo] = []  # the latest, oldest first
    alert_counts: dict[str, int] = {}  # kind -> alerts fired since start
    request_log: LogStats | None = None
    cluster: ClusterStats | None = None  # None: standalone
    #: reason -> connections the daemon closed: "idle", or refused at a bound named by
    #: its config key ("max_connections", "max_connections_per_uid", ..._per_pid")
    connections_closed: dict[str, int] = {}
    shm: ShmStats | None = None  # None: no shared-memory segment


class ShmClientStats(msgspec.Struct, frozen=True):
    """One client process's use of the segment, as it told the daemon (``hits`` ops)."""

    pid: int
    uid: int
    hits: int  # exact hits it read from the segment, the daemon still held the answer
    unknown: int  # hits told after their answer had left the cache (counted nowhere)
    fallbacks: int  # lookups the segment could not answer: they went to the socket
    told_at: float  # epoch seconds of its latest report
    admits: int = 0  # calls it took from admission slices (counted as each slice ends)


class ShmStats(msgspec.Struct, frozen=True):
    path: str
    generation: int
    slots: int
    arena_bytes: int
    published: int  # answers put in the segment since the daemon started
    not_published: int  # answers it could not hold: served by the socket only
    clients: list[ShmClientStats]  # the latest reporting processes, most recent first
    slice_calls: int = 0  # calls admitted in advance in admission slices
    slice_taken: int = 0  # of the slices ended, calls their clients took
    slice_released: int = 0  # and calls given back untaken
    slices_open: int = 0  # slices not ended yet


class CountReply(Reply, tag="count"):
    input_tokens: int
    output_tokens: int  # max_tokens when given, else 0
    total_tokens: int
    exact: bool  # False: an estimate (no public tokenizer, tools, images, ...)
    encoding: str  # the encoding counted with ("o200k_base", ...)
    model: str  # the model asked about, "" when an encoding was given
    estimate_ratio: float  # 1.0 when exact; else tokens per token of ``encoding``


class AdmitReply(Reply, tag="admit"):
    allowed: bool
    lease: str  # "" when denied
    reason: str  # "" when allowed; "limit", "burst" (ahead of the limit's pace) or "retry_loop"
    limit: str  # the limit that denied (the one that frees last)
    used: float  # its current use (USD for usd limits)
    amount: float  # its amount
    retry_after: float | None  # seconds; None when no time can be promised
    input_tokens: int  # the estimate reserved
    output_tokens: int
    usd: float
    usd_known: bool  # False: the model had no price and the default price was used
    near: list[str]  # limits at or above the near fraction after this admit
    shadow: list[str]  # shadow-mode limits that would have denied
    ttl: float  # seconds the lease lives without a settle


class SettleReply(Reply, tag="settle"):
    found: bool  # False: no such lease (never admitted, or forgotten long ago)
    duplicate: bool  # already settled before: nothing changed
    expired: bool  # settled after its TTL: the truth replaced the estimate all the same
    usd: float  # the cost recorded (for a duplicate: what the first settle recorded)
    durable: bool  # persisted before this reply
    released: bool = False  # the lease had been released: nothing is charged


class ReleaseReply(Reply, tag="release"):
    released: bool


class LimitUse(msgspec.Struct, frozen=True):
    name: str
    scope: str
    key: str
    metric: str
    window: str
    amount: float
    used: float
    shadow: bool


class LimitsReply(Reply, tag="limits"):
    limits: list[LimitUse]
    open_leases: int


class CacheGetReply(Reply, tag="cache_get"):
    hit: bool
    key: bytes  # the exact-tier key of the request (16 bytes)
    tier: str = ""  # "exact" or "semantic" on a hit
    response: msgspec.Raw = NIL_RAW  # as stored (msgpack; nil on a miss): see ``value()``
    similarity: float = 0.0  # 1.0 for exact hits
    verdict: str = ""  # the semantic verifier's verdict on a semantic hit
    query: str = ""  # the last user turn the entry was stored for
    cached_at: float = 0.0  # epoch seconds
    stale: bool = False  # expired, served because allow_stale was set
    input_tokens: int = 0  # the usage of the call that produced the answer (0: not told)
    output_tokens: int = 0
    reason: str = ""  # on a miss: "miss", "bypassed" or "disabled"

    def value(self) -> object:
        """The cached response decoded (None on a miss)."""
        return msgspec.msgpack.decode(self.response)


class CachePutReply(Reply, tag="cache_put"):
    stored: bool
    key: bytes
    tier: str = ""  # the policy's tier when stored
    ttl: float = 0.0
    reason: str = ""  # why not stored: "error", "tool_calls", "tool_turns", ...


class CacheInvalidateReply(Reply, tag="cache_invalidate"):
    removed: int


class TierStats(msgspec.Struct, frozen=True):
    entries: int
    bytes: int
    hits: int
    misses: int
    hit_rate_pct: float
    stale_serves: int
    evictions: int
    expirations: int
    verifier_refusals: int = 0


class CacheStats(msgspec.Struct, frozen=True):
    enabled: bool
    max_entries: int
    max_bytes: int
    tiers: dict[str, TierStats]  # "exact", "semantic"
    stores: int
    not_stored: dict[str, int]  # reason -> count
    bypassed: int
    snapshot: str  # path, or "off"
    snapshot_at: float  # epoch seconds of the last snapshot written or restored, 0 = none
    semantic: str = ""  # "loading", "ready", "off", or "failed: <why>" (the tier stopped)
    threshold: float = 0.0  # the similarity a semantic hit needs
    semantic_pending: int = 0  # semantic writes queued, not yet applied


class ChainModel(msgspec.Struct, frozen=True):
    model: str
    provider: str
    timeout: float  # seconds per attempt
    max_tokens: int


class BeginReply(Reply, tag="begin", kw_only=True):
    """``outcome``: "hit" (a cached answer: ``response``, ``tier``, ``similarity``,
    ``stale``), "go" (call: ``lease``, ``chain``, ``deadline`` seconds for everything,
    ``backoff`` bounds of the pauses between attempts, ``max_attempts``), or "deny"
    (``reason``: a limit's "limit"/"burst"/"retry_loop", or "no_model" when every
    model's circuit is open; ``limit``, ``retry_after``)."""

    outcome: str
    key: bytes = b""  # the request's exact cache key
    response: msgspec.Raw = NIL_RAW
    tier: str = ""
    similarity: float = 0.0
    verdict: str = ""
    stale: bool = False
    lease: str = ""
    route: str = ""
    chain: list[ChainModel] = []
    skipped: list[str] = []  # models left out: circuit open
    downgraded: bool = False
    deadline: float = 0.0
    backoff: list[float] = []
    max_attempts: int = 0
    static_fallback: str = ""
    reason: str = ""
    limit: str = ""
    retry_after: float | None = None
    input_tokens: int = 0  # the estimate admitted
    output_tokens: int = 0
    usd: float = 0.0

    def value(self) -> object:
        """A hit's cached response decoded (None otherwise)."""
        return msgspec.msgpack.decode(self.response)


class EndReply(Reply, tag="end"):
    found: bool  # the lease was known
    duplicate: bool  # ended before: nothing changed
    usd: float  # what the call cost (priced for the answering model)
    durable: bool
    stored: bool  # the response went into the cache
    reason: str = ""  # why it was not stored


class ExtendReply(Reply, tag="extend"):
    allowed: bool
    reason: str = ""  # "limit" (a budget ran out) or "unknown_lease"
    limit: str = ""
    used: float = 0.0
    amount: float = 0.0
    retry_after: float | None = None


class RouteReply(Reply, tag="route"):
    route: str
    chain: list[ChainModel]
    skipped: list[str]
    downgraded: bool
    retry_after: float  # when the chain is empty: seconds until a model may be tried


class ReportReply(Reply, tag="report"):
    state: str  # the model's circuit now: "closed", "open", "half_open"


class CostsReply(Reply, tag="costs"):
    since: float  # the first hour counted
    until: float
    by: str
    totals: CostTotals
    groups: list[CostGroup]  # the top groups by spend
    other_groups: int  # groups beyond the top (their sums are in ``totals``)
    hours: list[CostPeriod]
    days: list[CostPeriod]


class MetricsReply(Reply, tag="metrics"):
    text: str  # Prometheus text format 0.0.4
    content_type: str


class HitsReply(Reply, tag="hits"):
    accounted: int  # hits whose answer the daemon still holds: counted as served
    unknown: int  # answers gone since (evicted, invalidated): counted nowhere


class SliceReply(Reply, tag="slice", kw_only=True):
    """``leases``: the calls admitted, in the order the client takes them (none: denied,
    as ``AdmitReply`` says why with ``reason``, ``limit``, ``used``, ``amount``,
    ``retry_after``). Each call's estimate is ``input_tokens``, ``output_tokens``,
    ``usd``; ``near`` and ``shadow`` are as the slice's last admit left them."""

    grant: int = 0  # the slice's id (0: none granted)
    leases: list[str] = []
    ttl: float = 0.0  # seconds the client may take calls from it
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0
    usd_known: bool = True
    near: list[str] = []
    shadow: list[str] = []
    reason: str = ""
    limit: str = ""
    used: float = 0.0
    amount: float = 0.0
    retry_after: float | None = None
    lease_ttl: float = 0.0  # seconds each call's lease lives without a settle


class SliceEndReply(Reply, tag="slice_end"):
    taken: int  # calls the client took (as its slab says, at most the slice's)
    released: int  # calls given back


class Error(Reply, tag="error", kw_only=True):
    id: RequestId | None = None
    code: ErrorCode
    message: str


REPLY_TYPES: tuple[type[Reply], ...] = (
    HelloReply, Pong, FingerprintReply, StatsReply, CountReply, AdmitReply, SettleReply,
    ReleaseReply, LimitsReply, CacheGetReply, CachePutReply, CacheInvalidateReply, BeginReply,
    EndReply, ExtendReply, RouteReply, ReportReply, CostsReply, MetricsReply, HitsReply,
    SliceReply, SliceEndReply, Error,
)
