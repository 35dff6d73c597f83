# C declarations for xxHash (the system's libxxhash-dev header), compiled inline
# through xxh_inline.h so the extension carries no runtime library dependency.
from libc.stdint cimport uint64_t

cdef extern from "xxh_inline.h" nogil:
    ctypedef struct XXH128_hash_t:
        uint64_t low64
        uint64_t high64

    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]

    uint64_t XXH3_64bits_withSeed(const void* data, size_t length, uint64_t seed)
    XXH128_hash_t XXH3_128bits_withSeed(const void* data, size_t length, uint64_t seed)
    void XXH128_canonicalFromHash(XXH128_canonical_t* dst, XXH128_hash_t hash)
