"""Quota leases: how a daemon spends a cluster-wide limit without asking Redis per admit.

Redis holds the truth of every shared limit counter (a sliding window's buckets, or a
calendar period's total). A daemon takes a *lease* on a counter: a chunk of its remaining
amount, charged in Redis at once, spent locally (``take``) while the lease's slot (the
Redis bucket or period it was charged to) lasts, renewed by reports, and closed by its
next acquire, which returns what was not used. Chunks adapt: at most the remaining
amount over ``divisor`` x the live daemons, at least what the admit needs, so a counter far
from its amount is leased in large chunks and one near it in single units; the cluster
never grants more than the amount (over-admission is bounded by what a daemon that dies
spent after its last report). Settles that differ from their estimate, releases, and
admits made while Redis was away are *adjustments*, sent in batches a daemon numbers so a
replayed batch is applied once.

When Redis fails or is slower than the timeout the cluster is *degraded*: each shared
limit follows its policy (``local_share``: this daemon enforces the limit times ``1 -
margin`` over the live daemons it last saw; ``fail_open``: the full limit, locally;
``fail_closed``: refuse), admits are recorded as adjustments (bounded: one per counter and
slot still inside its window), and a heartbeat keeps trying; when it answers, the
adjustments are flushed and the degraded flag clears. Every method takes ``now`` (the
daemon's clock); Redis time is used for slots, through the offset measured at each reply.
"""
from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

from ..errors import StoreUnavailable
from ..wire import ClusterStats

if TYPE_CHECKING:  # the store imports redis: loaded only in cluster mode
    from .store import Call, RedisStore

log = logging.getLogger("sidecar.cluster")


#: A lease is spent only until this fraction of its TTL after it was granted or last
#: renewed: Redis reclaims it at the full TTL, so the daemon stops first.
_RENEW_MARGIN = 0.7


class Policy(enum.Enum):
    LOCAL_SHARE = "local_share"
    FAIL_OPEN = "fail_open"
    FAIL_CLOSED = "fail_closed"


class Shared(NamedTuple):
    """One shared limit rule, as the cluster needs it."""

    index: int  # the rule's index in the limits engine
    name: str
    shape: str  # scope/metric/window: a changed rule never meets its old counters
    sliding: bool  # else calendar (hour or day)
    span: float  # sliding: seconds per bucket
    buckets: int  # sliding: buckets per window
    amount: int
    need_at: int  # which need it counts: 0 requests, 1 input, 2 output, 3 total, 4 micro-USD
    policy: Policy
    period: Callable[[float], tuple[float, float]] | None  # calendar: (start, end) at t


class Refusal(NamedTuple):
    """A shared limit the cluster cannot grant now."""

    limit: str
    used: int
    amount: int
    retry_after: float  # seconds; inf when unknown
    reason: str  # "limit" (the cluster is full) or "unavailable" (fail_closed, degraded)


class Quota:
    """This daemon's lease on one shared counter."""

    __slots__ = ("rule", "key", "keys", "slot", "ends", "valid", "granted", "used",
                 "reported", "seq", "open", "touched", "replay", "busy", "last_used", "full")

    def __init__(self, rule: Shared, key: str, keys: tuple[str, str]) -> None:
        self.rule = rule
        self.key = key
        self.keys = keys
        self.slot = -1.0  # the Redis slot the lease is charged to
        self.ends = 0.0  # local time the slot ends
        #: local time after which the lease must not be spent: its slot's end, or (with a
        #: margin) when Redis may reclaim it unless a report renews it first
        self.valid = 0.0
        self.granted = 0
        self.used = 0
        self.reported = 0
        self.seq = 0
        self.open = False  # Redis holds a lease of ours for this counter
        self.touched = 0.0
        self.replay: list[Any] | None = None  # args of an acquire whose answer was lost
        self.busy: asyncio.Future[Refusal | None] | None = None  # acquire in flight
        self.last_used = 0  # what the previous lease used: sizes the next one
        #: the cluster refused this counter: (local time until which to refuse without
        #: asking, the refusal, when it said to retry); a bucket at most, so what other
        #: daemons return is seen soon
        self.full: tuple[float, Refusal, float] | None = None


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=10).hexdigest()


class Cluster:
    """Leases, adjustments, membership and degraded mode for the shared limit rules."""

    def __init__(self, store: RedisStore, *, name: str, daemon: str | None = None,
                 lease_ttl: float = 5.0, heartbeat: float = 1.0, divisor: int = 4,
                 margin: float = 0.1, expected_daemons: int = 1, hold: float = 600.0,
                 on_mode: Callable[[bool], None] | None = None) -> None:
        self.store = store
        self.name = name
        self.daemon = daemon or f"{os.uname().nodename}-{os.getpid()}-{os.urandom(3).hex()}"
        self.lease_ttl = lease_ttl
        self.heartbeat = heartbeat
        self.divisor = divisor
        self.margin = margin
        self.live = max(1, expected_daemons)  # until the first heartbeat answers
        self.on_mode = on_mode
        self.hold = hold  # seconds a lease's record waits for its settle
        self.rules: dict[int, Shared] = {}
        self.quotas: dict[tuple[int, str], Quota] = {}
        #: lease id -> what it took: ((quota, slot, amount), ...)
        self.leases: dict[str, tuple[float, tuple[tuple[Quota, float, int], ...]]] = {}
        #: (rule index, key, slot) -> adjustment not yet sent
        self.pending: dict[tuple[int, str, float], int] = {}
        self._batch: tuple[int, dict[tuple[int, str, float], int]] | None = None
        self._batch_seq = 0
        self.offset = 0.0  # Redis time minus local time, at the last reply
        self.degraded = True  # until Redis first answers
        self.reason = "not connected yet"
        self.connected = False  # Redis has answered at least once
        self.since = 0.0
        self.transitions = 0
        self.acquires = 0
        self.grants = 0
        self.refusals = 0
        self._members = f"llms:{{{_digest(name, 'members')}}}:members"

    # -- configuration ---------------------------------------------------------------

    def configure(self, rules: Sequence[Shared]) -> None:
        """The shared rules (at start and on reload). A rule that keeps its name and
        shape keeps its leases and adjustments (a new amount or policy applies from its
        next lease); the leases of a rule gone or reshaped are left to expire in Redis."""
        new = {r.index: r for r in rules}
        by_name = {r.name: r for r in rules}
        moved = {old.index: by_name[old.name].index for old in self.rules.values()
                 if old.name in by_name and by_name[old.name].shape == old.shape}
        kept = {}
        for q in self.quotas.values():
            if q.rule.index in moved:
                q.rule = new[moved[q.rule.index]]
                kept[(q.rule.index, q.key)] = q
        self.quotas = kept

        def remap(table: dict[tuple[int, str, float], int]) -> dict:
            return {(moved[i], key, slot): v for (i, key, slot), v in table.items()
                    if i in moved}

        self.pending = remap(self.pending)
        if self._batch is not None:
            self._batch = (self._batch[0], remap(self._batch[1]))
        self.rules = new

    def stats(self, redis: str) -> ClusterStats:
        return ClusterStats(
            redis=redis, name=self.name, daemon=self.daemon, degraded=self.degraded,
            reason=self.reason, degraded_since=self.since if self.degraded else 0.0,
            live_daemons=self.live, shared_limits=len(self.rules),
            leases_open=sum(q.open for q in self.quotas.values()),
            pending_adjustments=len(self.pending) + (len(self._batch[1]) if self._batch
                                                     else 0),
            acquires=self.acquires, grants=self.grants, refusals=self.refusals,
            transitions=self.transitions)

    def share(self, rule: Shared) -> int:
        """The amount this daemon enforces alone while degraded (``local_share``)."""
        return max(0, math.floor(rule.amount * (1 - self.margin) / self.live))

    def _quota(self, rule: Shared, key: str) -> Quota:
        q = self.quotas.get((rule.index, key))
        if q is None:
            base = _digest(self.name, rule.name, rule.shape, key)
            q = self.quotas[(rule.index, key)] = Quota(rule, key, (
                f"llms:{{{base}}}:u", f"llms:{{{base}}}:l"))
        return q

    def _window(self, rule: Shared, redis_now: float) -> list[Any]:
        if rule.sliding:
            keep = math.ceil(rule.span * rule.buckets * 2 + self.lease_ttl * 4)
            return ["s", repr(rule.span), rule.buckets, 0, 0, keep]
        assert rule.period is not None
        start, end = rule.period(redis_now)
        keep = math.ceil(end - start + self.lease_ttl * 4)
        return ["c", 0, 0, int(start), repr(end), keep]

    def _slot(self, rule: Shared, now: float) -> float:
        """The Redis slot holding local time ``now`` (estimated through the offset)."""
        t = now + self.offset
        if rule.sliding:
            return float(math.floor(t / rule.span))
        assert rule.period is not None
        return float(int(rule.period(t)[0]))

    # -- admitting ---------------------------------------------------------------------

    def take(self, lease: str, tracked: Sequence[tuple[int, str, int]],
             now: float) -> list[tuple[Quota, int]] | Refusal | None:
        """Spend ``tracked`` (``(rule index, key, amount)`` per shared rule an admit
        reserved on) from this daemon's leases, all or none. None: done; a list: the
        quotas short of their amount (``acquire`` them, then take again); a ``Refusal``:
        Redis refused one of them a moment ago, or (degraded) a ``fail_closed`` rule
        refuses."""
        if self.degraded:
            return self._take_degraded(lease, tracked, now)
        entries = []
        short = []
        for index, key, amount in tracked:
            rule = self.rules.get(index)
            if rule is None:
                continue
            q = self._quota(rule, key)
            if q.valid <= now or q.granted - q.used < amount:
                if q.full is not None and q.full[0] > now:
                    refusal, retry_at = q.full[1], q.full[2]
                    return refusal._replace(retry_after=max(0.0, retry_at - now))
                short.append((q, amount))
            else:
                entries.append((q, amount))
        if short:
            return short
        for q, amount in entries:
            q.used += amount
            q.touched = now
        if entries:
            self.leases[lease] = (now + self.hold,
                                  tuple((q, q.slot, amount) for q, amount in entries))
        return None

    def _take_degraded(self, lease: str, tracked: Sequence[tuple[int, str, int]],
                       now: float) -> Refusal | None:
        """Redis is away: the engine enforces each rule's degraded amount; the admit is
        recorded as an adjustment Redis gets once it is back."""
        shared = [(self.rules[i], key, amount) for i, key, amount in tracked
                  if i in self.rules]
        for rule, _, _ in shared:
            if rule.policy is Policy.FAIL_CLOSED:
                return Refusal(rule.name, 0, rule.amount, self.heartbeat, "unavailable")
        took = []
        for rule, key, amount in shared:
            slot = self._slot(rule, now)
            k = (rule.index, key, slot)
            self.pending[k] = self.pending.get(k, 0) + amount
            took.append((self._quota(rule, key), slot, amount))
        if took:
            self.leases[lease] = (now + self.hold, tuple(took))
        return None

    async def acquire(self, short: Sequence[tuple[Quota, int]], now: float) -> Refusal | None:
        """Lease at least the missing amounts (concurrently); a Refusal when the cluster
        cannot grant one of them (the others keep what they got)."""
        results = await asyncio.gather(*(self._acquire_one(q, amount, now)
                                         for q, amount in short))
        for refusal in results:
            if refusal is not None:
                return refusal
        return None

    async def _acquire_one(self, q: Quota, amount: int, now: float) -> Refusal | None:
        while q.busy is not None:  # one acquire per counter at a time; then re-check
            await asyncio.shield(q.busy)
            if q.valid > now and q.granted - q.used >= amount:
                return None
        q.busy = asyncio.get_running_loop().create_future()
        try:
            refusal = await self._acquire_call(q, amount, now)
        except StoreUnavailable as exc:
            self.enter_degraded(str(exc), now)
            refusal = (Refusal(q.rule.name, 0, q.rule.amount, self.heartbeat, "unavailable")
                       if q.rule.policy is Policy.FAIL_CLOSED else None)
        finally:
            busy, q.busy = q.busy, None
            busy.set_result(None)
        return refusal

    async def _acquire_call(self, q: Quota, amount: int, now: float) -> Refusal | None:
        rule = q.rule
        if q.replay is not None:
            args = q.replay  # the same call again: Redis applies it once
        else:
            q.valid = 0.0  # this call closes the lease: nothing more is spent from it
            q.seq += 1
            # a counter new to this daemon takes the largest share; later, twice what the
            # last lease used (the script caps both at the share)
            hint = max(amount, 2 * q.last_used) if q.last_used else rule.amount
            args = [*self._window(rule, now + self.offset), self.daemon, q.seq, rule.amount,
                    amount, hint, self.divisor, self.live, repr(self.lease_ttl),
                    q.used if q.open else 0]
            q.replay = args
        self.acquires += 1
        reply = await self.store.call("acquire", q.keys, args)
        q.replay = None
        kind = reply[0]
        if kind == "period":  # our idea of the period was off: the clock offset moved
            self.offset = float(reply[1]) - now
            return await self._acquire_call(q, amount, now)
        if q.open:
            self._closed(q, args[-1], bool(int(reply[-1])))
        if kind == "closed":  # a close (want 0) replayed
            return None
        if kind == "deny":
            self.offset = float(reply[3]) - now
            self.refusals += 1
            wait = float(reply[2])
            refusal = Refusal(rule.name, int(reply[1]), rule.amount,
                              wait if wait >= 0 else math.inf, "limit")
            hold = rule.span if rule.sliding else self.heartbeat
            q.full = (now + min(refusal.retry_after, hold), refusal, now + refusal.retry_after)
            return refusal
        self.offset = float(reply[3]) - now
        self.grants += 1
        q.full = None
        q.slot, q.granted, q.used, q.reported, q.open = float(reply[1]), int(reply[2]), 0, 0, True
        q.ends = self._slot_end(rule, q.slot) - self.offset
        q.valid = min(q.ends, now + self.lease_ttl * _RENEW_MARGIN)
        q.touched = now
        return None

    def _closed(self, q: Quota, sent: int, found: bool) -> None:
        """Redis closed our lease on ``q`` with ``sent`` as its use (a reclaimed lease
        too: the script charged the use we had not reported). ``found`` False: the lease
        was gone altogether (its key expired in a long outage): what we spent beyond our
        last report is sent as an adjustment."""
        extra = q.used - sent if found else q.used - q.reported
        if extra:
            k = (q.rule.index, q.key, q.slot)
            self.pending[k] = self.pending.get(k, 0) + extra
        q.last_used = q.used
        q.open, q.granted, q.used, q.reported, q.valid = False, 0, 0, 0, 0.0

    def _slot_end(self, rule: Shared, slot: float) -> float:
        """Redis time at which ``slot`` stops taking new use."""
        if rule.sliding:
            return (slot + 1) * rule.span
        assert rule.period is not None
        return rule.period(slot)[1]

    # -- after the call ------------------------------------------------------------------

    def settled(self, lease: str, needs: Sequence[int]) -> None:
        """The lease's actual use (``needs`` indexed like ``Shared.need_at``) replaces
        what it took: the difference is an adjustment of the slot it was taken from."""
        taken = self.leases.pop(lease, None)
        if taken is None:
            return
        for q, slot, amount in taken[1]:
            if self.rules.get(q.rule.index) is not q.rule:
                continue  # its rule was reshaped or removed by a reload
            delta = needs[q.rule.need_at] - amount
            if delta:
                k = (q.rule.index, q.key, slot)
                self.pending[k] = self.pending.get(k, 0) + delta

    def released(self, lease: str) -> None:
        """A lease ended unused: what it took goes back."""
        taken = self.leases.pop(lease, None)
        if taken is None:
            return
        for q, slot, amount in taken[1]:
            if self.rules.get(q.rule.index) is not q.rule:
                continue  # its rule was reshaped or removed by a reload
            k = (q.rule.index, q.key, slot)
            self.pending[k] = self.pending.get(k, 0) - amount

    # -- degraded mode -------------------------------------------------------------------

    def enter_degraded(self, reason: str, now: float) -> None:
        if self.degraded:
            self.reason = reason
            return
        self.degraded, self.reason, self.since = True, reason, now
        self.transitions += 1
        self.connected = True  # (a start without Redis never gets here: it starts degraded)
        for q in self.quotas.values():
            # nothing more is spent from leases; once Redis is back each is closed with
            # its exact use (a lease Redis reclaimed meanwhile included)
            q.valid = 0.0
        log.warning("cluster degraded: %s; limits shared through Redis now follow their "
                    "degraded policy (local share of %d live daemons)", reason, self.live)
        if self.on_mode is not None:
            self.on_mode(True)

    def _leave_degraded(self, now: float) -> None:
        self.degraded, self.reason = False, ""
        if not self.connected:
            self.connected = True
            log.info("cluster %r: connected, %d live daemons", self.name, self.live)
        else:
            self.transitions += 1
            log.warning("cluster recovered after %.1f s: limits shared through Redis again",
                        now - self.since if self.since else 0.0)
        if self.on_mode is not None:
            self.on_mode(False)

    # -- the background loop -------------------------------------------------------------

    async def tick(self, now: float) -> None:
        """Once per ``heartbeat``: membership, lease reports and closes, adjustments;
        leaves degraded mode when all of it went through."""
        try:
            live, redis_now = await self.store.call(
                "heartbeat", [self._members], [self.daemon, repr(self.heartbeat * 3)])
            self.offset = float(redis_now) - now
            self.live = max(1, int(live))
            await self._replay(now)
            await self._sync_quotas(now)
            await self.flush(now)
        except StoreUnavailable as exc:
            self.enter_degraded(str(exc), now)
            return
        if self.degraded:
            self._leave_degraded(now)
        self._forget(now)

    async def _replay(self, now: float) -> None:
        """Resend the acquires whose answers were lost, before anything else touches
        their counters: Redis applies each once and answers what it did."""
        for q in [q for q in self.quotas.values() if q.replay is not None and q.busy is None]:
            q.busy = asyncio.get_running_loop().create_future()
            try:
                await self._acquire_call(q, 0, now)
            finally:
                busy, q.busy = q.busy, None
                busy.set_result(None)

    async def _sync_quotas(self, now: float) -> None:
        """Report every open lease (renewing it); close the ones whose slot is over or
        that sat idle for half their TTL (or a heartbeat, if longer)."""
        calls: list[Call] = []
        order: list[tuple[Quota, bool, int]] = []
        for q in self.quotas.values():
            if not q.open or q.busy is not None:
                continue
            window = self._window(q.rule, now + self.offset)
            closing = q.ends <= now or now - q.touched > max(self.heartbeat, self.lease_ttl / 2)
            if closing:
                q.valid = 0.0  # spent no more: the close returns the rest
                q.seq += 1
                q.replay = [*window, self.daemon, q.seq, q.rule.amount, 0, 0, self.divisor,
                            self.live, repr(self.lease_ttl), q.used]
                calls.append(("acquire", q.keys, q.replay))
            else:
                calls.append(("report", q.keys, [*window, self.daemon, q.used,
                                                 repr(self.lease_ttl)]))
            order.append((q, closing, q.used))
            # an admit's acquire waits for this call: its close must not cross ours
            q.busy = asyncio.get_running_loop().create_future()
        try:
            replies = await self.store.batch(calls)
        finally:
            for q, _, _ in order:
                busy, q.busy = q.busy, None
                if busy is not None:
                    busy.set_result(None)
        for (q, closing, sent), reply in zip(order, replies):
            if closing:
                q.replay = None
                self._closed(q, sent, bool(int(reply[-1])))
            elif reply[0] == "gone":  # reclaimed: spend no more; the next sync closes it
                q.valid, q.touched = 0.0, -math.inf
            else:
                q.reported = sent
                q.valid = min(q.ends, now + self.lease_ttl * _RENEW_MARGIN)

    async def flush(self, now: float) -> None:
        """Send the adjustments (the batch that failed last time first, unchanged)."""
        if self._batch is None:
            if not self.pending:
                return
            self._batch_seq += 1
            self._batch, self.pending = (self._batch_seq, self.pending), {}
        seq, entries = self._batch
        by_counter: dict[tuple[int, str], list[Any]] = {}
        for (index, key, slot), delta in entries.items():
            if delta and index in self.rules:
                by_counter.setdefault((index, key), []).extend((int(slot), delta))
        calls: list[Call] = []
        for (index, key), pairs in by_counter.items():
            rule = self.rules[index]
            q = self._quota(rule, key)
            calls.append(("adjust", q.keys, [*self._window(rule, now + self.offset),
                                             self.daemon, seq, *pairs]))
        await self.store.batch(calls)
        self._batch = None

    async def flush_now(self, now: float) -> None:
        """``flush``, entering degraded mode if Redis fails."""
        try:
            await self.flush(now)
        except StoreUnavailable as exc:
            self.enter_degraded(str(exc), now)

    def _forget(self, now: float) -> None:
        """Drop closed leases' records and adjustments that no window counts any more
        (what keeps memory flat through a long outage)."""
        for lease in [k for k, (until, _) in self.leases.items() if until <= now]:
            del self.leases[lease]
        for k in [k for k, q in self.quotas.items() if not q.open and q.busy is None
                  and q.replay is None and now - q.touched > self.lease_ttl * 4]:
            del self.quotas[k]

    def trim(self, now: float) -> None:
        """Drop adjustments of slots no longer inside their window (called while
        degraded: the pending table stays bounded by counters x window)."""
        for (index, key, slot) in list(self.pending):
            rule = self.rules.get(index)
            if rule is None or slot < self._slot(rule, now) - (rule.buckets if rule.sliding
                                                                 else 0):
                del self.pending[(index, key, slot)]

    async def close(self, now: float) -> None:
        """At shutdown: return what the open leases did not use, leave the membership."""
        try:
            for q in self.quotas.values():
                q.touched = -math.inf  # every open lease closes
            await self._sync_quotas(now)
            await self.flush(now)
            await self.store.call("leave", [self._members], [self.daemon])
        except StoreUnavailable as exc:
            log.warning("cluster: leases not returned at shutdown (%s): they return when "
                        "their TTL of %.0f s runs out", exc, self.lease_ttl)
        await self.store.close()

