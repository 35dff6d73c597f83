# Core, the engine's operations (included by window.pyx): rule loading, admit, settle,
# extend, release, expiry, and the views and housekeeping sidecar.limits builds on. Cython
# cannot spread one class over several files (``include`` is allowed at module level only),
# so Core's C helpers are module-level functions of ``Core self`` in the window_*.pxi files
# included before this one.


cdef class Core:
    """Rules, counters and leases. ``sidecar.limits.engine.Engine`` subclasses it and supplies
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
        ``now``; the result types are ``sidecar.limits.engine``' named tuples."""
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
        _install_rules(self, table, names, shapes, matches, alert_thresholds, remap)

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
            _expire(self, now, self.pending)
        if fingerprint and self.retry_loop_max:
            denial = _retry_loop(self, subject, fingerprint, now)
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
            kg = _keyed(self, S_GLOBAL, "")
        if self.nspace[S_WHO]:
            kw = _keyed(self, S_WHO, user or subject[1])
        if model and self.nspace[S_MODEL]:
            km = _keyed(self, S_MODEL, model)
        if route and self.nspace[S_ROUTE]:
            kr = _keyed(self, S_ROUTE, route)
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
                used = _used(self, r, c, now)
                if used + need > r.amount:
                    wait = INFINITY if never else _window_retry(self, r, c, need, now)
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
        lease.id = _next_id(self)
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
        # before the lease is touched: all or nothing; requests given: what a slice used
        cdef bint counted = _load_amounts(usage_, actual)
        cdef Lease lease = _find(self, lease_id, owner)
        if lease is None:
            return self.settle_type(False, False, False)
        if lease.state == L_OPEN:
            del self.leases[lease_id]
            lease.hold(-1)
            _disown(self, lease)
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
            amount = res.amount if r.need_at == 0 and not counted else actual[r.need_at]
            if expired:  # its records may have been evicted (and made again) since
                k = _current(self, res.space, k)
            if k is not None:
                _adjust(self, res, &k.c[r.pos], amount - res.amount, now)
            # an expired lease's estimate was persisted at expiry: persist the difference
            spend = _spend(self, res, key, amount - res.amount if expired else amount)
            if spend is not None:
                spent.append(spend)
        lease.state = L_SETTLED
        lease.micro_usd = actual[4]
        _remember(self, lease)
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
        cdef Lease lease = _find(self, lease_id, owner)
        if lease is None or lease.state != L_OPEN:
            return self.denial_type("lease", "unknown_lease", 0, 0, INFINITY, True)
        for i in range(lease.n):  # check everything first: all or none
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            delta = want[r.need_at] - res.amount
            if k is None or delta <= 0 or r.kind == K_GAUGE or r.shadow:
                continue
            used = _used(self, r, &k.c[r.pos], now)
            if used + delta > r.amount:
                return self.denial_type(self.names[res.rule], "limit", used, r.amount,
                                        _window_retry(self, r, &k.c[r.pos], delta, now),
                                        delta > r.amount)
        for i in range(lease.n):
            res = &lease.res[i]
            r = &self.rules[res.rule]
            k = lease.keyed(res.space)
            delta = want[r.need_at] - res.amount
            if k is None or delta <= 0 or r.kind == K_GAUGE:
                continue
            _adjust(self, res, &k.c[r.pos], delta, now)
            res.amount += delta
        return None

    def release(self, str lease_id, double now, long owner=-1):
        """Cancel an unused reservation: every amount it reserved is given back."""
        cdef Lease lease = _find(self, lease_id, owner)
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
                _adjust(self, res, &k.c[r.pos], -res.amount, now)
        _close(self, lease, L_RELEASED)
        return True

    def expire(self, double now):
        """Expire leases past their TTL: the estimate stays spent (returned, to persist,
        with that of leases an admit expired since the last call), the concurrency slot
        is freed. Returns ``(leases expired, spend)``."""
        spent, self.pending = self.pending, []
        count = _expire(self, now, spent) if now >= self.oldest else 0
        return count, spent

    # -- views and housekeeping --------------------------------------------------------

    def counters(self, double now):
        """``(rule index, key, used)`` of every counter in use (sorted by rule, key)."""
        cdef Keyed k
        cdef int i, s
        cdef CRule* r
        out = []
        for s, k in _records(self):
            for i in range(self.nrules):
                r = &self.rules[i]
                if r.space == s and k.c[r.pos].live:
                    out.append((i, k.key, _used(self, r, &k.c[r.pos], now)))
        out.sort()
        return out

    def usage_of(self, str who, double now):
        """``(rule index, used)`` of the user and tier counters of ``who`` in use."""
        cdef Keyed k = self.who.get(who)
        cdef int i
        cdef CRule* r
        if k is None:
            return []
        return [(i, _used(self, &self.rules[i], &k.c[self.rules[i].pos], now))
                for i in range(self.nrules)
                if self.rules[i].space == S_WHO and k.c[self.rules[i].pos].live]

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
        for s, k in _records(self):
            for i in range(self.nrules):
                r = &self.rules[i]
                if r.space != s or not r.durable or not k.c[r.pos].live:
                    continue
                c = &k.c[r.pos]
                if r.kind == K_SLIDING:
                    slots = ring_buckets(&c.ring, now)
                elif _used(self, r, c, now):
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
        cdef Keyed k = _keyed(self, r.space, key)
        cdef Counter* c = &k.c[r.pos]
        if r.kind == K_SLIDING:
            if c.ring.counts == NULL:
                ring_init(&c.ring, r.span, r.buckets)
            c.live = True
            ring_used(&c.ring, now)
            return ring_adjust(&c.ring, <int64_t>slot, amount, now)
        if r.kind == K_HOUR or r.kind == K_DAY:
            c.live = True
            _used(self, r, c, now)
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
        _prune_recent(self, now - self.retry_loop_window, budget, self.retry_loop_max_keys)
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
                        _used(self, r, &k.c[r.pos], now) or k.c[r.pos].tat > now):
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
        lease = _find(self, lease_id, owner)
        return None if lease is None else lease.subject
