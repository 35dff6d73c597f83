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
by ``sidecar.limits.engine``, which owns validation, names and documentation of the public API.
"""
cimport cython
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.math cimport floor, INFINITY
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

from window cimport (
    K_SLIDING, K_HOUR, K_DAY, K_REQUEST, K_GAUGE, S_GLOBAL, S_WHO, S_MODEL, S_ROUTE, NSPACES,
    L_OPEN, L_SETTLED, L_RELEASED, L_EXPIRED, Ring, CRule, Counter, Res,
)

import os
from collections import OrderedDict

# The rule kinds and key spaces of window.pxd, by the names sidecar.limits gives them.
KINDS = {"sliding": K_SLIDING, "hour": K_HOUR, "day": K_DAY, "request": K_REQUEST,
         "gauge": K_GAUGE}
SPACES = {"global": S_GLOBAL, "user": S_WHO, "tier": S_WHO, "model": S_MODEL,
          "route": S_ROUTE}

# One .pyx compiles to one module, so the parts are included here, each before the parts
# that use it; the C types they share are declared in window.pxd.
include "window_rings.pxi"
include "window_records.pxi"
include "window_rules.pxi"
include "window_counters.pxi"
include "window_retry_loop.pxi"
include "window_leases.pxi"
include "window_core.pxi"
