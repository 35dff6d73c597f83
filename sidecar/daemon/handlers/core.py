"""``Handlers``: the daemon's components, the dispatch table from request type to op,
and every op but the guarded call's (``calls``): hello, ping, fingerprint, count, the
limits ops, the cache ops, stats, costs, metrics. ``Handlers.reload`` swaps in the parts
of a new config that can change while running.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import importlib.metadata
import logging
import math
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.parse
from typing import Awaitable, Callable, Sequence, TypeVar, Union

import msgspec

from ... import __version__
from ..._native import MODULES as NATIVE_MODULES, load as load_native
from ...ledger.accounting import Accounting, Begun
from ...ledger.alerts import Alerts, Notifier
from ...cache.keys import RequestKey
from ...cache.store import Cache
from ...cluster.quota import Cluster, Policy, Refusal, Shared
from ...config import Config
from ...ledger.costs import By, CostTracker, Tallies
from ...ledger.requestlog import RequestLog
from ...ledger.metrics import Exposition, Gauges, Metrics
from ...text.normalize import Normalizer
from ...errors import Forbidden, InvalidValue, JournalError, Overloaded
from ...limits.journal import Journal
from ...limits.engine import (
    MICRO, NEED_AT, Decision, Denial, Engine, Estimate, Kind, shape_of, SettleResult, Spend,
    Subject, Usage, compile_rules, encode_spend,
)
from ...limits.pricing import Price, PricingRegistry, Usage as PricedUsage
from ...wire.protocol import (
    OPS, PROTOCOL_VERSION, Admit, AdmitReply, Begin, BuildInfo, CacheGet, CacheGetReply,
    CacheInvalidate, CacheInvalidateReply, CachePut, CachePutReply, Costs, CostsReply, Count,
    CountReply, End, EndReply, Extend, Fingerprint, FingerprintReply, Hello, HelloReply,
    Limits, LimitsReply, LimitUse, MetricsReply, MetricsText, Ping, Pong, Release,
    ReleaseReply, Reply, Report, Request, Route, Settle, SettleReply, Stats, StatsReply,
)
from ...routing.router import Router
from ...text.tokens import ESTIMATE_ENCODING, Tokenizer, get_encoding
from ._common import Deferred, bounded_micro, wire_seconds
from .calls import CallOps


Handler = Callable[[Request], "Reply | Deferred"]


def _yield_to_the_loop() -> None:
    """A counting thread runs at nice 10: when it shares a CPU with the event loop, the
    scheduler lets the loop's wake-ups pre-empt it at once instead of after the count's
    time slice (measured by ``python -m bench stall``). Linux sets nice per thread."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # elsewhere: the count just runs at normal priority
        return


#: Long token counts (``tokens.offload_chars`` and up) run here, off the event loop; two
#: at a time (a connection waits for its own before it sends more), the rest queue.
_COUNTING = ThreadPoolExecutor(2, thread_name_prefix="llm-sidecar-count",
                               initializer=_yield_to_the_loop)
R = TypeVar("R", SettleReply, EndReply)
C = TypeVar("C", CacheGet, CachePut, Begin)
T = TypeVar("T")
log = logging.getLogger("sidecar.handlers")
#: A journal record: a settle's spend (the limits engine's) or cost tracker rows.
_JOURNAL_RECORD = msgspec.msgpack.Decoder(Union[list[Spend], Tallies])  # type: ignore[valid-type]
_TALLIES = msgspec.msgpack.Encoder()


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("limits journal write failed: %s", future.exception())


#: Calendar windows: the limits whose threshold crossings are budget alerts.
_BUDGETS = (Kind.HOUR, Kind.DAY)

#: Denial reasons that time cures: an admit may wait them out (a retry loop it may not).
_WAITABLE = ("limit", "burst")


def _waits(denial: Denial, wait: float) -> bool:
    """A cluster refusal that an admit willing to ``wait`` seconds waits out."""
    return (wait > 0 and denial.reason in ("limit", "busy")
            and denial.retry_after <= wait)  # inf (unknown) never fits


def _without_password(url: str) -> str:
    """``url`` fit for stats and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def build_info() -> BuildInfo:
    """Versions and the compiled modules actually loaded (their files prove it)."""
    libraries = {}
    for dist in ("msgspec", "uvloop"):
        try:
            libraries[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libraries[dist] = "unknown"
    return BuildInfo(
        version=__version__,
        protocol=PROTOCOL_VERSION,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        native={name: load_native(name).__file__ or "" for name in NATIVE_MODULES},
        libraries=libraries,
    )


class Handlers(CallOps):
    """Every op of the daemon over its components (normaliser, tokenizer, pricing, limits
    engine, journal). Runs on the event loop; ops that must wait (a long count, a queued
    admit, a settle being synced) return a ``Deferred``."""

    def __init__(self, config: Config, metrics: Metrics, socket_path: str,
                 journal: Journal | None = None, cache_snapshot: str = "off",
                 request_log: RequestLog | None = None, request_log_path: str = "off",
                 notifier: Notifier | None = None, cluster: Cluster | None = None) -> None:
        self.journal = journal
        #: the uid of the peer whose request runs now (set by the server before each
        #: op; -1: no peer, e.g. in-process use): leases are bound to it
        self.owner = -1
        #: whether that peer may use the operator ops (``[server.access]``)
        self.operator = True
        self.cache_snapshot = cache_snapshot
        self.metrics = metrics
        self.socket_path = socket_path
        self.started = time.monotonic()
        self.epoch = 0
        self.build = build_info()
        self.config = config
        self.normalizer = Normalizer(config.normalize.filler_words)
        self.tokenizer = self._tokenizer(config)
        self.pricing = self._pricing(config)
        self.limit_alerts: dict[str, int] = {}  # "limit@80%" -> times crossed
        self.denials: dict[str, int] = {}  # limit name (or "retry_loop") -> denials
        self.near: dict[str, int] = {}  # limit name -> admits that left it near its amount
        self.shadow: dict[str, int] = {}  # shadow limit name -> admits it would have denied
        self.engine = Engine(compile_rules(config.limits), **self._engine_settings(config))
        self.cluster = cluster
        if cluster is not None:
            cluster.on_mode = self._cluster_mode
            self._configure_cluster(config)
        self.cache = Cache(config.cache, self.normalizer)
        self.router = Router(config.routing, config.routes, config.circuits)
        ledger = config.ledger
        self.accounting = Accounting(
            CostTracker(config.limits.timezone, retention_days=ledger.retention_days,
                        max_rows=ledger.max_rows),
            metrics, Alerts(config.alerts, notifier), request_log)
        self.notifier = notifier
        self.request_log_path = request_log_path
        self.exposition = Exposition(metrics)
        #: lease -> (the begin request as the cache sees it, its cache keys, what begin knew);
        #: for end, which stores the answer under those keys without folding the text again
        self._begun: dict[str, tuple[Begin, RequestKey, Begun]] = {}
        #: FIFO queues of admits waiting for room, by the limit that denied them
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self.table: dict[type[Request], Handler] = {
            Hello: self.hello,
            Ping: self.ping,
            Fingerprint: self.fingerprint,
            Stats: self.stats,
            Count: self.count,
            Admit: self.admit,
            Settle: self.settle,
            Release: self.release,
            Limits: self.limits,
            CacheGet: self.cache_get,
            CachePut: self.cache_put,
            CacheInvalidate: self.cache_invalidate,
            Begin: self.begin,
            End: self.end,
            Extend: self.extend,
            Route: self.route,
            Report: self.report,
            Costs: self.cost_summary,
            MetricsText: self.metrics_text,
        }
        assert tuple(t.__struct_config__.tag for t in self.table) == OPS

    @staticmethod
    def _tokenizer(config: Config) -> Tokenizer:
        # Map every encoding the config can reach now, so no request pays for loading.
        for name in {*config.tokens.models.values(), ESTIMATE_ENCODING}:
            get_encoding(name)
        return Tokenizer(config.tokens.models, config.tokens.estimate_ratios)

    @staticmethod
    def _engine_settings(config: Config) -> dict:
        limits = config.limits
        return dict(zone=limits.timezone, lease_ttl=limits.lease_ttl,
                    near_fraction=limits.near_fraction, retry_loop_max=limits.retry_loop_max,
                    retry_loop_window=limits.retry_loop_window,
                    retry_loop_max_keys=limits.retry_loop_max_keys,
                    alert_thresholds=limits.alert_thresholds,
                    max_open_leases_per_uid=limits.max_open_leases_per_uid)

    @staticmethod
    def _pricing(config: Config) -> PricingRegistry:
        def price(p: object) -> Price:
            return Price(p.input, p.output, p.cached_input, p.reasoning)  # type: ignore[attr-defined]

        pricing = config.pricing
        return PricingRegistry(
            overrides={name: price(p) for name, p in pricing.overrides.items()},
            litellm_json=pricing.litellm_json or None, default=price(pricing.default))

    def reload(self, config: Config) -> None:
        normalizer = Normalizer(config.normalize.filler_words)
        tokenizer = self._tokenizer(config)
        self.pricing = self._pricing(config)
        self.engine.reconfigure(compile_rules(config.limits), **self._engine_settings(config))
        if self.cluster is not None:
            self._configure_cluster(config)
        self.cache.reconfigure(config.cache, normalizer)
        self.router.reconfigure(config.routing, config.routes, config.circuits)
        self.accounting.alerts.reconfigure(config.alerts)
        self.accounting.costs.reconfigure(config.limits.timezone, config.ledger.retention_days,
                                          config.ledger.max_rows)
        self.config = config
        self.normalizer = normalizer
        self.tokenizer = tokenizer
        self.epoch += 1

    def hello(self, req: Hello) -> HelloReply:
        return HelloReply(
            id=req.id, protocol=PROTOCOL_VERSION, server=f"llm-sidecar/{__version__}",
            features=list(OPS), max_frame=self.config.server.max_frame_bytes, pid=os.getpid(),
            idle_timeout=self.config.server.idle_timeout,
        )

    def ping(self, req: Ping) -> Pong:
        return Pong(id=req.id)

    def fingerprint(self, req: Fingerprint) -> FingerprintReply:
        normalized, key, spec = self.normalizer.fingerprint(req.text)
        return FingerprintReply(id=req.id, normalized=normalized, key=key, spec=spec)

    def count(self, req: Count) -> CountReply | Deferred:
        if self._long_count(req):
            # Counting releases the GIL: a worker thread keeps the loop serving others.
            loop = asyncio.get_running_loop()
            return Deferred(loop.run_in_executor(_COUNTING, self._count, req, self.tokenizer),
                            req.id)
        return self._count(req, self.tokenizer)

    def _long_count(self, req: Count | Admit | Begin) -> bool:
        """Whether counting ``req``'s text belongs on a worker thread: from
        ``tokens.offload_chars`` on, a count would hold up every client of the loop."""
        if req.text is not None:
            size = len(req.text)
        else:
            size = 0
            for m in req.messages or ():
                if isinstance(m.content, str):
                    size += len(m.content)
                else:  # text parts are counted; other parts cost little
                    size += sum(len(p["text"]) if isinstance(p.get("text"), str) else 64
                                for p in m.content or ())
        return size >= self.config.tokens.offload_chars

    @staticmethod
    def _count(req: Count, tokenizer: Tokenizer) -> CountReply:
        n = tokenizer.count(req.text, messages=req.messages, tools=req.tools, model=req.model,
                            encoding=req.encoding, max_tokens=req.max_tokens,
                            special=req.special)
        return CountReply(id=req.id, input_tokens=n.input_tokens, output_tokens=n.output_tokens,
                          total_tokens=n.total_tokens, exact=n.exact, encoding=n.encoding,
                          model=n.model, estimate_ratio=n.estimate_ratio)

    # -- limits ---------------------------------------------------------------------

    def housekeeping(self, now: float) -> None:
        """Once a second: expire leases past their TTL, drop idle counters and cache
        entries past their stale window. Each step is guarded on its own, so one that
        fails (counted in ``stats`` ``task_failures``) never skips the others."""
        guard = self.metrics.task_failures.guard
        with guard("housekeeping.leases"):
            expired, spent = self.engine.expire(now)
            if expired:
                self._wake_waiters()
            # nobody waits on an expiry or on cost rows: a journal failure is only counted
            durable = self._persist(spent, costs=True)
            if durable is not None:
                durable.add_done_callback(_log_failure)
        with guard("housekeeping.journal"):
            if self.journal is not None and self.journal.needs_compaction:
                compacted = self.compact_journal(now)
                if compacted is not None:
                    compacted.add_done_callback(_log_failure)
        with guard("housekeeping.limits"):
            self.engine.evict_idle(now)
        with guard("housekeeping.cache"):
            self.cache.housekeeping(now)
        with guard("housekeeping.costs"):
            self.accounting.costs.expire(now)
        with guard("housekeeping.alerts"):
            self.accounting.alerts.expire(now)
        with guard("housekeeping.calls"):
            for lease in [k for k, (_, _, b) in self._begun.items() if b.until <= now]:
                del self._begun[lease]

    @staticmethod
    def _off_loop(fn: Callable[[], T]) -> Awaitable[T]:
        """``fn()`` on a counting thread: for work that scans a text of
        ``tokens.offload_chars`` or more (counting and folding release the GIL)."""
        return asyncio.get_running_loop().run_in_executor(_COUNTING, fn)

    def _counted_off_loop(self, req: Admit | Begin,
                          model: str) -> Awaitable[tuple[int, bytes]]:
        """``_input_tokens`` and ``_prompt_key`` off the loop, for a long text."""
        return self._off_loop(lambda: (self._input_tokens(req, model), self._prompt_key(req)))

    def _input_tokens(self, req: Admit | Begin, model: str) -> int:
        if req.input_tokens is not None:
            return req.input_tokens
        if req.text is None and req.messages is None:
            return 0
        return self.tokenizer.count(
            req.text, messages=req.messages, tools=req.tools, model=model,
            encoding="" if model else ESTIMATE_ENCODING).input_tokens

    def _estimate(self, req: Admit | Begin, model: str, input_tokens: int | None = None,
                  prompt: bytes | None = None) -> tuple[Estimate, bool, bytes]:
        if input_tokens is None:
            input_tokens = self._input_tokens(req, model)
        output_tokens = req.max_tokens or 0
        usd = getattr(req, "usd", None)
        if usd is not None:
            micro, known = round(usd * MICRO), True
        else:
            cost = self.pricing.estimate(model, input_tokens, output_tokens)
            micro, known = bounded_micro(cost.micro_usd), cost.known
        if prompt is None:
            prompt = self._prompt_key(req)
        return Estimate(input_tokens, output_tokens, micro), known, prompt

    def _prompt_key(self, req: Admit | Begin) -> bytes:
        """Fingerprint of what is asked (the last user turn), for the retry-loop guard."""
        if req.text is not None:
            return self.normalizer.fingerprint(req.text).key
        for message in reversed(req.messages or ()):
            if message.role == "user":
                content = message.content
                if not isinstance(content, str):
                    content = " ".join(str(p.get("text", "")) for p in content or ())
                return self.normalizer.fingerprint(content).key
        return b""

    def _admit_reply(self, req: Admit, decision: Decision, known: bool,
                     refused: Denial | None = None) -> AdmitReply:
        """The reply to ``decision``, or to the cluster's ``refused`` of it."""
        e = decision.estimate
        denial = refused or decision.denial
        scale = self._scale_of(denial.limit) if denial else 1
        return AdmitReply(
            id=req.id, allowed=denial is None, lease="" if denial else decision.lease,
            reason=denial.reason if denial else "", limit=denial.limit if denial else "",
            used=denial.used / scale if denial else 0.0,
            amount=denial.amount / scale if denial else 0.0,
            retry_after=wire_seconds(denial.retry_after) if denial else 0.0,
            input_tokens=e.input_tokens, output_tokens=e.output_tokens,
            usd=e.micro_usd / MICRO, usd_known=known, near=list(decision.near),
            shadow=list(decision.shadow_denials), ttl=self.engine.lease_ttl,
        )

    def _observe(self, subject: Subject, decision: Decision, now: float) -> None:
        """Budget alerts; denials counted by limit."""
        for crossed in decision.crossed:
            self.limit_alerts[crossed] = self.limit_alerts.get(crossed, 0) + 1
            name = crossed.rpartition("@")[0]
            if any(r.name == name and r.kind in _BUDGETS for r in self.engine.rules):
                self.accounting.alerts.budget(crossed, subject.user or subject.key,
                                              subject.model, now)  # logs it too
            else:
                log.warning("limit alert: %s crossed (user %r, model %r)", crossed,
                            subject.user or subject.key, subject.model)
        if decision.denial is not None:
            name = decision.denial.limit
            self.denials[name] = self.denials.get(name, 0) + 1
            self.accounting.limit_denial(decision.denial.reason, name)
        for name in decision.near:
            self.near[name] = self.near.get(name, 0) + 1
        for name in decision.shadow_denials:
            self.shadow[name] = self.shadow.get(name, 0) + 1
            log.info("shadow limit %s would have denied (user %r)", name,
                     subject.user or subject.key)

    def _scale_of(self, limit: str) -> int:
        for rule in self.engine.rules:
            if rule.name == limit:
                return MICRO if rule.metric.value == "usd" else 1
        return 1

    def admit(self, req: Admit) -> AdmitReply | Deferred:
        owner = self.owner  # the peer asking; a later retry or count off the loop acts for it
        if req.input_tokens is None and self._long_count(req):
            return Deferred(asyncio.ensure_future(self._admit_counted(req, owner)), req.id)
        return self._admit(req, owner)

    def _admit(self, req: Admit, owner: int,
               counted: tuple[int, bytes] | None = None) -> AdmitReply | Deferred:
        subject = Subject(req.user, req.key, req.model, req.route)
        estimate, known, prompt = self._estimate(req, req.model, *(counted or ()))
        now = time.time()
        decision = self.engine.admit(subject, estimate, now, prompt, owner)
        self._observe(subject, decision, now)
        if decision.tracked and self.cluster is not None:
            shared = self._share(decision, now)
            if isinstance(shared, Denial) and not _waits(shared, req.wait):
                return self._admit_reply(req, decision, known, shared)
            if shared is not None:
                return Deferred(asyncio.ensure_future(self._admit_shared(
                    req, subject, estimate, known, decision, shared, owner)), req.id)
        denial = decision.denial
        if (denial is not None and req.wait > 0 and denial.reason in _WAITABLE
                and not denial.never
                and (denial.retry_after <= req.wait or math.isinf(denial.retry_after))):
            # a finite retry_after within the wait, or a slot that frees when a lease ends
            task = asyncio.ensure_future(self._admit_waiting(req, subject, estimate, known,
                                                             denial.limit, owner))
            return Deferred(task, req.id)
        return self._admit_reply(req, decision, known)

    async def _admit_counted(self, req: Admit, owner: int) -> AdmitReply:
        """An admit whose text is counted on a worker thread first, as a long count is."""
        reply = self._admit(req, owner, await self._counted_off_loop(req, req.model))
        return await reply.future if isinstance(reply, Deferred) else reply

    async def _admit_shared(self, req: Admit, subject: Subject, estimate: Estimate,
                            known: bool, decision: Decision,
                            shared: Denial | Awaitable[Denial | None],
                            owner: int) -> AdmitReply:
        """The cluster's answer (asking Redis first when it must); a refusal whose
        retry_after fits in what is left of the admit's ``wait`` is tried again then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait
        while True:
            denial = shared if isinstance(shared, Denial) else await shared
            if denial is None or not _waits(denial, deadline - loop.time()):
                return self._admit_reply(req, decision, known, denial)
            await asyncio.sleep(denial.retry_after)
            now = time.time()
            decision = self.engine.admit(subject, estimate, now, b"", owner)
            self._observe(subject, decision, now)
            if not decision.tracked:  # refused by this daemon's own limits: no more waiting
                return self._admit_reply(req, decision, known)
            shared = self._share(decision, now)
            if shared is None:
                return self._admit_reply(req, decision, known)

    # -- cluster -----------------------------------------------------------------------

    def _configure_cluster(self, config: Config) -> None:
        """Tell the cluster which rules it shares: every non-shadow sliding or calendar
        rule (per-request caps and concurrency stay per daemon)."""
        assert self.cluster is not None
        policies = {row.name: row.degraded or config.cluster.degraded
                    for row in config.limits.rules}
        shared = []
        for i, r in enumerate(self.engine.rules):
            if r.shadow or r.kind not in (Kind.SLIDING, Kind.HOUR, Kind.DAY):
                continue
            sliding = r.kind is Kind.SLIDING
            shared.append(Shared(
                index=i, name=r.name, shape=shape_of(r), sliding=sliding,
                span=r.span / r.buckets if sliding else 0.0, buckets=r.buckets,
                amount=r.amount, need_at=NEED_AT[r.metric],
                policy=Policy(policies[r.name]),
                period=None if sliding else functools.partial(self.engine.period, r.kind)))
        self.cluster.configure(shared)
        self._cluster_mode(self.cluster.degraded)

    def _cluster_mode(self, degraded: bool) -> None:
        """Each shared rule's amount in the engine: the full amount while Redis answers
        (the cluster's leases decide), the degraded policy's while it does not."""
        cluster = self.cluster
        assert cluster is not None
        rules = compile_rules(self.config.limits)
        if degraded:
            rules = [r._replace(amount=cluster.share(cluster.rules[i]))
                     if i in cluster.rules and cluster.rules[i].policy is Policy.LOCAL_SHARE
                     else r for i, r in enumerate(rules)]
        self.engine.reconfigure(rules, **self._engine_settings(self.config))
        self.engine.track([i in cluster.rules for i in range(len(rules))])

    def _share(self, decision: Decision,
               now: float) -> Denial | Awaitable[Denial | None] | None:
        """The cluster's say on an admitted ``decision``: None (agreed from this
        daemon's leases), a Denial (refused; the engine's reservation is released), or
        an awaitable of either (Redis must be asked first)."""
        assert self.cluster is not None
        took = self.cluster.take(decision.lease, decision.tracked, now)
        if took is None:
            return None
        if isinstance(took, Refusal):
            return self._refused(decision, took)
        return self._share_after(decision, took, now)

    async def _share_after(self, decision: Decision, short: list,
                           now: float) -> Denial | None:
        assert self.cluster is not None
        refusal = None
        for _ in range(16):  # leases spent meanwhile by concurrent admits: ask again
            refusal = await self.cluster.acquire(short, now)
            if refusal is not None:
                break
            now = time.time()
            took = self.cluster.take(decision.lease, decision.tracked, now)
            if took is None:
                return None
            if isinstance(took, Refusal):
                refusal = took
                break
            short = took
        if refusal is None:  # concurrent admits kept winning: try again shortly
            rule = short[0][0].rule
            refusal = Refusal(rule.name, 0, rule.amount, 0.01, "busy")
        return self._refused(decision, refusal)

    def _refused(self, decision: Decision, refusal: Refusal) -> Denial:
        self.engine.release(decision.lease, time.time())
        self._wake_waiters()
        self.denials[refusal.limit] = self.denials.get(refusal.limit, 0) + 1
        self.accounting.limit_denial(refusal.reason, refusal.limit)
        return Denial(refusal.limit, refusal.reason, refusal.used, refusal.amount,
                      refusal.retry_after)

    async def _admit_waiting(self, req: Admit, subject: Subject, estimate: Estimate,
                             known: bool, limit: str, owner: int) -> AdmitReply:
        """Queue behind earlier waiters for ``limit`` (FIFO); the head retries when its
        retry_after passes or when a settle or release frees room. No polling."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait
        queue = self._waiting.setdefault(limit, collections.deque())
        me: asyncio.Future[None] = loop.create_future()
        queue.append(me)
        try:
            while True:
                if queue[0] is me:
                    now = time.time()
                    decision = self.engine.admit(subject, estimate, now, b"", owner)
                    self._observe(subject, decision, now)
                    denial = decision.denial
                    if denial is None:
                        return self._admit_reply(req, decision, known)
                    pause = min(denial.retry_after, deadline - loop.time())
                    if denial.reason not in _WAITABLE or pause <= 0:
                        return self._admit_reply(req, decision, known)
                else:
                    pause = deadline - loop.time()
                    if pause <= 0:
                        decision = self.engine.admit(subject, estimate, time.time(), b"",
                                                     owner)
                        return self._admit_reply(req, decision, known)
                me = self._rearm(queue, me, loop)
                try:
                    await asyncio.wait_for(asyncio.shield(me), pause)
                except asyncio.TimeoutError:
                    pass  # retry_after passed or the wait ran out: look again
        finally:
            queue.remove(me)
            if queue:
                if not queue[0].done():
                    queue[0].set_result(None)  # the next in line looks now
            else:
                self._waiting.pop(limit, None)

    @staticmethod
    def _rearm(queue: collections.deque, me: asyncio.Future, loop) -> asyncio.Future:
        if not me.done():
            return me
        fresh = loop.create_future()
        queue[queue.index(me)] = fresh
        return fresh

    def _wake_waiters(self) -> None:
        for queue in self._waiting.values():
            if queue and not queue[0].done():
                queue[0].set_result(None)

    def settle(self, req: Settle) -> SettleReply | Deferred:
        result, micro, subject = self._settle(req.lease, req.input_tokens, req.output_tokens,
                                              req.cached_input_tokens, req.reasoning_tokens,
                                              req.usd, "")
        if subject is not None and result.found and not result.duplicate:
            self.accounting.ended(
                time.time(), lease=req.lease, begun=None, user=subject.user or subject.key,
                route=subject.route, model=subject.model, attempts=(),
                input_tokens=req.input_tokens, output_tokens=req.output_tokens,
                cached_tokens=req.cached_input_tokens, reasoning_tokens=req.reasoning_tokens,
                micro_usd=micro, error=False)
        reply = SettleReply(id=req.id, found=result.found, duplicate=result.duplicate,
                            expired=result.expired, usd=micro / MICRO,
                            durable=self.journal is not None, released=result.released)
        return self._durably(req.lease, result, reply)

    def _settle(self, lease: str, input_tokens: int, output_tokens: int, cached: int,
                reasoning: int, usd: float | None,
                model: str) -> tuple[SettleResult, int, Subject | None]:
        """Settle ``lease``, priced for ``model`` (default: the model it was admitted for)
        unless ``usd`` is given. Returns the engine's result, the micro-dollars and whom
        the lease was admitted for (None: an unknown lease)."""
        subject = self.engine.lease_subject(lease, self.owner)
        if usd is not None:
            micro = round(usd * MICRO)
        else:
            model = model or (subject.model if subject is not None else "")
            micro = bounded_micro(self.pricing.cost(model, PricedUsage(
                input_tokens, output_tokens, cached, reasoning)).micro_usd) if (
                    subject is not None) else 0
        result = self.engine.settle(lease, Usage(input_tokens, output_tokens, micro),
                                    time.time(), self.owner)
        if result.duplicate:  # what was recorded, not what this resend says
            return result, result.micro_usd, subject
        if result.found:
            self._wake_waiters()
            if self.cluster is not None:
                self.cluster.settled(lease, (1, input_tokens, output_tokens,
                                             input_tokens + output_tokens, micro))
        return result, micro, subject

    def _durably(self, lease: str, result: SettleResult, reply: R) -> R | Deferred:
        """``reply`` once the settle's spend is on disk (``durable=False`` if it could not
        be written: the settle stands)."""
        try:
            durable = self._persist(result.spent)
        except (JournalError, Overloaded) as exc:
            log.error("settle %s applied but not persisted: %s", lease, exc)
            return msgspec.structs.replace(reply, durable=False)
        if durable is None:
            return reply
        return Deferred(asyncio.ensure_future(self._after(durable, reply)), reply.id)

    def _persist(self, spent: Sequence[Spend],
                 costs: bool = False) -> asyncio.Future[None] | None:
        """Journal ``spent`` with the cost rows changed since the last write; the future
        resolves when both are on disk (None: nothing written, or no journal). Without
        spend the rows wait for the next settle that has some, or for ``costs`` (once a
        second): a call whose settle touches no budget is never held for an fdatasync."""
        if self.journal is None or not (spent or costs):
            return None
        durable = None
        tallies = self.accounting.costs.drain()
        if tallies is not None:
            durable = self.journal.append_nowait(_TALLIES.encode(tallies))
        if spent:  # appended after the rows: its future resolves after theirs
            durable = self.journal.append_nowait(encode_spend(spent))
        return durable

    def persist_costs(self) -> asyncio.Future[None] | None:
        """Journal the cost rows changed since the last write (at shutdown)."""
        return self._persist((), costs=True)

    @staticmethod
    async def _after(durable: asyncio.Future[None] | None, reply: R) -> R:
        """The reply once the spend is synced; if the write fails, the settle stands
        (it was applied, and a retry would be a duplicate) but says it is not durable."""
        try:
            if durable is not None:
                await durable
        except JournalError as exc:
            log.error("settle %d applied but not persisted: %s", reply.id, exc)
            return msgspec.structs.replace(reply, durable=False)
        return reply

    def restore(self, records: Sequence[bytes], now: float) -> tuple[int, int]:
        """Put the journal's spend back into the engine and its cost rows back into the
        cost tracker (at start); returns how many of each were applied."""
        spends: list[Spend] = []
        tallies: list[Tallies] = []
        for record in records:
            item = _JOURNAL_RECORD.decode(record)
            if isinstance(item, Tallies):
                tallies.append(item)
            else:
                spends.extend(item)
        return self.engine.restore(spends, now), self.accounting.costs.restore(tallies, now)

    def compact_journal(self, now: float) -> asyncio.Future[None] | None:
        """Replace the journal by the engine's current durable spend and every cost row."""
        if self.journal is None:
            return None
        snapshot = self.engine.snapshot(now)
        chunks = [encode_spend(snapshot[i:i + 1000]) for i in range(0, len(snapshot), 1000)]
        chunks += [_TALLIES.encode(t) for t in self.accounting.costs.snapshot()]
        return self.journal.compact(chunks)

    def release(self, req: Release) -> ReleaseReply:
        released = self.engine.release(req.lease, time.time(), self.owner)
        if released:
            self._wake_waiters()
            if self.cluster is not None:
                self.cluster.released(req.lease)
        return ReleaseReply(id=req.id, released=released)

    def _operator_only(self, what: str) -> None:
        """Refuse ``what`` to a peer that is not an operator (``[server.access]``)."""
        if not self.operator:
            raise Forbidden(f"{what} is for operators: run it as root or as the daemon's "
                            "user, or add your uid or gid to server.access.operator_uids "
                            "or operator_gids")

    def _scoped(self, req: C) -> C:
        """With ``server.access.isolate_cache``, an app peer's cache requests live in a
        namespace of its own uid: no peer reads or fills another's entries."""
        if self.operator or not self.config.server.access.isolate_cache:
            return req
        return msgspec.structs.replace(req, namespace=f"uid:{self.owner}/{req.namespace}")

    def limits(self, req: Limits) -> LimitsReply:
        if req.user is None:
            self._operator_only("every user's limits (limits without a user)")
        rows = []
        for st in self.engine.state(time.time(), req.user):
            scale = MICRO if st.metric == "usd" else 1
            rows.append(LimitUse(name=st.name, scope=st.scope, key=st.key, metric=st.metric,
                                 window=st.window, amount=st.amount / scale,
                                 used=st.used / scale, shadow=st.shadow))
        return LimitsReply(id=req.id, limits=rows, open_leases=self.engine.open_leases)

    # -- caches -----------------------------------------------------------------------

    def cache_get(self, req: CacheGet) -> CacheGetReply | Deferred:
        reply = self.cache.get(self._scoped(req), time.time())
        if isinstance(reply, CacheGetReply):
            return reply
        # a semantic search: embedding and search run on the cache's worker thread
        return Deferred(asyncio.ensure_future(reply), req.id)

    def cache_put(self, req: CachePut) -> CachePutReply:
        return self.cache.put(self._scoped(req), time.time())

    def cache_invalidate(self, req: CacheInvalidate) -> CacheInvalidateReply:
        if req.all or req.namespace is not None or self.config.server.access.isolate_cache:
            self._operator_only("cache invalidation (but of one key)")
        return CacheInvalidateReply(id=req.id, removed=self.cache.invalidate(req))

    def stats(self, req: Stats) -> StatsReply:
        now = time.time()
        requests, errors = self.metrics.totals()
        return StatsReply(
            id=req.id,
            uptime_s=round(time.monotonic() - self.started, 3),
            pid=os.getpid(),
            socket=self.socket_path,
            config_epoch=self.epoch,
            connections_now=self.metrics.connections_now,
            connections_total=self.metrics.connections_total,
            requests_total=requests,
            errors_total=errors,
            ops=self.metrics.snapshot(),
            build=self.build,
            limit_alerts=dict(self.limit_alerts),
            limit_denials=dict(self.denials),
            limit_near=dict(self.near),
            limit_shadow=dict(self.shadow),
            open_leases=self.engine.open_leases,
            retry_loop_keys=self.engine.retry_loop_keys,
            retry_loop_max_keys=self.engine.retry_loop_max_keys,
            retry_loop_forgotten=self.engine.retry_loop_forgotten,
            task_failures=dict(self.metrics.task_failures.counts),
            cache=self.cache.stats(self.cache_snapshot),
            circuits=self.router.states(now),
            latency=self.metrics.latency(),
            spend_today=self.accounting.costs.summary(
                self.accounting.costs.day_of(now), now, By.MODEL, 0).totals,
            alerts=list(self.accounting.alerts.recent),
            alert_counts=dict(self.accounting.alerts.counts),
            request_log=self.accounting.log_stats(self.request_log_path),
            cluster=self.cluster.stats(_without_password(self.config.cluster.redis_url))
            if self.cluster is not None else None,
            connections_closed=dict(self.metrics.connections_closed),
        )

    def cost_summary(self, req: Costs) -> CostsReply:
        if req.by == "user":
            self._operator_only("costs by user")
        now = time.time()
        costs = self.accounting.costs
        since = req.since if req.since is not None else costs.day_of(now)
        until = req.until if req.until is not None else now
        if until < since:
            raise InvalidValue(f"until ({until}) is before since ({since})")
        summary = costs.summary(since, until, By(req.by), req.top)
        return CostsReply(id=req.id, **summary._asdict())

    def metrics_text(self, req: MetricsText) -> MetricsReply:
        return MetricsReply(id=req.id, text=self.prometheus().decode(),
                            content_type=Exposition.CONTENT_TYPE)

    def prometheus(self) -> bytes:
        """The Prometheus exposition of everything (the op and the HTTP listener)."""
        cache = self.cache.stats(self.cache_snapshot)
        logged = self.accounting.log_stats(self.request_log_path)
        return self.exposition.render(Gauges(
            uptime_s=time.monotonic() - self.started,
            open_leases=self.engine.open_leases,
            cache_entries={t: s.entries for t, s in cache.tiers.items()},
            cache_bytes={t: s.bytes for t, s in cache.tiers.items()},
            cache_hits={t: s.hits + s.stale_serves for t, s in cache.tiers.items()},
            cache_misses={t: s.misses for t, s in cache.tiers.items()},
            semantic_pending=cache.semantic_pending,
            circuits=self.router.states(time.time()),
            transitions=self.router.transitions(),
            log_written=logged.written, log_dropped=logged.dropped, log_failed=logged.failed,
            notify_dropped=self.notifier.stats().dropped if self.notifier else 0,
            limit_alerts=dict(self.limit_alerts),
            alert_counts=dict(self.accounting.alerts.counts),
            cluster=self.cluster.stats(self.config.cluster.redis_url)
            if self.cluster is not None else None))


