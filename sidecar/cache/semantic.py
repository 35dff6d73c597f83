"""The semantic tier (``SemanticTier``): the entries of semantic kinds indexed by the
embedding of their last user turn, one vector index per scope; a hit needs the similarity
threshold and the pair verifier's consent (``sidecar.cache.verify``). Its embedding and index
work runs on its own threads.
"""
from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from .settings import SemanticConfig
from .embed import BATCH, Embedder, client_space, make_embedder, unit_vector
from .exact import Entry
from .keys import RequestKey
from ..text.normalize import Normalizer
from .vectors import VectorIndex
from .verify import Mode, Verifier
from ..wire import TierStats

log = logging.getLogger("sidecar.cache")

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
