"""``Handlers``: the daemon's components, the dispatch table from request type to op,
``reload`` (which swaps in the parts of a new config that can change while running),
the once-a-second housekeeping, and the ops that each ask one component: hello, ping,
fingerprint, count, the cache ops, stats, costs, metrics. The other ops are mixed in:
the limits ops (``limits``), their cluster sharing (``cluster``) and the guarded-call
ops (``calls``).
"""
from __future__ import annotations

import asyncio
import collections
import importlib.metadata
import logging
import os
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import urllib.parse
from typing import Awaitable, Callable, TypeVar

import msgspec

from ...version import __version__
from ..._native import MODULES as NATIVE_MODULES, load as load_native
from ...ledger.accounting import Accounting, Begun
from ...ledger.alerts import Alerts, Notifier
from ...cache.store import Cache
from ...cache.keys import RequestKey
from ...cluster.quota import Cluster
from ...config import Config
from ...ledger.costs import By, CostTracker
from ...ledger.requestlog import RequestLog
from ...ledger.metrics import Exposition, Gauges, Metrics
from ...text.normalize import Normalizer
from ...errors import Forbidden, InvalidValue
from ...limits.journal import Journal
from ...limits.engine import Engine, compile_rules
from ...limits.pricing import Price, PricingRegistry
from ...wire import (
    OPS, PROTOCOL_VERSION, Admit, Begin, BuildInfo, CacheGet, CacheGetReply, CacheInvalidate,
    CacheInvalidateReply, CachePut, CachePutReply, Costs, CostsReply, Count, CountReply, End,
    Extend, Fingerprint, FingerprintReply, Hello, HelloReply, Hits, Limits, MetricsReply,
    MetricsText, Ping, Pong, Release, Reply, Report, Request, Route, Settle, ShmClientStats,
    ShmStats, Slice, SliceEnd, Stats, StatsReply,
)
from ...wire.shm import Publisher
from ...routing.router import Router
from ...text.tokens import ESTIMATE_ENCODING, Tokenizer, get_encoding
from ._common import Deferred
from .calls import CallOps
from .cluster import ClusterOps
from .limits import LimitOps
from .slices import SliceOps


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
C = TypeVar("C", CacheGet, CachePut, Begin)
T = TypeVar("T")
log = logging.getLogger("sidecar.handlers")


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("limits journal write failed: %s", future.exception())


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


#: client processes whose use of the segment ``stats`` shows (the latest to report)
SHM_CLIENTS = 64


class Handlers(CallOps, LimitOps, ClusterOps, SliceOps):
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
        self.owner_pid = 0  # and its pid (0: none)
        #: the shared-memory segment the service made (None: none), and what the latest
        #: SHM_CLIENTS client processes told of their use of it, by pid (oldest first)
        self.segment: Publisher | None = None
        self.shm_clients: dict[int, ShmClientStats] = {}
        self._init_slices()
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
            Hits: self.hits,
            Slice: self.slice,
            SliceEnd: self.slice_end,
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

    def housekeeping(self, now: float) -> None:
        """Once a second: expire leases past their TTL, drop idle counters and cache
        entries past their stale window. Each step is guarded on its own, so one that
        fails (counted in ``stats`` ``task_failures``) never skips the others."""
        guard = self.metrics.task_failures.guard
        with guard("housekeeping.slices"):
            self.expire_slices(now)
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

    @staticmethod
    def _off_loop(fn: Callable[[], T]) -> Awaitable[T]:
        """``fn()`` on a counting thread: for work that scans a text of
        ``tokens.offload_chars`` or more (counting and folding release the GIL)."""
        return asyncio.get_running_loop().run_in_executor(_COUNTING, fn)

    def _operator_only(self, what: str) -> None:
        """Refuse ``what`` to a peer that is not an operator (``[server.access]``)."""
        if not self.operator:
            raise Forbidden(f"{what} is for operators: run it as root or as the daemon's "
                            "user, or add your uid or gid to server.access.operator_uids "
                            "or operator_gids")

    # -- caches -----------------------------------------------------------------------

    def _scoped(self, req: C) -> C:
        """With ``server.access.isolate_cache``, an app peer's cache requests live in a
        namespace of its own uid: no peer reads or fills another's entries."""
        if self.operator or not self.config.server.access.isolate_cache:
            return req
        return msgspec.structs.replace(req, namespace=f"uid:{self.owner}/{req.namespace}")

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
            shm=self._shm_stats(),
        )

    def _tell_shm_use(self, pid: int, uid: int, now: float, hits: int = 0, unknown: int = 0,
                      fallbacks: int = 0, admits: int = 0) -> None:
        """Add to a process's line of ``stats().shm.clients`` (the latest SHM_CLIENTS
        processes are kept)."""
        clients = self.shm_clients
        old = clients.pop(pid, None)
        if old is not None and old.uid == uid:
            hits, unknown, fallbacks, admits = (old.hits + hits, old.unknown + unknown,
                                                old.fallbacks + fallbacks, old.admits + admits)
        clients[pid] = ShmClientStats(pid=pid, uid=uid, hits=hits, unknown=unknown,
                                      fallbacks=fallbacks, told_at=now, admits=admits)
        while len(clients) > SHM_CLIENTS:
            del clients[next(iter(clients))]

    def _shm_stats(self) -> ShmStats | None:
        seg = self.segment
        if seg is None:
            return None
        return ShmStats(path=str(seg.path), generation=seg.generation, slots=seg.slots,
                        arena_bytes=seg.arena_bytes, published=self.cache.published,
                        not_published=self.cache.not_published,
                        clients=list(reversed(self.shm_clients.values())),
                        slice_calls=self.slices_granted, slice_taken=self.slices_taken,
                        slice_released=self.slices_released,
                        slices_open=len(self._grants))

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

