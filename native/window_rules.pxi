# Core's rule table and key records (included by window.pyx; helpers of Core as functions of
# ``Core self``): installing a rule table, moving counters and leases onto a new one, and
# the Keyed record of each key (made when first needed, found, listed).


cdef int _install_rules(Core self, list table, list names, list shapes, list matches,
                        alert_thresholds, list remap) except -1:
    """The work of ``Core._load_rules``, which documents the rows and ``remap``."""
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
            _remap(self, old, old_count, remap)
    finally:
        free(old)
    self.sweep = []
    self._forget_periods()
    return 0


cdef int _remap(Core self, CRule* old, int old_count, list remap) except -1:
    cdef int i, j, s, newi
    cdef Keyed k, fresh
    cdef Lease lease
    cdef Res* res
    for s, space in ((S_GLOBAL, None), (S_WHO, self.who), (S_MODEL, self.models),
                     (S_ROUTE, self.routes)):
        records = ([] if self.glob is None else [self.glob]) if space is None \
            else list(space.values())
        for k in records:
            fresh = _new_keyed(self, s, k.key)
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


cdef Keyed _new_keyed(Core self, int space, str key):
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


cdef Keyed _keyed(Core self, int space, str key):
    """The record of ``key`` in ``space``, made when first needed."""
    cdef dict d
    cdef Keyed k
    if space == S_GLOBAL:
        if self.glob is None:
            self.glob = _new_keyed(self, S_GLOBAL, "")
        return self.glob
    d = self.who if space == S_WHO else self.models if space == S_MODEL else self.routes
    found = d.get(key)
    if found is not None:
        return <Keyed>found
    k = _new_keyed(self, space, key)
    d[key] = k
    return k


cdef list _records(Core self):
    """``(key space, record)`` of every key."""
    out = [] if self.glob is None else [(S_GLOBAL, self.glob)]
    out += [(S_WHO, k) for k in self.who.values()]
    out += [(S_MODEL, k) for k in self.models.values()]
    out += [(S_ROUTE, k) for k in self.routes.values()]
    return out


cdef Keyed _current(Core self, int space, Keyed k):
    """The live record of ``k``'s key (``k`` itself unless it was evicted since)."""
    if k is None or space == S_GLOBAL:
        return self.glob if k is not None else None
    d = self.who if space == S_WHO else self.models if space == S_MODEL else self.routes
    return d.get(k.key)
