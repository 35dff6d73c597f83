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
from typing import Any, Callable

import msgspec

from ..wire import (
    MAX_NAME, MAX_TOKENS, REQUEST_DECODER, Begin, BeginReply, CacheGet, CacheGetReply, Hits,
    ShmHit,
)
from ..errors import SidecarError
from ..wire.shm import ANSWER_DECODER, Segment, segment_path

_ENCODER = msgspec.msgpack.Encoder()
#: Hits are told to the daemon ahead of the client's next round trip; with none, once
#: this many wait, or at the first hit REPORT_AFTER seconds after the oldest untold one
#: (and at close). Fallbacks alone are told at most once per REPORT_AFTER.
REPORT_EVERY = 256
REPORT_AFTER = 1.0
MAX_HITS = 1024  # in one report (``Hits``' bound); more wait for the next
#: answers kept decoded, by count and by body bytes (a hit on one copies nothing)
KEEP_ANSWERS = 1024
KEEP_BYTES = 8 << 20


def _name(v: object) -> bool:
    return type(v) is str and len(v) <= MAX_NAME  # type: ignore[arg-type]


def _text(v: object) -> bool:
    return type(v) is str


def _flag(v: object) -> bool:
    return type(v) is bool


def _tokens(v: object) -> bool:
    return v is None or (type(v) is int and 0 <= v <= MAX_TOKENS)  # type: ignore[operator]


def _temperature(v: object) -> bool:
    return v is None or (type(v) is float and 0.0 <= v <= 100.0)  # type: ignore[operator]


def _threshold(v: object) -> bool:
    return v is None or (type(v) is float and 0.0 < v <= 1.0)  # type: ignore[operator]


def _at_most(n: int) -> Callable[[object], bool]:
    return lambda v: type(v) is str and len(v) <= n  # type: ignore[arg-type]


#: The fields of a plain one-turn request, each with the check the daemon's decoder
#: makes of it (``sidecar.wire.requests``): a request with only these, all passing, is
#: keyed natively; any other field (messages, params, tools, ...) takes the generic path.
_PLAIN_GET: dict[str, Callable[[object], bool]] = {
    "namespace": _name, "model": _name, "text": _text, "temperature": _temperature,
    "threshold": _threshold, "allow_stale": _flag, "no_cache": _flag,
}
_PLAIN_BEGIN = {
    **_PLAIN_GET, "user": _name, "key": _name, "route": _name, "task": _name, "kind": _name,
    "input_tokens": _tokens, "max_tokens": _tokens, "no_store": _flag,
    "request_id": _at_most(128), "template": _at_most(128), "template_version": _at_most(64),
}


def _plain(fields: dict[str, Any], checks: dict[str, Callable[[object], bool]]) -> bool:
    try:
        for name, value in fields.items():
            if not checks[name](value):
                return False
    except KeyError:
        return False  # a field the plain path does not know
    return "text" in fields


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
        #: hits the daemon has not been told of yet: (fields, begin, key, when, stale); a
        #: deque so that threads sharing a client append and drain it without a lock
        self.pending: deque[tuple[dict[str, Any], bool, bytes, float, bool]] = deque()
        self.told_fallbacks = 0
        self.told_at = time.monotonic()
        self.untold = 0  # hits answered but never told: the daemon could not be reached
        #: the hits waiting should be told now (with no round trip to ride on): there
        #: are REPORT_EVERY, or the oldest is REPORT_AFTER seconds old (at ``report_by``)
        self.due = False
        self.report_by = 0.0
        #: answers read before, by arena position (unique in a generation, and still
        #: theirs while ``find`` says so): [key, begin reply, cache_get reply, size]
        self.answers: dict[int, list] = {}
        self.answer_bytes = 0

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
        self.answers.clear()
        self.answer_bytes = 0
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

    def _key(self, fields: dict[str, Any], begin: bool) -> bytes | None:
        """The exact key the daemon would compute for the request (None: it would refuse
        it, or the segment may not answer it: no_cache, or a kind the daemon does not know,
        which it refuses, saying why)."""
        if fields.get("no_cache"):
            return None
        if begin:
            kind = fields.get("kind")
            if kind and (type(kind) is not str or kind not in self.kinds):
                return None
        if _plain(fields, _PLAIN_BEGIN if begin else _PLAIN_GET):
            model = fields.get("model")
            if begin and not model:
                model = f"route:{fields.get('route') or fields.get('task') or '-'}"
            return self._text_key(fields.get("namespace", ""), model or "",
                                  fields.get("temperature"), fields["text"])
        try:
            req = (Begin if begin else CacheGet)(**fields)
            view: Any = REQUEST_DECODER.decode(_ENCODER.encode(req))
            if begin and not view.model:
                view = msgspec.structs.replace(
                    view, model=f"route:{view.route or view.task or '-'}")
            return self._request_key(self.normalizer, view).key
        except (msgspec.MsgspecError, TypeError, ValueError, SidecarError):
            return None  # a request the daemon would refuse: let it say so

    def lookup(self, fields: dict[str, Any], begin: bool) -> BeginReply | CacheGetReply | None:
        """The reply of an exact hit for the begin (or cache get) ``fields`` describe, or
        None (ask the daemon). ``due`` turns true when the hits waiting should be told."""
        now = time.time()
        stale_ok = fields.get("allow_stale") is True
        for _ in range(2):  # the second time with a fresh map or meta
            if self.normalizer is None and not self._ready():
                break
            key = self._key(fields, begin)
            if key is None:
                break
            seg: Segment = self.segment  # type: ignore[assignment]
            if not stale_ok:  # the hot path: a body read before is not copied again
                pos = seg.find(key, now, False, self.epoch)
                if pos >= 0:
                    known = self.answers.get(pos)
                    if known is None or known[0] != key:
                        found = seg.get(key, now, False, self.epoch)
                        if found is None:
                            break  # overwritten since: a miss
                        known = self._answer(key, found[0], seg.pos, False)
                    pending = self.pending  # (``_told_later``, inline: the hottest path)
                    if not pending:
                        self.report_by = now + REPORT_AFTER
                    pending.append((fields, begin, key, now, False))
                    self.hits += 1
                    self.due = len(pending) >= REPORT_EVERY or now >= self.report_by
                    return known[1] if begin else known[2]
            else:
                found = seg.get(key, now, True, self.epoch)
                if found is not None:
                    known = self._answer(key, found[0], seg.pos, found[1])
                    self._told_later(fields, begin, key, now, found[1])
                    return known[1] if begin else known[2]
            if not seg.closed and seg.epoch == self.epoch:
                break  # a plain miss
            self.normalizer = None  # closed, or the meta changed: map or load it again
        self.fallbacks += 1
        return None

    def _told_later(self, fields: dict[str, Any], begin: bool, key: bytes, now: float,
                    stale: bool) -> None:
        pending = self.pending
        if not pending:
            self.report_by = now + REPORT_AFTER
        pending.append((fields, begin, key, now, stale))
        self.hits += 1
        self.due = len(pending) >= REPORT_EVERY or now >= self.report_by

    def _answer(self, key: bytes, body: bytes, pos: int, stale: bool) -> list:
        """The replies a hit on this body gives (replies are immutable: one serves every
        hit on it), kept by position unless stale or past the bounds."""
        answer = ANSWER_DECODER.decode(body)
        known = [key, BeginReply(outcome="hit", key=key, response=answer.response,
                                 tier="exact", similarity=1.0, stale=stale),
                 CacheGetReply(hit=True, key=key, tier="exact", response=answer.response,
                               similarity=1.0, query=answer.query,
                               cached_at=answer.cached_at, stale=stale,
                               input_tokens=answer.input_tokens,
                               output_tokens=answer.output_tokens), len(body)]
        if not stale and len(body) <= KEEP_BYTES // 16:
            answers = self.answers
            while answers and (len(answers) >= KEEP_ANSWERS
                               or self.answer_bytes + len(body) > KEEP_BYTES):
                self.answer_bytes -= answers.pop(next(iter(answers)))[3]  # the oldest
            answers[pos] = known
            self.answer_bytes += len(body)
        return known

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
        self.due = False
        self.told_fallbacks, self.told_at = self.fallbacks, time.monotonic()
        return Hits(hits=told, fallbacks=fallbacks)

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        self.normalizer = None
        self.answers.clear()
        self.answer_bytes = 0


def _told(fields: dict[str, Any], begin: bool, key: bytes, at: float, stale: bool) -> ShmHit:
    get = fields.get
    if begin:
        return ShmHit(op="begin", key=key, at=at, stale=stale,
                      who=get("user") or get("key") or "", model=get("model") or "",
                      route=get("route") or "", task=get("task") or "",
                      request_id=get("request_id") or "", template=get("template") or "",
                      template_version=get("template_version") or "")
    return ShmHit(op="cache_get", key=key, at=at, stale=stale, model=get("model") or "")
