# The C-level contract of sidecar._native.window: the rule kinds, key spaces and lease
# states, and the C records (rings, rules, counters, reservations) every part of the module
# works on. window.pyx cimports it by name: Cython looks for a module's own .pxd under the
# module's package path (sidecar/_native/), not beside a source kept in native/.
from libc.stdint cimport int64_t

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

cdef enum:
    L_OPEN = 0
    L_SETTLED = 1
    L_RELEASED = 2
    L_EXPIRED = 3


ctypedef struct Ring:
    int64_t* counts  # buckets + 1 slots; NULL until first used
    int64_t head     # absolute index of the newest bucket
    int64_t total
    int buckets
    double width


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


ctypedef struct Res:
    int rule
    int space
    double slot      # bucket (sliding) or period start (calendar)
    int64_t amount
