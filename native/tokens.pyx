# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Exact BPE token counting for tiktoken encodings (compiled core).

Counts equal ``len(tiktoken_encoding.encode_ordinary(text))``: the text is split by the
encoding's pre-tokenisation pattern (``pretokenize.pxi``, a hand-written scanner with the
regex's exact semantics), and each piece's UTF-8 bytes are merged by rank as tiktoken's
byte-pair merge does. Only counts are produced, never ids, which allows:

- a piece that is itself a token counts 1 after one hash lookup;
- a bounded, direct-mapped cache of short multi-token pieces -> count, verified against
  the stored bytes, so a hit is always exact. One thread at a time uses it; a count that
  finds it taken merges every piece itself rather than wait (the merge is pure), so a
  short count on the daemon's event loop never waits for a long one on a worker thread.

``RankTable`` is the compact read-only form of the merge ranks (one contiguous buffer:
offsets by rank, an open-addressing XXH3 hash of token bytes -> rank, the token bytes),
built once from the ``.tiktoken`` file and then adopted zero-copy from an mmap of the
on-disk cache. Imported only by ``sidecar.text.tokens``.
"""
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from cpython.pythread cimport (
    PyThread_type_lock, PyThread_allocate_lock, PyThread_free_lock, PyThread_acquire_lock,
    PyThread_release_lock, NOWAIT_LOCK,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from includes.pyunicode cimport (
    PyUnicode_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_IS_ASCII,
    PyUnicode_AsUTF8AndSize, PyUnicode_1BYTE_KIND, PyUnicode_2BYTE_KIND,
)
from includes.xxhash cimport XXH3_64bits_withSeed

include "pretokenize.pxi"

pt_init()

FORMAT = b"LSBPE001"
cdef const char* MAGIC = "LSBPE001"

cdef enum:
    HEADER_SIZE = 64
    RANK_BITS = 18           # slot = tag << RANK_BITS | (rank + 1)
    RANK_MASK = (1 << RANK_BITS) - 1
    MAX_TOKENS = RANK_MASK - 1
    CACHE_BITS = 16
    CACHE_SLOTS = 1 << CACHE_BITS
    CACHE_MAX_LEN = 22       # pieces up to this many bytes are cached
    STACK_PARTS = 128        # longer pieces merge through a heap (O(n log n))
    NOGIL_MIN = 4096         # texts at least this long are counted without the GIL


cdef struct CacheEntry:
    uint64_t hash
    uint8_t length
    uint8_t count
    uint8_t data[CACHE_MAX_LEN]


cdef inline uint64_t _hash(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    return XXH3_64bits_withSeed(p, n, 0)


def build_table(tokens) -> bytes:
    """Serialise tokens (a sequence of bytes, index = rank) into the RankTable layout."""
    cdef Py_ssize_t n = len(tokens), i, blob_len = 0, size = 2
    cdef bytes tok
    if n > MAX_TOKENS:
        raise ValueError(f"{n} tokens exceed the table's limit of {MAX_TOKENS}")
    for tok in tokens:
        blob_len += len(tok)
    while size < 2 * n:
        size <<= 1
    cdef Py_ssize_t off_at = HEADER_SIZE
    cdef Py_ssize_t slots_at = off_at + 4 * (n + 1)
    cdef Py_ssize_t blob_at = slots_at + 4 * size
    out = bytearray(blob_at + blob_len)
    cdef uint8_t* base = out
    cdef uint32_t* offsets = <uint32_t*>(base + off_at)
    cdef uint32_t* slots = <uint32_t*>(base + slots_at)
    cdef uint8_t* blob = base + blob_at
    cdef uint64_t h, mask = size - 1, j
    cdef uint32_t pos = 0
    cdef const uint8_t* p
    for i in range(n):
        tok = tokens[i]
        p = tok
        offsets[i] = pos
        memcpy(blob + pos, p, len(tok))
        pos += len(tok)
        h = _hash(p, len(tok))
        j = h & mask
        while slots[j]:
            j = (j + 1) & mask
        slots[j] = <uint32_t>(((h >> 50) << RANK_BITS) | <uint64_t>(i + 1))
    offsets[n] = pos
    header = FORMAT + int(n).to_bytes(4, "little") + int(size).to_bytes(4, "little") \
        + int(blob_len).to_bytes(4, "little")
    out[:len(header)] = header
    return bytes(out)


cdef class RankTable:
    """Read-only view of a serialised rank table held in any buffer (bytes, mmap)."""
    cdef Py_buffer _view
    cdef bint _held
    cdef const uint32_t* offsets
    cdef const uint32_t* slots
    cdef const uint8_t* blob
    cdef readonly uint32_t n_tokens
    cdef uint64_t mask

    def __cinit__(self, buffer):
        self._held = False
        PyObject_GetBuffer(buffer, &self._view, PyBUF_SIMPLE)
        self._held = True
        cdef const uint8_t* base = <const uint8_t*>self._view.buf
        cdef Py_ssize_t size = self._view.len
        if size < HEADER_SIZE or memcmp(base, MAGIC, 8) != 0:
            raise ValueError("not a rank table (bad header)")
        cdef uint32_t n = (<const uint32_t*>(base + 8))[0]
        cdef uint32_t slots = (<const uint32_t*>(base + 12))[0]
        cdef uint32_t blob_len = (<const uint32_t*>(base + 16))[0]
        cdef Py_ssize_t need = HEADER_SIZE + 4 * (<Py_ssize_t>n + 1) + 4 * <Py_ssize_t>slots + blob_len
        if n > MAX_TOKENS or slots & (slots - 1) or slots < 2 * n or size != need:
            raise ValueError("not a rank table (inconsistent sizes)")
        self.n_tokens = n
        self.offsets = <const uint32_t*>(base + HEADER_SIZE)
        self.slots = self.offsets + n + 1
        self.blob = <const uint8_t*>(self.slots + slots)
        self.mask = slots - 1
        if self.offsets[n] != blob_len:
            raise ValueError("not a rank table (offsets do not cover the blob)")

    def __dealloc__(self):
        if self._held:
            PyBuffer_Release(&self._view)

    cdef inline long rank_of(self, const uint8_t* p, Py_ssize_t n) noexcept nogil:
        cdef uint64_t h = _hash(p, n)
        cdef uint64_t j = h & self.mask
        cdef uint32_t tag = <uint32_t>(h >> 50), slot, r
        while True:
            slot = self.slots[j]
            if slot == 0:
                return -1
            if slot >> RANK_BITS == tag:
                r = (slot & RANK_MASK) - 1
                if (self.offsets[r + 1] - self.offsets[r] == <uint32_t>n
                        and memcmp(self.blob + self.offsets[r], p, n) == 0):
                    return r
            j = (j + 1) & self.mask

    def rank(self, bytes token) -> int:
        """Rank of ``token``, or -1 when it is not a token."""
        return self.rank_of(token, len(token))

    def token(self, uint32_t rank) -> bytes:
        if rank >= self.n_tokens:
            raise IndexError(rank)
        return self.blob[self.offsets[rank]:self.offsets[rank + 1]]


cdef Py_ssize_t _merge_count(RankTable table, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Tokens of one piece: tiktoken's byte-pair merge, counting the parts left."""
    cdef uint32_t stack_start[STACK_PARTS + 1]
    cdef long stack_rank[STACK_PARTS + 1]
    cdef uint32_t* start = stack_start
    cdef long* rank = stack_rank
    cdef Py_ssize_t parts = n + 1, i, best
    cdef long lowest, NONE = 0x7FFFFFFF
    if n > STACK_PARTS:
        return _merge_count_long(table, p, n)
    # part i spans [start[i], start[i+1]); rank[i] = rank of parts i and i+1 merged
    for i in range(parts):
        start[i] = <uint32_t>i
    for i in range(parts - 2):
        rank[i] = table.rank_of(p + i, 2)
        if rank[i] < 0:
            rank[i] = NONE
    rank[parts - 2] = NONE
    rank[parts - 1] = NONE
    while parts > 2:
        lowest = NONE
        best = -1
        for i in range(parts - 2):
            if rank[i] < lowest:
                lowest = rank[i]
                best = i
        if best < 0:
            break
        # merge part best with best+1: drop boundary best+1
        for i in range(best + 1, parts - 1):
            start[i] = start[i + 1]
            rank[i] = rank[i + 1]
        parts -= 1
        if best + 2 < parts:
            rank[best] = table.rank_of(p + start[best], start[best + 2] - start[best])
            if rank[best] < 0:
                rank[best] = NONE
        else:
            rank[best] = NONE
        if best > 0:
            rank[best - 1] = table.rank_of(p + start[best - 1], start[best + 1] - start[best - 1])
            if rank[best - 1] < 0:
                rank[best - 1] = NONE
    return parts - 1


cdef struct HeapItem:
    long rank
    uint32_t start  # first byte of the pair's left part
    uint32_t end    # one past the pair's right part, when pushed


cdef inline bint _before(HeapItem a, HeapItem b) noexcept nogil:
    # lowest rank first; among equal ranks the leftmost, as tiktoken's scan picks
    return a.rank < b.rank or (a.rank == b.rank and a.start < b.start)


cdef inline void _push(HeapItem* heap, Py_ssize_t* size, HeapItem item) noexcept nogil:
    cdef Py_ssize_t i = size[0], parent
    size[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not _before(item, heap[parent]):
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = item


cdef inline HeapItem _pop(HeapItem* heap, Py_ssize_t* size) noexcept nogil:
    cdef HeapItem top = heap[0], last
    cdef Py_ssize_t i = 0, child, n
    size[0] -= 1
    n = size[0]
    last = heap[n]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and _before(heap[child + 1], heap[child]):
            child += 1
        if not _before(heap[child], last):
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top


cdef Py_ssize_t _merge_count_long(RankTable table, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The same merge order for long pieces in O(n log n): parts in a linked list, pair
    ranks in a heap; an entry is stale once its left part is gone or its right end moved."""
    cdef uint32_t* nxt = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
    cdef uint32_t* prv = <uint32_t*>malloc((n + 1) * sizeof(uint32_t))
    cdef uint8_t* alive = <uint8_t*>malloc(n + 1)
    cdef HeapItem* heap = <HeapItem*>malloc(3 * (n + 1) * sizeof(HeapItem))
    cdef Py_ssize_t size = 0, parts = n, i
    cdef HeapItem item
    cdef uint32_t a, b, c
    cdef long r
    if nxt == NULL or prv == NULL or alive == NULL or heap == NULL:
        free(nxt); free(prv); free(alive); free(heap)
        return -1
    for i in range(n + 1):
        nxt[i] = <uint32_t>(i + 1)
        prv[i] = <uint32_t>(i - 1) if i > 0 else 0
        alive[i] = 1
    for i in range(n - 1):
        r = table.rank_of(p + i, 2)
        if r >= 0:
            item.rank = r
            item.start = <uint32_t>i
            item.end = <uint32_t>(i + 2)
            _push(heap, &size, item)
    while size:
        item = _pop(heap, &size)
        a = item.start
        if not alive[a] or nxt[a] >= n or nxt[nxt[a]] != item.end:
            continue
        # merge part a with the next one
        b = nxt[a]
        alive[b] = 0
        nxt[a] = nxt[b]
        if nxt[b] <= n:
            prv[nxt[b]] = a
        parts -= 1
        c = nxt[a]  # end of the merged part
        if c < n:
            r = table.rank_of(p + a, nxt[c] - a)
            if r >= 0:
                item.rank = r
                item.start = a
                item.end = nxt[c]
                _push(heap, &size, item)
        if a > 0:
            b = prv[a]
            r = table.rank_of(p + b, c - b)
            if r >= 0:
                item.rank = r
                item.start = b
                item.end = c
                _push(heap, &size, item)
    free(nxt); free(prv); free(alive); free(heap)
    return parts


cdef inline Py_ssize_t _utf8_width(uint32_t c) noexcept nogil:
    if c < 0x80:
        return 1
    if c < 0x800:
        return 2
    if c < 0x10000:
        return 3
    return 4


cdef Py_ssize_t _to_utf8(const pt_char* s, Py_ssize_t n, uint8_t* out) noexcept nogil:
    """UTF-8 of ``n`` code points into ``out`` (room for 4 bytes each); -1 at a lone
    surrogate, which has no UTF-8 (the caller lets CPython raise its error)."""
    cdef Py_ssize_t i, o = 0
    cdef uint32_t c
    for i in range(n):
        c = s[i]
        if c < 0x80:
            out[o] = <uint8_t>c
            o += 1
        elif c < 0x800:
            out[o] = <uint8_t>(0xC0 | (c >> 6))
            out[o + 1] = <uint8_t>(0x80 | (c & 0x3F))
            o += 2
        elif c < 0x10000:
            if 0xD800 <= c <= 0xDFFF:
                return -1
            out[o] = <uint8_t>(0xE0 | (c >> 12))
            out[o + 1] = <uint8_t>(0x80 | ((c >> 6) & 0x3F))
            out[o + 2] = <uint8_t>(0x80 | (c & 0x3F))
            o += 3
        else:
            out[o] = <uint8_t>(0xF0 | (c >> 18))
            out[o + 1] = <uint8_t>(0x80 | ((c >> 12) & 0x3F))
            out[o + 2] = <uint8_t>(0x80 | ((c >> 6) & 0x3F))
            out[o + 3] = <uint8_t>(0x80 | (c & 0x3F))
            o += 4
    return o


cdef Py_ssize_t _utf8_of(int kind, const void* data, Py_ssize_t n, uint8_t* out) noexcept nogil:
    if kind == PyUnicode_1BYTE_KIND:
        return _to_utf8(<const uint8_t*>data, n, out)
    if kind == PyUnicode_2BYTE_KIND:
        return _to_utf8(<const uint16_t*>data, n, out)
    return _to_utf8(<const uint32_t*>data, n, out)


cdef class Counter:
    """Counts tokens of one encoding: a RankTable plus its pre-tokeniser and a cache."""
    cdef readonly RankTable table
    cdef int kind
    cdef CacheEntry* cache
    cdef PyThread_type_lock lock
    cdef readonly uint64_t cache_hits
    cdef readonly uint64_t cache_misses
    cdef readonly uint64_t uncached  # counts made without the cache: another thread held it

    def __cinit__(self, RankTable table, int pretokenizer):
        if pretokenizer not in (PT_CL100K, PT_O200K):
            raise ValueError(f"unknown pre-tokeniser {pretokenizer}")
        self.table = table
        self.kind = pretokenizer
        self.cache = <CacheEntry*>PyMem_Malloc(CACHE_SLOTS * sizeof(CacheEntry))
        self.lock = PyThread_allocate_lock()
        if self.cache == NULL or self.lock == NULL:
            raise MemoryError()
        memset(self.cache, 0, CACHE_SLOTS * sizeof(CacheEntry))

    def __dealloc__(self):
        PyMem_Free(self.cache)
        if self.lock != NULL:
            PyThread_free_lock(self.lock)

    cdef Py_ssize_t _piece(self, const uint8_t* p, Py_ssize_t n, bint cached) noexcept nogil:
        """Tokens of one piece; ``cached`` only when the caller holds ``self.lock``."""
        cdef uint64_t h
        cdef CacheEntry* e
        cdef Py_ssize_t count
        if n == 1 or self.table.rank_of(p, n) >= 0:
            return 1
        if n > CACHE_MAX_LEN or not cached:
            return _merge_count(self.table, p, n)
        h = _hash(p, n)
        e = &self.cache[h & (CACHE_SLOTS - 1)]
        if e.hash == h and e.length == n and memcmp(e.data, p, n) == 0:
            self.cache_hits += 1
            return e.count
        self.cache_misses += 1
        count = _merge_count(self.table, p, n)
        e.hash = h
        e.length = <uint8_t>n
        e.count = <uint8_t>count
        memcpy(e.data, p, n)
        return count

    cdef Py_ssize_t _count(self, int kind, const void* data, Py_ssize_t n,
                           const uint8_t* utf8, bint cached) noexcept nogil:
        if kind == PyUnicode_1BYTE_KIND:
            return self._scan(<const uint8_t*>data, n, utf8, cached)
        if kind == PyUnicode_2BYTE_KIND:
            return self._scan(<const uint16_t*>data, n, utf8, cached)
        return self._scan(<const uint32_t*>data, n, utf8, cached)

    cdef Py_ssize_t _scan(self, const pt_char* s, Py_ssize_t n, const uint8_t* utf8,
                          bint cached) noexcept nogil:
        cdef Py_ssize_t pos = 0, end, k, total = 0, got
        cdef Py_ssize_t bpos = 0, bend
        while pos < n:
            end = pt_next(self.kind, s, n, pos)
            bend = bpos
            for k in range(pos, end):
                bend += _utf8_width(s[k])
            got = self._piece(utf8 + bpos, bend - bpos, cached)
            if got < 0:
                return -1
            total += got
            pos = end
            bpos = bend
        return total

    def count(self, str text) -> int:
        """Tokens in ``text``; UnicodeEncodeError at a lone surrogate (the caller
        replaces them, as tiktoken does, and counts again)."""
        cdef Py_ssize_t size = 0, n = PyUnicode_GET_LENGTH(text), total = -1
        cdef int kind = PyUnicode_KIND(text)
        cdef const void* data = PyUnicode_DATA(text)
        cdef const uint8_t* utf8 = NULL
        cdef uint8_t* own = NULL
        cdef bint cached
        if n == 0:
            return 0
        if n < NOGIL_MIN or PyUnicode_IS_ASCII(text):
            # ASCII is its own UTF-8, and a short text converts in no time.
            utf8 = <const uint8_t*>PyUnicode_AsUTF8AndSize(text, &size)
        # Never wait for the cache: its holder may be a worker inside a count of megabytes
        # while this caller is the event loop. Without it the count is the same, only slower.
        cached = PyThread_acquire_lock(self.lock, NOWAIT_LOCK)
        if not cached:
            self.uncached += 1  # under the GIL: no other thread writes it meanwhile
        if n >= NOGIL_MIN:
            with nogil:
                if utf8 == NULL:
                    # Converted here: CPython's converter holds the GIL (~7 ms for 4 MB),
                    # which the event loop would wait for while a worker counts.
                    own = <uint8_t*>malloc(4 * n)
                    if own != NULL:
                        size = _utf8_of(kind, data, n, own)
                        utf8 = own
                if utf8 != NULL and size >= 0:
                    total = self._count(kind, data, n, utf8, cached)
        else:
            total = self._count(kind, data, n, utf8, cached)
        if cached:
            PyThread_release_lock(self.lock)
        free(own)
        if size < 0:
            PyUnicode_AsUTF8AndSize(text, &size)  # raises CPython's UnicodeEncodeError
        if total < 0:
            raise MemoryError()
        return total

    def count_piece(self, bytes piece) -> int:
        """Tokens of one pre-tokenised piece given as UTF-8 bytes (tests, diagnostics)."""
        cdef Py_ssize_t got
        cdef bint cached = PyThread_acquire_lock(self.lock, NOWAIT_LOCK)
        got = self._piece(piece, len(piece), cached) if len(piece) else 0
        if cached:
            PyThread_release_lock(self.lock)
        if got < 0:
            raise MemoryError()
        return got


PRETOKENIZERS = {"cl100k_base": PT_CL100K, "o200k_base": PT_O200K}
