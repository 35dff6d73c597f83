# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The shared-memory segment of the exact cache: a daemon-written index of answers by
exact key, read by client processes without a system call.

Layout (every field a native-endian 64-bit word unless said; offsets in bytes):

    header, 4096:  magic "LLMSHM\\x01\\0" | layout u32, slot size u32 | generation |
                   slots (a power of two) | arena offset | arena size | config epoch |
                   head (bytes ever reserved in the arena) | entries published | closed |
                   meta seq | meta length | ... | at 256: the meta blob (to 4096)
    index:         ``slots`` slots of 64 bytes: seq | key (16 bytes) | pos | len u32,
                   state u32 | expires (f64) | stale until (f64) | spare
    arena:         a ring of entries: pos (the entry's own position) | len u32, pad u32 |
                   body, padded to 8 bytes

One writer (the daemon's event loop) and any number of readers. A slot is a seqlock:
the writer makes ``seq`` odd, fences (release), writes the fields, and stores ``seq``
even again (release); a reader loads ``seq`` (acquire), copies the fields, fences
(acquire) and loads ``seq`` again, retrying while it was odd or moved. The arena is
log-structured: an entry is written at ``head`` and ``head`` only grows, so the writer
stores the new ``head`` and fences (release) before it overwrites older bytes; a reader
copies a body, fences (acquire) and loads ``head``: the copy is intact iff
``head - pos <= arena size`` (no reservation has reached the entry's bytes since), and
the entry's own header must name the slot's ``pos`` and ``len``. A torn or overwritten
read is a miss, never an answer. Readers write nothing.

No I/O, no clock: the caller maps the file and passes ``now``.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from includes.shm_atomic cimport (shm_cas, shm_fence_acquire, shm_fence_release,
                                  shm_fetch_add, shm_load_acquire, shm_load_relaxed,
                                  shm_store_release, shm_store_relaxed)

cdef const char* C_MAGIC = b"LLMSHM\x01\x00"

cdef enum:
    C_LAYOUT = 1
    C_HEADER_SIZE = 4096
    C_SLOT_SIZE = 64
    C_ENTRY_HEADER = 16
    C_KEY_SIZE = 16
    C_PROBES = 16  # slots looked at from a key's home slot: it is within them or absent

MAGIC = C_MAGIC[:8]
LAYOUT = C_LAYOUT
HEADER_SIZE = C_HEADER_SIZE
SLOT_SIZE = C_SLOT_SIZE
ENTRY_HEADER = C_ENTRY_HEADER
KEY_SIZE = C_KEY_SIZE
PROBES = C_PROBES

cdef enum:
    H_LAYOUT = 8        # u32 layout, u32 slot size
    H_GENERATION = 16
    H_SLOTS = 24
    H_ARENA_OFFSET = 32
    H_ARENA_SIZE = 40
    H_EPOCH = 48
    H_HEAD = 56
    H_PUBLISHED = 64
    H_CLOSED = 72       # non-zero: the daemon stopped serving this segment
    H_META_SEQ = 80     # a seqlock over the meta blob
    H_META_LEN = 88
    H_META = 256        # the meta blob: what a client needs to compute keys as the daemon

cdef enum:
    S_SEQ = 0
    S_KEY = 8
    S_POS = 24
    S_LEN = 32          # u32 len, u32 state
    S_EXPIRES = 40
    S_STALE = 48

cdef enum:
    EMPTY = 0
    LIVE = 1
    GONE = 2            # a tombstone: probing goes on past it

cdef enum:
    MAX_RETRIES = 64    # a slot rewritten this often during one read: give up (a miss)


cdef inline uint64_t* _word(unsigned char* base, size_t off) noexcept nogil:
    return <uint64_t*>(base + off)


cdef inline uint64_t _home(const unsigned char* key, uint64_t mask) noexcept nogil:
    cdef uint64_t h
    memcpy(&h, key, 8)  # the key is an XXH3-128 digest: its bytes are already uniform
    return h & mask


cdef class _Segment:
    cdef object _buffer  # keeps the mapping alive while we point into it
    cdef unsigned char* base
    cdef size_t size
    cdef uint64_t slots
    cdef uint64_t mask
    cdef size_t index_off
    cdef size_t arena_off
    cdef uint64_t arena_size

    cdef int _attach(self, unsigned char* base, size_t size) except -1:
        if size < C_HEADER_SIZE:
            raise ValueError("segment smaller than its header")
        if memcmp(base, C_MAGIC, 8) != 0:
            raise ValueError("not an llm-sidecar segment (magic)")
        cdef uint32_t layout, slot_size
        memcpy(&layout, base + H_LAYOUT, 4)
        memcpy(&slot_size, base + H_LAYOUT + 4, 4)
        if layout != C_LAYOUT or slot_size != C_SLOT_SIZE:
            raise ValueError(f"segment layout {layout} (this build reads {C_LAYOUT})")
        self.base = base
        self.size = size
        self.slots = _word(base, H_SLOTS)[0]
        self.arena_off = _word(base, H_ARENA_OFFSET)[0]
        self.arena_size = _word(base, H_ARENA_SIZE)[0]
        if (self.slots == 0 or self.slots & (self.slots - 1)
                or C_HEADER_SIZE + self.slots * C_SLOT_SIZE > self.arena_off
                or self.arena_off + self.arena_size > size or self.arena_size < 4096):
            raise ValueError("segment header does not fit its size")
        self.mask = self.slots - 1
        self.index_off = C_HEADER_SIZE
        return 0

    @property
    def generation(self) -> int:
        return _word(self.base, H_GENERATION)[0]

    @property
    def epoch(self) -> int:
        return shm_load_acquire(_word(self.base, H_EPOCH))

    @property
    def head(self) -> int:
        return shm_load_acquire(_word(self.base, H_HEAD))

    @property
    def published(self) -> int:
        return shm_load_acquire(_word(self.base, H_PUBLISHED))

    @property
    def closed(self) -> bool:
        """The daemon stopped serving this segment (it exited, or a newer daemon found
        it left behind): nothing in it may be served any more."""
        return shm_load_acquire(_word(self.base, H_CLOSED)) != 0

    def meta(self) -> bytes:
        """The meta blob the daemon published (b"" before any)."""
        cdef uint64_t s1, s2, length
        cdef bytes out
        while True:
            s1 = shm_load_acquire(_word(self.base, H_META_SEQ))
            if s1 & 1:
                continue
            length = _word(self.base, H_META_LEN)[0]
            if length > C_HEADER_SIZE - H_META:
                length = 0  # only a torn read gets here: the seqlock check retries it
            out = PyBytes_FromStringAndSize(<char*>(self.base + H_META), length)
            shm_fence_acquire()
            s2 = shm_load_relaxed(_word(self.base, H_META_SEQ))
            if s1 == s2:
                return out

    @property
    def slot_count(self) -> int:
        return self.slots

    @property
    def arena_bytes(self) -> int:
        return self.arena_size


cdef class Reader(_Segment):
    """Lookups in a mapped segment (read-only is enough). ``retries`` counts reads that
    met a slot being rewritten; ``torn`` counts bodies overwritten while copied."""

    cdef public uint64_t retries
    cdef public uint64_t torn
    #: what the last successful ``find`` or ``get`` found: the entry's arena position
    #: (unique within a generation: the arena never reuses one) and whether it was stale
    cdef readonly uint64_t pos
    cdef readonly bint stale
    cdef uint32_t _length

    def __init__(self, const unsigned char[::1] buffer not None):
        self._buffer = buffer
        self._attach(<unsigned char*>&buffer[0], buffer.shape[0])

    def find(self, bytes key not None, double now, bint allow_stale=False, int64_t epoch=-1):
        """The arena position of the live entry under ``key`` (16 bytes), or -1, as
        ``get`` decides, without copying the body. The entry's bytes are intact at that
        position (no reservation has reached them), so a body ``get`` returned for the
        same position in this generation is still this entry's."""
        if not self._find(key, now, allow_stale, epoch):
            return -1
        shm_fence_acquire()
        if shm_load_relaxed(_word(self.base, H_HEAD)) - self.pos > self.arena_size:
            self.torn += 1
            return -1
        return self.pos

    def get(self, bytes key not None, double now, bint allow_stale=False, int64_t epoch=-1):
        """``(body, stale)`` of the live entry under ``key`` (16 bytes), or None: absent,
        expired (past its stale window when ``allow_stale``), overwritten while read, the
        segment closed, or its config epoch not ``epoch`` (when given: the key was
        computed under that epoch's meta)."""
        if not self._find(key, now, allow_stale, epoch):
            return None
        cdef uint64_t pos = self.pos, head, own_pos
        cdef uint32_t length = self._length, own_len
        cdef uint64_t off = pos % self.arena_size
        if off + C_ENTRY_HEADER + <uint64_t>length > self.arena_size:
            return None  # never written so: a segment someone else scribbled on
        cdef bytes body = PyBytes_FromStringAndSize(NULL, length)
        cdef unsigned char* entry = self.base + self.arena_off + off
        memcpy(&own_pos, entry, 8)
        memcpy(&own_len, entry + 8, 4)
        memcpy(PyBytes_AS_STRING(body), entry + C_ENTRY_HEADER, length)
        shm_fence_acquire()
        head = shm_load_relaxed(_word(self.base, H_HEAD))
        if head - pos > self.arena_size or own_pos != pos or own_len != length:
            self.torn += 1
            return None
        return (body, self.stale)

    cdef bint _find(self, bytes key, double now, bint allow_stale, int64_t epoch) except -1:
        """Whether a servable entry is under ``key``: then ``pos``, ``_length`` and
        ``stale`` describe it, as its slot read under the seqlock."""
        if len(key) != C_KEY_SIZE:
            raise ValueError("a key is 16 bytes")
        if shm_load_acquire(_word(self.base, H_CLOSED)):
            return False  # no longer kept up to date (invalidations, reloads): serve nothing
        if epoch >= 0 and shm_load_acquire(_word(self.base, H_EPOCH)) != <uint64_t>epoch:
            return False  # the meta the key was made under is gone: the caller reloads it
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(key)
        cdef uint64_t i = _home(k, self.mask)
        cdef int probe, found
        for probe in range(C_PROBES):
            found = self._read(self.base + self.index_off + ((i + probe) & self.mask) * C_SLOT_SIZE,
                               k, now, allow_stale)
            if found >= 0:
                return found
        return False

    cdef int _read(self, unsigned char* slot, const unsigned char* key, double now,
                   bint allow_stale) noexcept:
        """The slot's verdict for ``key``: 1 (its servable entry: ``pos``, ``_length``
        and ``stale`` set), 0 (the key's search ends here: an empty slot, or the key's
        entry not servable) or -1 (go on)."""
        cdef uint64_t s1, s2, pos
        cdef uint32_t length, state
        cdef double expires, stale_until
        cdef unsigned char kcopy[16]
        cdef int attempt
        for attempt in range(MAX_RETRIES):
            s1 = shm_load_acquire(_word(slot, S_SEQ))
            if s1 & 1:
                self.retries += 1
                continue
            memcpy(kcopy, slot + S_KEY, C_KEY_SIZE)
            memcpy(&pos, slot + S_POS, 8)
            memcpy(&length, slot + S_LEN, 4)
            memcpy(&state, slot + S_LEN + 4, 4)
            memcpy(&expires, slot + S_EXPIRES, 8)
            memcpy(&stale_until, slot + S_STALE, 8)
            shm_fence_acquire()
            s2 = shm_load_relaxed(_word(slot, S_SEQ))
            if s1 != s2:
                self.retries += 1
                continue
            break
        else:
            return 0  # rewritten all the while: a miss
        if state == EMPTY:
            return 0
        if state != LIVE or memcmp(kcopy, key, C_KEY_SIZE) != 0:
            return -1
        if now >= expires and not (allow_stale and now < stale_until):
            return 0
        self.pos, self._length, self.stale = pos, length, now >= expires
        return 1


cdef class Writer(_Segment):
    """The daemon's side: formats a zeroed mapping, then puts and removes entries. One
    thread only; readers in other processes never block it."""

    def __init__(self, unsigned char[::1] buffer not None, uint64_t generation,
                 uint64_t slots):
        cdef size_t size = buffer.shape[0]
        if slots == 0 or slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        cdef size_t arena_off = C_HEADER_SIZE + slots * C_SLOT_SIZE
        if arena_off + 4096 > size:
            raise ValueError("the segment is too small for its index and an arena")
        cdef unsigned char* base = <unsigned char*>&buffer[0]
        memset(base, 0, arena_off)  # the arena's old bytes are dead: head starts at 0
        cdef uint32_t layout = C_LAYOUT, slot_size = C_SLOT_SIZE
        memcpy(base + H_LAYOUT, &layout, 4)
        memcpy(base + H_LAYOUT + 4, &slot_size, 4)
        _word(base, H_GENERATION)[0] = generation
        _word(base, H_SLOTS)[0] = slots
        _word(base, H_ARENA_OFFSET)[0] = arena_off
        _word(base, H_ARENA_SIZE)[0] = (size - arena_off) & ~(<uint64_t>7)
        shm_fence_release()
        memcpy(base, C_MAGIC, 8)  # last: a reader of a half-made file sees no magic
        self._buffer = buffer
        self._attach(base, size)

    def set_epoch(self, uint64_t epoch) -> None:
        shm_store_release(_word(self.base, H_EPOCH), epoch)

    def set_meta(self, const unsigned char[::1] meta not None) -> None:
        """Publish the meta blob (at most 3840 bytes) under its seqlock."""
        cdef size_t length = meta.shape[0]
        if length > C_HEADER_SIZE - H_META:
            raise ValueError(f"meta is {length} bytes; at most {C_HEADER_SIZE - H_META}")
        cdef uint64_t* seq = _word(self.base, H_META_SEQ)
        cdef uint64_t s = seq[0]
        shm_store_relaxed(seq, s + 1)
        shm_fence_release()
        _word(self.base, H_META_LEN)[0] = length
        if length:
            memcpy(self.base + H_META, &meta[0], length)
        shm_store_release(seq, s + 2)

    def mark_closed(self) -> None:
        shm_store_release(_word(self.base, H_CLOSED), 1)

    def put(self, const unsigned char[::1] key not None, const unsigned char[::1] body not None,
            double expires, double stale_until) -> bool:
        """Publish ``body`` under ``key``; False when it cannot be (too large for the
        arena, or every slot of the key's probe window is live and newer)."""
        if key.shape[0] != C_KEY_SIZE:
            raise ValueError("a key is 16 bytes")
        cdef size_t length = body.shape[0]
        cdef uint64_t need = (C_ENTRY_HEADER + length + 7) & ~(<uint64_t>7)
        if need > self.arena_size // 4:
            return False
        cdef unsigned char* slot = self._slot_for(&key[0])
        if slot == NULL:
            return False
        cdef uint64_t* head_word = _word(self.base, H_HEAD)
        cdef uint64_t pos = head_word[0]
        cdef uint64_t off = pos % self.arena_size
        if off + need > self.arena_size:  # no entry wraps: skip the ring's tail
            pos += self.arena_size - off
            off = 0
        # Reserve before writing: readers of an entry these bytes reach see head move
        # past it (the release fence orders the head store before the stores below).
        shm_store_relaxed(head_word, pos + need)
        shm_fence_release()
        cdef unsigned char* entry = self.base + self.arena_off + off
        cdef uint32_t len32 = <uint32_t>length
        memcpy(entry, &pos, 8)
        memcpy(entry + 8, &len32, 4)
        if length:
            memcpy(entry + C_ENTRY_HEADER, &body[0], length)
        self._publish(slot, &key[0], pos, len32, LIVE, expires, stale_until)
        shm_store_release(_word(self.base, H_PUBLISHED),
                          _word(self.base, H_PUBLISHED)[0] + 1)
        return True

    def remove(self, const unsigned char[::1] key not None) -> bool:
        """Take ``key``'s entry out of the index (its bytes age out of the arena)."""
        if key.shape[0] != C_KEY_SIZE:
            raise ValueError("a key is 16 bytes")
        cdef uint64_t i = _home(&key[0], self.mask)
        cdef unsigned char* slot
        cdef uint32_t state
        cdef int probe
        for probe in range(C_PROBES):
            slot = self.base + self.index_off + ((i + probe) & self.mask) * C_SLOT_SIZE
            memcpy(&state, slot + S_LEN + 4, 4)
            if state == EMPTY:
                return False
            if state == LIVE and memcmp(slot + S_KEY, &key[0], C_KEY_SIZE) == 0:
                self._publish(slot, &key[0], 0, 0, GONE, 0.0, 0.0)
                return True
        return False

    def clear(self) -> None:
        """Every entry out (a reload that changed what keys mean, an invalidation)."""
        cdef uint64_t n
        cdef unsigned char* slot
        cdef uint32_t state
        for n in range(self.slots):
            slot = self.base + self.index_off + n * C_SLOT_SIZE
            memcpy(&state, slot + S_LEN + 4, 4)
            if state != EMPTY:
                self._publish(slot, slot + S_KEY, 0, 0, EMPTY, 0.0, 0.0)

    cdef unsigned char* _slot_for(self, const unsigned char* key) noexcept:
        """The slot to write ``key`` into: its own, else the first free one, else the one
        whose entry expires first (replaced)."""
        cdef uint64_t i = _home(key, self.mask)
        cdef unsigned char* slot
        cdef unsigned char* free = NULL
        cdef unsigned char* oldest = NULL
        cdef double expires, oldest_expires = 0.0
        cdef uint32_t state
        cdef int probe
        for probe in range(C_PROBES):
            slot = self.base + self.index_off + ((i + probe) & self.mask) * C_SLOT_SIZE
            memcpy(&state, slot + S_LEN + 4, 4)
            if state == LIVE:
                if memcmp(slot + S_KEY, key, C_KEY_SIZE) == 0:
                    return slot
                memcpy(&expires, slot + S_EXPIRES, 8)
                if oldest == NULL or expires < oldest_expires:
                    oldest, oldest_expires = slot, expires
            elif free == NULL:
                free = slot
                if state == EMPTY:
                    break  # the key cannot be further on
        if free != NULL:
            return free
        return oldest

    cdef void _publish(self, unsigned char* slot, const unsigned char* key, uint64_t pos,
                       uint32_t length, uint32_t state, double expires,
                       double stale_until) noexcept:
        cdef uint64_t* seq = _word(slot, S_SEQ)
        cdef uint64_t s = seq[0]
        cdef unsigned char k[16]
        memcpy(k, key, C_KEY_SIZE)  # key may point into this very slot (clear)
        shm_store_relaxed(seq, s + 1)
        shm_fence_release()
        memcpy(slot + S_KEY, k, C_KEY_SIZE)
        memcpy(slot + S_POS, &pos, 8)
        memcpy(slot + S_LEN, &length, 4)
        memcpy(slot + S_LEN + 4, &state, 4)
        memcpy(slot + S_EXPIRES, &expires, 8)
        memcpy(slot + S_STALE, &stale_until, 8)
        shm_store_release(seq, s + 2)


def mark_closed(unsigned char[::1] buffer not None) -> None:
    """Mark the segment in ``buffer`` closed: one its daemon left behind (killed before
    it could), found by the next daemon at the same path. ``ValueError`` if it is not a
    segment."""
    cdef _Segment seg = _Segment.__new__(_Segment)
    seg._attach(<unsigned char*>&buffer[0], buffer.shape[0])
    shm_store_release(_word(seg.base, H_CLOSED), 1)


# --- admission slices: the client's counters ------------------------------------------
#
# A client process owns one slab file (it created it, only it may write it); the daemon
# maps it read-only. Slot i (64 bytes at 64 + 64 i) holds one slice the daemon granted:
#   grant (the daemon's id of it, 0: the slot is free) | granted | used | settled |
#   input tokens | output tokens | spare x2
# The client installs a grant (counters zeroed, then ``grant`` stored with release),
# takes a call from it with a compare-and-swap that keeps ``used <= granted``, and adds
# each call's usage (atomic adds, ``settled`` last). The daemon loads them (acquire) when
# the slice ends, is returned or its owner is gone: what the file says is the client's
# own account, bounded by the daemon to what it granted.

cdef const char* C_SLAB_MAGIC = b"LLMSLAB\x01"

cdef enum:
    SLAB_SLOTS = 64
    SLAB_SIZE = 64 + 64 * 64
    W_GRANT = 0
    W_GRANTED = 8
    W_USED = 16
    W_SETTLED = 24
    W_INPUT = 32
    W_OUTPUT = 40

SLAB_BYTES = SLAB_SIZE
SLAB_SLOT_COUNT = SLAB_SLOTS


cdef class Slab:
    """A slab mapping (``writable``: the client's own; else the daemon's read-only view)."""

    cdef object _buffer
    cdef unsigned char* base
    cdef readonly bint writable

    def __init__(self, buffer not None, bint writable=False, uint64_t pid=0):
        cdef const unsigned char[::1] view = buffer
        if view.shape[0] < SLAB_SIZE:
            raise ValueError(f"a slab is {SLAB_SIZE} bytes")
        self._buffer = buffer
        self.base = <unsigned char*>&view[0]
        self.writable = writable
        if writable:
            memset(self.base, 0, SLAB_SIZE)
            _word(self.base, 8)[0] = pid
            shm_fence_release()
            memcpy(self.base, C_SLAB_MAGIC, 8)
        elif memcmp(self.base, C_SLAB_MAGIC, 8) != 0:
            raise ValueError("not a slab")

    @property
    def pid(self) -> int:
        return _word(self.base, 8)[0]

    cdef inline unsigned char* _slot(self, int slot) except NULL:
        if not 0 <= slot < SLAB_SLOTS:
            raise ValueError(f"slot {slot} out of range")
        return self.base + 64 + 64 * slot

    def install(self, int slot, uint64_t grant, uint64_t granted) -> None:
        """Make ``slot`` hold the slice ``grant`` of ``granted`` calls, none used yet."""
        if not self.writable:
            raise ValueError("a read-only slab")
        cdef unsigned char* s = self._slot(slot)
        shm_store_release(_word(s, W_GRANT), 0)
        shm_store_relaxed(_word(s, W_GRANTED), granted)
        shm_store_relaxed(_word(s, W_USED), 0)
        shm_store_relaxed(_word(s, W_SETTLED), 0)
        shm_store_relaxed(_word(s, W_INPUT), 0)
        shm_store_relaxed(_word(s, W_OUTPUT), 0)
        shm_store_release(_word(s, W_GRANT), grant)

    def take(self, int slot, uint64_t grant) -> int:
        """One call from the slice ``grant`` in ``slot``: its index (0, 1, ...), or -1
        when the slice is spent or the slot holds another one. Lock-free: any number of
        threads may take at once, and no more than ``granted`` succeed."""
        cdef unsigned char* s = self._slot(slot)
        cdef uint64_t used, granted
        if shm_load_acquire(_word(s, W_GRANT)) != grant:
            return -1
        granted = shm_load_relaxed(_word(s, W_GRANTED))
        used = shm_load_relaxed(_word(s, W_USED))
        while used < granted:
            if shm_cas(_word(s, W_USED), &used, used + 1):
                return used
        return -1

    def settle(self, int slot, uint64_t input_tokens, uint64_t output_tokens) -> int:
        """Add one call's usage; returns the calls settled so far, this one included."""
        cdef unsigned char* s = self._slot(slot)
        shm_fetch_add(_word(s, W_INPUT), input_tokens)
        shm_fetch_add(_word(s, W_OUTPUT), output_tokens)
        return shm_fetch_add(_word(s, W_SETTLED), 1) + 1

    def state(self, int slot) -> tuple:
        """``(grant, granted, used, settled, input_tokens, output_tokens)`` as loaded."""
        cdef unsigned char* s = self._slot(slot)
        cdef uint64_t grant = shm_load_acquire(_word(s, W_GRANT))
        return (grant, shm_load_acquire(_word(s, W_GRANTED)),
                shm_load_acquire(_word(s, W_USED)), shm_load_acquire(_word(s, W_SETTLED)),
                shm_load_acquire(_word(s, W_INPUT)), shm_load_acquire(_word(s, W_OUTPUT)))
