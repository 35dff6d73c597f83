# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Prompt-text normalisation spec and its xxh3-128 fingerprint (compiled core).

Spec version 1, applied to a Python ``str``:

1. ASCII text is lower-cased; other text becomes NFKC(casefold(NFKC(text))).
2. Each code point is classed with the interpreter's Unicode database:
   - white space (``str.isspace``) separates words;
   - non-printable code points that are not white space or private use
     (controls, format characters such as U+200B, lone surrogates, unassigned) are removed;
   - punctuation (categories Pd, Ps, Pe, Pi, Pf and Po, except the meaning-bearing
     ``# % & * @ / \\ § ¶ † ‡ ‰ ‱ ′ ″ ‴``) is kept when a digit follows it, or a digit
     precedes it and an alphanumeric follows (so ``-5``, ``3.14``, ``1,000``, ``5-a``
     survive while the ``?`` of ``is it 5?`` folds), removed when it is an apostrophe
     (U+0027, U+2019) between two alphanumerics (``don't`` -> ``dont``), and otherwise
     separates words;
   - everything else is kept.
3. Words are joined by one space; words equal to a filler word are dropped.

The fingerprint is XXH3-128 over the UTF-8 of the normalised text, seeded with the
XXH3-64 of a descriptor naming the spec version, the Unicode version and the filler words,
so keys made under different specs never collide by construction. Imported only by
``sidecar.text.normalize``.
"""
import unicodedata

from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from includes.pyunicode cimport (
    PyUnicode_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_IS_ASCII,
    PyUnicode_FromKindAndData, PyUnicode_AsUTF8AndSize,
    PyUnicode_1BYTE_KIND, PyUnicode_2BYTE_KIND, PyUnicode_4BYTE_KIND,
    Py_UNICODE_ISSPACE, Py_UNICODE_ISALNUM, Py_UNICODE_ISDIGIT, Py_UNICODE_ISPRINTABLE,
)
from includes.xxhash cimport (
    XXH128_hash_t, XXH128_canonical_t, XXH3_64bits_withSeed, XXH3_128bits_withSeed,
    XXH128_canonicalFromHash,
)

SPEC_VERSION = 1
UNICODE_VERSION = unicodedata.unidata_version

cdef enum:
    # Code-point class bits.
    F_SPACE = 1
    F_PUNCT = 2
    F_DROP = 4
    F_ALNUM = 8
    F_DIGIT = 16
    F_APOS = 32
    # Every punctuation and white-space code point lies below U+40000 (checked by the
    # tests against the whole database); above it only printability matters.
    TABLE_SIZE = 0x40000
    # Inputs at least this long are folded and hashed without the GIL.
    NOGIL_MIN = 16384

cdef uint8_t _TABLE[TABLE_SIZE]


cdef struct Word:
    uint32_t* chars
    Py_ssize_t length

_FOLDED_CATEGORIES = frozenset(("Pd", "Ps", "Pe", "Pi", "Pf", "Po"))
_KEPT_PUNCTUATION = frozenset("#%&*@/\\§¶†‡‰‱′″‴")
_APOSTROPHES = frozenset("'\u2019")


cdef inline bint _private_use(uint32_t c) noexcept nogil:
    return 0xE000 <= c <= 0xF8FF or c >= 0xF0000


cdef uint8_t _classify(uint32_t c) noexcept nogil:
    # Classification from the C-level character database; punctuation needs the
    # category and is patched in by _build_table.
    cdef uint8_t f = 0
    if Py_UNICODE_ISSPACE(c):
        return F_SPACE
    if Py_UNICODE_ISALNUM(c):
        f |= F_ALNUM
    if Py_UNICODE_ISDIGIT(c):
        f |= F_DIGIT
    if not Py_UNICODE_ISPRINTABLE(c) and not _private_use(c):
        f |= F_DROP
    return f


cdef void _build_table() except *:
    cdef uint32_t c
    cdef uint8_t f
    category = unicodedata.category
    for c in range(TABLE_SIZE):
        f = _classify(c)
        if f == 0:
            ch = chr(c)
            if category(ch) in _FOLDED_CATEGORIES and ch not in _KEPT_PUNCTUATION:
                f = F_PUNCT | (F_APOS if ch in _APOSTROPHES else 0)
        _TABLE[c] = f


_build_table()


cdef inline uint8_t _flags(uint32_t c) noexcept nogil:
    if c < TABLE_SIZE:
        return _TABLE[c]
    return _classify(c)


ctypedef fused char_t:
    uint8_t
    uint16_t
    uint32_t


cdef inline bint _is_filler(const char_t* w, Py_ssize_t n, const Word* fillers,
                            Py_ssize_t nfillers) noexcept nogil:
    cdef Py_ssize_t j, k
    for j in range(nfillers):
        if fillers[j].length != n:
            continue
        for k in range(n):
            if <uint32_t>w[k] != fillers[j].chars[k]:
                break
        else:
            return True
    return False


cdef Py_ssize_t _fold(const char_t* s, Py_ssize_t n, char_t* out, const Word* fillers,
                      Py_ssize_t nfillers) noexcept nogil:
    """Apply step 2 and 3 of the spec; returns the output length (<= n)."""
    cdef Py_ssize_t i, o = 0, start = 0
    cdef bint in_word = False
    cdef uint32_t c, before, after
    cdef uint8_t f
    for i in range(n):
        c = s[i]
        f = _flags(c)
        if f & F_DROP:
            continue
        if f & F_PUNCT:
            before = s[i - 1] if i > 0 else 0
            after = s[i + 1] if i + 1 < n else 0
            if _flags(after) & F_DIGIT or (_flags(before) & F_DIGIT and _flags(after) & F_ALNUM):
                f = 0
            elif f & F_APOS and _flags(before) & _flags(after) & F_ALNUM:
                continue
            else:
                f = F_SPACE
        if f & F_SPACE:
            if in_word:
                in_word = False
                if _is_filler(out + start, o - start, fillers, nfillers):
                    o = start - 1 if start > 0 else 0
            continue
        if not in_word:
            in_word = True
            if o > 0:
                out[o] = 32
                o += 1
            start = o
        out[o] = <char_t>c
        o += 1
    if in_word and _is_filler(out + start, o - start, fillers, nfillers):
        o = start - 1 if start > 0 else 0
    return o


cdef str _prepare(str text):
    if PyUnicode_IS_ASCII(text):
        return text.lower()
    text = unicodedata.normalize("NFKC", text)
    return unicodedata.normalize("NFKC", text.casefold())


cdef class Normalizer:
    """Normaliser for one spec: version 1 with a fixed tuple of filler words.

    ``filler_words`` must already be in normalised form (lower case, one word each);
    ``sidecar.text.normalize`` validates them before they get here.
    """
    cdef Word* _fillers
    cdef Py_ssize_t _nfillers
    cdef readonly uint64_t seed
    cdef readonly str spec
    cdef readonly tuple filler_words

    def __cinit__(self):
        self._fillers = NULL
        self._nfillers = 0

    def __init__(self, filler_words=()):
        cdef Py_ssize_t i, k, n
        cdef str w
        words = tuple(sorted(set(filler_words)))
        for w in words:
            if not w:
                raise ValueError("filler words must be non-empty")
        self._fillers = <Word*>PyMem_Malloc(max(1, len(words)) * sizeof(Word))
        if self._fillers == NULL:
            raise MemoryError()
        for i, w in enumerate(words):
            n = len(w)
            self._fillers[i].chars = <uint32_t*>PyMem_Malloc(n * sizeof(uint32_t))
            if self._fillers[i].chars == NULL:
                raise MemoryError()
            for k in range(n):
                self._fillers[i].chars[k] = ord(w[k])
            self._fillers[i].length = n
            self._nfillers = i + 1
        self.filler_words = words
        descriptor = "llm-sidecar/normalize/%d\x1funicode=%s\x1ffillers=%s" % (
            SPEC_VERSION, UNICODE_VERSION, "\x1e".join(words))
        data = descriptor.encode("utf-8")
        self.seed = XXH3_64bits_withSeed(<const char*>data, len(data), 0)
        self.spec = "v%d:%016x" % (SPEC_VERSION, self.seed)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._fillers != NULL:
            for i in range(self._nfillers):
                PyMem_Free(self._fillers[i].chars)
            PyMem_Free(self._fillers)

    cpdef str normalize(self, str text):
        """Return the normalised form of ``text``."""
        cdef str t = _prepare(text)
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(t), o
        cdef int kind = PyUnicode_KIND(t)
        cdef const void* src = PyUnicode_DATA(t)
        if n == 0:
            return ""
        cdef void* out = PyMem_Malloc(n * kind)
        if out == NULL:
            raise MemoryError()
        try:
            if n >= NOGIL_MIN:
                with nogil:
                    o = self._dispatch(kind, src, n, out)
            else:
                o = self._dispatch(kind, src, n, out)
            return PyUnicode_FromKindAndData(kind, out, o)
        finally:
            PyMem_Free(out)

    cdef Py_ssize_t _dispatch(self, int kind, const void* src, Py_ssize_t n,
                              void* out) noexcept nogil:
        if kind == PyUnicode_1BYTE_KIND:
            return _fold(<const uint8_t*>src, n, <uint8_t*>out, self._fillers, self._nfillers)
        if kind == PyUnicode_2BYTE_KIND:
            return _fold(<const uint16_t*>src, n, <uint16_t*>out, self._fillers, self._nfillers)
        return _fold(<const uint32_t*>src, n, <uint32_t*>out, self._fillers, self._nfillers)

    cpdef tuple fingerprint(self, str text):
        """Return ``(normalised text, 16-byte big-endian XXH3-128 key)``."""
        cdef str norm = self.normalize(text)
        cdef Py_ssize_t size
        cdef const char* utf8 = PyUnicode_AsUTF8AndSize(norm, &size)
        return norm, self._key(utf8, size)

    cpdef bytes key_of(self, bytes data):
        """16-byte big-endian XXH3-128 of ``data`` under this spec's seed: the key of a
        structure whose text parts were normalised by this spec (cache requests)."""
        return self._key(data, len(data))

    cdef bytes _key(self, const char* p, Py_ssize_t size):
        cdef XXH128_hash_t h
        cdef XXH128_canonical_t canon
        if size >= NOGIL_MIN:
            with nogil:
                h = XXH3_128bits_withSeed(p, size, self.seed)
        else:
            h = XXH3_128bits_withSeed(p, size, self.seed)
        XXH128_canonicalFromHash(&canon, h)
        return (<char*>canon.digest)[:16]

    def text_key(self, str namespace not None, str model not None, object temperature,
                 str text not None):
        """The exact key of a one-turn request with no params, tools or response format:
        ``key_of`` of the canonical msgpack ``["exact", namespace, model, temperature,
        {}, None, None, [["user", normalize(text), None, None, None]]]`` (what
        ``sidecar.cache.keys.request_key`` hashes for it), built here in one pass.
        ``temperature``: a float or None."""
        cdef Py_ssize_t ns_len, model_len, text_len, size, i, n
        cdef const char* ns_p = PyUnicode_AsUTF8AndSize(namespace, &ns_len)
        cdef const char* model_p = PyUnicode_AsUTF8AndSize(model, &model_len)
        cdef double t = 0.0
        if temperature is not None:
            if type(temperature) is not float:
                raise TypeError("temperature must be a float or None")
            t = temperature
        cdef str norm
        cdef const char* text_p
        cdef const uint8_t* src
        cdef uint8_t small[2048]
        cdef uint8_t* work = small
        cdef uint8_t c
        if not PyUnicode_IS_ASCII(text):
            norm = self.normalize(text)
            text_p = PyUnicode_AsUTF8AndSize(norm, &text_len)
            return self._text_key(ns_p, ns_len, model_p, model_len, temperature is not None,
                                  t, text_p, text_len)
        # ASCII (the common case): lower-cased and folded here, no str made; the folded
        # bytes are their own UTF-8 (what ``normalize`` then encoding would give)
        n = PyUnicode_GET_LENGTH(text)
        src = <const uint8_t*>PyUnicode_DATA(text)
        if 2 * n > 2048:
            work = <uint8_t*>PyMem_Malloc(2 * n)
            if work == NULL:
                raise MemoryError()
        try:
            for i in range(n):
                c = src[i]
                work[i] = c + 32 if 65 <= c <= 90 else c
            text_len = _fold(<const uint8_t*>work, n, work + n, self._fillers, self._nfillers)
            return self._text_key(ns_p, ns_len, model_p, model_len, temperature is not None,
                                  t, <const char*>(work + n), text_len)
        finally:
            if work != small:
                PyMem_Free(work)

    cdef bytes _text_key(self, const char* ns_p, Py_ssize_t ns_len, const char* model_p,
                         Py_ssize_t model_len, bint has_t, double t, const char* text_p,
                         Py_ssize_t text_len):
        cdef Py_ssize_t size
        # array(8) "exact" ns model temp {} nil nil array(1) array(5) "user" text nil x3
        size = 1 + 6 + (5 + ns_len) + (5 + model_len) + 9 + 3 + 2 + 5 + (5 + text_len) + 3
        cdef unsigned char stack[1024]
        cdef unsigned char* buf = stack
        if size > 1024:
            buf = <unsigned char*>PyMem_Malloc(size)
            if buf == NULL:
                raise MemoryError()
        cdef unsigned char* p = buf
        cdef bytes key
        try:
            p[0] = 0x98
            p[1] = 0xa5
            memcpy(p + 2, b"exact", 5)
            p = _pack_str(p + 7, ns_p, ns_len)
            p = _pack_str(p, model_p, model_len)
            if not has_t:
                p[0] = 0xc0
                p += 1
            else:
                p = _pack_double(p, t)
            p[0] = 0x80
            p[1] = 0xc0
            p[2] = 0xc0
            p[3] = 0x91
            p[4] = 0x95
            p[5] = 0xa4
            memcpy(p + 6, b"user", 4)
            p = _pack_str(p + 10, text_p, text_len)
            p[0] = 0xc0
            p[1] = 0xc0
            p[2] = 0xc0
            p += 3
            key = self._key(<const char*>buf, p - buf)
        finally:
            if buf != stack:
                PyMem_Free(buf)
        return key


cdef inline unsigned char* _pack_str(unsigned char* p, const char* s, Py_ssize_t n) noexcept:
    """msgpack's shortest str header for ``n`` bytes (as msgspec writes it), then the bytes."""
    if n < 32:
        p[0] = 0xa0 | n
        p += 1
    elif n < 256:
        p[0] = 0xd9
        p[1] = <unsigned char>n
        p += 2
    elif n < 65536:
        p[0] = 0xda
        p[1] = <unsigned char>(n >> 8)
        p[2] = <unsigned char>n
        p += 3
    else:
        p[0] = 0xdb
        p[1] = <unsigned char>(n >> 24)
        p[2] = <unsigned char>(n >> 16)
        p[3] = <unsigned char>(n >> 8)
        p[4] = <unsigned char>n
        p += 5
    memcpy(p, s, n)
    return p + n


cdef inline unsigned char* _pack_double(unsigned char* p, double v) noexcept:
    cdef uint64_t bits
    memcpy(&bits, &v, 8)
    p[0] = 0xcb
    cdef int i
    for i in range(8):
        p[1 + i] = <unsigned char>(bits >> (56 - 8 * i))
    return p + 9
