# A lease's identity and end (included by window.pyx; helpers of Core as functions of
# ``Core self``): its unguessable id, the owner check that finds it, and its end: closed,
# expired, and remembered so a repeated settle or release is answered the same way.


cdef const char* HEX = b"0123456789abcdef"


cdef str _next_id(Core self):
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


cdef Lease _find(Core self, str lease_id, long owner):
    """The lease, open or remembered, when ``owner`` may see it (else None)."""
    lease = self.leases.get(lease_id)
    if lease is None:
        lease = self.done.get(lease_id)
    if lease is None or (owner >= 0 and (<Lease>lease).owner >= 0
                         and (<Lease>lease).owner != owner):
        return None
    return <Lease>lease


cdef int _expire(Core self, double now, list spent) except -1:
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
                spend = _spend(self, res, k.key, res.amount)
                if spend is not None:
                    spent.append(spend)
        _close(self, lease, L_EXPIRED)
        count += 1
    return count


cdef void _disown(Core self, Lease lease):
    """An open lease ends: its owner holds one fewer."""
    cdef Py_ssize_t left
    if lease.owner >= 0:
        left = self.owned[lease.owner] - 1
        if left:
            self.owned[lease.owner] = left
        else:
            del self.owned[lease.owner]


cdef void _close(Core self, Lease lease, int state):
    """An open lease ends: its records are no longer held, and it is remembered."""
    lease.hold(-1)
    _disown(self, lease)
    lease.state = state
    _remember(self, lease)


cdef void _remember(Core self, Lease lease):
    self.done[lease.id] = lease
    if len(self.done) > self.remembered:
        self.done.popitem(last=False)
