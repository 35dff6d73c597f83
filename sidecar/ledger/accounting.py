"""What each guarded request leaves behind once it is decided: cost tracker rows, metrics,
alerts and a request log record.

``Handlers`` decides (cache, route, admit, settle) and then tells ``Accounting`` what
happened through one of four calls: ``hit``, ``denied``, ``ended`` (an ``end`` or a bare
``settle``); each updates every sink in the same way, so the cost tracker, the Prometheus
counters and the request log always agree. Runs on the event loop; the request log
writes on its own thread and the alert notifier delivers on its own thread.
"""
from __future__ import annotations

import itertools
import os
from typing import NamedTuple, Sequence

from .alerts import Alerts
from .costs import CostTracker
from .records import RequestRecord
from .requestlog import RequestLog
from .metrics import Metrics
from ..wire import Attempt, LogStats

MICRO = 1_000_000


class Begun(NamedTuple):
    """What ``begin`` knew about a request that went to the providers (kept by lease)."""

    until: float  # forgotten after this (the lease's TTL)
    began: float
    user: str
    route: str
    chain: tuple[str, ...]  # the models offered, in order
    providers: tuple[str, ...]
    input_tokens: int  # the estimate admitted
    request_id: str
    template: str
    template_version: str


class Accounting:
    """The cost tracker, metrics, alerts and request log, fed the same facts."""

    def __init__(self, costs: CostTracker, metrics: Metrics, alerts: Alerts,
                 log: RequestLog | None) -> None:
        self.costs = costs
        self.metrics = metrics
        self.alerts = alerts
        self.log = log
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def new_id(self) -> str:
        """A request id for a request that got no lease (a hit or a denial)."""
        return f"{self._prefix}-{next(self._ids)}"

    def _write(self, record: RequestRecord) -> None:
        if self.log is not None:
            self.log.write(record)

    def hit(self, now: float, *, user: str, route: str, model: str, semantic: bool,
            similarity: float, saved_micro: int, request_id: str, template: str,
            template_version: str) -> None:
        """A request answered from the cache; ``model`` would have been called."""
        m = self.metrics
        self.costs.hit(now, model, user, route, semantic=semantic, saved_micro_usd=saved_micro)
        label = m.model(model)
        m.saved[label] = m.saved.get(label, 0) + saved_micro
        key = (route, "hit")
        m.requests[key] = m.requests.get(key, 0) + 1
        self._write(RequestRecord(
            ts=round(now, 6), request_id=request_id or self.new_id(), outcome="hit",
            user=user, route=route, template=template, template_version=template_version,
            requested=model, cache_tier="semantic" if semantic else "exact",
            similarity=similarity))

    def denied(self, now: float, *, user: str, route: str, model: str, reason: str,
               limit: str, input_tokens: int, request_id: str, template: str,
               template_version: str) -> None:
        """A ``begin`` refused (a limit, or every circuit open)."""
        m = self.metrics
        self.costs.denial(now, model, user, route)
        key = (route, "deny")
        m.requests[key] = m.requests.get(key, 0) + 1
        self._write(RequestRecord(
            ts=round(now, 6), request_id=request_id or self.new_id(), outcome="deny",
            user=user, route=route, template=template, template_version=template_version,
            requested=model, input_tokens=input_tokens, cache_tier="miss", reason=reason,
            limit=limit))

    def limit_denial(self, reason: str, limit: str) -> None:
        """Any denial by a limit (``admit``, ``begin`` or ``extend``), for the counter."""
        key = (reason, limit)
        self.metrics.denials[key] = self.metrics.denials.get(key, 0) + 1

    def ended(self, now: float, *, lease: str, begun: Begun | None, user: str, route: str,
              model: str, attempts: Sequence[Attempt], input_tokens: int,
              output_tokens: int, cached_tokens: int, reasoning_tokens: int, micro_usd: int,
              error: bool) -> None:
        """A call settled: by ``end`` (``begun`` set when this daemon saw its ``begin``)
        or by a bare ``settle``. ``model`` is the one that answered ("" when none did)."""
        m = self.metrics
        failed = error or not model
        charged = model or (begun.chain[0] if begun is not None and begun.chain else "")
        self.costs.request(now, charged, user, route, input_tokens=input_tokens,
                           output_tokens=output_tokens, cached_tokens=cached_tokens,
                           reasoning_tokens=reasoning_tokens, micro_usd=micro_usd,
                           error=failed)
        m.usage_of(charged, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
                   micro_usd)
        size = input_tokens or (begun.input_tokens if begun is not None else 0)
        for a in attempts:
            m.attempt(a.model, size, a.latency)
            self.alerts.attempt(a.model, a.ok, now)
        alerts = self.alerts
        alerts.priced(charged, input_tokens + output_tokens, micro_usd, now)
        today, yesterday = self.costs.day_totals(now)
        alerts.cost_per_request(today, yesterday, self.costs.day_of(now), now)
        outcome = "settled" if begun is None else "error" if failed else "ok"
        key = (route, outcome)
        m.requests[key] = m.requests.get(key, 0) + 1
        if begun is None:
            self._write(RequestRecord(
                ts=round(now, 6), request_id=lease, outcome=outcome, user=user, route=route,
                requested=charged, model=model, attempts=attempts,
                input_tokens=input_tokens, output_tokens=output_tokens,
                cached_tokens=cached_tokens, reasoning_tokens=reasoning_tokens,
                usd=micro_usd / MICRO))
            return
        depth, provider = 0, ""
        if model in begun.chain:
            depth = begun.chain.index(model)
            provider = begun.providers[depth]
            if depth:
                m.fallbacks[route] = m.fallbacks.get(route, 0) + 1
        self._write(RequestRecord(
            ts=round(now, 6), request_id=begun.request_id or lease, outcome=outcome,
            user=user, route=route, template=begun.template,
            template_version=begun.template_version,
            requested=begun.chain[0] if begun.chain else charged, model=model,
            provider=provider, fallback_depth=depth, attempts=attempts,
            input_tokens=input_tokens, output_tokens=output_tokens,
            cached_tokens=cached_tokens, reasoning_tokens=reasoning_tokens,
            duration=round(now - begun.began, 6), cache_tier="miss", usd=micro_usd / MICRO,
            error=next((a.error or f"status {a.status}" for a in attempts if not a.ok), "")
            if failed else ""))

    def log_stats(self, path: str) -> LogStats:
        if self.log is None:
            return LogStats(path="off")
        s = self.log.stats()
        return LogStats(path=path, written=s.written, dropped=s.dropped,
                        failed=s.failed_records, rotations=s.rotations, error=s.error)
