"""Admission from slices: ``Client.admit`` takes a call from a slice the daemon granted
this process (``sidecar.daemon.handlers.slices``), with no round trip.

A plain admit (``user``, ``key``, ``model``, ``route``, ``input_tokens``, ``max_tokens``:
nothing to count, no ``usd``, no ``wait``) is answered from the process's slice for that
same request shape while the slice lasts: a lock-free take in the process's slab (a file
it owns, the daemon reads it) gives the index of a lease the daemon already admitted;
the app settles or releases it over the socket as any admit's lease. When the slice is
spent or its TTL is near, the next admit asks the daemon for another (ending the old one
in the same round trip, which gives back what was not taken); a slice the daemon denies
is the denial the socket admit would have given. The daemon binds slices to the
connection they were asked on (``Client``'s slices have one of their own, ``AsyncClient``
uses its connection): when it closes (the daemon restarted, or this process died), the
daemon gives back every call not taken, and the next slice starts on a new connection
with a new slab. ``Slices`` holds the state and plans a renewal (a generator of the
requests to send); ``SyncSlices`` and ``AsyncClient`` run it over their connection.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Callable, Generator, NamedTuple, Protocol, Sequence

import msgspec

from ._common import Dead
from ..errors import SidecarError
from ..wire import (
    MAX_NAME, MAX_TOKENS, AdmitReply, Reply, Request, Slice, SliceEnd, SliceReply,
)
from ..wire.shm import SLAB_SLOTS, ClientSlab

#: the plain admit's fields: a request with only these (``input_tokens`` given) may be
#: admitted from a slice; anything else (text to count, usd, wait) asks the daemon
_NAMES = ("user", "key", "model", "route")
_PLAIN = frozenset(_NAMES + ("input_tokens", "max_tokens"))
#: a client stops taking from a slice this many seconds before its TTL ends (the daemon
#: ends it half a second after): a take and the daemon's count never race
MARGIN = 0.1
#: a shape's slices hold one call (an admit as the socket's, nothing held in advance)
#: until HOT_AFTER of them in a row were spent within their TTL; then 2, 4, ... 64
HOT_AFTER = 4
MAX_SIZE = 64


class _Connection(Protocol):
    def exchange(self, requests: Sequence[Request],
                 timeout: float) -> list[Reply | BaseException]: ...
    def close(self) -> None: ...


class _Local(NamedTuple):
    grant: int
    slot: int
    replies: list[AdmitReply]  # each call's admit reply, by the index its take gives
    until: float  # monotonic: take no call after
    streak: int  # slices of this shape before it spent within their TTL, in a row


def _shape(fields: dict[str, Any]) -> tuple | None:
    """The slice key of a plain admit (None: not one)."""
    if not fields.keys() <= _PLAIN or "input_tokens" not in fields:
        return None
    for name in _NAMES:
        v = fields.get(name, "")
        if type(v) is not str or len(v) > MAX_NAME:
            return None
    for name in ("input_tokens", "max_tokens"):
        v = fields.get(name, 0)
        if v is None and name == "max_tokens":
            continue
        if type(v) is not int or not 0 <= v <= MAX_TOKENS:
            return None
    return (fields.get("user", ""), fields.get("key", ""), fields.get("model", ""),
            fields.get("route", ""), fields["input_tokens"], fields.get("max_tokens") or 0)


class Slices:
    """One client's admission slices: the takes, and the plan of a renewal
    (``renew``), which a driver runs over its connection (``SyncSlices`` here, and
    ``AsyncClient`` over its own)."""

    def __init__(self) -> None:
        self.slab: ClientSlab | None = None
        self.local: dict[tuple, _Local] = {}
        self.free = list(range(SLAB_SLOTS - 1, -1, -1))
        self.off = False  # the daemon grants none (cluster mode): every admit asks it
        self.admits = 0  # calls admitted from slices
        self.asked = 0  # slices asked for

    def take(self, fields: dict[str, Any]) -> AdmitReply | tuple | None:
        """A call admitted from a slice; else the shape to ask a slice for (a tuple);
        None: not a plain admit (ask the daemon)."""
        if self.off or not fields.keys() <= _PLAIN:
            return None
        get = fields.get
        n, m = get("input_tokens"), get("max_tokens") or 0
        if type(n) is not int or type(m) is not int:
            return None
        # (a shape with a slice was checked in full when its slice was asked for)
        shape = (get("user", ""), get("key", ""), get("model", ""), get("route", ""), n, m)
        try:
            s = self.local.get(shape)
        except TypeError:  # an unhashable value: not a plain admit
            return None
        if s is not None and time.monotonic() < s.until:
            i = self.slab.slab.take(s.slot, s.grant)  # type: ignore[union-attr]
            if i >= 0:
                self.admits += 1
                return s.replies[i]
        return shape if _shape(fields) is not None else None

    def retake(self, shape: tuple) -> AdmitReply | None:
        """A call from the shape's slice if another caller renewed it meanwhile."""
        s = self.local.get(shape)
        if s is not None and time.monotonic() < s.until:
            i = self.slab.slab.take(s.slot, s.grant)  # type: ignore[union-attr]
            if i >= 0:
                self.admits += 1
                return s.replies[i]
        return None

    def reset(self) -> ClientSlab:
        """A new connection: the old one's slices ended with it; a new slab for it."""
        if self.slab is not None:
            self.slab.close()
        self.slab = ClientSlab()
        self.local.clear()
        self.free = list(range(SLAB_SLOTS - 1, -1, -1))
        return self.slab

    def renew(self, shape: tuple, fresh: bool) -> Generator[list[Request], SliceReply | None,
                                                            AdmitReply | None]:
        """Ask for the shape's next slice: yields the requests to send (a ``Slice``
        last) and is sent the reply to it (None: the exchange failed); returns the call
        taken from it, a denial, or None (ask the daemon). ``fresh``: on a new
        connection, which starts with a new slab (named, then its file removed once the
        daemon has mapped it) and no slices."""
        if fresh:
            self.reset()
        s = self.local.get(shape)
        requests: list[Request] = []
        if s is not None:
            requests.append(SliceEnd(grant=s.grant))
            del self.local[shape]
            self.free.append(s.slot)
        if not self.free:  # every slot holds a live slice: end the oldest
            old = self.local.pop(next(iter(self.local)))
            requests.append(SliceEnd(grant=old.grant))
            self.free.append(old.slot)
        slot = self.free.pop()
        streak = s.streak + 1 if s is not None and time.monotonic() < s.until else 0
        size = 1 if streak < HOT_AFTER else min(MAX_SIZE, 2 << (streak - HOT_AFTER))
        user, key, model, route, input_tokens, max_tokens = shape
        ask = Slice(user=user, key=key, model=model, route=route, input_tokens=input_tokens,
                    max_tokens=max_tokens, count=size, slot=slot)
        first = msgspec.structs.replace(ask, slab=self.slab.path) if fresh else ask  # type: ignore
        reply = yield [*requests, first]
        if fresh:
            self.slab.unlink()  # type: ignore[union-attr]  # mapped, or refused
        if reply is not None and not reply.leases and reply.reason != "cluster" and self.local:
            # denied while this client's other slices hold calls: give those back, ask again
            ends: list[Request] = [SliceEnd(grant=x.grant) for x in self.local.values()]
            self.free.extend(x.slot for x in self.local.values())
            self.local.clear()
            reply = yield [*ends, ask]
        if reply is None or not reply.leases:
            self.free.append(slot)
            if reply is None:
                return None  # the socket admit says what is wrong
            if reply.reason == "cluster":
                self.off = True
                return None
            return AdmitReply(
                allowed=False, lease="", reason=reply.reason, limit=reply.limit,
                used=reply.used, amount=reply.amount, retry_after=reply.retry_after,
                input_tokens=reply.input_tokens, output_tokens=reply.output_tokens,
                usd=reply.usd, usd_known=reply.usd_known, near=reply.near,
                shadow=reply.shadow, ttl=reply.lease_ttl)
        self.asked += 1
        self.slab.slab.install(slot, reply.grant, len(reply.leases))  # type: ignore
        s = _Local(reply.grant, slot, [AdmitReply(
            allowed=True, lease=lease, reason="", limit="", used=0.0, amount=0.0,
            retry_after=0.0, input_tokens=reply.input_tokens,
            output_tokens=reply.output_tokens, usd=reply.usd, usd_known=reply.usd_known,
            near=reply.near, shadow=reply.shadow, ttl=reply.lease_ttl)
            for lease in reply.leases], time.monotonic() + reply.ttl - MARGIN, streak)
        self.local[shape] = s
        i = self.slab.slab.take(slot, s.grant)  # type: ignore[union-attr]
        self.admits += 1
        return s.replies[i]

    def ends(self) -> list[Request]:
        """The requests that end every slice (at close), forgetting them."""
        ends: list[Request] = [SliceEnd(grant=s.grant) for s in self.local.values()]
        self.local.clear()
        return ends

    def release_slab(self) -> None:
        if self.slab is not None:
            self.slab.close()
            self.slab = None


#: what an exchange of the slices may fail with: the admit then asks over the socket
FAILURES = (SidecarError, Dead, TimeoutError, OSError)


class SyncSlices(Slices):
    """``Client``'s slices, on a connection of their own (``connect`` opens it)."""

    def __init__(self, connect: Callable[[], _Connection], timeout: float) -> None:
        super().__init__()
        self.connect = connect
        self.timeout = timeout
        self.conn: _Connection | None = None
        self.lock = threading.Lock()  # asking for slices only: takes are lock-free

    def admit(self, fields: dict[str, Any]) -> AdmitReply | None:
        """A call admitted from a slice, a denial, or None (ask the daemon)."""
        got = self.take(fields)
        if type(got) is not tuple:
            return got  # type: ignore[return-value]
        with self.lock:
            again = self.retake(got)
            if again is not None:
                return again
            fresh = self.conn is None
            if fresh:
                try:
                    self.conn = self.connect()
                except FAILURES:
                    return None
            plan = self.renew(got, fresh)
            requests = next(plan)
            while True:
                try:
                    requests = plan.send(self._exchange(requests))
                except StopIteration as done:
                    return done.value

    def _exchange(self, requests: list[Request]) -> SliceReply | None:
        if self.conn is None:
            return None
        try:
            replies = self.conn.exchange(requests, self.timeout)
        except FAILURES:
            self._drop()
            return None
        last = replies[-1]
        if isinstance(last, BaseException):
            self._drop()  # (a refused slab: the next ask starts on a new connection)
            return None
        return last  # type: ignore[return-value]

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def close(self) -> None:
        """End every slice (the calls not taken go back) and let the slab go."""
        with self.lock:
            ends = self.ends()
            if self.conn is not None and ends:
                with contextlib.suppress(*FAILURES):  # (closing the connection ends them too)
                    self.conn.exchange(ends, self.timeout)
            self._drop()
            self.release_slab()
