/* Exact top-k by dot product over a row-major float32 matrix (the exact tier of
 * native/vectors.pyx). One pass: each row's dot product is compared with the k-th best so
 * far and inserted into a small sorted array, so no similarity vector is materialised.
 *
 * The dot product keeps SC_LANES independent partial sums, so the compiler vectorises it
 * without -ffast-math (no reassociation of one accumulator is needed). On x86-64 GCC the
 * function is compiled three times (AVX-512, AVX2+FMA, baseline SSE2) and the loader picks
 * the best one for the CPU it runs on: one wheel, no -march=native. */
#ifndef SIDECAR_VEC_KERNELS_H
#define SIDECAR_VEC_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SC_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))
#else
#define SC_CLONES
#endif

#define SC_LANES 16

SC_CLONES
static size_t sc_dot_topk(const float *restrict matrix, size_t rows, size_t dim,
                          const float *restrict query, size_t k,
                          int64_t *restrict out_rows, float *restrict out_sims)
{
    size_t found = 0;
    if (k == 0)
        return 0;
    for (size_t r = 0; r < rows; r++) {
        const float *restrict row = matrix + r * dim;
        float acc[SC_LANES] = {0};
        size_t j = 0;
        for (; j + SC_LANES <= dim; j += SC_LANES)
            for (size_t l = 0; l < SC_LANES; l++)
                acc[l] += row[j + l] * query[j + l];
        float s = 0.0f;
        for (size_t l = 0; l < SC_LANES; l++)
            s += acc[l];
        for (; j < dim; j++)
            s += row[j] * query[j];
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
