# C declarations of the segment's atomics (shm_atomic.h, compiled inline).
from libc.stdint cimport uint64_t

cdef extern from "shm_atomic.h" nogil:
    uint64_t shm_load_acquire(const uint64_t* p)
    uint64_t shm_load_relaxed(const uint64_t* p)
    void shm_store_release(uint64_t* p, uint64_t v)
    void shm_store_relaxed(uint64_t* p, uint64_t v)
    void shm_fence_acquire()
    void shm_fence_release()
    bint shm_cas(uint64_t* p, uint64_t* expected, uint64_t desired)
    uint64_t shm_fetch_add(uint64_t* p, uint64_t v)
