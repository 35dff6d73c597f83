/* C11 atomics for the shared-memory segment (native/shm.pyx). The segment's words are
 * plain uint64_t in a file mapping; these helpers access them as _Atomic, which has the
 * same size and alignment for uint64_t on every platform this builds on. */
#ifndef LLM_SIDECAR_SHM_ATOMIC_H
#define LLM_SIDECAR_SHM_ATOMIC_H
#include <stdatomic.h>
#include <stdint.h>

static inline uint64_t shm_load_acquire(const uint64_t *p) {
    return atomic_load_explicit((const _Atomic uint64_t *)p, memory_order_acquire);
}
static inline uint64_t shm_load_relaxed(const uint64_t *p) {
    return atomic_load_explicit((const _Atomic uint64_t *)p, memory_order_relaxed);
}
static inline void shm_store_release(uint64_t *p, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)p, v, memory_order_release);
}
static inline void shm_store_relaxed(uint64_t *p, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)p, v, memory_order_relaxed);
}
/* The client's counters of its admission slices (native/shm.pyx, Slab): one process
 * debits them from several threads, the daemon reads them. */
static inline int shm_cas(uint64_t *p, uint64_t *expected, uint64_t desired) {
    return atomic_compare_exchange_weak_explicit((_Atomic uint64_t *)p, expected, desired,
                                                 memory_order_acq_rel, memory_order_acquire);
}
static inline uint64_t shm_fetch_add(uint64_t *p, uint64_t v) {
    return atomic_fetch_add_explicit((_Atomic uint64_t *)p, v, memory_order_acq_rel);
}
static inline void shm_fence_acquire(void) { atomic_thread_fence(memory_order_acquire); }
static inline void shm_fence_release(void) { atomic_thread_fence(memory_order_release); }
#endif
