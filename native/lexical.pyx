# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""A lexical embedder: hashed word and character n-grams into a fixed-size unit vector.

The input is text already normalised by ``native/normalize`` (lower case, punctuation
folded, words separated by single spaces). Features, each hashed with XXH3-64 (seeded per
feature family) to a dimension and a sign (the "hashing trick"), summed, then the vector
is L2-normalised:

- every word, weight 1.0;
- every pair of adjacent words, weight 0.7;
- every character 3-gram of each word padded with a space on both sides, weight 0.3
  (so "phone" and "phones" share most of their mass).

Cosine similarity of two such vectors measures shared wording, never meaning: "buy a
phone" and "purchase a telephone" score low. It serves near-duplicate detection (tests,
minimal installs), not paraphrase matching. Deterministic across runs and machines.
Imported only by ``sidecar.cache.embed``.
"""
from libc.math cimport sqrt
from libc.stdint cimport uint64_t
from libc.string cimport memset

from includes.xxhash cimport XXH3_64bits_withSeed

cdef enum:
    SEED_WORD = 0x5ed1
    SEED_PAIR = 0x5ed2
    SEED_GRAM = 0x5ed3

cdef float W_WORD = 1.0
cdef float W_PAIR = 0.7
cdef float W_GRAM = 0.3


cdef inline void _add(float* out, Py_ssize_t dim, const char* p, Py_ssize_t n, uint64_t seed,
                      float weight) noexcept nogil:
    cdef uint64_t h = XXH3_64bits_withSeed(p, n, seed)
    # low bits pick the dimension, the top bit the sign
    if h >> 63:
        out[h % dim] -= weight
    else:
        out[h % dim] += weight


cdef void _embed(const char* s, Py_ssize_t n, float* out, Py_ssize_t dim) noexcept nogil:
    cdef Py_ssize_t i = 0, start, prev_start = -1, k, wlen
    cdef char gram[3]
    cdef double norm = 0.0
    memset(out, 0, dim * sizeof(float))
    while i < n:
        while i < n and s[i] == 32:
            i += 1
        if i >= n:
            break
        start = i
        while i < n and s[i] != 32:
            i += 1
        wlen = i - start
        _add(out, dim, s + start, wlen, SEED_WORD, W_WORD)
        if prev_start >= 0:
            # the pair "prev word" with its joining space: contiguous in the input only
            # when exactly one space separates them, which normalised text guarantees
            _add(out, dim, s + prev_start, start + wlen - prev_start, SEED_PAIR, W_PAIR)
        # 3-grams of " word " (bytes of UTF-8; a multi-byte character spans grams)
        for k in range(-1, wlen - 1):
            gram[0] = 32 if k < 0 else s[start + k]
            gram[1] = s[start + k + 1]
            gram[2] = 32 if k + 2 >= wlen else s[start + k + 2]
            _add(out, dim, gram, 3, SEED_GRAM, W_GRAM)
        prev_start = start
    for k in range(dim):
        norm += out[k] * out[k]
    if norm > 0:
        norm = 1.0 / sqrt(norm)
        for k in range(dim):
            out[k] = <float>(out[k] * norm)


def embed_into(bytes text, float[::1] out):
    """Write the unit vector of ``text`` (UTF-8 of normalised text) into ``out``; an
    empty text gives the zero vector."""
    cdef const char* s = text
    cdef Py_ssize_t n = len(text)
    if out.shape[0] < 1:
        raise ValueError("out must have at least one dimension")
    with nogil:
        _embed(s, n, &out[0], out.shape[0])


def embed_batch(list texts, float[:, ::1] out):
    """``embed_into`` for each of ``texts`` (bytes), row by row of ``out``."""
    cdef Py_ssize_t i, n, rows = len(texts)
    cdef bytes t
    cdef const char* s
    if out.shape[0] < rows or out.shape[1] < 1:
        raise ValueError("out must have a row per text and at least one column")
    for i in range(rows):
        t = texts[i]
        s = t
        n = len(t)
        with nogil:
            _embed(s, n, &out[i, 0], out.shape[1])
