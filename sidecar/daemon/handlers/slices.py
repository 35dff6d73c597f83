"""Admission slices: ``slice`` admits up to 64 calls at once, each exactly as ``admit``
would (one lease each, the same estimate, the same rules), for a client process to take
without a round trip; ``slice_end`` gives back the calls it did not take.

Which calls were taken is counted in the client's slab (``sidecar.wire.shm.Slab``), a
file the client process owns and the daemon maps read-only: slot ``i`` counts the takes
of the slice in it with a compare-and-swap, so the count never passes the slice's size,
and the client took leases ``0 .. taken-1``. When the slice ends (``slice_end``), its TTL
passes (``shm.slice_ttl``, checked once a second) or its connection closes (the client
process died, or closed it), the daemon reads the count and releases the rest. The
leases taken are the client's to settle or release over the socket, as any admit's: an
unsettled one expires with the lease TTL, as it would after a socket admit. A client
cannot give back more than it was granted, nor touch another connection's slices.

``SliceOps`` is one part of ``Handlers`` (it uses its engine, estimate and observers).
"""
from __future__ import annotations

import time
from typing import NamedTuple

from ...errors import InvalidValue
from ...limits.engine import MICRO, Metric, Subject
from ...wire import Admit, Slice, SliceEnd, SliceEndReply, SliceReply
from ...wire.shm import DaemonSlab, open_slab
from ._common import wire_seconds


class _Grant(NamedTuple):
    conn: object  # the connection it was granted on
    slot: int
    leases: tuple[str, ...]
    owner: int
    pid: int
    expires: float


class SliceOps:
    """The slice ops (part of ``Handlers``)."""

    def _init_slices(self) -> None:
        #: the connection whose request runs now (set by the server before each op)
        self.conn: object = None
        self._slabs: dict[object, DaemonSlab] = {}  # by connection
        self._grants: dict[int, _Grant] = {}  # by grant id, oldest first
        self._next_grant = 1
        self.slices_granted = 0  # calls handed out in slices
        self.slices_taken = 0  # of those, taken by their clients
        self.slices_released = 0  # given back untaken

    def slice(self, req: Slice) -> SliceReply:
        if self.cluster is not None:  # a cluster's leases come from Redis, one admit each
            return SliceReply(id=req.id, reason="cluster")
        slab = self._slabs.get(self.conn)
        if slab is None:
            if not req.slab:
                raise InvalidValue("the first slice on a connection names its slab")
            try:
                slab = open_slab(req.slab, self.owner)
            except (OSError, ValueError) as exc:
                raise InvalidValue(f"slab {req.slab!r} cannot be used: {exc}") from None
            self._slabs[self.conn] = slab
        now = time.time()
        for gid, g in list(self._grants.items()):
            if g.conn is self.conn and g.slot == req.slot:
                self._end_grant(gid, g)  # the client reuses the slot: that slice is over
        subject = Subject(req.user, req.key, req.model, req.route)
        admit = Admit(user=req.user, key=req.key, model=req.model, route=req.route,
                      input_tokens=req.input_tokens, max_tokens=req.max_tokens)
        estimate, known, _ = self._estimate(admit, req.model, req.input_tokens, b"")
        leases: list[str] = []
        decision = None
        # a concurrency limit's slots must not wait in a client's slice: one call each
        count = 1 if any(r.metric is Metric.CONCURRENT for r in self.engine.rules) \
            else req.count
        for _ in range(count):
            decision = self.engine.admit(subject, estimate, now, b"", self.owner)
            if decision.denial is not None:
                if not leases and not any(g.conn is self.conn for g in self._grants.values()):
                    # the call asked for is denied (a client holding other slices gives
                    # them back and asks again: only that answer counts)
                    self._observe(subject, decision, now)
                break
            self._observe(subject, decision, now)
            leases.append(decision.lease)
        assert decision is not None
        e = decision.estimate
        common = dict(id=req.id, input_tokens=e.input_tokens, output_tokens=e.output_tokens,
                      usd=e.micro_usd / MICRO, usd_known=known, near=list(decision.near),
                      shadow=list(decision.shadow_denials), lease_ttl=self.engine.lease_ttl)
        if not leases:
            denial = decision.denial
            scale = self._scale_of(denial.limit)
            return SliceReply(reason=denial.reason, limit=denial.limit,
                              used=denial.used / scale, amount=denial.amount / scale,
                              retry_after=wire_seconds(denial.retry_after), **common)
        gid = self._next_grant
        self._next_grant += 1
        ttl = self.config.shm.slice_ttl
        self._grants[gid] = _Grant(self.conn, req.slot, tuple(leases), self.owner,
                                   self.owner_pid, now + ttl)
        self.slices_granted += len(leases)
        return SliceReply(grant=gid, leases=leases, ttl=ttl, **common)

    def slice_end(self, req: SliceEnd) -> SliceEndReply:
        g = self._grants.get(req.grant)
        if g is None or g.conn is not self.conn:
            return SliceEndReply(id=req.id, taken=0, released=0)  # over already, or not its
        taken, released = self._end_grant(req.grant, g)
        return SliceEndReply(id=req.id, taken=taken, released=released)

    def _end_grant(self, gid: int, g: _Grant) -> tuple[int, int]:
        """Release the calls of slice ``gid`` its client did not take (its slab says how
        many it took, bounded by the slice)."""
        del self._grants[gid]
        slab = self._slabs.get(g.conn)
        taken = len(g.leases)  # no slab to read: count every call taken (never too few)
        if slab is not None:
            grant, _, used, *_ = slab.state(g.slot)
            # another grant in the slot: the client never installed this one (it reuses
            # a slot only after the daemon ended the slice in it), so it took none
            taken = min(used, len(g.leases)) if grant == gid else 0
        now = time.time()
        released = 0
        for lease in g.leases[taken:]:
            released += self.engine.release(lease, now, g.owner)
        if released:
            self._wake_waiters()
        self.slices_taken += taken
        self.slices_released += released
        self._tell_shm_use(g.pid, g.owner, time.time(), admits=taken)
        return taken, released

    def connection_closed(self, conn: object) -> None:
        """A connection closed: its slices end (what its slab says was taken stays
        taken), and its slab is let go."""
        if conn not in self._slabs:
            return
        for gid, g in list(self._grants.items()):
            if g.conn is conn:
                self._end_grant(gid, g)
        self._slabs.pop(conn).close()

    def expire_slices(self, now: float) -> None:
        """End the slices past their TTL (housekeeping, once a second)."""
        for gid, g in list(self._grants.items()):
            if g.expires + SLICE_GRACE <= now:
                self._end_grant(gid, g)


#: seconds past a slice's TTL before the daemon ends it: the client stops taking
#: SLICE_MARGIN before the TTL, so a take and the daemon's count never race
SLICE_GRACE = 0.5
