# The records an admit works with (included by window.pyx): Keyed, the counters of one
# key; Decision, an admit's outcome; Lease, what an admit reserved; and the loading of a
# request's amounts, checked before any of them is used.


#: The largest amount one request may carry in one unit (tokens, micro-dollars): sums of
#: two and of many requests in one counter stay far inside int64. The wire's bounds
#: (``sidecar.wire``) are tighter; this guards the engine against its own callers.
cdef int64_t MAX_NEED = 1LL << 56


@cython.no_gc  # holds its key string only
cdef class Keyed:
    """The counters of one key (a user, a model, ...) for every rule of its key space."""

    cdef Counter* c
    cdef unsigned char* applies  # per position: the rule covers this key (model/route match)
    cdef int n
    cdef int held                # open leases reserving on this record
    cdef readonly str key

    def __dealloc__(self):
        cdef int i
        if self.c != NULL:
            for i in range(self.n):
                free(self.c[i].ring.counts)
        free(self.c)
        free(self.applies)


@cython.no_gc  # holds tuples and strings only: never part of a cycle
@cython.freelist(64)
cdef class Decision:
    """The outcome of an admit: ``allowed`` with a ``lease``, or ``denial`` (a
    ``sidecar.limits.engine.Denial``), the ``estimate`` reserved, limits left ``near`` their
    amount, ``shadow_denials`` (shadow rules that would have denied), alert thresholds
    ``crossed`` (``"name@80%"``) and, on tracked rules (``Core._track``), what was
    ``tracked``: ``(rule index, key, amount)`` per rule reserved."""

    cdef readonly bint allowed
    cdef readonly str lease
    cdef readonly object denial
    cdef readonly object estimate
    cdef readonly tuple near
    cdef readonly tuple shadow_denials
    cdef readonly tuple crossed
    cdef readonly tuple tracked

    def __repr__(self):
        return (f"Decision(allowed={self.allowed!r}, lease={self.lease!r}, "
                f"denial={self.denial!r}, estimate={self.estimate!r}, near={self.near!r}, "
                f"shadow_denials={self.shadow_denials!r}, crossed={self.crossed!r})")


cdef tuple EMPTY = ()


cdef Decision _decision(bint allowed, str lease, object denial, object estimate, tuple near,
                        tuple shadow, tuple crossed):
    cdef Decision d = Decision.__new__(Decision)
    d.allowed = allowed
    d.lease = lease
    d.denial = denial
    d.estimate = estimate
    d.near = near
    d.shadow_denials = shadow
    d.crossed = crossed
    d.tracked = EMPTY
    return d


cdef int _load_amounts(object amounts_, int64_t* out) except -1:
    """``(input, output, micro_usd[, requests])`` into ``out``: requests, input, output,
    total and micro-dollars, each checked before anything is changed with them. Returns
    1 when ``requests`` was given (a slice of several calls, or what a slice used), else
    0 (one call: 1 request)."""
    if not isinstance(amounts_, tuple) or len(<tuple>amounts_) < 3:
        raise TypeError("amounts must be an (input, output, micro_usd) (named) tuple")
    cdef tuple amounts = <tuple>amounts_
    cdef int i, n = 4 if len(amounts) > 3 else 3
    for i in range(n):
        v = amounts[i]
        if not isinstance(v, int) or not 0 <= v <= MAX_NEED:
            raise ValueError(f"amount {v!r} out of range: 0 to {MAX_NEED}")
    out[0] = amounts[3] if n == 4 else 1
    out[1] = amounts[0]
    out[2] = amounts[1]
    out[3] = out[1] + out[2]
    out[4] = amounts[2]
    return n == 4


@cython.no_gc  # holds tuples, strings and Keyed records only: never part of a cycle
@cython.freelist(64)
cdef class Lease:
    cdef readonly str id
    cdef readonly object subject
    cdef readonly object estimate
    cdef double expires
    cdef int state
    cdef readonly long owner   # the uid of the peer that took it (-1: any)
    cdef readonly int64_t micro_usd  # what its settle recorded
    cdef Keyed k0, k1, k2, k3   # the records reserved on, by key space (None if unused)
    cdef Res* res
    cdef int n

    def __dealloc__(self):
        free(self.res)

    cdef inline Keyed keyed(self, int space):
        if space == S_GLOBAL:
            return self.k0
        if space == S_WHO:
            return self.k1
        if space == S_MODEL:
            return self.k2
        return self.k3

    cdef void hold(self, int step):
        if self.k0 is not None:
            self.k0.held += step
        if self.k1 is not None:
            self.k1.held += step
        if self.k2 is not None:
            self.k2.held += step
        if self.k3 is not None:
            self.k3.held += step
