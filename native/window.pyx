# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Sliding-window counters for the limits engine (compiled core). Time is always an argument.

A window of ``span`` seconds is split into ``buckets`` sub-buckets of ``width = span /
buckets`` seconds. An amount added at time ``t`` lands in bucket ``floor(t / width)``. At
time ``now`` (bucket ``b``) the window counts buckets ``b - buckets .. b``: ``buckets + 1``
of them, so every amount is counted for at least ``span`` seconds and at most ``span +
width``. Hence, exactly:

- the sum admitted in ANY interval of length ``span`` never exceeds the limit (no
  overshoot, unlike fixed windows);
- an amount is forgotten at most ``width = span / buckets`` later than an exact sliding log
  would forget it, so a request may be refused up to ``span / buckets`` early (with 60
  buckets: 1/60 of the window), and never admitted late;
- ``retry_after`` is exact for this model: the time until enough old buckets leave the
  window for the request to fit, assuming nothing else is added meanwhile.

Amounts are integers (requests, tokens, micro-dollars). Clocks that step backwards are
treated as standing still. Imported only by ``sidecar.limits``.
"""
from libc.math cimport floor, INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free


cdef inline int64_t _slot(int64_t bucket, int64_t ring) noexcept nogil:
    # C's % keeps the sign of a negative bucket (times before the epoch): fold it back
    cdef int64_t r = bucket % ring
    return r + ring if r < 0 else r


cdef class SlidingWindow:
    cdef int64_t* counts
    cdef readonly int buckets
    cdef readonly double span
    cdef readonly double width
    cdef int64_t head      # absolute index of the newest bucket
    cdef readonly int64_t total

    def __cinit__(self, double span, int buckets=60):
        if not span > 0 or buckets < 1:
            raise ValueError("span must be > 0 and buckets >= 1")
        self.counts = <int64_t*>calloc(buckets + 1, sizeof(int64_t))
        if self.counts == NULL:
            raise MemoryError()
        self.buckets = buckets
        self.span = span
        self.width = span / buckets
        self.head = 0
        self.total = 0

    def __dealloc__(self):
        free(self.counts)

    cdef inline int64_t _index(self, double now) noexcept nogil:
        return <int64_t>floor(now / self.width)

    cdef void _advance(self, int64_t b) noexcept nogil:
        cdef int64_t k, ring = self.buckets + 1
        if b <= self.head:
            return
        if b - self.head >= ring:
            for k in range(ring):
                self.counts[k] = 0
            self.total = 0
        else:
            for k in range(self.head + 1, b + 1):
                self.total -= self.counts[_slot(k, ring)]
                self.counts[_slot(k, ring)] = 0
        self.head = b

    cpdef int64_t used(self, double now):
        """Sum counted in the window at ``now``."""
        self._advance(self._index(now))
        return self.total

    cpdef int64_t add(self, double now, int64_t amount):
        """Add ``amount`` at ``now``; returns the bucket it landed in (for ``adjust``)."""
        cdef int64_t b = self._index(now)
        self._advance(b)
        if b < self.head:
            b = self.head
        self.counts[_slot(b, self.buckets + 1)] += amount
        self.total += amount
        return b

    cpdef bint adjust(self, int64_t bucket, int64_t delta, double now):
        """Add ``delta`` (may be negative) to an earlier ``bucket`` if it is still in the
        window; returns whether it was. A bucket's count never goes below zero."""
        cdef int64_t ring = self.buckets + 1, i, old
        self._advance(self._index(now))
        if bucket > self.head or bucket <= self.head - ring:
            return False
        i = _slot(bucket, ring)
        old = self.counts[i]
        if old + delta < 0:
            delta = -old
        self.counts[i] = old + delta
        self.total += delta
        return True

    cpdef double retry_after(self, double now, int64_t need, int64_t limit):
        """Seconds until ``need`` more fits under ``limit``: 0 if it fits now, infinity
        if it never can (``need > limit``)."""
        cdef int64_t ring = self.buckets + 1, k, excess
        if need > limit:
            return INFINITY
        self._advance(self._index(now))
        excess = self.total + need - limit
        if excess <= 0:
            return 0.0
        for k in range(self.head - self.buckets, self.head + 1):
            excess -= self.counts[_slot(k, ring)]
            if excess <= 0:
                # bucket k leaves the window when bucket k + ring begins
                return (k + ring) * self.width - now
        return INFINITY  # unreachable: the whole window frees everything

    def is_empty(self, double now) -> bool:
        return self.used(now) == 0

    def buckets_in_window(self, double now):
        """``(absolute bucket, count)`` pairs with a non-zero count (for snapshots)."""
        cdef int64_t ring = self.buckets + 1, k
        self._advance(self._index(now))
        return [(k, self.counts[_slot(k, ring)])
                for k in range(self.head - self.buckets, self.head + 1)
                if self.counts[_slot(k, ring)]]
