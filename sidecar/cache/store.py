"""The response cache (``Cache``): the store policy of the ``cache`` config over the exact
and semantic tiers behind the cache ops. A lookup tries the exact tier, then searches the
semantic tier when the request's scope has entries there; a store refuses what must not
be cached (errors, tool calls, long chats, high temperatures, oversize answers) and puts
the rest in the exact tier, and entries of semantic kinds in the semantic tier too; a
reconfiguration applies new bounds and policy; ``snapshot`` and ``restore`` carry the
entries across restarts. Apart from the semantic tier's threads, methods take ``now``:
nothing reads a clock or does I/O.
"""
from __future__ import annotations

import enum
import logging
from typing import Coroutine

import msgspec
import numpy as np

from .settings import CacheConfig
from ..errors import InvalidValue
from .exact import Entry, ExactTier
from .keys import RequestKey, request_key
from .semantic import SemanticTier
from .snapshot import decode_snapshot, encode_snapshot
from ..text.normalize import Normalizer
from .verify import Mode
from ..wire.shm import ANSWER_ENCODER, Answer, Publishing
from ..wire import (
    CacheGet, CacheGetReply, CacheInvalidate, CachePut, CachePutReply, CacheStats,
)

log = logging.getLogger("sidecar.cache")


class Tier(enum.Enum):
    EXACT = "exact"
    SEMANTIC = "semantic"
    NONE = "none"


class Cache:
    """The tiers behind the cache ops, with the store policy of ``cache`` config."""

    def __init__(self, config: CacheConfig, normalizer: Normalizer) -> None:
        self.normalizer = normalizer
        self.config = config
        self.exact = ExactTier(config.max_entries, config.max_bytes, config.stale_for)
        self.semantic = SemanticTier(config.semantic, normalizer)
        self.exact.on_drop = self._dropped
        #: the shared-memory segment clients read exact answers from (None: none)
        self.publisher: Publishing | None = None
        self.published = 0  # answers put in the segment
        self.not_published = 0  # answers it could not hold (the socket serves them)
        self.stores = 0
        self.bypassed = 0
        self.removed = 0
        self.not_stored: dict[str, int] = {}
        self.snapshot_at = 0.0
        self.reconfigure(config, normalizer)

    def reconfigure(self, config: CacheConfig, normalizer: Normalizer) -> None:
        """New bounds and policy (SIGHUP); entries made under another normalisation
        spec can never match again, so they are dropped. A changed ``[cache.semantic]``
        starts a new semantic tier, refilled from the entries kept."""
        respec = normalizer.spec != self.normalizer.spec
        if respec:
            self.exact.remove_where(lambda e: False)
        if respec or config.semantic != self.config.semantic:
            self.semantic.close()
            self.semantic = SemanticTier(config.semantic, normalizer)
            for entry in list(self.exact.entries()):
                if entry.tier == Tier.SEMANTIC.value:
                    self.semantic.add(entry)
        self.config = config
        self.normalizer = normalizer
        self.exact.max_entries = config.max_entries
        self.exact.max_bytes = config.max_bytes
        self.exact.stale_for = config.stale_for
        self.exact.trim()  # smaller bounds apply now
        if self.publisher is not None and (not config.enabled or respec):
            self.publish_to(self.publisher)  # emptied, or refilled under the new bounds

    def get(self, req: CacheGet, now: float, rk: RequestKey | None = None
            ) -> CacheGetReply | Coroutine[None, None, CacheGetReply]:
        """The exact tier's answer, or a coroutine searching the semantic tier (run on
        its worker thread) when the scope has entries there. ``rk``: the request's keys
        when already computed (``request_key``, off the loop for a long text)."""
        if rk is None:
            rk = request_key(self.normalizer, req)
        if not self.config.enabled:
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="disabled")
        if req.no_cache:
            self.bypassed += 1
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="bypassed")
        vector = self.semantic.client_vector(req.vector)
        entry, stale = self.exact.get(rk.key, now, req.allow_stale)
        if entry is not None:
            return self._hit(req, rk, entry, stale, Tier.EXACT, 1.0, "")
        space = self.semantic.searchable(rk, vector)
        if space is None:
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="miss")
        threshold = max(self.semantic.threshold, req.threshold or 0.0)  # stricter only
        return self._semantic_get(req, rk, space, vector, threshold, now)

    async def _semantic_get(self, req: CacheGet, rk: RequestKey, space: bytes,
                            vector: np.ndarray | None, threshold: float,
                            now: float) -> CacheGetReply:
        """Freshness is judged at ``now``, the time the lookup was asked."""
        semantic = self.semantic
        candidates = await semantic.search(space, rk, vector, threshold)
        for c in candidates:
            member = semantic.members.get(c.vkey)
            if c.reasons or member is None:
                continue
            entry, stale = self.exact.peek(member.key, now, req.allow_stale)
            if entry is not None:
                semantic.hits += 1
                return self._hit(req, rk, entry, stale, Tier.SEMANTIC, c.similarity,
                                 "verified" if semantic.verifier.mode is not Mode.OFF
                                 else "unverified")
        refused = next((c for c in candidates if c.reasons), None)
        if refused is not None:
            semantic.refusals += 1
            semantic.misses += 1
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="refused",
                                 similarity=refused.similarity,
                                 verdict=",".join(refused.reasons))
        semantic.misses += 1
        return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="miss")

    def _hit(self, req: CacheGet, rk: RequestKey, entry: Entry, stale: bool, tier: Tier,
             similarity: float, verdict: str) -> CacheGetReply:
        return CacheGetReply(id=req.id, hit=True, key=rk.key, tier=tier.value,
                             response=msgspec.Raw(entry.response), similarity=similarity,
                             verdict=verdict, query=entry.query, cached_at=entry.created,
                             stale=stale, input_tokens=entry.input_tokens,
                             output_tokens=entry.output_tokens)

    def put(self, req: CachePut, now: float, rk: RequestKey | None = None) -> CachePutReply:
        """Store ``req.response`` (see ``protocol.CachePut``); ``rk``: the request's keys
        when already computed (``end`` reuses those of its ``begin``)."""
        if rk is None:
            rk = request_key(self.normalizer, req)
        kind = req.kind or "general"
        policy = self.config.policy.get(kind)
        if policy is None:
            raise InvalidValue(f"unknown response kind {req.kind!r}; known: "
                               + ", ".join(sorted(self.config.policy)))
        reason = self._refusal(req, rk, policy.tier)
        if reason:
            self.not_stored[reason] = self.not_stored.get(reason, 0) + 1
            return CachePutReply(id=req.id, stored=False, key=rk.key, reason=reason)
        vector = self.semantic.client_vector(req.vector)
        ttl = policy.ttl if req.ttl is None else req.ttl
        entry = Entry(rk.key, req.namespace, rk.scope, bytes(req.response), rk.query,
                      req.model, kind, policy.tier, now, now + ttl,
                      b"" if vector is None else vector.tobytes(), req.input_tokens,
                      req.output_tokens)
        self._store(entry)
        self.stores += 1
        return CachePutReply(id=req.id, stored=True, key=rk.key, tier=policy.tier, ttl=ttl)

    def _store(self, entry: Entry) -> None:
        self.exact.put(entry)
        if entry.tier == Tier.SEMANTIC.value:
            self.semantic.add(entry)
        self._publish(entry)

    def _publish(self, entry: Entry) -> None:
        """Put ``entry`` in the shared-memory segment, where clients find it without
        asking; one the segment cannot hold stays an answer of the socket only."""
        if self.publisher is None or not self.config.enabled or entry.key not in self.exact:
            return  # (a disabled cache answers nothing, from the socket or the segment)
        body = ANSWER_ENCODER.encode(Answer(msgspec.Raw(entry.response), entry.query,
                                            entry.created, entry.input_tokens,
                                            entry.output_tokens))
        if self.publisher.put(entry.key, body, entry.expires,
                              entry.expires + self.config.stale_for):
            self.published += 1
        else:
            self.not_published += 1

    def publish_to(self, publisher: Publishing | None) -> None:
        """Keep ``publisher``'s segment true from now on, starting with every entry."""
        self.publisher = publisher
        if publisher is not None:
            publisher.clear()
            for entry in list(self.exact.entries()):
                self._publish(entry)

    def _dropped(self, entry: Entry) -> None:
        """An entry left the exact tier (evicted, expired, removed, replaced)."""
        self.semantic.forget(entry)
        if self.publisher is not None:
            self.publisher.remove(entry.key)

    def _refusal(self, req: CachePut, rk: RequestKey, tier: str) -> str:
        """Why ``req`` must not be stored ("" when it may)."""
        cfg = self.config
        if not cfg.enabled:
            return "disabled"
        if req.no_store:
            return "no_store"
        if tier == Tier.NONE.value:
            return "policy"
        if req.error:
            return "error"
        if req.tool_calls:
            return "tool_calls"
        if rk.tool_turns:
            return "tool_turns"
        if rk.user_turns > cfg.max_turns:
            return "too_many_turns"
        if req.temperature is not None and req.temperature > cfg.max_temperature:
            return "temperature"
        if len(req.response) + len(rk.query) + 200 > cfg.max_bytes:
            return "too_large"
        return ""

    def invalidate(self, req: CacheInvalidate) -> int:
        if req.key is not None:
            removed = self.exact.remove(req.key)
        elif req.namespace is not None:
            ns = req.namespace
            removed = self.exact.remove_where(lambda e: e.namespace != ns)
        elif req.all:
            removed = self.exact.remove_where(lambda e: False)
        else:
            raise InvalidValue("cache_invalidate needs key, namespace or all = true")
        self.removed += removed
        return removed

    def housekeeping(self, now: float) -> None:
        self.exact.expire(now)

    @property
    def changes(self) -> int:
        """Grows with every change of the stored entries (to skip unchanged snapshots)."""
        c = self.exact.counts
        return self.stores + self.removed + c.evictions + c.expirations

    def stats(self, snapshot: str) -> CacheStats:
        return CacheStats(enabled=self.config.enabled, max_entries=self.config.max_entries,
                          max_bytes=self.config.max_bytes,
                          tiers={Tier.EXACT.value: self.exact.stats(),
                                 Tier.SEMANTIC.value: self.semantic.stats()},
                          stores=self.stores,
                          not_stored=dict(self.not_stored), bypassed=self.bypassed,
                          snapshot=snapshot, snapshot_at=self.snapshot_at,
                          semantic=self.semantic.status, threshold=self.semantic.threshold,
                          semantic_pending=self.semantic.pending)

    # -- snapshots -----------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The entries as one snapshot blob (encode on the loop, write it elsewhere)."""
        return encode_snapshot(self.normalizer.spec, self.exact.entries())

    def restore(self, data: bytes, now: float) -> int:
        """Put a snapshot's entries back (skipping those past their stale window, and all
        of a snapshot made under another normalisation spec); raises ``SnapshotError`` if
        the blob is unusable. Returns how many were kept."""
        spec, entries = decode_snapshot(data)
        if spec != self.normalizer.spec:
            log.warning("cache snapshot made under normalisation spec %s, now %s: not "
                        "restored (its keys cannot match)", spec, self.normalizer.spec)
            return 0
        kept = 0
        for entry in entries:
            if entry.expires + self.config.stale_for > now:
                self._store(entry)  # semantic entries are indexed again, in the background
                kept += 1
        self.snapshot_at = now
        return kept
