"""Response caches: request keys, the store policy, the exact and semantic tiers, bounds
and snapshots.

A request's exact key is the XXH3-128 (under the normalisation spec's seed) of a canonical
msgpack encoding of everything that shapes the answer: namespace, model, temperature and
the other sampling parameters, tools, response format, and every message's role and
content, each text normalised by ``native/normalize``; so "Please, what is 2+2?" and
"what is 2+2" share a key, while another model, temperature, system prompt or tool set
never does. The scope key (the same without the last user turn) groups the entries a
semantic search may compare.

The exact tier is a bounded LRU (``cache.max_entries``, ``cache.max_bytes``) with a TTL
per entry from the response type's policy; an expired entry is kept ``cache.stale_for``
seconds longer and served, flagged stale, only to a caller that asks. ``snapshot`` and
``restore`` carry entries across restarts in one checksummed file written atomically.

The semantic tier (``SemanticTier``) indexes the entries of semantic kinds by the
embedding of their last user turn, one vector index per scope; a hit needs the similarity
threshold and the pair verifier's consent (``sidecar.verify``). Its embedding and index
work runs on its own threads. Apart from those and the snapshot file functions, methods
take ``now``: nothing reads a clock or does I/O.
"""
from __future__ import annotations

import asyncio
import collections
import enum
import logging
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Coroutine, Iterable, NamedTuple

import msgspec
import numpy as np

from .settings import CacheConfig, SemanticConfig
from .embed import BATCH, Embedder, client_space, make_embedder, unit_vector
from ..errors import InvalidValue
from ..text.normalize import Normalizer
from .vectors import VectorIndex
from .verify import Mode, Verifier
from ..wire import (
    CacheGet, CacheGetReply, CacheInvalidate, CachePut, CachePutReply, CacheRequest,
    CacheStats, TierStats,
)

log = logging.getLogger("sidecar.cache")

#: Sorted map keys make the encoding canonical: {"a": 1, "b": 2} == {"b": 2, "a": 1}.
_CANONICAL = msgspec.msgpack.Encoder(order="sorted")


class Tier(enum.Enum):
    EXACT = "exact"
    SEMANTIC = "semantic"
    NONE = "none"


class RequestKey:
    """The keys of a request: ``key`` (16 bytes, the exact tier's) and, computed when
    first asked for, ``scope`` (16 bytes: all of the key but the last user turn, which a
    paraphrase of that turn must share to be served the same answer)."""

    __slots__ = ("key", "query", "user_turns", "tool_turns", "_scope", "_scope_of")

    def __init__(self, key: bytes, query: str, user_turns: int, tool_turns: bool,
                 scope_of: Callable[[], bytes]) -> None:
        self.key = key
        self.query = query  # the last user turn as sent ("" if none)
        self.user_turns = user_turns
        self.tool_turns = tool_turns  # a tool result or an assistant tool call is in the chat
        self._scope: bytes | None = None
        self._scope_of = scope_of

    @property
    def scope(self) -> bytes:
        if self._scope is None:
            self._scope = self._scope_of()
        return self._scope


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: the text ones, in order
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def request_key(normalizer: Normalizer, req: CacheRequest) -> RequestKey:
    """The keys of ``req`` under ``normalizer``'s spec."""
    if req.messages is not None and req.text is not None:
        raise InvalidValue("give messages or text, not both")
    norm = normalizer.normalize
    shape = [req.namespace, req.model, req.temperature, req.params, req.tools,
             req.response_format]
    if req.messages is None:  # one user turn (or none): the common case, kept short
        turns = [] if req.text is None else [("user", norm(req.text), None, None, None)]
        key = normalizer.key_of(_CANONICAL.encode(["exact", *shape, turns]))
        return RequestKey(key, req.text or "", len(turns), False, lambda: normalizer.key_of(
            _CANONICAL.encode(["scope", *shape, []])))
    messages = req.messages
    turns = []
    context = []  # every turn but the last user turn: what a paraphrase must share
    query = ""
    user_turns = 0
    tool_turns = False
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for m in messages:
        content = m.content
        if isinstance(content, list):
            # text parts normalised; other parts (images, ...) kept as sent
            content = [dict(p, text=norm(str(p["text"]))) if isinstance(p, dict) and "text" in p
                       else p for p in content]
        elif isinstance(content, str):
            content = norm(content)
        row = (m.role, content, m.name, m.tool_call_id, m.tool_calls)
        if len(turns) != last_user:
            context.append(row)
        turns.append(row)
        if m.role == "user":
            user_turns += 1
            query = _text_of(m.content)
        if m.role == "tool" or m.tool_calls:
            tool_turns = True
    key = normalizer.key_of(_CANONICAL.encode(["exact", *shape, turns]))
    return RequestKey(key, query, user_turns, tool_turns, lambda: normalizer.key_of(
        _CANONICAL.encode(["scope", *shape, context])))


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


# --- snapshots ------------------------------------------------------------------------

_MAGIC = b"LLMSCACHE3\n"
_ROW = (bytes, str, bytes, bytes, str, str, str, str, float, float, bytes)
#: by magic: version 2 rows lack the answer's usage (restored as unknown, 0)
_BODIES = {
    b"LLMSCACHE2\n": msgspec.msgpack.Decoder(tuple[str, list[tuple[_ROW]]]),  # type: ignore[misc]
    _MAGIC: msgspec.msgpack.Decoder(tuple[str, list[tuple[(*_ROW, int, int)]]]),  # type: ignore[misc]
}
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
    decoder = _BODIES.get(data[:head])
    if decoder is None or len(data) < head + 4:
        raise SnapshotError("not an llm-sidecar cache snapshot (bad header)")
    (crc,) = struct.unpack(">I", data[head:head + 4])
    body = data[head + 4:]
    if zlib.crc32(body) != crc:
        raise SnapshotError("checksum mismatch (truncated or corrupt)")
    try:
        spec, rows = decoder.decode(body)
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


# --- the semantic tier ------------------------------------------------------------------

#: Similarity a semantic hit needs, by (embedder, verifier mode), measured at <= 1% false
#: hits on labelled question pairs (``python -m bench cache --pairs FILE``). The lexical
#: embedder matches near-duplicates only: its threshold asks for shared wording.
DEFAULT_THRESHOLDS: dict[tuple[str, str], float] = {
    ("minilm", "full"): 0.92, ("minilm", "cheap"): 0.94, ("minilm", "off"): 0.955,
    ("lexical", "full"): 0.90, ("lexical", "cheap"): 0.90, ("lexical", "off"): 0.95,
}


class _Member(NamedTuple):
    space: bytes  # scope key + vector space: one index each
    key: bytes  # the exact tier's key of the entry
    query: str  # the last user turn the entry was stored for


class Candidate(NamedTuple):
    vkey: int
    similarity: float
    reasons: tuple[str, ...]  # the verifier's objections; empty: may be served


class SemanticTier:
    """Entries stored under a semantic policy, searchable by the meaning of their last
    user turn within their scope. The response bodies stay in the exact tier; this tier
    holds a vector per entry in one ``VectorIndex`` per (scope, vector space).

    Writes (embedding an entry's question, adding or removing its vector) are queued by
    ``add``/``forget`` on the event loop and applied in order on a writer thread, so a
    paraphrase can match once its entry's write has run (milliseconds later; the exact
    tier serves identical requests at once). Searches (embedding the question, searching,
    verifying) run on a second thread, so a backlog of writes never delays a lookup by
    more than one embedding (the model's session is shared under a lock; the index takes
    searches while it is written). The embedder is loaded on the writer thread when the
    tier starts, so start-up never waits for it."""

    def __init__(self, config: SemanticConfig, normalizer: Normalizer) -> None:
        self.config = config
        self.enabled = config.enabled
        self.threshold = config.threshold or DEFAULT_THRESHOLDS[(config.embedder,
                                                                  config.verifier)]
        self.verifier = Verifier(Mode(config.verifier))
        self.members: dict[int, _Member] = {}  # vkey -> member (event loop)
        self.sizes: collections.Counter[bytes] = collections.Counter()  # space -> members
        self.hits = self.misses = self.refusals = 0
        self.dropped = 0  # vectors removed because their entry left the exact tier
        self.broken = ""  # why the tier is off after a failure (logged once)
        self._indexes: dict[bytes, VectorIndex] = {}  # worker thread only
        self._ops: collections.deque[tuple] = collections.deque()  # ("add"|"remove", ...)
        self._queued = 0  # ops ever queued (event loop only)
        self._applied = 0  # ops ever applied or dropped (writer thread only)
        self._flush_queued = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="sidecar-semantic-write")
        self._searcher = ThreadPoolExecutor(1, thread_name_prefix="sidecar-semantic-search")
        self._embedder: Future[Embedder] | None = (
            self._worker.submit(make_embedder, config.embedder, normalizer)
            if config.enabled else None)

    def close(self) -> None:
        """Stop the worker; queued writes are dropped (a restart rebuilds the tier from
        the cache snapshot)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._searcher.shutdown(wait=False, cancel_futures=True)

    def _space(self, scope: bytes, vector: np.ndarray | None) -> bytes:
        """Index id: the scope key (seeded by the normalisation spec) and the vector
        space (the configured embedder, or client vectors of one dimension)."""
        name = client_space(vector.shape[0]) if vector is not None else self.config.embedder
        return scope + name.encode()

    def client_vector(self, values: list[float] | None) -> np.ndarray | None:
        return None if values is None else unit_vector(values, self.config.client_dim)

    # -- writes (event loop) ------------------------------------------------------------

    def add(self, entry: Entry) -> None:
        """Index ``entry`` (by its client vector, or by its query's embedding)."""
        if not self.enabled or not entry.query:
            return
        vkey = int.from_bytes(entry.key[:8], "big")
        known = self.members.get(vkey)
        if known is not None and known.key != entry.key:
            return  # a 64-bit collision: this entry is served by the exact tier only
        vector = entry.client_vector()
        space = self._space(entry.scope, vector)
        if known is not None:
            self.sizes[known.space] -= 1
        self.members[vkey] = _Member(space, entry.key, entry.query)
        self.sizes[space] += 1
        self._queue(("add", space, vkey, entry.query, vector))

    def forget(self, entry: Entry) -> None:
        """The exact tier dropped ``entry``: its vector goes too."""
        vkey = int.from_bytes(entry.key[:8], "big")
        member = self.members.get(vkey)
        if member is None or member.key != entry.key:
            return
        del self.members[vkey]
        self.dropped += 1
        self.sizes[member.space] -= 1
        if self.sizes[member.space] <= 0:
            del self.sizes[member.space]
        self._queue(("remove", member.space, vkey))

    def _queue(self, op: tuple) -> None:
        self._queued += 1
        self._ops.append(op)
        if not self._flush_queued:
            self._flush_queued = True
            self._worker.submit(self._flush)

    # -- worker thread ------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_queued = False  # before draining: a later op queues another flush
        try:
            embedder = self._loaded()
            while self._ops:
                op = self._ops.popleft()
                if op[0] == "remove":
                    index = self._indexes.get(op[1])
                    if index is not None:
                        index.remove(np.asarray([op[2]], dtype=np.uint64))
                    self._applied += 1
                    continue
                adds = [op]  # consecutive adds are embedded in one model run
                while self._ops and self._ops[0][0] == "add" and len(adds) < BATCH:
                    adds.append(self._ops.popleft())
                texts = [a[3] for a in adds if a[4] is None]
                vectors = iter(embedder.embed(texts)) if texts else iter(())
                for _, space, vkey, _query, vector in adds:
                    if vector is None:
                        vector = next(vectors)
                    self._index_for(space, vector.shape[0]).add(
                        np.asarray([vkey], dtype=np.uint64), vector.reshape(1, -1))
                    self._applied += 1
        except Exception as exc:  # a broken model or index must not take the daemon down
            self._fail(exc)

    def _index_for(self, space: bytes, dim: int) -> VectorIndex:
        index = self._indexes.get(space)
        if index is None:
            options = {name: value for name, value in (
                ("exact_below", self.config.exact_below), ("dtype", self.config.dtype))
                if value is not None}  # unset: the vectors module's measured defaults
            index = self._indexes[space] = VectorIndex(dim, **options)
        return index

    def _loaded(self) -> Embedder:
        """The embedder (waits for it to load, on the thread that asks)."""
        assert self._embedder is not None
        return self._embedder.result()

    def _fail(self, exc: BaseException) -> None:
        if not self.broken:
            log.error("semantic cache tier off after an error: %s: %s",
                      type(exc).__name__, exc)
        self.broken = f"{type(exc).__name__}: {exc}"
        self.enabled = False
        self._ops.clear()

    def _search(self, space: bytes, query: str, vector: np.ndarray | None,
                threshold: float) -> list[Candidate]:
        """Entries of ``space`` at or above ``threshold``, most similar first, each with
        the verifier's objections."""
        try:
            index = self._indexes.get(space)
            if index is None or not len(index):
                return []
            if vector is None:
                vector = self._loaded().embed([query])[0]
            found = index.search(vector, self.config.candidates)
        except Exception as exc:
            self._fail(exc)
            return []
        out = []
        for vkey, similarity in zip(found.keys.tolist(), found.similarities.tolist()):
            member = self.members.get(vkey)
            if similarity < threshold or member is None or member.space != space:
                continue
            out.append(Candidate(vkey, similarity, tuple(self.verifier(query, member.query))))
        return out

    # -- reads (event loop) ------------------------------------------------------------

    def searchable(self, rk: RequestKey, vector: np.ndarray | None) -> bytes | None:
        """The space to search for ``rk``, or None when nothing there could match (no
        embedding is computed then)."""
        if not self.enabled or not rk.query:
            return None
        space = self._space(rk.scope, vector)
        return space if self.sizes.get(space) else None

    async def search(self, space: bytes, rk: RequestKey, vector: np.ndarray | None,
                     threshold: float) -> list[Candidate]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._searcher, self._search, space, rk.query,
                                          vector, threshold)

    @property
    def pending(self) -> int:
        """Writes queued and not yet applied (including the one being applied)."""
        return 0 if self.broken else self._queued - self._applied

    def memory_bytes(self) -> int:
        return sum(index.memory_bytes() for index in list(self._indexes.values()))

    @property
    def status(self) -> str:
        if self.broken:
            return f"failed: {self.broken}"
        if self._embedder is None:
            return "off"
        if not self._embedder.done():
            return "loading"
        if self._embedder.exception() is not None:
            self._fail(self._embedder.exception())  # type: ignore[arg-type]
            return f"failed: {self.broken}"
        return "ready"

    def stats(self) -> TierStats:
        looked = self.hits + self.misses
        return TierStats(entries=len(self.members), bytes=self.memory_bytes(),
                         hits=self.hits, misses=self.misses,
                         hit_rate_pct=round(100.0 * self.hits / looked, 2) if looked else 0.0,
                         stale_serves=0, evictions=self.dropped, expirations=0,
                         verifier_refusals=self.refusals)


# --- the cache --------------------------------------------------------------------------


class Cache:
    """The tiers behind the cache ops, with the store policy of ``cache`` config."""

    def __init__(self, config: CacheConfig, normalizer: Normalizer) -> None:
        self.normalizer = normalizer
        self.config = config
        self.exact = ExactTier(config.max_entries, config.max_bytes, config.stale_for)
        self.semantic = SemanticTier(config.semantic, normalizer)
        self.exact.on_drop = self.semantic.forget
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
            self.exact.on_drop = self.semantic.forget
            for entry in list(self.exact.entries()):
                if entry.tier == Tier.SEMANTIC.value:
                    self.semantic.add(entry)
        self.config = config
        self.normalizer = normalizer
        self.exact.max_entries = config.max_entries
        self.exact.max_bytes = config.max_bytes
        self.exact.stale_for = config.stale_for
        self.exact.trim()  # smaller bounds apply now

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
