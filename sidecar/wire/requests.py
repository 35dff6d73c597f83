"""Every request a client can send: one frozen msgspec Struct per op, tagged by ``op``.
``OPS`` lists their tags in the order the daemon dispatches them."""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from .values import NIL_RAW, Epoch, HttpStatus, LeaseId, Name, RequestId, Seconds, Tokens, Usd


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
    response: msgspec.Raw = NIL_RAW  # nil: nothing to cache
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


class ShmHit(msgspec.Struct, frozen=True, kw_only=True):
    """One exact hit a client read from the shared-memory segment, told afterwards so
    the daemon accounts it as a hit through the socket (stats, savings, request log)."""

    op: Literal["begin", "cache_get"] = "begin"
    key: Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
    at: Epoch  # when it was read (the daemon keeps it within the last minute)
    stale: bool = False
    who: Name = ""  # the begin's user, else its key
    model: Name = ""
    route: Name = ""
    task: Name = ""
    request_id: Annotated[str, msgspec.Meta(max_length=128)] = ""
    template: Annotated[str, msgspec.Meta(max_length=128)] = ""
    template_version: Annotated[str, msgspec.Meta(max_length=64)] = ""


class Hits(Request, tag="hits"):
    """Exact hits served from the segment since the last report (at most 1024)."""

    idempotent: ClassVar[bool] = False  # a resend would count them twice
    hits: Annotated[list[ShmHit], msgspec.Meta(max_length=1024)] = []
    #: lookups the segment could not answer since the last report (they used the socket)
    fallbacks: Annotated[int, msgspec.Meta(ge=0, le=1 << 53)] = 0


class Slice(Request, tag="slice", kw_only=True):
    """Admit up to ``count`` calls at once, each as ``Admit`` would with ``input_tokens``
    and ``max_tokens``: a slice the client process takes calls from without a round
    trip, counting them in slot ``slot`` of its slab (a file it owns, named by ``slab``
    on the connection's first slice). The daemon releases the calls not taken when the
    slice ends (``SliceEnd``), its TTL passes, or the connection closes."""

    idempotent: ClassVar[bool] = False
    user: Name = ""
    key: Name = ""
    model: Name = ""
    route: Name = ""
    input_tokens: Tokens
    max_tokens: Tokens = 0
    count: Annotated[int, msgspec.Meta(ge=1, le=64)] = 16
    slab: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    slot: Annotated[int, msgspec.Meta(ge=0, le=63)] = 0


class SliceEnd(Request, tag="slice_end"):
    """The client is done with slice ``grant``: the calls it did not take are released."""

    idempotent: ClassVar[bool] = False
    grant: Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]


REQUEST_TYPES: tuple[type[Request], ...] = (
    Hello, Ping, Fingerprint, Stats, Count, Admit, Settle, Release, Limits, CacheGet,
    CachePut, CacheInvalidate, Begin, End, Extend, Route, Report, Costs, MetricsText, Hits,
    Slice, SliceEnd,
)
OPS: tuple[str, ...] = tuple(t.__struct_config__.tag for t in REQUEST_TYPES)
