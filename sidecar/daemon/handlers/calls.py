"""The guarded-call ops: ``begin`` (exact cache, count, semantic cache, route, admit in
one round trip), ``end`` (report the attempts, settle, account, store the answer),
``extend``, ``route`` and ``report``.

``CallOps`` is one part of ``Handlers``: the components it uses (engine, cache, router,
pricing, accounting) belong to ``Handlers``, which mixes it in, and the limits steps it
shares with ``admit`` and ``settle`` (``_estimate``, ``_observe``, ``_settle``,
``_durably``) to ``LimitOps`` (``limits``); it lives here so that each file holds one
concern.
"""
from __future__ import annotations

import asyncio
import time
from typing import Awaitable, NamedTuple

import msgspec

from ...ledger.accounting import Begun
from ...cache.keys import RequestKey, request_key
from ...errors import InvalidValue
from ...limits.engine import MICRO, Decision, Denial, Estimate, Subject, Usage
from ...limits.pricing import Usage as PricedUsage
from ...wire import (
    NIL, Begin, BeginReply, CacheGetReply, CachePut, ChainModel, End, EndReply, Extend,
    ExtendReply, Hits, HitsReply, Report, ReportReply, Route, RouteReply,
)
from ...routing.settings import RouteConfig
from ...routing.router import Chain, backoff_schedule, budget_fraction
from ._common import CACHE_FIELDS, Deferred, bounded_micro, wire_seconds

class _Admitted(NamedTuple):
    """A begin past its admit, while the cluster (maybe) has its say."""

    req: Begin
    view: Begin
    rk: RequestKey
    found: CacheGetReply
    who: str
    chain: Chain
    cfg: RouteConfig | None
    deadline: float
    estimate: Estimate
    decision: Decision
    now: float


class CallOps:
    """``begin``, ``end``, ``extend``, ``route``, ``report``; mixed into ``Handlers``,
    whose attributes these methods use."""

    def begin(self, req: Begin) -> BeginReply | Deferred:
        """Exact cache, then (when the scope has entries) the semantic tier on its
        thread, then count (a long text on a worker thread), route and admit."""
        if req.kind and req.kind not in self.config.cache.policy:
            # refused now: at end the call would be paid for and its answer unstorable
            raise InvalidValue(f"unknown response kind {req.kind!r}; known: "
                               + ", ".join(sorted(self.config.cache.policy)))
        view = self._cache_view(req)
        owner = self.owner  # the peer asking: a begin finished later still acts for it
        if self._long_count(req):  # its cache key folds the whole text: not on the loop
            return Deferred(asyncio.ensure_future(self._begin_long(req, view, owner)), req.id)
        rk = request_key(self.normalizer, view)  # kept for end, which stores the answer
        found = self.cache.get(view, time.time(), rk)
        if isinstance(found, CacheGetReply):
            reply = self._begin_after_cache(req, view, rk, found, owner)
            if isinstance(reply, BeginReply):
                return reply
            return Deferred(asyncio.ensure_future(reply), req.id)  # the cluster is asked
        return Deferred(asyncio.ensure_future(self._begin_off_loop(req, view, rk, found, owner,
                                                                   False)), req.id)

    def _cache_view(self, req: Begin) -> Begin:
        """The request as the cache keys it: a routed request is keyed by its route (or
        task), so answers of different routes never mix."""
        req = self._scoped(req)
        if req.model:
            return req
        return msgspec.structs.replace(req, model=f"route:{req.route or req.task or '-'}")

    async def _begin_long(self, req: Begin, view: Begin, owner: int) -> BeginReply:
        """A begin whose text is long: its cache keys are computed on a counting thread,
        and after a miss its input tokens and prompt key too."""
        now = time.time()
        rk = await self._off_loop(lambda: request_key(self.normalizer, view))
        found = self.cache.get(view, now, rk)
        return await self._begin_off_loop(req, view, rk, found, owner,
                                          req.input_tokens is None)

    async def _begin_off_loop(self, req: Begin, view: Begin, rk: RequestKey,
                              found: CacheGetReply | Awaitable[CacheGetReply], owner: int,
                              long_count: bool) -> BeginReply:
        """A begin that waits for the semantic tier's search, or counts a long text on a
        worker thread (after a miss), or both."""
        if not isinstance(found, CacheGetReply):
            found = await found
        counted = None
        if long_count and not found.hit:
            counted = await self._counted_off_loop(req, req.model)
        reply = self._begin_after_cache(req, view, rk, found, owner, counted)
        return reply if isinstance(reply, BeginReply) else await reply

    def _begin_after_cache(self, req: Begin, view: Begin, rk: RequestKey,
                           found: CacheGetReply, owner: int,
                           counted: tuple[int, bytes] | None = None
                           ) -> BeginReply | Awaitable[BeginReply]:
        """Route and admit a begin the cache did not answer; its lease is ``owner``'s.
        ``counted``: its input tokens and prompt key when already computed off the loop."""
        now = time.time()
        who = req.user or req.key
        if found.hit:
            self._account_hit(req, found, who, now)
            return BeginReply(id=req.id, outcome="hit", key=found.key, response=found.response,
                              tier=found.tier, similarity=found.similarity,
                              verdict=found.verdict, stale=found.stale)
        used = budget_fraction(self.engine.budgets(who, now))
        input_tokens, prompt = counted or (self._input_tokens(req, req.model), None)
        picked = self.router.pick_route(req.route, req.model, req.task, input_tokens)
        cfg = self.config.routes.get(picked)
        deadline = cfg.deadline if cfg is not None else self.config.routing.model_timeout
        chain = self.router.chain(req.route, req.model, req.task, input_tokens, used, now,
                                  now + deadline)
        if not chain.models:
            self.accounting.denied(
                now, user=who, route=chain.route, model=req.model, reason="no_model",
                limit="", input_tokens=input_tokens, request_id=req.request_id,
                template=req.template, template_version=req.template_version)
            return BeginReply(id=req.id, outcome="deny", key=found.key, reason="no_model",
                              route=chain.route, skipped=list(chain.skipped),
                              retry_after=round(chain.retry_after, 6),
                              static_fallback=cfg.static_fallback if cfg else "")
        first = chain.models[0].model
        subject = Subject(req.user, req.key, first, chain.route)
        estimate, known, prompt = self._estimate(req, first, input_tokens, prompt)
        decision = self.engine.admit(subject, estimate, now, prompt, owner)
        self._observe(subject, decision, now)
        step = _Admitted(req, view, rk, found, who, chain, cfg, deadline, estimate, decision,
                         now)
        if decision.denial is None and decision.tracked and self.cluster is not None:
            shared = self._share(decision, now)
            if shared is not None and not isinstance(shared, Denial):
                return self._begin_shared(step, shared)
            return self._begin_decided(step, shared)
        return self._begin_decided(step, decision.denial)

    async def _begin_shared(self, step: _Admitted,
                            shared: Awaitable[Denial | None]) -> BeginReply:
        return self._begin_decided(step, await shared)

    def _begin_decided(self, step: _Admitted, d: Denial | None) -> BeginReply:
        """The deny or go reply of an admitted (or refused) begin."""
        req, view, rk, found, who, chain, cfg, deadline, estimate, decision, now = step
        first = chain.models[0].model
        if d is not None:
            self.accounting.denied(
                now, user=who, route=chain.route, model=first, reason=d.reason, limit=d.limit,
                input_tokens=estimate.input_tokens, request_id=req.request_id,
                template=req.template, template_version=req.template_version)
            return BeginReply(id=req.id, outcome="deny", key=found.key, reason=d.reason,
                              limit=d.limit, retry_after=wire_seconds(d.retry_after),
                              route=chain.route, input_tokens=estimate.input_tokens,
                              output_tokens=estimate.output_tokens,
                              usd=estimate.micro_usd / MICRO)
        self._begun[decision.lease] = (view, rk, Begun(
            until=now + self.engine.lease_ttl, began=now, user=who, route=chain.route,
            chain=tuple(m.model for m in chain.models),
            providers=tuple(m.provider for m in chain.models),
            input_tokens=estimate.input_tokens, request_id=req.request_id,
            template=req.template, template_version=req.template_version))
        attempts = cfg.max_attempts if cfg is not None else 1
        return BeginReply(
            id=req.id, outcome="go", key=found.key, lease=decision.lease, route=chain.route,
            chain=[ChainModel(*m) for m in chain.models], skipped=list(chain.skipped),
            downgraded=chain.downgraded, deadline=deadline,
            backoff=backoff_schedule(cfg.backoff_base, cfg.backoff_max, attempts)
            if cfg is not None else [], max_attempts=attempts,
            static_fallback=cfg.static_fallback if cfg is not None else "",
            input_tokens=estimate.input_tokens, output_tokens=estimate.output_tokens,
            usd=estimate.micro_usd / MICRO)

    def _account_hit(self, req: Begin, found: CacheGetReply, who: str, now: float) -> None:
        """A hit saved the call the route's first model (or the model asked for) would
        have made: priced with the usage stored with the answer."""
        model, route = req.model, ""
        if not model:
            route = self.router.pick_route(req.route, "", req.task, found.input_tokens)
            cfg = self.config.routes.get(route)
            model = cfg.models[0].model if cfg is not None else ""
        saved = self.pricing.cost(model, PricedUsage(found.input_tokens,
                                                     found.output_tokens)).micro_usd
        self.accounting.hit(now, user=who, route=route, model=model,
                            semantic=found.tier == "semantic", similarity=found.similarity,
                            saved_micro=saved, request_id=req.request_id,
                            template=req.template, template_version=req.template_version)

    def hits(self, req: Hits) -> HitsReply:
        """Exact hits a client read from the shared-memory segment: each accounted as a
        hit through the socket would have been, if the answer is still held; its time
        kept within the last minute (a report cannot rewrite older hours)."""
        now = time.time()
        accounted = unknown = 0
        exact = self.cache.exact
        for h in req.hits:
            entry, stale = exact.peek(h.key, now, True)
            if entry is None:
                unknown += 1
                continue
            accounted += 1
            if stale:
                exact.counts.stale_serves += 1
            else:
                exact.counts.hits += 1
            if h.op == "begin":
                view = Begin(user=h.who, model=h.model, route=h.route, task=h.task,
                             request_id=h.request_id, template=h.template,
                             template_version=h.template_version)
                found = CacheGetReply(hit=True, key=h.key, tier="exact", similarity=1.0,
                                      input_tokens=entry.input_tokens,
                                      output_tokens=entry.output_tokens)
                self._account_hit(view, found, h.who, min(max(h.at, now - 60.0), now))
        self._tell_shm_use(self.owner_pid, self.owner, now, hits=accounted, unknown=unknown,
                           fallbacks=req.fallbacks)
        return HitsReply(id=req.id, accounted=accounted, unknown=unknown)

    def end(self, req: End) -> EndReply | Deferred:
        now = time.time()
        result, micro, subject = self._settle(
            req.lease, req.input_tokens, req.output_tokens, req.cached_input_tokens,
            req.reasoning_tokens, req.usd, req.model)
        if result.found and not result.duplicate:  # circuits hear each call once, and
            for a in req.attempts:  # only from the peer that holds its lease
                self.router.report(a.model, a.ok, now, a.retry_after)
        stored, reason = False, ""
        popped = self._begun.pop(req.lease, None)
        begun = popped[2] if popped is not None else None
        if subject is not None and result.found and not result.duplicate:
            self.accounting.ended(
                now, lease=req.lease, begun=begun, user=subject.user or subject.key,
                route=subject.route, model=req.model, attempts=req.attempts,
                input_tokens=req.input_tokens, output_tokens=req.output_tokens,
                cached_tokens=req.cached_input_tokens, reasoning_tokens=req.reasoning_tokens,
                micro_usd=micro, error=req.error)
        if result.duplicate:
            reason = "duplicate"
        elif bytes(req.response) == NIL:
            reason = "no_response"
        elif popped is None:
            reason = "unknown_lease"
        else:
            view, rk = popped[0], popped[1]
            try:
                put = self.cache.put(CachePut(
                    id=req.id, response=req.response, kind=view.kind, error=req.error,
                    tool_calls=req.tool_calls, no_store=view.no_store,
                    input_tokens=req.input_tokens, output_tokens=req.output_tokens,
                    **{f: getattr(view, f) for f in CACHE_FIELDS}), now, rk)
                stored, reason = put.stored, put.reason
            except InvalidValue as exc:  # e.g. a kind dropped by a reload since begin:
                stored, reason = False, f"invalid: {exc}"  # the settle above stands
        reply = EndReply(id=req.id, found=result.found, duplicate=result.duplicate,
                         usd=micro / MICRO, durable=self.journal is not None, stored=stored,
                         reason=reason)
        return self._durably(req.lease, result, reply)

    def extend(self, req: Extend) -> ExtendReply:
        subject = self.engine.lease_subject(req.lease, self.owner)
        model = req.model or (subject.model if subject is not None else "")
        micro = bounded_micro(self.pricing.cost(model, PricedUsage(
            req.input_tokens, req.output_tokens, 0, 0)).micro_usd)
        denial = self.engine.extend(req.lease, Usage(req.input_tokens, req.output_tokens,
                                                     micro), time.time(), self.owner)
        if denial is None:
            return ExtendReply(id=req.id, allowed=True)
        self.denials[denial.limit] = self.denials.get(denial.limit, 0) + 1
        self.accounting.limit_denial(denial.reason, denial.limit)
        scale = self._scale_of(denial.limit)
        return ExtendReply(id=req.id, allowed=False, reason=denial.reason, limit=denial.limit,
                           used=denial.used / scale, amount=denial.amount / scale,
                           retry_after=wire_seconds(denial.retry_after))

    def route(self, req: Route) -> RouteReply:
        now = time.time()
        used = budget_fraction(self.engine.budgets(req.user, now)) if req.user else 0.0
        picked = self.router.pick_route(req.route, req.model, req.task, req.input_tokens)
        cfg = self.config.routes.get(picked)
        deadline = cfg.deadline if cfg is not None else self.config.routing.model_timeout
        chain = self.router.chain(req.route, req.model, req.task, req.input_tokens, used, now,
                                  now + deadline)
        return RouteReply(id=req.id, route=chain.route,
                          chain=[ChainModel(*m) for m in chain.models],
                          skipped=list(chain.skipped), downgraded=chain.downgraded,
                          retry_after=round(chain.retry_after, 6))

    def report(self, req: Report) -> ReportReply:
        self._operator_only("report (a circuit outcome without a lease; apps report "
                            "through end)")
        state = self.router.report(req.model, req.ok, time.time(), req.retry_after)
        return ReportReply(id=req.id, state=state.value)

