"""The client's shared-memory fast path: exact-cache hits read from the daemon's segment
(``sidecar.wire.shm``) with no round trip.

The key is computed here exactly as the daemon computes it, under a normaliser built from
the filler words the daemon published. A one-turn text request (no params, tools or
response format) whose fields the daemon would accept is keyed natively in one pass
(``Normalizer.text_key``, the daemon's own common case); any other request is encoded as
it would be sent and decoded with the daemon's decoder, so the struct keyed is the one
the daemon would see, and keyed by ``sidecar.cache.keys.request_key``. A request the
daemon would refuse is never answered here: the socket says why. A routed request is
keyed by its route, as the daemon's cache views it.

Only a segment owned by the daemon's uid is read; with ``isolate_cache`` (per-uid
namespaces: the daemon publishes nothing) the fast path stays off. Every read names the
config epoch its key was made under, and a segment the daemon closed (it stopped, or was
replaced) answers nothing: the next lookup maps the current one, or reloads its meta.
"""
from __future__ import annotations

import json
import time
from collections import deque
from typing import Any

import msgspec

from ..wire import (
    MAX_NAME, MAX_TOKENS, REQUEST_DECODER, Begin, BeginReply, CacheGet, CacheGetReply, Hits,
    ShmHit,
)
from ..wire.shm import ANSWER_DECODER, Segment, segment_path

_ENCODER = msgspec.msgpack.Encoder()
#: Hits are told to the daemon ahead of the client's next round trip; with none, once
#: this many wait, or at the first hit REPORT_AFTER seconds after the oldest untold one
#: (and at close). Fallbacks alone are told at most once per REPORT_AFTER.
REPORT_EVERY = 256
REPORT_AFTER = 1.0
MAX_HITS = 1024  # in one report (``Hits``' bound); more wait for the next


def _count(v: object) -> bool:
    return v is None or (type(v) is int and 0 <= v <= MAX_TOKENS)  # type: ignore[operator]


def _plain(req: Begin | CacheGet, begin: bool) -> bool:
    """Whether ``req`` is one user turn of text with no params, tools, response format or
    vector, and every field as the daemon's decoder would accept it (types, bounds)."""
    t, threshold = req.temperature, req.threshold
    if not (type(req.text) is str and req.messages is None and not req.params
            and req.tools is None and req.response_format is None and req.vector is None
            and type(req.namespace) is str and type(req.model) is str
            and len(req.namespace) <= MAX_NAME and len(req.model) <= MAX_NAME
            and (t is None or (type(t) is float and 0.0 <= t <= 100.0))
            and (threshold is None or (type(threshold) is float and 0.0 < threshold <= 1.0))
            and type(req.allow_stale) is bool and type(req.no_cache) is bool):
        return False
    if not begin:
        return True
    names = (req.user, req.key, req.route, req.task, req.kind)  # type: ignore[union-attr]
    return (all(type(n) is str and len(n) <= MAX_NAME for n in names)
            and type(req.request_id) is str and len(req.request_id) <= 128  # type: ignore
            and type(req.template) is str and len(req.template) <= 128  # type: ignore
            and type(req.template_version) is str  # type: ignore[union-attr]
            and len(req.template_version) <= 64  # type: ignore[union-attr]
            and type(req.no_store) is bool  # type: ignore[union-attr]
            and _count(req.input_tokens) and _count(req.max_tokens))  # type: ignore


class FastPath:
    """Exact hits from the segment beside ``socket_path``, if its owner is ``daemon_uid``."""

    def __init__(self, socket_path: str, daemon_uid: int) -> None:
        self.path = segment_path(socket_path)
        self.daemon_uid = daemon_uid
        self.segment: Segment | None = None
        self.epoch = -1
        self.normalizer: Any = None  # None: the segment's meta says not to use it
        self.kinds: frozenset[str] = frozenset()
        self.hits = 0
        self.fallbacks = 0  # lookups the segment could not answer (a miss, or off)
        #: hits the daemon has not been told of yet: (request, key, when, stale); a deque
        #: so that threads sharing a client append and drain it without a lock
        self.pending: deque[tuple[Begin | CacheGet, bytes, float, bool]] = deque()
        self.told_fallbacks = 0
        self.told_at = time.monotonic()

    def _ready(self) -> bool:
        """Map the current segment and load its meta, if anything changed."""
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
        self.normalizer = None
        try:
            meta = json.loads(seg.meta())
            if meta.get("isolate_cache"):
                return False
            normalizer = Normalizer(meta["filler_words"])
            if normalizer.spec != meta["spec"]:
                return False
            self.kinds = frozenset(meta["kinds"])
        except (ValueError, KeyError, TypeError):
            return False
        self.normalizer, self._request_key = normalizer, request_key
        self._text_key = normalizer.text_key
        return True

    def _key(self, req: Begin | CacheGet, begin: bool) -> bytes | None:
        """The exact key the daemon would compute for ``req`` (None: it would refuse it)."""
        if _plain(req, begin):
            model = req.model
            if begin and not model:
                model = f"route:{req.route or req.task or '-'}"  # type: ignore[union-attr]
            return self._text_key(req.namespace, model, req.temperature, req.text)
        try:
            view: Any = REQUEST_DECODER.decode(_ENCODER.encode(req))
            if begin and not view.model:
                view = msgspec.structs.replace(
                    view, model=f"route:{view.route or view.task or '-'}")
            return self._request_key(self.normalizer, view).key
        except Exception:  # a request the daemon would refuse: let it say so
            return None

    def lookup(self, req: Begin | CacheGet) -> BeginReply | CacheGetReply | None:
        """The reply of an exact hit for ``req``, or None (ask the daemon)."""
        begin = type(req) is Begin
        now = time.time()
        found = None
        for _ in range(2):  # the second time with a fresh map or meta
            if req.no_cache or (self.normalizer is None and not self._ready()):
                break
            if begin and req.kind and req.kind not in self.kinds:  # type: ignore[union-attr]
                break  # a kind the daemon does not know: it refuses the begin, and says why
            key = self._key(req, begin)
            if key is None:
                break
            found = self.segment.get(key, now, req.allow_stale, self.epoch)  # type: ignore
            seg = self.segment
            if found is not None or seg is None or (not seg.closed and seg.epoch == self.epoch):
                break  # an answer, or a plain miss
            self.normalizer = None  # closed, or the meta changed: map or load it again
        if found is None:
            self.fallbacks += 1
            return None
        body, stale = found
        answer = ANSWER_DECODER.decode(body)
        self.hits += 1
        self.pending.append((req, key, now, stale))
        if begin:
            return BeginReply(id=req.id, outcome="hit", key=key, response=answer.response,
                              tier="exact", similarity=1.0, stale=stale)
        return CacheGetReply(id=req.id, hit=True, key=key, tier="exact",
                             response=answer.response, similarity=1.0, query=answer.query,
                             cached_at=answer.cached_at, stale=stale,
                             input_tokens=answer.input_tokens,
                             output_tokens=answer.output_tokens)

    def due(self) -> bool:
        """Whether the hits waiting should be told now, with no round trip to ride."""
        return len(self.pending) >= REPORT_EVERY or bool(
            self.pending and time.time() - self.pending[0][2] >= REPORT_AFTER)

    def report(self, force: bool = False) -> Hits | None:
        """What the daemon should be told before the client's next request: every hit
        waiting; fallbacks alone once a second (or when ``force``)."""
        fallbacks = self.fallbacks - self.told_fallbacks
        if not self.pending and not (fallbacks and (
                force or time.monotonic() - self.told_at >= REPORT_AFTER)):
            return None
        told = []
        while self.pending and len(told) < MAX_HITS:
            told.append(_told(*self.pending.popleft()))
        self.told_fallbacks, self.told_at = self.fallbacks, time.monotonic()
        return Hits(hits=told, fallbacks=fallbacks)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        self.normalizer = None


def _told(req: Begin | CacheGet, key: bytes, at: float, stale: bool) -> ShmHit:
    if type(req) is Begin:
        return ShmHit(op="begin", key=key, at=at, stale=stale, who=req.user or req.key,
                      model=req.model, route=req.route, task=req.task,
                      request_id=req.request_id, template=req.template,
                      template_version=req.template_version)
    return ShmHit(op="cache_get", key=key, at=at, stale=stale, model=req.model)

