# C declarations for the exact tier's kernel (vec_kernels.h, compiled inline).
from libc.stdint cimport int64_t

cdef extern from "vec_kernels.h" nogil:
    size_t sc_dot_topk(const float* matrix, size_t rows, size_t dim, const float* query,
                       size_t k, int64_t* out_rows, float* out_sims)
