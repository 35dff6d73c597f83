# One counter under its rule (included by window.pyx; helpers of Core as functions of
# ``Core self``): what it has used, how long until a request fits, adjusting what a
# reservation put on it, and the durable spend a reservation leaves.


cdef inline void _gauge_down(Counter* c, int64_t amount) noexcept nogil:
    c.total = c.total - amount if c.total > amount else 0


cdef inline double _period_start(Core self, int kind, double now) except? -1:
    cdef int p = kind - K_HOUR
    if not (self.pstart[p] <= now < self.pend[p]):
        start, end = self.period_fn(kind == K_DAY, now)
        self.pstart[p] = start
        self.pend[p] = end
    return self.pstart[p]


cdef int64_t _used(Core self, CRule* r, Counter* c, double now) except? -1:
    cdef double start
    if r.kind == K_SLIDING:
        if c.ring.counts == NULL:
            return 0
        return ring_used(&c.ring, now)
    if r.kind == K_GAUGE:
        return c.total
    if r.kind == K_REQUEST:
        return 0
    start = _period_start(self, r.kind, now)
    if c.period != start:
        c.period = start
        c.total = 0
    return c.total


cdef double _window_retry(Core self, CRule* r, Counter* c, int64_t need, double now) except? -1:
    if need > r.amount:
        return INFINITY
    if r.kind == K_SLIDING:
        return ring_retry_after(&c.ring, now, need, r.amount)
    if r.kind == K_GAUGE:
        return INFINITY  # frees when a lease ends: no time can be promised
    _period_start(self, r.kind, now)
    return self.pend[r.kind - K_HOUR] - now


cdef int _adjust(Core self, Res* res, Counter* c, int64_t delta, double now) except -1:
    cdef CRule* r = &self.rules[res.rule]
    if not delta:
        return 0
    if r.kind == K_SLIDING:
        if c.ring.counts != NULL:
            ring_adjust(&c.ring, <int64_t>res.slot, delta, now)
        if r.pace > 0 and c.tat > -INFINITY:
            c.tat += delta * r.pace
    elif r.kind == K_HOUR or r.kind == K_DAY:
        if c.period == res.slot:
            c.total = max(0, c.total + delta)
    return 0


cdef object _spend(Core self, Res* res, str key, int64_t amount):
    cdef CRule* r = &self.rules[res.rule]
    if not amount or not r.durable:
        return None
    return self.spend_type(self.names[res.rule], self.shapes[res.rule], key, res.slot,
                           amount)
