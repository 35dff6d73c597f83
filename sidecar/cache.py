"""Response caches: request keys, the store policy, the exact tier, bounds and snapshots.

A request's exact key is the XXH3-128 (under the normalisation spec's seed) of a canonical
msgpack encoding of everything that shapes the answer: namespace, model, temperature and
the other sampling parameters, tools, response format, and every message's role and
content, each text normalised by ``native/normalize``; so "Please, what is 2+2?" and
"what is 2+2" share a key, while another model, temperature, system prompt or tool set
never does. The scope key (the same without the conversation's user and assistant turns)
groups entries a semantic search may compare.

The exact tier is a bounded LRU (``cache.max_entries``, ``cache.max_bytes``) with a TTL
per entry from the response type's policy; an expired entry is kept ``cache.stale_for``
seconds longer and served, flagged stale, only to a caller that asks. ``snapshot`` and
``restore`` carry entries across restarts in one checksummed file written atomically.
Every method takes ``now``: nothing here reads a clock or does I/O except the snapshot
file functions.
"""
from __future__ import annotations

import collections
import enum
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import msgspec

from .config import CacheConfig
from .errors import InvalidValue
from .normalize import Normalizer
from .protocol import (
    CacheGet, CacheGetReply, CacheInvalidate, CachePut, CachePutReply, CacheRequest,
    CacheStats, Message, TierStats,
)

log = logging.getLogger("sidecar.cache")

#: Sorted map keys make the encoding canonical: {"a": 1, "b": 2} == {"b": 2, "a": 1}.
_CANONICAL = msgspec.msgpack.Encoder(order="sorted")


class Tier(enum.Enum):
    EXACT = "exact"
    SEMANTIC = "semantic"
    NONE = "none"


class RequestKey(NamedTuple):
    key: bytes  # 16 bytes: the exact tier's key
    scope: bytes  # 16 bytes: namespace + model + sampling + tools + format + system turns
    query: str  # the last user turn as sent ("" if none)
    user_turns: int
    tool_turns: bool  # a tool result or an assistant tool call is part of the chat


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: the text ones, in order
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def request_key(normalizer: Normalizer, req: CacheRequest) -> RequestKey:
    """The keys of ``req`` under ``normalizer``'s spec."""
    messages: Sequence[Message] = req.messages if req.messages is not None else (
        [Message(role="user", content=req.text)] if req.text is not None else [])
    if req.messages is not None and req.text is not None:
        raise InvalidValue("give messages or text, not both")
    norm = normalizer.normalize
    turns = []
    system = []
    query = ""
    user_turns = 0
    tool_turns = False
    for m in messages:
        content = m.content
        if isinstance(content, list):
            # text parts normalised; other parts (images, ...) kept as sent
            content = [dict(p, text=norm(str(p["text"]))) if isinstance(p, dict) and "text" in p
                       else p for p in content]
        elif isinstance(content, str):
            content = norm(content)
        row = (m.role, content, m.name, m.tool_call_id, m.tool_calls)
        turns.append(row)
        if m.role in ("system", "developer"):
            system.append(row)
        elif m.role == "user":
            user_turns += 1
            query = _text_of(m.content)
        if m.role == "tool" or m.tool_calls:
            tool_turns = True
    shape = [req.namespace, req.model, req.temperature, req.params, req.tools,
             req.response_format]
    key = normalizer.key_of(_CANONICAL.encode(["exact", *shape, turns]))
    scope = normalizer.key_of(_CANONICAL.encode(["scope", *shape, system]))
    return RequestKey(key, scope, query, user_turns, tool_turns)


class Entry:
    __slots__ = ("key", "namespace", "scope", "response", "query", "model", "kind", "tier",
                 "created", "expires")

    def __init__(self, key: bytes, namespace: str, scope: bytes, response: bytes, query: str,
                 model: str, kind: str, tier: str, created: float, expires: float) -> None:
        self.key = key
        self.namespace = namespace
        self.scope = scope
        self.response = response
        self.query = query
        self.model = model
        self.kind = kind
        self.tier = tier
        self.created = created
        self.expires = expires

    @property
    def size(self) -> int:
        """Bytes charged against ``max_bytes``: the body, the query and a fixed overhead
        for the record and its index slot."""
        return len(self.response) + len(self.query) + len(self.namespace) + 200

    def as_row(self) -> tuple:
        return (self.key, self.namespace, self.scope, self.response, self.query, self.model,
                self.kind, self.tier, self.created, self.expires)


class _Counts:
    __slots__ = ("hits", "misses", "stale_serves", "evictions", "expirations")

    def __init__(self) -> None:
        self.hits = self.misses = self.stale_serves = self.evictions = self.expirations = 0


class ExactTier:
    """Entries by exact key, least recently used first; bounded in entries and bytes."""

    def __init__(self, max_entries: int, max_bytes: int, stale_for: float) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.stale_for = stale_for
        self._entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self.bytes = 0
        self.counts = _Counts()
        self._sweep: list[bytes] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float, allow_stale: bool) -> tuple[Entry | None, bool]:
        """``(entry, stale)``: a fresh entry, an expired one when ``allow_stale`` (and
        still within ``stale_for``), else ``(None, False)``. Hits count as recent use."""
        entry = self._entries.get(key)
        if entry is not None and entry.expires + self.stale_for <= now:
            self._drop(entry)
            self.counts.expirations += 1
            entry = None
        if entry is None or (entry.expires <= now and not allow_stale):
            self.counts.misses += 1
            return None, False
        self._entries.move_to_end(key)
        stale = entry.expires <= now
        if stale:
            self.counts.stale_serves += 1
        else:
            self.counts.hits += 1
        return entry, stale

    def put(self, entry: Entry) -> None:
        """Store (replacing an entry of the same key), then evict the least recently used
        until within bounds. An entry larger than ``max_bytes`` is not kept."""
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[entry.key] = entry
        self.bytes += entry.size
        self.trim()

    def trim(self) -> None:
        """Evict the least recently used until within bounds."""
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, victim = self._entries.popitem(last=False)
            self.bytes -= victim.size
            self.counts.evictions += 1

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        self.bytes -= entry.size

    def remove(self, key: bytes) -> int:
        entry = self._entries.get(key)
        if entry is None:
            return 0
        self._drop(entry)
        return 1

    def remove_where(self, keep: Callable[[Entry], bool]) -> int:
        gone = [e for e in self._entries.values() if not keep(e)]
        for entry in gone:
            self._drop(entry)
        return len(gone)

    def expire(self, now: float, budget: int = 20_000) -> int:
        """Drop entries past their stale window, looking at up to ``budget`` per call."""
        if not self._sweep:
            self._sweep = list(self._entries)
        batch = self._sweep[-budget:]
        del self._sweep[-budget:]
        dropped = 0
        for key in batch:
            entry = self._entries.get(key)
            if entry is not None and entry.expires + self.stale_for <= now:
                self._drop(entry)
                dropped += 1
        self.counts.expirations += dropped
        return dropped

    def entries(self) -> Iterable[Entry]:
        """Least recently used first."""
        return self._entries.values()

    def stats(self) -> TierStats:
        c = self.counts
        looked = c.hits + c.stale_serves + c.misses
        return TierStats(entries=len(self._entries), bytes=self.bytes, hits=c.hits,
                         misses=c.misses,
                         hit_rate_pct=round(100.0 * (c.hits + c.stale_serves) / looked, 2)
                         if looked else 0.0,
                         stale_serves=c.stale_serves, evictions=c.evictions,
                         expirations=c.expirations)


# --- snapshots ------------------------------------------------------------------------

_MAGIC = b"LLMSCACHE1\n"
_BODY = msgspec.msgpack.Decoder(tuple[str, list[tuple[bytes, str, bytes, bytes, str, str, str,
                                                       str, float, float]]])
_PLAIN = msgspec.msgpack.Encoder()


class SnapshotError(Exception):
    """A snapshot file that cannot be used (corrupt, truncated, other format)."""


def encode_snapshot(spec: str, entries: Iterable[Entry]) -> bytes:
    """Magic, CRC-32 of the body, body: msgpack ``[spec id, rows]`` (rows least recently
    used first; keys are only comparable under the same normalisation spec)."""
    body = _PLAIN.encode([spec, [e.as_row() for e in entries]])
    return _MAGIC + struct.pack(">I", zlib.crc32(body)) + body


def decode_snapshot(data: bytes) -> tuple[str, list[Entry]]:
    head = len(_MAGIC)
    if not data.startswith(_MAGIC) or len(data) < head + 4:
        raise SnapshotError("not an llm-sidecar cache snapshot (bad header)")
    (crc,) = struct.unpack(">I", data[head:head + 4])
    body = data[head + 4:]
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch (truncated or corrupt)")
    try:
        spec, rows = _BODY.decode(body)
        return spec, [Entry(*row) for row in rows]
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SnapshotError(f"undecodable body ({exc})") from None


def write_snapshot(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, fsync dir).
    Blocking: run it off the event loop."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --- the cache --------------------------------------------------------------------------


class Cache:
    """The tiers behind the cache ops, with the store policy of ``cache`` config."""

    def __init__(self, config: CacheConfig, normalizer: Normalizer) -> None:
        self.normalizer = normalizer
        self.exact = ExactTier(config.max_entries, config.max_bytes, config.stale_for)
        self.stores = 0
        self.bypassed = 0
        self.removed = 0
        self.not_stored: dict[str, int] = {}
        self.snapshot_at = 0.0
        self.reconfigure(config, normalizer)

    def reconfigure(self, config: CacheConfig, normalizer: Normalizer) -> None:
        """New bounds and policy (SIGHUP); entries made under another normalisation
        spec can never match again, so they are dropped."""
        if normalizer.spec != self.normalizer.spec:
            self.exact.remove_where(lambda e: False)
        self.config = config
        self.normalizer = normalizer
        self.exact.max_entries = config.max_entries
        self.exact.max_bytes = config.max_bytes
        self.exact.stale_for = config.stale_for
        self.exact.trim()  # smaller bounds apply now

    def get(self, req: CacheGet, now: float) -> CacheGetReply:
        rk = request_key(self.normalizer, req)
        if not self.config.enabled:
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="disabled")
        if req.no_cache:
            self.bypassed += 1
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="bypassed")
        entry, stale = self.exact.get(rk.key, now, req.allow_stale)
        if entry is None:
            return CacheGetReply(id=req.id, hit=False, key=rk.key, reason="miss")
        return CacheGetReply(id=req.id, hit=True, key=rk.key, tier=Tier.EXACT.value,
                             response=msgspec.Raw(entry.response), similarity=1.0,
                             query=entry.query, cached_at=entry.created, stale=stale)

    def put(self, req: CachePut, now: float) -> CachePutReply:
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
        ttl = policy.ttl if req.ttl is None else req.ttl
        self.exact.put(Entry(rk.key, req.namespace, rk.scope, bytes(req.response), rk.query,
                             req.model, kind, policy.tier, now, now + ttl))
        self.stores += 1
        return CachePutReply(id=req.id, stored=True, key=rk.key, tier=policy.tier, ttl=ttl)

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
                          tiers={Tier.EXACT.value: self.exact.stats()}, stores=self.stores,
                          not_stored=dict(self.not_stored), bypassed=self.bypassed,
                          snapshot=snapshot, snapshot_at=self.snapshot_at)

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
                self.exact.put(entry)
                kept += 1
        self.snapshot_at = now
        return kept
