"""Wire protocol: every request and reply as a frozen msgspec Struct; no I/O.

A frame body is a msgpack map tagged by ``op``. Requests form one tagged union decoded by
one typed decoder (``REQUEST_DECODER``); replies form another (``REPLY_DECODER``). Every
request carries an ``id`` (0 to 2**63 - 1) that its reply echoes; an ``Error`` reply to a
frame whose id could not be read has ``id = None``. Unknown map keys are ignored, so a newer
client can talk to an older daemon that lacks a field it only adds.
"""
from __future__ import annotations

import enum
from typing import Annotated, ClassVar, Literal, Union

import msgspec

#: Bumped on any incompatible change of framing or of an existing message.
PROTOCOL_VERSION = 1

RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

# Every number on the wire is bounded to what the daemon can hold and compute with: the
# limits engine adds tokens and micro-dollars in int64, so one request's amounts (and
# their sums over a window) must stay far below 2**63; floats must be finite (a NaN
# fails every range check). The bounds are far beyond any real call.
#: tokens in one field of one request (~1.1e12)
MAX_TOKENS = 2**40
#: USD of one call (an explicit ``usd`` on admit, settle or end)
MAX_USD = 1e6
#: seconds of a provider's Retry-After or a call's latency (one day)
MAX_SECONDS = 86_400.0
#: epoch seconds accepted as a time (year 3000)
MAX_EPOCH = 32_503_680_000.0
#: characters of a caller's name for something (user, key, model, route, namespace, ...)
MAX_NAME = 512

Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=MAX_USD)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
Epoch = Annotated[float, msgspec.Meta(ge=0, le=MAX_EPOCH)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
LeaseId = Annotated[str, msgspec.Meta(max_length=128)]
HttpStatus = Annotated[int, msgspec.Meta(ge=0, le=999)]

NIL = b"\xc0"  # msgpack nil: the default of opaque ``Raw`` fields (no value)
_NIL = msgspec.Raw(NIL)


class ErrorCode(enum.IntEnum):
    """Integer codes carried by ``Error`` replies."""

    MALFORMED = 1  # not msgpack, or trailing bytes
    UNKNOWN_OP = 2  # no such op
    MISSING_FIELD = 3  # a required field is absent
    WRONG_TYPE = 4  # a field has the wrong type or an out-of-range value
    TOO_LARGE = 5  # the frame exceeds the max frame size; the connection is closed
    OVERLOADED = 6  # a configured bound (connections) is reached
    INTERNAL = 7  # a bug or backend failure inside the daemon
    INVALID_VALUE = 8  # well-typed but unacceptable (e.g. both text and messages)
    UNKNOWN_ENCODING = 9  # no such tokenizer encoding; the message lists the known ones
    FORBIDDEN = 10  # the peer's uid/gid may not do this (``[server.access]``)


# --- requests -------------------------------------------------------------------------


class Request(msgspec.Struct, tag_field="op", frozen=True, kw_only=True):
    """Base of all requests. ``id`` may be left 0 when a client assigns ids."""

    id: RequestId = 0
    #: Safe to send again on a fresh connection when the first one died mid-call.
    idempotent: ClassVar[bool] = True


class Hello(Request, tag="hello"):
    client: Name = ""


class Ping(Request, tag="ping"):
    """Liveness: answered with a ``Pong`` carrying the same id."""


class Fingerprint(Request, tag="fingerprint"):
    text: str


class Stats(Request, tag="stats"):
    """Ask for the daemon's ``StatsReply``."""


class Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One chat message as the OpenAI chat API takes it. ``content`` is text or a list of
    parts (``{"type": "text", "text": ...}``, image parts, ...)."""

    role: Annotated[str, msgspec.Meta(max_length=64)]
    content: str | list[dict[str, object]] | None = None
    name: Name | None = None
    tool_calls: list[dict[str, object]] | None = None
    tool_call_id: Name | None = None


class Count(Request, tag="count"):
    """Count tokens of ``text`` or of a chat (``messages``, optional ``tools``), for
    ``model`` (mapped to an encoding, or estimated) or an explicit ``encoding``.
    ``max_tokens`` is added as the output estimate; ``special`` counts special-token text
    (such as ``<|endoftext|>``) as the one special token instead of as ordinary text."""

    text: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, object]] | None = None
    model: Name = ""
    encoding: Name = ""
    max_tokens: Tokens | None = None
    special: bool = False


class Admit(Request, tag="admit"):
    """Ask to spend: reserves the estimate on every limit that applies, all or none.

    Input tokens come from ``input_tokens`` when given, else are counted from ``text`` or
    ``messages`` (+ ``tools``) for ``model``; output from ``max_tokens``; USD from
    ``usd`` when given, else priced for ``model``. No ``user`` means the anonymous tier
    (partitioned by ``key`` when given). ``wait`` seconds: queue (FIFO per limit) until it
    fits instead of being denied at once. ``idempotent`` is False: a resend could reserve
    twice."""

    idempotent: ClassVar[bool] = False
    user: Name = ""
    key: Name = ""
    model: Name = ""
    route: Name = ""
    input_tokens: Tokens | None = None
    text: str | None = None
    messages: list[Message] | None = None
    tools: list[dict[str, object]] | None = None
    max_tokens: Tokens | None = None
    usd: Usd | None = None
    wait: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class Settle(Request, tag="settle"):
    """Replace a lease's estimate by what the call really used. Settling twice is a no-op.
    ``input_tokens`` includes ``cached_input_tokens`` (OpenAI's convention); ``usd``
    overrides the price computed for the lease's model."""

    lease: LeaseId
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    usd: Usd | None = None


class Release(Request, tag="release"):
    """Cancel an unused reservation (the call was never made)."""

    lease: LeaseId


class Limits(Request, tag="limits"):
    """Current use of every limit counter, or only of ``user``'s."""

    user: Name | None = None


class CacheRequest(Request, tag="_cache"):
    """What identifies a cached answer: the chat (``messages``, or ``text`` as one user
    turn), ``model``, sampling (``temperature`` and any other ``params`` such as top_p,
    seed, stop, max_tokens), ``tools``, ``response_format`` and a caller ``namespace``
    (tenant). Texts are normalised (``native/normalize``) before keying."""

    namespace: Name = ""
    model: Name = ""
    messages: list[Message] | None = None
    text: str | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    params: dict[str, object] = {}
    tools: list[dict[str, object]] | None = None
    response_format: dict[str, object] | None = None
    #: the last user turn's embedding, when the app computes its own (it is normalised;
    #: entries are only compared with vectors of the same dimension)
    vector: Annotated[list[Annotated[float, msgspec.Meta(ge=-1e30, le=1e30)]],
                      msgspec.Meta(max_length=16_384)] | None = None


class CacheGet(CacheRequest, tag="cache_get"):
    """Look up a cached answer: exact tier first, then the semantic tier (a verified
    paraphrase of the last user turn in the same scope). ``allow_stale`` also serves an
    expired entry (flagged; for when every provider fails); ``no_cache`` skips the lookup
    (a miss counted as bypassed); ``threshold`` asks for a stricter similarity than the
    configured one (a looser one is not honoured)."""

    allow_stale: bool = False
    no_cache: bool = False
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None


class CachePut(CacheRequest, tag="cache_put", kw_only=True):
    """Store ``response`` (any msgpack value, kept as sent) for the request. ``kind`` is
    the response type choosing tier and TTL from ``cache.policy`` ("" = "general");
    ``ttl`` overrides the policy's. Never stored: ``error`` answers, answers with
    ``tool_calls``, chats with tool turns or more user turns than ``cache.max_turns``,
    temperature above ``cache.max_temperature``, and ``no_store`` requests."""

    idempotent: ClassVar[bool] = True
    response: msgspec.Raw
    kind: Name = ""
    ttl: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] | None = None
    error: bool = False
    tool_calls: bool = False
    no_store: bool = False
    #: the usage of the call that produced ``response``: prices what a hit saves
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0


class CacheInvalidate(Request, tag="cache_invalidate"):
    """Remove entries: the one with ``key``, or all of ``namespace``, or all (``all``)."""

    key: Annotated[bytes, msgspec.Meta(max_length=64)] | None = None
    namespace: Name | None = None
    all: bool = False


class Begin(CacheRequest, tag="begin"):
    """Before an LLM call, in one round trip: exact cache, token count, semantic cache,
    route (open circuits skipped, downgrade applied), admit. Identity as ``CacheGet``
    (the cache's view) plus who asks (``user``, ``key``), the ``route`` (or ``task`` and
    input size choose one; ``model`` alone is a one-model chain), ``max_tokens`` (the
    output estimate), cache controls and the response ``kind`` that ``end`` stores under."""

    idempotent: ClassVar[bool] = False  # a resend could admit twice
    user: Name = ""
    key: Name = ""
    route: Name = ""
    task: Name = ""
    input_tokens: Tokens | None = None
    max_tokens: Tokens | None = None
    kind: Name = ""
    no_cache: bool = False
    no_store: bool = False
    allow_stale: bool = False
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    #: for the request log: the caller's id for the request (default: the lease, or a
    #: new id for a hit or denial) and the prompt template it filled, with its version
    request_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    template: Annotated[str, msgspec.Meta(max_length=128)] = ""
    template_version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """One provider call of a guarded request, as the client saw it."""

    model: Name
    ok: bool
    status: HttpStatus = 0  # HTTP status when there was one
    error: Annotated[str, msgspec.Meta(max_length=1024)] = ""  # exception, "" when ok
    retry_after: Seconds = 0.0  # the provider's Retry-After, seconds
    latency: Seconds = 0.0  # seconds


class End(Request, tag="end"):
    """After the call: every attempt's outcome (for the circuits), the usage of the one
    that answered (settles the lease, priced for ``model``), and the ``response`` to
    cache (omitted: nothing stored; ``error`` or ``tool_calls``: never stored)."""

    idempotent: ClassVar[bool] = True  # settling and reporting twice change nothing
    lease: LeaseId
    attempts: Annotated[list[Attempt], msgspec.Meta(max_length=64)] = []
    model: Name = ""  # the model that answered ("" when none did)
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    cached_input_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    usd: Usd | None = None
    response: msgspec.Raw = _NIL  # nil: nothing to cache
    error: bool = False
    tool_calls: bool = False


class Extend(Request, tag="extend"):
    """A streamed answer outgrew its lease's estimate: grow the reservation to the usage
    so far (``model`` prices it; default the lease's), on every limit or none. A denial
    means a budget ran out mid-stream."""

    idempotent: ClassVar[bool] = True  # growing to the same total twice adds nothing
    lease: LeaseId
    input_tokens: Tokens = 0
    output_tokens: Tokens = 0
    model: Name = ""


class Route(Request, tag="route"):
    """The model chain a request would get now (circuits and downgrade applied), without
    admitting anything; each half-open model in it takes a probe."""

    route: Name = ""
    model: Name = ""
    task: Name = ""
    input_tokens: Tokens = 0
    user: Name = ""


class Report(Request, tag="report"):
    """One provider call's outcome, for the model's circuit breaker."""

    model: Name
    ok: bool
    status: HttpStatus = 0
    retry_after: Seconds = 0.0


class Costs(Request, tag="costs"):
    """Spend, tokens and cache savings from the hour holding ``since`` (default: the start
    of today in the limits' zone) to ``until`` (default: now), grouped ``by`` model, user
    or route (the ``top`` groups by spend), with per-hour and per-day series."""

    since: Epoch | None = None  # epoch seconds
    until: Epoch | None = None
    by: Literal["model", "user", "route"] = "model"
    top: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 10


class MetricsText(Request, tag="metrics"):
    """The Prometheus text exposition of every metric."""


REQUEST_TYPES: tuple[type[Request], ...] = (
    Hello, Ping, Fingerprint, Stats, Count, Admit, Settle, Release, Limits, CacheGet,
    CachePut, CacheInvalidate, Begin, End, Extend, Route, Report, Costs, MetricsText,
)
OPS: tuple[str, ...] = tuple(t.__struct_config__.tag for t in REQUEST_TYPES)


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
    """An alert as it fired (see ``sidecar.alerts``)."""

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
    response: msgspec.Raw = _NIL  # as stored (msgpack; nil on a miss): see ``value()``
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
    response: msgspec.Raw = _NIL
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


class Error(Reply, tag="error", kw_only=True):
    id: RequestId | None = None
    code: ErrorCode
    message: str


REPLY_TYPES: tuple[type[Reply], ...] = (
    HelloReply, Pong, FingerprintReply, StatsReply, CountReply, AdmitReply, SettleReply,
    ReleaseReply, LimitsReply, CacheGetReply, CachePutReply, CacheInvalidateReply, BeginReply,
    EndReply, ExtendReply, RouteReply, ReportReply, CostsReply, MetricsReply, Error,
)

REQUEST_DECODER = msgspec.msgpack.Decoder(Union[REQUEST_TYPES])  # type: ignore[valid-type]
REPLY_DECODER = msgspec.msgpack.Decoder(Union[REPLY_TYPES])  # type: ignore[valid-type]


class Envelope(msgspec.Struct):
    """What can still be read of a frame that failed typed decoding: its id and op."""

    id: object = None
    op: object = None


ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)
