"""The client's shared-memory fast path: exact-cache hits read from the daemon's segment
(``sidecar.wire.shm``) with no round trip.

The key is computed here exactly as the daemon computes it: the request is encoded as
it would be sent and decoded with the daemon's own decoder (so the struct is the one the
daemon would see), viewed as the daemon's cache views it (a routed request is keyed by
its route), and keyed by ``sidecar.cache.keys.request_key`` under a normaliser built from
the filler words the daemon published. Only a segment owned by the daemon's uid is read;
with ``isolate_cache`` (per-uid namespaces the client cannot reproduce) or anything
unexpected the fast path stays off and the socket answers. A segment the daemon closed
(it stopped, or was replaced) is let go and the current one mapped on the next lookup.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import msgspec

from ..wire import (
    REQUEST_DECODER, Begin, BeginReply, CacheGet, CacheGetReply, Hits, ShmHit,
)
from ..wire.shm import ANSWER_DECODER, Segment, segment_path

_ENCODER = msgspec.msgpack.Encoder()
#: Hits are told to the daemon (``Hits``) once this many wait, or the oldest waited
#: REPORT_AFTER seconds (checked at the client's next hit, and at close).
REPORT_EVERY = 256
REPORT_AFTER = 1.0


class FastPath:
    """Exact hits from the segment beside ``socket_path``, if its owner is ``daemon_uid``."""

    def __init__(self, socket_path: str, daemon_uid: int) -> None:
        self.path = segment_path(socket_path)
        self.daemon_uid = daemon_uid
        self.segment: Segment | None = None
        self.epoch = -1
        self.normalizer: Any = None
        self.kinds: frozenset[str] = frozenset()
        self.hits = 0
        self.fallbacks = 0  # lookups the segment could not answer (a miss, or off)
        self.pending: list[ShmHit] = []  # hits the daemon has not been told of yet
        self.told_fallbacks = 0
        self.told_at = time.monotonic()

    def _ready(self) -> bool:
        seg = self.segment
        if seg is not None and not seg.closed:
            if seg.epoch != self.epoch:
                return self._load_meta(seg)
            return self.normalizer is not None
        if seg is not None:
            seg.close()
            self.segment = None
        try:
            seg = Segment(self.path)
        except (OSError, ValueError):
            return False  # none, not ours to read, or another layout: the socket answers
        if seg.owner != self.daemon_uid:
            seg.close()  # someone else's file at the path: never trusted
            return False
        self.segment = seg
        return self._load_meta(seg)

    def _load_meta(self, seg: Segment) -> bool:
        from ..cache.keys import request_key  # only a client that uses the segment
        from ..text.normalize import Normalizer

        self.epoch = seg.epoch
        try:
            meta = json.loads(seg.meta())
            if meta.get("isolate_cache"):
                self.normalizer = None
                return False
            normalizer = Normalizer(meta["filler_words"])
            if normalizer.spec != meta["spec"]:
                self.normalizer = None
                return False
        except (ValueError, KeyError, TypeError):
            self.normalizer = None
            return False
        self.normalizer, self._key = normalizer, request_key
        self.kinds = frozenset(meta["kinds"])
        return True

    def lookup(self, req: Begin | CacheGet) -> BeginReply | CacheGetReply | None:
        """The reply of an exact hit for ``req``, or None (ask the daemon)."""
        if req.no_cache or not self._ready() or (
                isinstance(req, Begin) and req.kind and req.kind not in self.kinds):
            self.fallbacks += 1  # (an unknown kind: the daemon refuses it, and says why)
            return None
        view: Any = REQUEST_DECODER.decode(_ENCODER.encode(req))
        if isinstance(view, Begin) and not view.model:
            view = msgspec.structs.replace(view, model=f"route:{view.route or view.task or '-'}")
        try:
            key = self._key(self.normalizer, view).key
        except Exception:  # a request the daemon would refuse: let it say so
            self.fallbacks += 1
            return None
        found = self.segment.get(key, time.time(), req.allow_stale)  # type: ignore[union-attr]
        if found is None:
            self.fallbacks += 1
            return None
        answer = ANSWER_DECODER.decode(found[0])
        self.hits += 1
        begin = isinstance(req, Begin)
        self.pending.append(ShmHit(
            op="begin" if begin else "cache_get", key=key, at=time.time(), stale=found[1],
            who=(req.user or req.key) if begin else "", model=req.model,
            route=req.route if begin else "", task=req.task if begin else "",
            request_id=req.request_id if begin else "", template=req.template if begin else "",
            template_version=req.template_version if begin else ""))
        if begin:
            return BeginReply(id=req.id, outcome="hit", key=key, response=answer.response,
                              tier="exact", similarity=1.0, stale=found[1])
        return CacheGetReply(id=req.id, hit=True, key=key, tier="exact",
                             response=answer.response, similarity=1.0, query=answer.query,
                             cached_at=answer.cached_at, stale=found[1],
                             input_tokens=answer.input_tokens,
                             output_tokens=answer.output_tokens)

    def due(self) -> bool:
        """Whether the hits waiting should be told now."""
        return len(self.pending) >= REPORT_EVERY or bool(
            self.pending and time.time() - self.pending[0].at >= REPORT_AFTER)

    def report(self, force: bool = False) -> Hits | None:
        """What the daemon should be told before the client's next request: every hit
        waiting; fallbacks alone once a second (or when ``force``)."""
        fallbacks = self.fallbacks - self.told_fallbacks
        if not self.pending and not (fallbacks and (
                force or time.monotonic() - self.told_at >= REPORT_AFTER)):
            return None
        hits, self.pending = self.pending, []
        self.told_fallbacks, self.told_at = self.fallbacks, time.monotonic()
        return Hits(hits=hits, fallbacks=fallbacks)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


def daemon_uid_of(path: str) -> int | None:
    """The uid owning the daemon's socket file (None when it cannot be read)."""
    try:
        return os.stat(path).st_uid
    except OSError:
        return None
