"""The limits ops: ``admit`` (estimate, decide, queue while waiting for room),
``settle``, ``release`` and ``limits``, with the steps the guarded call shares (counting
the prompt, the estimate, observing a decision, settling a lease) and the durability of
a settle through the limits journal (persist, restore, compact).

``LimitOps`` is one part of ``Handlers``, which mixes it in and owns the components it
uses (engine, journal, pricing, tokenizer, accounting); the cluster's say on an admit
(``_share``) comes from ``cluster``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from typing import Awaitable, Sequence, TypeVar, Union

import msgspec

from ...ledger.costs import Tallies
from ...errors import JournalError, Overloaded
from ...limits.engine import (
    MICRO, Decision, Denial, Estimate, Kind, SettleResult, Spend, Subject, Usage, encode_spend,
)
from ...limits.pricing import Usage as PricedUsage
from ...wire import (
    Admit, AdmitReply, Begin, EndReply, Limits, LimitsReply, LimitUse, Release, ReleaseReply,
    Settle, SettleReply,
)
from ...text.tokens import ESTIMATE_ENCODING
from ._common import Deferred, bounded_micro, wire_seconds

R = TypeVar("R", SettleReply, EndReply)
log = logging.getLogger("sidecar.handlers")

#: A journal record: a settle's spend (the limits engine's) or cost tracker rows.
_JOURNAL_RECORD = msgspec.msgpack.Decoder(Union[list[Spend], Tallies])  # type: ignore[valid-type]
_TALLIES = msgspec.msgpack.Encoder()

#: Calendar windows: the limits whose threshold crossings are budget alerts.
_BUDGETS = (Kind.HOUR, Kind.DAY)

#: Denial reasons that time cures: an admit may wait them out (a retry loop it may not).
_WAITABLE = ("limit", "burst")


def _waits(denial: Denial, wait: float) -> bool:
    """A cluster refusal that an admit willing to ``wait`` seconds waits out."""
    return (wait > 0 and denial.reason in ("limit", "busy")
            and denial.retry_after <= wait)  # inf (unknown) never fits


class LimitOps:
    """``admit``, ``settle``, ``release``, ``limits`` and the journal's part in them;
    mixed into ``Handlers``, whose attributes these methods use."""

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
