# Sliding-window rings (included by window.pyx; Ring is declared in window.pxd): the bucket
# arithmetic of the module docstring's model as C functions over one Ring, and
# SlidingWindow, one ring on its own, through which the tests check that model.


cdef inline int64_t _slot(int64_t bucket, int64_t ring) noexcept nogil:
    # C's % keeps the sign of a negative bucket (times before the epoch): fold it back
    cdef int64_t r = bucket % ring
    return r + ring if r < 0 else r


cdef int ring_init(Ring* r, double span, int buckets) except -1:
    r.counts = <int64_t*>calloc(buckets + 1, sizeof(int64_t))
    if r.counts == NULL:
        raise MemoryError()
    r.head = 0
    r.total = 0
    r.buckets = buckets
    r.width = span / buckets
    return 0


cdef inline int64_t ring_index(Ring* r, double now) noexcept nogil:
    return <int64_t>floor(now / r.width)


cdef void ring_advance(Ring* r, int64_t b) noexcept nogil:
    cdef int64_t k, ring = r.buckets + 1
    if b <= r.head:
        return
    if b - r.head >= ring:
        for k in range(ring):
            r.counts[k] = 0
        r.total = 0
    else:
        for k in range(r.head + 1, b + 1):
            r.total -= r.counts[_slot(k, ring)]
            r.counts[_slot(k, ring)] = 0
    r.head = b


cdef inline int64_t ring_used(Ring* r, double now) noexcept nogil:
    ring_advance(r, ring_index(r, now))
    return r.total


cdef int64_t ring_add(Ring* r, double now, int64_t amount) noexcept nogil:
    cdef int64_t b = ring_index(r, now)
    ring_advance(r, b)
    if b < r.head:
        b = r.head
    r.counts[_slot(b, r.buckets + 1)] += amount
    r.total += amount
    return b


cdef bint ring_adjust(Ring* r, int64_t bucket, int64_t delta, double now) noexcept nogil:
    cdef int64_t ring = r.buckets + 1, i, old
    ring_advance(r, ring_index(r, now))
    if bucket > r.head or bucket <= r.head - ring:
        return False
    i = _slot(bucket, ring)
    old = r.counts[i]
    if old + delta < 0:
        delta = -old
    r.counts[i] = old + delta
    r.total += delta
    return True


cdef double ring_retry_after(Ring* r, double now, int64_t need, int64_t limit) noexcept nogil:
    cdef int64_t ring = r.buckets + 1, k, excess
    if need > limit:
        return INFINITY
    ring_advance(r, ring_index(r, now))
    excess = r.total + need - limit
    if excess <= 0:
        return 0.0
    for k in range(r.head - r.buckets, r.head + 1):
        excess -= r.counts[_slot(k, ring)]
        if excess <= 0:
            # bucket k leaves the window when bucket k + ring begins
            return (k + ring) * r.width - now
    return INFINITY  # unreachable: the whole window frees everything


cdef list ring_buckets(Ring* r, double now):
    cdef int64_t ring = r.buckets + 1, k
    ring_advance(r, ring_index(r, now))
    return [(k, r.counts[_slot(k, ring)])
            for k in range(r.head - r.buckets, r.head + 1) if r.counts[_slot(k, ring)]]


cdef class SlidingWindow:
    """One sliding window on its own (the engine keeps its rings inside ``Keyed``)."""

    cdef Ring r
    cdef readonly double span

    def __cinit__(self, double span, int buckets=60):
        if not span > 0 or buckets < 1:
            raise ValueError("span must be > 0 and buckets >= 1")
        ring_init(&self.r, span, buckets)
        self.span = span

    def __dealloc__(self):
        free(self.r.counts)

    @property
    def buckets(self):
        return self.r.buckets

    @property
    def width(self):
        return self.r.width

    @property
    def total(self):
        return self.r.total

    def used(self, double now):
        """Sum counted in the window at ``now``."""
        return ring_used(&self.r, now)

    def add(self, double now, int64_t amount):
        """Add ``amount`` at ``now``; returns the bucket it landed in (for ``adjust``)."""
        return ring_add(&self.r, now, amount)

    def adjust(self, int64_t bucket, int64_t delta, double now):
        """Add ``delta`` (may be negative) to an earlier ``bucket`` if it is still in the
        window; returns whether it was. A bucket's count never goes below zero."""
        return ring_adjust(&self.r, bucket, delta, now)

    def retry_after(self, double now, int64_t need, int64_t limit):
        """Seconds until ``need`` more fits under ``limit``: 0 if it fits now, infinity
        if it never can (``need > limit``)."""
        return ring_retry_after(&self.r, now, need, limit)

    def buckets_in_window(self, double now):
        """``(absolute bucket, count)`` pairs with a non-zero count (for snapshots)."""
        return ring_buckets(&self.r, now)
