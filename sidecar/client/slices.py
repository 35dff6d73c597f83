"""Admission from slices: ``Client.admit`` takes a call from a slice the daemon granted
this process (``sidecar.daemon.handlers.slices``), with no round trip.

A plain admit (``user``, ``key``, ``model``, ``route``, ``input_tokens``, ``max_tokens``:
nothing to count, no ``usd``, no ``wait``) is answered from the process's slice for that
same request shape while the slice lasts: a lock-free take in the process's slab (a file
it owns, the daemon reads it) gives the index of a lease the daemon already admitted;
the app settles or releases it over the socket as any admit's lease. When the slice is
spent or its TTL is near, the next admit asks the daemon for another (ending the old one
in the same round trip, which gives back what was not taken); a slice the daemon denies
is the denial the socket admit would have given. Slices live on one connection of their
own: if it closes (the daemon restarted, or this process died), the daemon gives back
every call not taken.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import msgspec

from ._common import Dead
from ..errors import SidecarError
from ..wire import MAX_NAME, MAX_TOKENS, AdmitReply, Reply, Request, Slice, SliceEnd
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
    """One client's admission slices (``connect`` opens its connection of their own)."""

    def __init__(self, connect: Callable[[], _Connection], timeout: float) -> None:
        self.connect = connect
        self.timeout = timeout
        self.slab: ClientSlab | None = None
        self.conn: _Connection | None = None
        self.local: dict[tuple, _Local] = {}
        self.free = list(range(SLAB_SLOTS - 1, -1, -1))
        self.lock = threading.Lock()  # asking for slices only: takes are lock-free
        self.off = False  # the daemon grants none (cluster mode): every admit asks it
        self.admits = 0  # calls admitted from slices
        self.asked = 0  # slices asked for

    def admit(self, fields: dict[str, Any]) -> AdmitReply | None:
        """A call admitted from a slice, a denial, or None (ask the daemon)."""
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
        if _shape(fields) is None:
            return None
        with self.lock:
            return self._renew(shape)

    def _renew(self, shape: tuple) -> AdmitReply | None:
        s = self.local.get(shape)
        if s is not None and time.monotonic() < s.until:  # another thread renewed it
            i = self.slab.slab.take(s.slot, s.grant)  # type: ignore[union-attr]
            if i >= 0:
                self.admits += 1
                return s.replies[i]
        if self.conn is None:  # a new connection: the old one's slices ended with it
            self.local.clear()
            self.free = list(range(SLAB_SLOTS - 1, -1, -1))
            s = None
        requests: list[Request] = []
        if s is not None:
            requests.append(SliceEnd(grant=s.grant))
            del self.local[shape]
            self.free.append(s.slot)
        if not self.free:  # every slot holds a live slice: end the oldest
            oldest = next(iter(self.local))
            old = self.local.pop(oldest)
            requests.append(SliceEnd(grant=old.grant))
            self.free.append(old.slot)
        slot = self.free.pop()
        streak = s.streak + 1 if s is not None and time.monotonic() < s.until else 0
        size = 1 if streak < HOT_AFTER else min(MAX_SIZE, 2 << (streak - HOT_AFTER))
        user, key, model, route, input_tokens, max_tokens = shape
        ask = Slice(user=user, key=key, model=model, route=route, input_tokens=input_tokens,
                    max_tokens=max_tokens, count=size, slot=slot)
        try:
            reply = self._exchange(requests, ask)
        except (SidecarError, Dead, TimeoutError, OSError):
            self.free.append(slot)
            return None  # the socket admit says what is wrong
        if not reply.leases and reply.reason != "cluster" and self.local:
            # denied while this client's other slices hold calls: give those back, ask again
            ends: list[Request] = [SliceEnd(grant=x.grant) for x in self.local.values()]
            self.free.extend(x.slot for x in self.local.values())
            self.local.clear()
            try:
                reply = self._exchange(ends, ask)
            except (SidecarError, Dead, TimeoutError, OSError):
                self.free.append(slot)
                return None
        if not reply.leases:
            self.free.append(slot)
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

    def _exchange(self, requests: list[Request], ask: Slice) -> Any:
        """Send ``requests`` then ``ask`` on the slices' connection (a new one, naming the
        slab, if there is none); the reply to ``ask``."""
        fresh = self.conn is None
        if fresh:  # a slab per connection: its file is gone once the daemon mapped it
            if self.slab is not None:
                self.slab.close()
            self.slab = ClientSlab()
            self.conn = self.connect()
            ask = msgspec.structs.replace(ask, slab=self.slab.path)
        try:
            replies = self.conn.exchange([*requests, ask], self.timeout)  # type: ignore
        except BaseException:
            self.conn.close()  # type: ignore[union-attr]
            self.conn = None
            raise
        finally:
            if fresh:
                self.slab.unlink()  # mapped by the daemon (or refused): no file left behind
        last = replies[-1]
        if isinstance(last, BaseException):
            if fresh:  # (the slab refused: the next ask starts on a new connection)
                self.conn.close()  # type: ignore[union-attr]
                self.conn = None
            raise last
        return last

    def close(self) -> None:
        """End every slice (the calls not taken go back) and let the slab go."""
        with self.lock:
            if self.conn is not None:
                if self.local:
                    try:
                        self.conn.exchange([SliceEnd(grant=s.grant)
                                            for s in self.local.values()], self.timeout)
                    except (SidecarError, Dead, OSError, TimeoutError):
                        pass  # closing the connection ends them all the same
                self.conn.close()
                self.conn = None
            self.local.clear()
            if self.slab is not None:
                self.slab.close()
                self.slab = None

