/* Exact top-k by dot product over a row-major float32 matrix (the exact tier of
 * native/vectors.pyx). One pass: each row's dot product is compared with the k-th best so
 * far and inserted into a small sorted array, so no similarity vector is materialised.
 *
 * The dot product runs four independent 16-float vector accumulators (GCC/Clang vector
 * extensions), so it is bound by memory bandwidth rather than by the latency of one
 * chain of multiply-adds, without -ffast-math. On x86-64 GCC the kernel is compiled three
 * times (AVX-512, AVX2+FMA, baseline SSE2) and the loader picks the best one for the CPU
 * it runs on: one wheel, no -march=native. */
#ifndef SIDECAR_VEC_KERNELS_H
#define SIDECAR_VEC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SC_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SC_CLONES
#endif

typedef float sc_v16 __attribute__((vector_size(64), aligned(4), may_alias));

SC_CLONES
static inline float sc_dot(const float *restrict a, const float *restrict b, size_t dim)
{
    sc_v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    size_t j = 0;
    for (; j + 64 <= dim; j += 64) {
        s0 += *(const sc_v16 *)(a + j) * *(const sc_v16 *)(b + j);
        s1 += *(const sc_v16 *)(a + j + 16) * *(const sc_v16 *)(b + j + 16);
        s2 += *(const sc_v16 *)(a + j + 32) * *(const sc_v16 *)(b + j + 32);
        s3 += *(const sc_v16 *)(a + j + 48) * *(const sc_v16 *)(b + j + 48);
    }
    for (; j + 16 <= dim; j += 16)
        s0 += *(const sc_v16 *)(a + j) * *(const sc_v16 *)(b + j);
    s0 += s1 + s2 + s3;
    float s = 0.0f;
    for (int l = 0; l < 16; l++)
        s += s0[l];
    for (; j < dim; j++)
        s += a[j] * b[j];
    return s;
}

SC_CLONES
static size_t sc_dot_topk(const float *restrict matrix, size_t rows, size_t dim,
                          const float *restrict query, size_t k,
                          int64_t *restrict out_rows, float *restrict out_sims)
{
    size_t found = 0;
    if (k == 0)
        return 0;
    for (size_t r = 0; r < rows; r++) {
        float s = sc_dot(matrix + r * dim, query, dim);
        /* strict '>' keeps the earlier row on ties, so results do not depend on timing */
        if (found == k && !(s > out_sims[k - 1]))
            continue;
        size_t pos = found < k ? found++ : k - 1;
        while (pos > 0 && s > out_sims[pos - 1]) {
            out_sims[pos] = out_sims[pos - 1];
            out_rows[pos] = out_rows[pos - 1];
            pos--;
        }
        out_sims[pos] = s;
        out_rows[pos] = (int64_t)r;
    }
    return found;
}

#endif
