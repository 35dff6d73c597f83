# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Typed glue between the semantic cache and USearch: one vector index, two tiers.

Below ``exact_below`` entries the index is a contiguous float32 matrix searched by brute
force (``includes/vec_kernels.h``: one fused dot-product + top-k pass, GIL released; numpy's
BLAS product was measured 2x faster at p50 between 2.5k and 10k rows but with 8 ms p99
stalls from OpenBLAS's thread pool, and a daemon shares its CPUs);
at ``exact_below`` it is rebuilt once, in bulk, as a USearch HNSW index (f32, f16 or i8
storage) and stays one until ``clear``. Both tiers answer with keys and similarities
(dot product of unit vectors, highest first), never distances.

USearch is reached through its compiled pybind11 object (``usearch.compiled.Index``),
not through ``usearch.index.Index``'s Python wrapper: the wrapper re-validates and
reshapes every call (measured in ``bench/cache.py``). The binding releases the GIL around
every add and search and serialises calls on one index with its own mutex.

Locking. ``_write`` serialises every mutation (add, remove, clear, load). ``_state``
guards the exact tier's matrix and the tier switch; searches of the exact tier hold it,
GIL released, for the length of one scan; searches of the HNSW tier take no lock of ours
(USearch's mutex orders them against adds, which are cut into chunks of ``add_chunk``
vectors so a search waits for at most one chunk). The rebuild at the threshold runs on a
copy of the matrix with neither lock blocking searches, which go on exact until the
finished index is swapped in.

Inputs arrive validated by ``sidecar.cache.vectors`` (shape, dtype, contiguity, dimension);
errors of USearch propagate as raised and are converted there. No I/O but ``save``/
``load`` of one file, no clocks.
"""
cimport cython
from cpython.pythread cimport (NOWAIT_LOCK, PyThread_acquire_lock, PyThread_allocate_lock,
                               PyThread_free_lock, PyThread_release_lock, PyThread_type_lock,
                               WAIT_LOCK)
from libc.stdint cimport int64_t, uint64_t

from includes.vec_kernels cimport sc_dot_topk

import os
import struct
import sys

import numpy as np

# onnxruntime (the embedder's runtime, a dependency) must be loaded before usearch's
# compiled module: the other way round, onnxruntime's initialisation crashes the process
# (its libstdc++ locale calls resolve into the copy usearch's extension carries). Here,
# where usearch is imported, the order holds whoever imports this module first.
import onnxruntime  # noqa: F401  (imported for its load order only)
from usearch import compiled as _us

# Scalar codes shared with sidecar.cache.vectors (its Dtype enum maps to these numbers).
cdef enum:
    S_F32 = 0
    S_F16 = 1
    S_I8 = 2

cdef enum:
    T_EXACT = 0
    T_HNSW = 1

SCALARS = {"f32": S_F32, "f16": S_F16, "i8": S_I8}
_KINDS = {S_F32: _us.ScalarKind.F32, S_F16: _us.ScalarKind.F16, S_I8: _us.ScalarKind.I8}
EXACT = T_EXACT
HNSW = T_HNSW

MAGIC = b"SCVEC\x00\x00\x01"
_HEADER = struct.Struct("<8sBBHIQQ")  # magic, tier, scalar, 0, dim, exact_below, count
NO_KEY = 0xFFFFFFFFFFFFFFFF  # key of a search_batch slot beyond the matches found

_F32 = np.dtype(np.float32)
_U64 = np.uint64
_NEG_INF = float("-inf")


cdef inline void _lock(PyThread_type_lock lock):
    # Try without giving up the GIL first: the lock is almost always free.
    if not PyThread_acquire_lock(lock, NOWAIT_LOCK):
        with nogil:
            PyThread_acquire_lock(lock, WAIT_LOCK)


def _dedupe_last(keys, vectors):
    """Keep the last occurrence of each key of a batch (a later vector replaces an
    earlier one, as it would across two add calls)."""
    uniq, first_of_reversed = np.unique(keys[::-1], return_index=True)
    if uniq.shape[0] == keys.shape[0]:
        return keys, vectors
    rows = np.sort(keys.shape[0] - 1 - first_of_reversed)
    return keys[rows], np.ascontiguousarray(vectors[rows])


@cython.final
cdef class Core:
    """The compiled index; ``sidecar.cache.vectors.VectorIndex`` is its public face."""

    cdef readonly int dim
    cdef readonly int scalar
    cdef readonly Py_ssize_t exact_below
    cdef readonly int tier
    cdef readonly int connectivity
    cdef readonly int expansion_add
    cdef readonly int expansion_search
    cdef readonly Py_ssize_t add_chunk
    cdef readonly int build_threads
    cdef Py_ssize_t capacity_hint
    # exact tier
    cdef object _matrix      # float32 (capacity, dim), rows [0, _n) live
    cdef object _keys        # uint64 (capacity,)
    cdef dict _rows          # key -> row
    cdef Py_ssize_t _n
    cdef float* _mat_ptr
    cdef uint64_t* _key_ptr
    # HNSW tier
    cdef object _hnsw        # usearch.compiled.Index or None
    cdef object _search_many  # its bound search_many, looked up once
    cdef PyThread_type_lock _write
    cdef PyThread_type_lock _state

    def __cinit__(self, int dim, int scalar, Py_ssize_t exact_below, Py_ssize_t capacity,
                  int connectivity, int expansion_add, int expansion_search,
                  Py_ssize_t add_chunk, int build_threads):
        self._write = PyThread_allocate_lock()
        self._state = PyThread_allocate_lock()
        if self._write == NULL or self._state == NULL:
            raise MemoryError()
        self.dim = dim
        self.scalar = scalar
        self.exact_below = exact_below
        self.capacity_hint = capacity
        self.connectivity = connectivity
        self.expansion_add = expansion_add
        self.expansion_search = expansion_search
        self.add_chunk = add_chunk
        self.build_threads = build_threads
        self._reset()

    def __dealloc__(self):
        if self._write != NULL:
            PyThread_free_lock(self._write)
        if self._state != NULL:
            PyThread_free_lock(self._state)

    cdef void _reset(self):
        self.tier = T_EXACT
        self._hnsw = None
        self._search_many = None
        self._rows = {}
        self._n = 0
        self._set_exact_storage(np.empty((0, self.dim), _F32), np.empty(0, _U64))

    cdef void _set_exact_storage(self, matrix, keys):
        cdef float[:, ::1] m = matrix
        cdef uint64_t[::1] k = keys
        self._matrix = matrix
        self._keys = keys
        self._mat_ptr = &m[0, 0] if m.shape[0] else NULL
        self._key_ptr = &k[0] if k.shape[0] else NULL

    cdef object _new_hnsw(self):
        return _us.Index(ndim=self.dim, dtype=_KINDS[self.scalar],
                         metric_kind=_us.MetricKind.Cos, connectivity=self.connectivity,
                         expansion_add=self.expansion_add,
                         expansion_search=self.expansion_search)

    cdef void _install_hnsw(self, index):
        # Caller holds _state (or the object is not shared yet).
        self._hnsw = index
        self._search_many = index.search_many
        self.tier = T_HNSW
        self._rows = {}
        self._n = 0
        self._set_exact_storage(np.empty((0, self.dim), _F32), np.empty(0, _U64))

    def __len__(self):
        index = self._hnsw
        return self._n if index is None else len(index)

    # --- mutation -------------------------------------------------------------------

    def add(self, keys, vectors):
        """Insert or replace ``keys[i] -> vectors[i]`` (uint64 1-D, float32 2-D C order)."""
        if keys.shape[0] == 0:
            return
        _lock(self._write)
        try:
            keys, vectors = _dedupe_last(keys, vectors)
            if self.tier == T_EXACT:
                if self._n + keys.shape[0] >= self.exact_below and \
                        self._n + self._count_new(keys) >= self.exact_below:
                    self._promote(keys, vectors)
                else:
                    self._exact_add(keys, vectors)
            else:
                self._hnsw_add(keys, vectors)
        finally:
            PyThread_release_lock(self._write)

    cdef Py_ssize_t _count_new(self, keys):
        cdef dict rows = self._rows
        cdef Py_ssize_t n = 0
        for key in keys.tolist():
            if key not in rows:
                n += 1
        return n

    cdef void _grow(self, Py_ssize_t need):
        # Caller holds _state.
        cdef Py_ssize_t cap = self._keys.shape[0]
        if need <= cap:
            return
        cap = max(need, 2 * cap, min(max(self.capacity_hint, 64), self.exact_below))
        matrix = np.empty((cap, self.dim), _F32)
        keys = np.empty(cap, _U64)
        matrix[:self._n] = self._matrix[:self._n]
        keys[:self._n] = self._keys[:self._n]
        self._set_exact_storage(matrix, keys)

    cdef int _exact_add(self, keys, vectors) except -1:
        cdef const float[:, ::1] src = vectors
        cdef Py_ssize_t i, row, d = self.dim, j
        cdef dict rows = self._rows
        key_list = keys.tolist()
        _lock(self._state)
        try:
            self._grow(self._n + len(key_list))
            for i, key in enumerate(key_list):
                row = rows.get(key, -1)
                if row < 0:
                    row = self._n
                    self._n += 1
                    rows[key] = row
                    self._key_ptr[row] = <uint64_t>key
                for j in range(d):
                    self._mat_ptr[row * d + j] = src[i, j]
        finally:
            PyThread_release_lock(self._state)
        return 0

    cdef int _promote(self, keys, vectors) except -1:
        # The threshold is reached: build the HNSW index from a copy of the exact tier plus
        # this batch, in bulk on every allowed CPU, while searches go on against the exact
        # tier; then swap. Only this writer changes the exact tier meanwhile (_write held).
        old_keys = self._keys[:self._n].copy()
        old_matrix = self._matrix[:self._n].copy()
        if old_keys.shape[0]:
            replaced = np.isin(old_keys, keys)
            if replaced.any():
                old_keys, old_matrix = old_keys[~replaced], old_matrix[~replaced]
        all_keys = np.concatenate((old_keys, keys))
        all_vectors = np.ascontiguousarray(np.concatenate((old_matrix, vectors)))
        index = self._new_hnsw()
        index.add_many(all_keys, all_vectors, copy=True, threads=self.build_threads)
        _lock(self._state)
        try:
            self._install_hnsw(index)
        finally:
            PyThread_release_lock(self._state)
        return 0

    cdef int _hnsw_add(self, keys, vectors) except -1:
        index = self._hnsw
        present = index.contains_many(keys)
        if present.any():
            index.remove_many(keys[present].tolist(), False, 1)
        cdef Py_ssize_t start, n = keys.shape[0], step = self.add_chunk
        if n <= step:
            index.add_many(keys, vectors, copy=True, threads=1)
            return 0
        for start in range(0, n, step):
            index.add_many(keys[start:start + step], vectors[start:start + step],
                           copy=True, threads=1)
        return 0

    def remove(self, keys):
        """Remove ``keys`` (uint64 1-D); absent keys are ignored. Returns how many went."""
        cdef Py_ssize_t row, last, removed = 0, d = self.dim
        if keys.shape[0] == 0:
            return 0
        _lock(self._write)
        try:
            if self.tier == T_HNSW:
                index = self._hnsw
                present = index.contains_many(keys)
                if not present.any():
                    return 0
                return index.remove_many(np.unique(keys[present]).tolist(), False, 1)
            _lock(self._state)
            try:
                for key in keys.tolist():
                    row = self._rows.pop(key, -1)
                    if row < 0:
                        continue
                    removed += 1
                    last = self._n - 1
                    if row != last:  # move the last row into the hole
                        moved = self._key_ptr[last]
                        self._key_ptr[row] = moved
                        self._matrix[row] = self._matrix[last]
                        self._rows[moved] = row
                    self._n = last
            finally:
                PyThread_release_lock(self._state)
            return removed
        finally:
            PyThread_release_lock(self._write)

    def clear(self):
        """Drop every entry and go back to the exact tier."""
        _lock(self._write)
        try:
            _lock(self._state)
            try:
                self._reset()
            finally:
                PyThread_release_lock(self._state)
        finally:
            PyThread_release_lock(self._write)

    # --- search ---------------------------------------------------------------------

    def search(self, query, Py_ssize_t k):
        """Top ``k`` of one float32 query: ``(keys uint64, similarities float32)``."""
        cdef const float[::1] q
        cdef int64_t[::1] rows
        cdef float[::1] sims
        cdef uint64_t[::1] out_keys
        cdef size_t found, i
        if self.tier == T_HNSW:
            return self._hnsw_search(query, k)
        q = query
        out_rows = np.empty(k, np.int64)
        out_sims = np.empty(k, _F32)
        rows = out_rows
        sims = out_sims
        _lock(self._state)
        try:
            if self.tier == T_HNSW:  # promoted while we waited
                keys = None
            else:
                with nogil:
                    found = sc_dot_topk(self._mat_ptr, self._n, self.dim, &q[0], k,
                                        &rows[0], &sims[0])
                keys = np.empty(found, _U64)
                out_keys = keys
                for i in range(found):
                    out_keys[i] = self._key_ptr[rows[i]]
        finally:
            PyThread_release_lock(self._state)
        if keys is None:
            return self._hnsw_search(query, k)
        return keys, out_sims[:found]

    cdef object _hnsw_search(self, query, Py_ssize_t k):
        keys, distances, counts, _, _ = self._search_many(query[None, :], k, False, 1)
        found = counts[0]
        return keys[0, :found], 1.0 - distances[0, :found]

    def search_batch(self, queries, Py_ssize_t k):
        """Top ``k`` of each row of a float32 matrix: ``(keys, similarities, counts)``, each
        row padded beyond its count with key ``NO_KEY`` and similarity ``-inf``."""
        cdef const float[:, ::1] q
        cdef int64_t[:, ::1] rows
        cdef float[:, ::1] sims
        cdef uint64_t[:, ::1] out_keys
        cdef Py_ssize_t[::1] cnt
        cdef Py_ssize_t n = queries.shape[0], i, j
        if self.tier == T_EXACT:
            q = queries
            out_rows = np.empty((n, k), np.int64)
            out_sims = np.full((n, k), _NEG_INF, _F32)
            keys = np.full((n, k), NO_KEY, _U64)
            counts = np.zeros(n, np.intp)
            rows, sims, out_keys, cnt = out_rows, out_sims, keys, counts
            _lock(self._state)
            try:
                if self.tier == T_EXACT:
                    with nogil:
                        for i in range(n):
                            cnt[i] = sc_dot_topk(self._mat_ptr, self._n, self.dim, &q[i, 0],
                                                 k, &rows[i, 0], &sims[i, 0])
                            for j in range(cnt[i]):
                                out_keys[i, j] = self._key_ptr[rows[i, j]]
                    return keys, out_sims, counts
            finally:
                PyThread_release_lock(self._state)
        keys, distances, counts, _, _ = self._search_many(queries, k, False, 1)
        # USearch leaves the slots beyond each count uninitialised
        pad = np.arange(k)[None, :] >= counts[:, None]
        sims_arr = np.full(distances.shape, _NEG_INF, _F32)
        np.subtract(_F32.type(1.0), distances, out=sims_arr, where=~pad)
        keys[pad] = NO_KEY
        return keys, sims_arr, counts

    # --- size and persistence -------------------------------------------------------

    def memory_bytes(self):
        """Bytes held for entries: the matrix, keys and key map, or USearch's arena."""
        index = self._hnsw
        if index is not None:
            return index.memory_usage
        return self._matrix.nbytes + self._keys.nbytes + sys.getsizeof(self._rows)

    def save(self, path):
        """Write the index to one file (header, then keys+matrix or USearch's image)."""
        _lock(self._write)
        try:
            with open(path, "wb") as f:
                if self.tier == T_HNSW:
                    image = self._hnsw.save_index_to_buffer()
                    f.write(_HEADER.pack(MAGIC, T_HNSW, self.scalar, 0, self.dim,
                                         self.exact_below, len(self._hnsw)))
                    f.write(image)
                else:
                    f.write(_HEADER.pack(MAGIC, T_EXACT, self.scalar, 0, self.dim,
                                         self.exact_below, self._n))
                    f.write(memoryview(self._keys[:self._n]).cast("B"))
                    f.write(memoryview(self._matrix[:self._n]).cast("B"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            PyThread_release_lock(self._write)

    def load(self, path):
        """Replace this index's content with a file written by ``save``; returns the header
        (tier, scalar, dim, exact_below, count) so the caller can check it."""
        with open(path, "rb") as f:
            data = f.read()
        if len(data) < _HEADER.size:
            raise ValueError("not a vector index file (too short)")
        magic, tier, scalar, _, dim, exact_below, count = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError("not a vector index file (bad magic)")
        if dim != self.dim or scalar != self.scalar:
            raise ValueError(f"the file holds dim {dim}, scalar {scalar}; this index has "
                             f"dim {self.dim}, scalar {self.scalar}")
        body = memoryview(data)[_HEADER.size:]
        _lock(self._write)
        try:
            if tier == T_HNSW:
                index = self._new_hnsw()
                index.load_index_from_buffer(body)
                if len(index) != count:
                    raise ValueError("vector index file is inconsistent (count)")
                _lock(self._state)
                try:
                    self._install_hnsw(index)
                finally:
                    PyThread_release_lock(self._state)
            elif tier == T_EXACT:
                if len(body) != count * (8 + 4 * dim):
                    raise ValueError("vector index file is truncated or padded")
                keys = np.frombuffer(body[:count * 8], _U64).copy()
                matrix = np.frombuffer(body[count * 8:], _F32).reshape(count, dim).copy()
                _lock(self._state)
                try:
                    self._reset()
                    self._set_exact_storage(matrix, keys)
                    self._rows = {k: i for i, k in enumerate(keys.tolist())}
                    self._n = count
                finally:
                    PyThread_release_lock(self._state)
            else:
                raise ValueError(f"vector index file has unknown tier {tier}")
        finally:
            PyThread_release_lock(self._write)
        return tier, scalar, dim, exact_below, count
