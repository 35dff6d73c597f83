# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The limits engine's compiled core: window counters, the rule table, admit/settle/release
over C records. Time is always an argument; nothing here reads a clock or does I/O.

Sliding windows. A window of ``span`` seconds is split into ``buckets`` sub-buckets of
``width = span / buckets`` seconds. An amount added at time ``t`` lands in bucket
``floor(t / width)``. At time ``now`` (bucket ``b``) the window counts buckets
``b - buckets .. b``: ``buckets + 1`` of them, so every amount is counted for at least
``span`` seconds and at most ``span + width``. Hence, exactly:

- the sum admitted in ANY interval of length ``span`` never exceeds the limit (no
  overshoot, unlike fixed windows);
- an amount is forgotten at most ``width = span / buckets`` later than an exact sliding log
  would forget it, so a request may be refused up to ``span / buckets`` early (with 60
  buckets: 1/60 of the window), and never admitted late;
- ``retry_after`` is exact for this model: the time until enough old buckets leave the
  window for the request to fit, assuming nothing else is added meanwhile.

Burst allowance (pacing). A sliding rule may also carry ``burst = B`` seconds: then its
amount must also be spent at the steady pace ``amount / span``, with a client allowed to
run at most ``B`` seconds ahead of that pace (the generic cell rate algorithm with
tolerance ``B``). With ``T = span / amount`` seconds per unit, a counter keeps a
theoretical arrival time ``tat``; a request of ``n`` units at ``now`` passes when
``tat - now <= B`` and then sets ``tat = max(tat, now) + n * T``; otherwise it is denied
(reason ``burst``) with ``retry_after = tat - B - now``, exact. So 30 per 60 s with
``B = 2`` lets two requests through back to back and then one every 2 s, while the window
still caps any 60 s at 30. A request of any size passes when the caller is on pace: pacing
delays what follows a large request instead of refusing it forever.

Calendar totals count one period (hour or day in the engine's zone; the engine passes the
period's start). Gauges (concurrent requests) count open leases.

The rule table groups counters by key space: one for global rules, one per user or
anonymous key (user and tier rules), one per model, one per route. A key's counters live
in one ``Keyed`` record, so an admit does one dictionary lookup per key space, then C.
Leases are C arrays of reservations. Amounts are integers (requests, tokens,
micro-dollars). Clocks that step backwards are treated as standing still. Imported only
by ``sidecar.limits``, which owns validation, names and documentation of the public API.
"""
cimport cython
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.math cimport floor, INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

import os
from collections import OrderedDict

# Rule kinds and key spaces; sidecar.limits maps its enums to these numbers.
cdef enum:
    K_SLIDING = 0
    K_HOUR = 1
    K_DAY = 2
    K_REQUEST = 3
    K_GAUGE = 4

cdef enum:
    S_GLOBAL = 0
    S_WHO = 1
    S_MODEL = 2
    S_ROUTE = 3
    NSPACES = 4

cdef const char* HEX = b"0123456789abcdef"

#: The largest amount one request may carry in one unit (tokens, micro-dollars): sums of
#: two and of many requests in one counter stay far inside int64. The wire's bounds
#: (``sidecar.protocol``) are tighter; this guards the engine against its own callers.
cdef int64_t MAX_NEED = 1LL << 56

cdef enum:
    L_OPEN = 0
    L_SETTLED = 1
    L_RELEASED = 2
    L_EXPIRED = 3

KINDS = {"sliding": K_SLIDING, "hour": K_HOUR, "day": K_DAY, "request": K_REQUEST,
         "gauge": K_GAUGE}
SPACES = {"global": S_GLOBAL, "user": S_WHO, "tier": S_WHO, "model": S_MODEL,
          "route": S_ROUTE}

# --- sliding-window rings ---------------------------------------------------------------

ctypedef struct Ring:
    int64_t* counts  # buckets + 1 slots; NULL until first used
    int64_t head     # absolute index of the newest bucket
    int64_t total
    int buckets
    double width


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


# --- the rule table -----------------------------------------------------------------------

ctypedef struct CRule:
    int kind
    int space
    int pos          # index of its counter in a Keyed record of its space
    int need_at      # 0 request, 1 input, 2 output, 3 total tokens, 4 micro-USD
    int tier         # tier rules: 1 authenticated, 2 anonymous; else 0 (any)
    int buckets
    double span
    int64_t amount
    bint shadow
    bint durable     # its spend must survive a crash (long sliding window or calendar)
    double pace      # seconds per unit when it has a burst allowance, else 0
    double tolerance # the burst allowance, seconds
    double near_at   # used at or above this is "near"
    bint tracked     # admits report what they reserved on it (``Decision.tracked``)


ctypedef struct Counter:
    Ring ring        # sliding
    int64_t total    # calendar (this period) or gauge
    double period    # calendar: start of the period ``total`` counts
    double tat       # pacing: theoretical arrival time
    bint live        # touched since the record was made (listed by ``counters``)


cdef inline void _gauge_down(Counter* c, int64_t amount) noexcept nogil:
    c.total = c.total - amount if c.total > amount else 0


ctypedef struct Res:
    int rule
    int space
    double slot      # bucket (sliding) or period start (calendar)
    int64_t amount


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
    ``sidecar.limits.Denial``), the ``estimate`` reserved, limits left ``near`` their
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
    """``(input, output, micro_usd)`` into ``out``: requests, input, output, total and
    micro-dollars, each checked before anything is changed with them."""
    if not isinstance(amounts_, tuple) or len(<tuple>amounts_) < 3:
        raise TypeError("amounts must be an (input, output, micro_usd) (named) tuple")
    cdef tuple amounts = <tuple>amounts_
    cdef int i
    for i in range(3):
        v = amounts[i]
        if not isinstance(v, int) or not 0 <= v <= MAX_NEED:
            raise ValueError(f"amount {v!r} out of range: 0 to {MAX_NEED}")
    out[0] = 1
    out[1] = amounts[0]
    out[2] = amounts[1]
    out[3] = out[1] + out[2]
    out[4] = amounts[2]
    return 0


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




cdef class Core:
    """Rules, counters and leases. ``sidecar.limits.Engine`` subclasses it and supplies
    the rule table (``_load_rules``), calendar periods (``_period``) and the result types."""

    cdef CRule* rules
    cdef int nrules
    cdef int nspace[4]           # rules per key space
    cdef list names              # rule names, by index
    cdef list shapes             # rule shapes (for Spend records), by index
    cdef list matches            # rule match strings, by index
    cdef list labels             # per rule: ("name@50%", ...) by alert threshold
    cdef double* alerts          # alert thresholds as fractions, ascending
    cdef int nalerts
    cdef Keyed glob
    cdef dict who, models, routes
    cdef dict leases             # open leases in admission order = expiry order
    cdef object done             # OrderedDict of ended leases, for idempotence
    cdef Py_ssize_t remembered
    cdef double oldest           # no open lease expires before this
    cdef double pstart[2]        # cached hour and day periods
    cdef double pend[2]
    cdef object recent           # OrderedDict (who, fingerprint) -> list of admit times,
                                 # least recently admitted first
    cdef list pending            # spend of leases expired inside admit, not yet taken
    cdef list sweep
    cdef Res* scratch            # admit's plan, one row per rule
    cdef int64_t* scratch_used
    cdef char idbuf[64]          # lease id being formatted: prefix "-" 32 hex digits
    cdef int idlen               # length of the prefix and its "-"
    cdef bytes entropy           # random bytes for lease ids, used 16 at a time
    cdef Py_ssize_t epos
    cdef object denial_type, spend_type, settle_type, period_fn
    cdef public double lease_ttl
    cdef double near
    cdef public int retry_loop_max
    cdef public double retry_loop_window
    cdef public Py_ssize_t retry_loop_max_keys
    cdef public Py_ssize_t max_owned  # open leases one owner may hold (0: no cap)
    cdef dict owned                   # owner uid -> open leases it holds (none: absent)
    cdef readonly int64_t retry_loop_forgotten  # keys still in their window dropped at the cap

    def __cinit__(self, *args, **kwargs):
        self.rules = NULL
        self.alerts = NULL
        self.scratch = NULL
        self.scratch_used = NULL
        self.nrules = 0
        self.nalerts = 0

    def __dealloc__(self):
        free(self.rules)
        free(self.alerts)
        free(self.scratch)
        free(self.scratch_used)

    def _init_core(self, str prefix, Py_ssize_t remembered, denial_type, spend_type,
                   settle_type, period_fn):
        """``period_fn(is_day, now) -> (start, end)``: the calendar hour or day holding
        ``now``; the result types are ``sidecar.limits``' named tuples."""
        self.period_fn = period_fn
        raw = prefix.encode("ascii") + b"-"
        if len(raw) > 24:
            raise ValueError("lease id prefix too long")
        memcpy(self.idbuf, <char*>raw, len(raw))
        self.idlen = len(raw)
        self.remembered = remembered
        self.denial_type = denial_type
        self.spend_type = spend_type
        self.settle_type = settle_type
        self.who = {}
        self.models = {}
        self.routes = {}
        self.leases = {}
        self.owned = {}
        self.max_owned = 0
        self.done = OrderedDict()
        self.recent = OrderedDict()
        self.retry_loop_max_keys = 10_000
        self.retry_loop_forgotten = 0
        self.pending = []
        self.sweep = []
        self.oldest = INFINITY
        self.entropy = b""
        self.epos = 0
        self.glob = None
        self._forget_periods()

    def _forget_periods(self):
        self.pstart[0] = self.pstart[1] = INFINITY
        self.pend[0] = self.pend[1] = -INFINITY

    def _load_rules(self, list table, list names, list shapes, list matches,
                    alert_thresholds, list remap=None):
        """Install the rule table: one row per rule, ``(kind, space, need_at, tier,
        span, buckets, amount, shadow, durable, burst)``. ``remap[i]`` is the new index
        of old rule ``i`` (or -1): counters and reservations of kept rules move, the
        others are dropped. Without ``remap`` all counters start empty."""
        cdef int n = len(table), i, j, s
        cdef CRule* rules = <CRule*>calloc(max(n, 1), sizeof(CRule))
        cdef double* alerts
        if rules == NULL:
            raise MemoryError()
        free(self.scratch)
        free(self.scratch_used)
        self.scratch = <Res*>malloc(max(n, 1) * sizeof(Res))
        self.scratch_used = <int64_t*>malloc(max(n, 1) * sizeof(int64_t))
        if self.scratch == NULL or self.scratch_used == NULL:
            free(rules)
            raise MemoryError()
        cdef int counts[4]
        counts[0] = counts[1] = counts[2] = counts[3] = 0
        for i, row in enumerate(table):
            kind, space, need_at, tier, span, buckets, amount, shadow, durable, burst = row
            rules[i].kind = kind
            rules[i].space = space
            rules[i].pos = counts[space]
            counts[space] += 1
            rules[i].need_at = need_at
            rules[i].tier = tier
            rules[i].span = span
            rules[i].buckets = buckets
            rules[i].amount = amount
            rules[i].shadow = shadow
            rules[i].durable = durable
            rules[i].pace = span / amount if burst > 0 else 0.0
            rules[i].tolerance = burst
        thresholds = sorted(alert_thresholds)
        alerts = <double*>calloc(max(len(thresholds), 1), sizeof(double))
        if alerts == NULL:
            free(rules)
            raise MemoryError()
        for j, t in enumerate(thresholds):
            alerts[j] = t
        cdef CRule* old = self.rules
        cdef int old_count = self.nrules
        self.rules = rules
        self.nrules = n
        for s in range(NSPACES):
            self.nspace[s] = counts[s]
        free(self.alerts)
        self.alerts = alerts
        self.nalerts = len(thresholds)
        self.names = list(names)
        self.shapes = list(shapes)
        self.matches = list(matches)
        self.labels = [tuple(f"{name}@{t:.0%}" for t in thresholds) for name in names]
        self.near_fraction = self.near
        try:
            if remap is None or old == NULL:
                self.glob = None
                self.who, self.models, self.routes = {}, {}, {}
            else:
                self._remap(old, old_count, remap)
        finally:
            free(old)
        self.sweep = []
        self._forget_periods()

    def _track(self, list flags):
        """Mark the rules whose reservations admits report in ``Decision.tracked``
        (``flags[i]`` for rule ``i``; the cluster shares their counters). Reset by every
        ``_load_rules``."""
        if len(flags) != self.nrules:
            raise ValueError(f"{len(flags)} flags for {self.nrules} rules")
        for i, flag in enumerate(flags):
            self.rules[i].tracked = bool(flag)

    @property
    def near_fraction(self):
        """Use at or above this fraction of an amount is reported as near."""
        return self.near

    @near_fraction.setter
    def near_fraction(self, double fraction):
        cdef int i
        self.near = fraction
        for i in range(self.nrules):
            self.rules[i].near_at = fraction * self.rules[i].amount

    cdef int _remap(self, CRule* old, int old_count, list remap) except -1:
        cdef int i, j, s, newi
        cdef Keyed k, fresh
        cdef Lease lease
        cdef Res* res
        for s, space in ((S_GLOBAL, None), (S_WHO, self.who), (S_MODEL, self.models),
                         (S_ROUTE, self.routes)):
            records = ([] if self.glob is None else [self.glob]) if space is None \
                else list(space.values())
            for k in records:
                fresh = self._new_keyed(s, k.key)
                for i in range(old_count):
                    newi = remap[i]
                    if old[i].space != s or newi < 0:
                        continue
                    j = self.rules[newi].pos
                    memcpy(&fresh.c[j], &k.c[old[i].pos], sizeof(Counter))
                    k.c[old[i].pos].ring.counts = NULL  # moved, not freed twice
                fresh.held = k.held
                if space is None:
                    self.glob = fresh
                else:
                    space[k.key] = fresh
        for collection in (self.leases.values(), self.done.values()):
            for lease in collection:
                j = 0
                for i in range(lease.n):
                    newi = remap[lease.res[i].rule]
                    if newi >= 0:
                        lease.res[j] = lease.res[i]
                        lease.res[j].rule = newi
                        j += 1
                lease.n = j
                # point the lease at the fresh records of its keys
                lease.k0 = self.glob if lease.k0 is not None else None
                if lease.k1 is not None:
                    lease.k1 = self.who.get(lease.k1.key)
                if lease.k2 is not None:
                    lease.k2 = self.models.get(lease.k2.key)
                if lease.k3 is not None:
                    lease.k3 = self.routes.get(lease.k3.key)
        return 0

    cdef Keyed _new_keyed(self, int space, str key):
        cdef Keyed k = Keyed.__new__(Keyed)
        cdef int n = self.nspace[space], i, pos
        cdef CRule* r
        k.key = key
        k.n = n
        k.held = 0
        k.c = <Counter*>calloc(max(n, 1), sizeof(Counter))
        k.applies = <unsigned char*>calloc(max(n, 1), 1)
        if k.c == NULL or k.applies == NULL:
            raise MemoryError()
        for i in range(self.nrules):
            r = &self.rules[i]
            if r.space != space:
                continue
            pos = r.pos
            k.c[pos].period = -INFINITY
            k.c[pos].tat = -INFINITY
            match = self.matches[i]
            if space == S_MODEL:
                k.applies[pos] = key.startswith(match)
            elif space == S_ROUTE:
                k.applies[pos] = not match or key == match
            else:
                k.applies[pos] = 1
        return k

    cdef Keyed _keyed(self, int space, str key):
        """The record of ``key`` in ``space``, made when first needed."""
        cdef dict d
        cdef Keyed k
        if space == S_GLOBAL:
            if self.glob is None:
                self.glob = self._new_keyed(S_GLOBAL, "")
            return self.glob
        d = self.who if space == S_WHO else self.models if space == S_MODEL else self.routes
        found = d.get(key)
        if found is not None:
            return <Keyed>found
        k = self._new_keyed(space, key)
        d[key] = k
        return k

    # -- counters --------------------------------------------------------------------

    cdef inline double _period_start(self, int kind, double now) except? -1:
        cdef int p = kind - K_HOUR
        if not (self.pstart[p] <= now < self.pend[p]):
            start, end = self.period_fn(kind == K_DAY, now)
            self.pstart[p] = start
            self.pend[p] = end
        return self.pstart[p]

    cdef int64_t _used(self, CRule* r, Counter* c, double now) except? -1:
        cdef double start
        if r.kind == K_SLIDING:
            if c.ring.counts == NULL:
                return 0
            return ring_used(&c.ring, now)
        if r.kind == K_GAUGE:
            return c.total
        if r.kind == K_REQUEST:
            return 0
        start = self._period_start(r.kind, now)
        if c.period != start:
            c.period = start
            c.total = 0
        return c.total

    cdef double _window_retry(self, CRule* r, Counter* c, int64_t need, double now) except? -1:
        if need > r.amount:
            return INFINITY
        if r.kind == K_SLIDING:
            return ring_retry_after(&c.ring, now, need, r.amount)
        if r.kind == K_GAUGE:
            return INFINITY  # frees when a lease ends: no time can be promised
        self._period_start(r.kind, now)
        return self.pend[r.kind - K_HOUR] - now

    cdef int _adjust(self, Res* res, Counter* c, int64_t delta, double now) except -1:
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

    cdef object _spend(self, Res* res, str key, int64_t amount):
        cdef CRule* r = &self.rules[res.rule]
        if not amount or not r.durable:
            return None
        return self.spend_type(self.names[res.rule], self.shapes[res.rule], key, res.slot,
                               amount)

    # -- admit / settle / release ------------------------------------------------------

    def admit(self, subject_, estimate_, double now, bytes fingerprint=b"", long owner=-1):
        """Reserve ``estimate`` (``(input, output, micro_usd)``) for ``subject`` (``(user,
        key, model, route)``) on every applicable rule, all or none. The lease belongs
        to ``owner`` (a uid; -1: anyone may end it)."""
        if not isinstance(subject_, tuple):
            raise TypeError("subject must be a (named) tuple")
        cdef int64_t needs[5]
        _load_amounts(estimate_, needs)
        cdef tuple subject = <tuple>subject_, estimate = <tuple>estimate_
        cdef str user = subject[0], model = subject[2], route = subject[3]
        cdef int tier, s, i, p, nplan = 0
        cdef bint never, best_never = False
        cdef double best_wait = -1.0, wait
        cdef Keyed kg = None, kw = None, km = None, kr = None, k
        cdef CRule* r
        cdef Counter* c
        cdef int64_t need, used, after, denied_used = 0, denied_amount = 0
        cdef Lease lease
        cdef Res* res
        cdef int64_t* useds
        cdef list shadow = None, near = None, crossed = None, tracked = None
        cdef Decision decision
        cdef str denied = None, denied_rule = None, reason
        if now >= self.oldest:
            self._expire(now, self.pending)
        if fingerprint and self.retry_loop_max:
            denial = self._retry_loop(subject, fingerprint, now)
            if denial is not None:
                return _decision(False, "", denial, estimate, EMPTY, EMPTY, EMPTY)
        if owner >= 0 and self.max_owned:  # one peer's open leases are bounded (memory)
            held = self.owned.get(owner, 0)
            if held >= self.max_owned:
                denial = self.denial_type("open_leases", "limit", held, self.max_owned,
                                          INFINITY, False)
                return _decision(False, "", denial, estimate, EMPTY, EMPTY, EMPTY)
        tier = 1 if user else 2
        if self.nspace[S_GLOBAL]:
            kg = self._keyed(S_GLOBAL, "")
        if self.nspace[S_WHO]:
            kw = self._keyed(S_WHO, user or subject[1])
        if model and self.nspace[S_MODEL]:
            km = self._keyed(S_MODEL, model)
        if route and self.nspace[S_ROUTE]:
            kr = self._keyed(S_ROUTE, route)
        res = self.scratch
        useds = self.scratch_used
        for i in range(self.nrules):
            r = &self.rules[i]
            k = kg if r.space == S_GLOBAL else kw if r.space == S_WHO else \
                km if r.space == S_MODEL else kr
            if k is None or not k.applies[r.pos] or (r.tier and r.tier != tier):
                continue
            need = needs[r.need_at]
            never = need > r.amount
            wait = -1.0
            used = 0
            reason = "limit"
            if r.kind == K_REQUEST:
                if never:
                    wait = INFINITY
            else:
                c = &k.c[r.pos]
                if r.kind == K_SLIDING and c.ring.counts == NULL:
                    ring_init(&c.ring, r.span, r.buckets)
                c.live = True
                used = self._used(r, c, now)
                if used + need > r.amount:
                    wait = INFINITY if never else self._window_retry(r, c, need, now)
                if r.pace > 0 and c.tat - now > r.tolerance:
                    if wait < 0:
                        reason = "burst"
                    wait = max(wait, c.tat - r.tolerance - now)
                res[nplan].rule = i
                res[nplan].space = r.space
                res[nplan].amount = need
                useds[nplan] = used
                nplan += 1
            if wait < 0:
                continue
            if r.shadow:
                if shadow is None:
                    shadow = []
                shadow.append(self.names[i])
            elif denied is None or (never, wait) > (best_never, best_wait):
                best_never, best_wait = never, wait
                denied, denied_rule = reason, self.names[i]
                denied_used, denied_amount = used, r.amount
        if denied is not None:
            denial = self.denial_type(denied_rule, denied, denied_used, denied_amount,
                                      best_wait, best_never)
            return _decision(False, "", denial, estimate, EMPTY,
                             EMPTY if shadow is None else tuple(shadow), EMPTY)
        for p in range(nplan):
            i = res[p].rule
            r = &self.rules[i]
            k = kg if r.space == S_GLOBAL else kw if r.space == S_WHO else \
                km if r.space == S_MODEL else kr
            c = &k.c[r.pos]
            need = res[p].amount
            if r.kind == K_SLIDING:
                res[p].slot = ring_add(&c.ring, now, need)
                if r.pace > 0:
                    c.tat = (c.tat if c.tat > now else now) + need * r.pace
            elif r.kind == K_GAUGE:
                c.total += need
                res[p].slot = 0.0
            else:
                c.total += need
                res[p].slot = c.period
            if r.tracked:
                if tracked is None:
                    tracked = []
                tracked.append((i, k.key, need))
            used = useds[p]
            after = used + need
            if after >= r.near_at:
                if near is None:
                    near = []
                near.append(self.names[i])
            if self.nalerts and after >= self.alerts[0] * r.amount:
                for s in range(self.nalerts):
                    if used < self.alerts[s] * r.amount <= after:
                        if crossed is None:
                            crossed = []
                        crossed.append(self.labels[i][s])
        lease = Lease.__new__(Lease)
        lease.res = <Res*>malloc(max(nplan, 1) * sizeof(Res))
        if lease.res == NULL:
            raise MemoryError()
        memcpy(lease.res, res, nplan * sizeof(Res))
        lease.n = nplan
        lease.id = self._next_id()
        lease.subject = subject
        lease.estimate = estimate
        lease.expires = now + self.lease_ttl
        if lease.expires < self.oldest:
            self.oldest = lease.expires
        lease.state = L_OPEN
        lease.owner = owner
        lease.micro_usd = 0
        lease.k0, lease.k1, lease.k2, lease.k3 = kg, kw, km, kr
        lease.hold(1)
        self.leases[lease.id] = lease
        if owner >= 0:
            self.owned[owner] = self.owned.get(owner, 0) + 1
        decision = _decision(True, lease.id, None, estimate,
                             EMPTY if near is None else tuple(near),
                             EMPTY if shadow is None else tuple(shadow),
                             EMPTY if crossed is None else tuple(crossed))
        if tracked is not None:
            decision.tracked = tuple(tracked)
        return decision

    cdef str _next_id(self):
        """``prefix-`` and 128 random bits in hex: unguessable, so no peer can name
        another's lease. Random bytes come from ``os.urandom`` 4 KiB at a time, which
        keeps the syscall off nearly every admit."""
        cdef const unsigned char* raw
        cdef int i
        if self.epos + 16 > len(self.entropy):
            self.entropy = os.urandom(4096)
            self.epos = 0
        raw = <const unsigned char*>(<char*>self.entropy) + self.epos
        self.epos += 16
        for i in range(16):
            self.idbuf[self.idlen + 2 * i] = HEX[raw[i] >> 4]
            self.idbuf[self.idlen + 2 * i + 1] = HEX[raw[i] & 15]
        return PyUnicode_DecodeASCII(self.idbuf, self.idlen + 32, NULL)

    cdef object _retry_loop(self, tuple subject, bytes fingerprint, double now):
        cdef double cutoff = now - self.retry_loop_window
        cdef list times
        cdef Py_ssize_t n = 0
        key = (subject[0] or subject[1], fingerprint)
        found = self.recent.get(key)
        if found is None:
            # two at most, so an admit's work stays bounded; one more than it adds, so the
            # map also shrinks back under a cap that a reload lowered
            self._prune_recent(cutoff, 2, self.retry_loop_max_keys - 1)
            times = self.recent[key] = []
        else:
            times = <list>found
            while n < len(times) and <double>times[n] <= cutoff:
                n += 1
            del times[:n]
        if len(times) >= self.retry_loop_max:
            return self.denial_type("retry_loop", "retry_loop", len(times), self.retry_loop_max,
                                    times[0] + self.retry_loop_window - now, False)
        times.append(now)
        self.recent.move_to_end(key)  # keeps the map ordered by latest admit: oldest first
        return None

    cdef Py_ssize_t _prune_recent(self, double cutoff, Py_ssize_t budget,
                                  Py_ssize_t keep) except -1:
        """Drop up to ``budget`` retry-loop keys from the oldest on: those whose latest
        admit left the window, and while more than ``keep`` remain, the oldest at all."""
        cdef Py_ssize_t dropped = 0
        cdef list times
        while dropped < budget and self.recent:
            key, times = self.recent.popitem(last=False)
            if times and <double>times[len(times) - 1] > cutoff:  # still in its window
                if len(self.recent) >= keep:
                    self.retry_loop_forgotten += 1
                else:
                    self.recent[key] = times
                    self.recent.move_to_end(key, last=False)
                    break
            dropped += 1
        return dropped

    cdef Lease _find(self, str lease_id, long owner):
        """The lease, open or remembered, when ``owner`` may see it (else None)."""
        lease = self.leases.get(lease_id)
        if lease is None:
            lease = self.done.get(lease_id)
        if lease is None or (owner >= 0 and (<Lease>lease).owner >= 0
                             and (<Lease>lease).owner != owner):
            return None
        return <Lease>lease

    def settle(self, str lease_id, usage_, double now, long owner=-1):
        """Replace the lease's estimate by ``usage`` ``(input, output, micro_usd)``.
        Settling again, or after a release, changes nothing and reports what was
        recorded. Another ``owner``'s lease is not found."""
        cdef bint expired = False
        cdef int64_t actual[5]
        cdef int i
        cdef Res* res
        cdef CRule* r
        cdef Keyed k
        cdef int64_t amount
        _load_amounts(usage_, actual)  # before the lease is touched: all or nothing
        cdef Lease lease = self._find(lease_id, owner)
        if lease is None:
            return self.settle_type(False, False, False)
        if lease.state == L_OPEN:
            del self.leases[lease_id]
            lease.hold(-1)
            self._disown(lease)
        elif lease.state != L_EXPIRED:
            return self.settle_type(True, True, False, (), lease.micro_usd,
                                    lease.state == L_RELEASED)
        else:
            expired = True
        spent = []
        for i in range(lease.n):
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            if k is None:
                continue
            key = k.key
            if r.kind == K_GAUGE:
                if not expired:
                    _gauge_down(&k.c[r.pos], res.amount)
                continue
            amount = res.amount if r.need_at == 0 else actual[r.need_at]
            if expired:  # its records may have been evicted (and made again) since
                k = self._current(res.space, k)
            if k is not None:
                self._adjust(res, &k.c[r.pos], amount - res.amount, now)
            # an expired lease's estimate was persisted at expiry: persist the difference
            spend = self._spend(res, key, amount - res.amount if expired else amount)
            if spend is not None:
                spent.append(spend)
        lease.state = L_SETTLED
        lease.micro_usd = actual[4]
        self._remember(lease)
        return self.settle_type(True, False, expired, tuple(spent), actual[4])

    def extend(self, str lease_id, usage_, double now, long owner=-1):
        """Grow an open lease's reservation to ``usage`` ``(input, output, micro_usd)``
        when that is more than it holds (a stream past its estimate), on every rule or
        none. Returns a denial (as ``admit``'s) or None."""
        cdef int64_t want[5]
        cdef int64_t delta, used
        cdef int i
        cdef Res* res
        cdef CRule* r
        cdef Keyed k
        _load_amounts(usage_, want)
        cdef Lease lease = self._find(lease_id, owner)
        if lease is None or lease.state != L_OPEN:
            return self.denial_type("lease", "unknown_lease", 0, 0, INFINITY, True)
        for i in range(lease.n):  # check everything first: all or none
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            delta = want[r.need_at] - res.amount
            if k is None or delta <= 0 or r.kind == K_GAUGE or r.shadow:
                continue
            used = self._used(r, &k.c[r.pos], now)
            if used + delta > r.amount:
                return self.denial_type(self.names[res.rule], "limit", used, r.amount,
                                        self._window_retry(r, &k.c[r.pos], delta, now),
                                        delta > r.amount)
        for i in range(lease.n):
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            delta = want[r.need_at] - res.amount
            if k is None or delta <= 0 or r.kind == K_GAUGE:
                continue
            self._adjust(res, &k.c[r.pos], delta, now)
            res.amount += delta
        return None

    def release(self, str lease_id, double now, long owner=-1):
        """Cancel an unused reservation: every amount it reserved is given back."""
        cdef Lease lease = self._find(lease_id, owner)
        cdef int i
        cdef Res* res
        cdef CRule* r
        cdef Keyed k
        if lease is None or lease.state != L_OPEN:
            return False
        del self.leases[lease_id]
        for i in range(lease.n):
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            if k is None:
                continue
            if r.kind == K_GAUGE:
                _gauge_down(&k.c[r.pos], res.amount)
            else:
                self._adjust(res, &k.c[r.pos], -res.amount, now)
        self._close(lease, L_RELEASED)
        return True

    cdef int _expire(self, double now, list spent) except -1:
        cdef Lease lease
        cdef int count = 0, i
        cdef Res* res
        cdef CRule* r
        cdef Keyed k
        due = []
        self.oldest = INFINITY
        for lease in self.leases.values():
            if lease.expires > now:
                self.oldest = lease.expires
                break
            due.append(lease)
        for lease in due:
            del self.leases[lease.id]
            for i in range(lease.n):
                res = &lease.res[i]
                r = &self.rules[res.rule]
                k = lease.keyed(res.space)
                if k is None:
                    continue
                if r.kind == K_GAUGE:
                    _gauge_down(&k.c[r.pos], res.amount)
                else:
                    spend = self._spend(res, k.key, res.amount)
                    if spend is not None:
                        spent.append(spend)
            self._close(lease, L_EXPIRED)
            count += 1
        return count

    def expire(self, double now):
        """Expire leases past their TTL: the estimate stays spent (returned, to persist,
        with that of leases an admit expired since the last call), the concurrency slot
        is freed. Returns ``(leases expired, spend)``."""
        spent, self.pending = self.pending, []
        count = self._expire(now, spent) if now >= self.oldest else 0
        return count, spent

    cdef void _disown(self, Lease lease):
        """An open lease ends: its owner holds one fewer."""
        cdef Py_ssize_t left
        if lease.owner >= 0:
            left = self.owned[lease.owner] - 1
            if left:
                self.owned[lease.owner] = left
            else:
                del self.owned[lease.owner]

    cdef void _close(self, Lease lease, int state):
        """An open lease ends: its records are no longer held, and it is remembered."""
        lease.hold(-1)
        self._disown(lease)
        lease.state = state
        self._remember(lease)

    cdef void _remember(self, Lease lease):
        self.done[lease.id] = lease
        if len(self.done) > self.remembered:
            self.done.popitem(last=False)

    # -- views and housekeeping --------------------------------------------------------

    def counters(self, double now):
        """``(rule index, key, used)`` of every counter in use (sorted by rule, key)."""
        cdef Keyed k
        cdef int i, s
        cdef CRule* r
        out = []
        for s, k in self._records():
            for i in range(self.nrules):
                r = &self.rules[i]
                if r.space == s and k.c[r.pos].live:
                    out.append((i, k.key, self._used(r, &k.c[r.pos], now)))
        out.sort()
        return out

    def usage_of(self, str who, double now):
        """``(rule index, used)`` of the user and tier counters of ``who`` in use."""
        cdef Keyed k = self.who.get(who)
        cdef int i
        cdef CRule* r
        if k is None:
            return []
        return [(i, self._used(&self.rules[i], &k.c[self.rules[i].pos], now))
                for i in range(self.nrules)
                if self.rules[i].space == S_WHO and k.c[self.rules[i].pos].live]

    cdef list _records(self):
        """``(key space, record)`` of every key."""
        out = [] if self.glob is None else [(S_GLOBAL, self.glob)]
        out += [(S_WHO, k) for k in self.who.values()]
        out += [(S_MODEL, k) for k in self.models.values()]
        out += [(S_ROUTE, k) for k in self.routes.values()]
        return out

    cdef Keyed _current(self, int space, Keyed k):
        """The live record of ``k``'s key (``k`` itself unless it was evicted since)."""
        if k is None or space == S_GLOBAL:
            return self.glob if k is not None else None
        d = self.who if space == S_WHO else self.models if space == S_MODEL else self.routes
        return d.get(k.key)

    def snapshot(self, double now):
        """Settled and expired spend in durable windows now: the counters less the
        estimates of open leases (those become durable only when settled)."""
        cdef Lease lease
        cdef Keyed k
        cdef int i, s
        cdef CRule* r
        cdef Counter* c
        held = {}
        for lease in self.leases.values():
            for i in range(lease.n):
                if self.rules[lease.res[i].rule].kind != K_GAUGE:
                    hk = (lease.res[i].rule, lease.keyed(lease.res[i].space).key,
                          lease.res[i].slot)
                    held[hk] = held.get(hk, 0) + lease.res[i].amount
        out = []
        for s, k in self._records():
            for i in range(self.nrules):
                r = &self.rules[i]
                if r.space != s or not r.durable or not k.c[r.pos].live:
                    continue
                c = &k.c[r.pos]
                if r.kind == K_SLIDING:
                    slots = ring_buckets(&c.ring, now)
                elif self._used(r, c, now):
                    slots = [(c.period, c.total)]
                else:
                    continue
                for slot, total in slots:
                    amount = total - held.get((i, k.key, float(slot)), 0)
                    if amount > 0:
                        out.append(self.spend_type(self.names[i], self.shapes[i], k.key,
                                                   float(slot), amount))
        return out

    def _restore_one(self, int index, str key, double slot, int64_t amount, double now):
        """Add one persisted amount back; returns whether it applied (its bucket or period
        is still current)."""
        cdef CRule* r = &self.rules[index]
        cdef Keyed k = self._keyed(r.space, key)
        cdef Counter* c = &k.c[r.pos]
        if r.kind == K_SLIDING:
            if c.ring.counts == NULL:
                ring_init(&c.ring, r.span, r.buckets)
            c.live = True
            ring_used(&c.ring, now)
            return ring_adjust(&c.ring, <int64_t>slot, amount, now)
        if r.kind == K_HOUR or r.kind == K_DAY:
            c.live = True
            self._used(r, c, now)
            if c.period == slot:
                c.total = max(0, c.total + amount)
                return True
        return False

    def evict_idle(self, double now, int budget=20_000):
        """Drop key records whose windows are empty and that no open lease points at,
        looking at up to ``budget`` records per call (a full pass spans several calls, so
        a sweep never stalls the caller however many keys there are); and up to
        ``budget`` retry-loop keys whose window has passed or that exceed their cap."""
        cdef Keyed k
        cdef int evicted = 0, i, s
        cdef CRule* r
        cdef bint idle
        cdef Py_ssize_t cut
        self._prune_recent(now - self.retry_loop_window, budget, self.retry_loop_max_keys)
        if not self.sweep:
            self.sweep = [(S_WHO, key) for key in self.who]
            self.sweep += [(S_MODEL, key) for key in self.models]
            self.sweep += [(S_ROUTE, key) for key in self.routes]
            if self.glob is not None:
                self.sweep.append((S_GLOBAL, ""))
        # wraparound=False: a negative slice bound would not count from the end
        cut = max(len(self.sweep) - budget, 0)
        batch = self.sweep[cut:]
        del self.sweep[cut:]
        for s, key in batch:
            d = None if s == S_GLOBAL else self.who if s == S_WHO else \
                self.models if s == S_MODEL else self.routes
            k = self.glob if d is None else d.get(key)
            if k is None or k.held:
                continue
            idle = True
            for i in range(self.nrules):
                r = &self.rules[i]
                if r.space == s and k.c[r.pos].live and (
                        self._used(r, &k.c[r.pos], now) or k.c[r.pos].tat > now):
                    idle = False
                    break
            if idle:
                if d is None:
                    self.glob = None
                else:
                    del d[key]
                evicted += 1
        return evicted

    @property
    def open_leases(self):
        return len(self.leases)

    @property
    def retry_loop_keys(self):
        """(user, prompt) keys the retry-loop guard tracks now."""
        return len(self.recent)

    def lease_subject(self, str lease_id, long owner=-1):
        """Who a lease (open, or remembered after it ended) was admitted for; None when
        unknown or another ``owner``'s."""
        lease = self._find(lease_id, owner)
        return None if lease is None else lease.subject
