"""The exact tier: cached entries by exact key in a bounded LRU (``cache.max_entries``,
``cache.max_bytes``) with a TTL per entry from the response type's policy; an expired
entry is kept ``cache.stale_for`` seconds longer and served, flagged stale, only to a
caller that asks. Methods take ``now``: nothing reads a clock or does I/O.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable

import numpy as np

from ..wire import TierStats


class Entry:
    __slots__ = ("key", "namespace", "scope", "response", "query", "model", "kind", "tier",
                 "created", "expires", "vector", "input_tokens", "output_tokens")

    def __init__(self, key: bytes, namespace: str, scope: bytes, response: bytes, query: str,
                 model: str, kind: str, tier: str, created: float, expires: float,
                 vector: bytes = b"", input_tokens: int = 0, output_tokens: int = 0) -> None:
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
        self.vector = vector  # a client-supplied unit vector (float32), kept to re-index
        self.input_tokens = input_tokens  # the usage that produced the answer (0: unknown)
        self.output_tokens = output_tokens

    @property
    def size(self) -> int:
        """Bytes charged against ``max_bytes``: the body, the query and a fixed overhead
        for the record and its index slot."""
        return len(self.response) + len(self.query) + len(self.namespace) + len(self.vector) + 200

    def as_row(self) -> tuple:
        return (self.key, self.namespace, self.scope, self.response, self.query, self.model,
                self.kind, self.tier, self.created, self.expires, self.vector,
                self.input_tokens, self.output_tokens)

    def client_vector(self) -> np.ndarray | None:
        return np.frombuffer(self.vector, dtype=np.float32) if self.vector else None


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
        #: called with every entry that leaves (evicted, expired, removed, replaced)
        self.on_drop: Callable[[Entry], None] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

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
            self._dropped(old)
        self._entries[entry.key] = entry
        self.bytes += entry.size
        self.trim()

    def trim(self) -> None:
        """Evict the least recently used until within bounds."""
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            _, victim = self._entries.popitem(last=False)
            self.bytes -= victim.size
            self.counts.evictions += 1
            self._dropped(victim)

    def _dropped(self, entry: Entry) -> None:
        if self.on_drop is not None:
            self.on_drop(entry)

    def _drop(self, entry: Entry) -> None:
        del self._entries[entry.key]
        self.bytes -= entry.size
        self._dropped(entry)

    def peek(self, key: bytes, now: float, allow_stale: bool) -> tuple[Entry | None, bool]:
        """As ``get`` for an entry another tier found, counted there: refreshes its
        recency, counts nothing here."""
        entry = self._entries.get(key)
        if entry is None or entry.expires + self.stale_for <= now or (
                entry.expires <= now and not allow_stale):
            return None, False
        self._entries.move_to_end(key)
        return entry, entry.expires <= now

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
