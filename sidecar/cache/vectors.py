"""The semantic cache's vector index: the public face of ``sidecar._native.vectors``.

One ``VectorIndex`` per cache scope maps uint64 keys to unit vectors (the caller
L2-normalises them) and answers nearest-neighbour queries with keys and cosine
similarities (the dot product, in [-1, 1], highest first). Small indexes are searched
exactly by brute force over a contiguous float32 matrix; at ``exact_below`` entries the
index is rebuilt once as a USearch HNSW graph (f32, f16 or i8 storage) and searched
approximately from then on; both tiers return the same kind of result. This module owns
names, docstrings and validation; the compiled module does the work and USearch's errors
become ``sidecar.errors.VectorIndexError`` here, at one place (``_failed``).

Thread safety: every method may be called from any thread. Mutations (``add``,
``remove``, ``clear``, ``load``, ``save``) are serialised among themselves; searches
never wait for a whole ``add``: on the exact tier they wait at most for one in-memory
copy of the batch, on the HNSW tier for at most one chunk of ``add_chunk`` inserts
(USearch orders calls on one index with a mutex, GIL released). The rebuild at the
threshold (about 4 s for 10k dim-384 entries on one vCPU) runs on the adding thread while
searches continue on the exact tier. So the
intended use is: searches on the event loop, batched ``add`` calls on one worker thread.
"""
from __future__ import annotations

import enum
import os
from typing import NamedTuple

import numpy as np

from .._native import load
from ..errors import VectorIndexError, VectorInputError

_native = load("vectors")

#: Below this many entries search is exact brute force. ``python -m bench cache`` on the
#: 2-vCPU reference VM (dim 384): an exact scan costs about 100-130 us at 5k entries and
#: 270-320 us at 10k; an HNSW query at 10k 110-220 us (f16) or 190-390 us (f32); so up
#: to 5k exact search is as fast, has recall 1, and its inserts are copies instead of
#: graph inserts. With f32 storage the crossover is nearer 10k (not yet re-measured).
DEFAULT_EXACT_BELOW = 5_000
#: Inserts per USearch call when adding to the HNSW tier: the longest a search waits.
DEFAULT_ADD_CHUNK = 32
#: Key of a ``search_batch`` slot beyond the matches found.
NO_KEY: int = _native.NO_KEY

_F32 = np.dtype(np.float32)
_U64 = np.dtype(np.uint64)
_CONVERT = "convert with np.ascontiguousarray(x, dtype=np.float32)"


class Dtype(enum.Enum):
    """How the HNSW tier stores vectors (the exact tier always keeps float32)."""

    F32 = "f32"
    F16 = "f16"
    I8 = "i8"


class Tier(enum.Enum):
    """Which search an index runs now."""

    EXACT = _native.EXACT
    HNSW = _native.HNSW


class Matches(NamedTuple):
    """Result of ``search``: parallel arrays, most similar first."""

    keys: np.ndarray  # uint64
    similarities: np.ndarray  # float32, dot product of unit vectors


class BatchMatches(NamedTuple):
    """Result of ``search_batch``: row ``i`` answers query ``i``; slots at and beyond
    ``counts[i]`` hold key ``NO_KEY`` and similarity ``-inf``."""

    keys: np.ndarray  # uint64 (n, k)
    similarities: np.ndarray  # float32 (n, k)
    counts: np.ndarray  # intp (n,)


def _failed(what: str, exc: Exception) -> VectorIndexError:
    """The one place where the native layer's and USearch's errors become ours."""
    if isinstance(exc, VectorIndexError):
        return exc
    return VectorIndexError(f"vector index {what} failed: {exc}")


class VectorIndex:
    """Nearest-neighbour index of unit vectors under uint64 keys.

    ``dim``: vector dimension (384 for MiniLM). ``dtype``: HNSW storage. ``"f32"`` by
    default; ``"f16"`` halves the memory (about 1.7 vs 3.4 kB per dim-384 entry) and
    matched f32's recall@1 on clustered vectors at 10k and 100k entries and on random ones
    at 10k, but measured 1.5 points lower on random vectors at 100k (one build each, so
    not yet told apart from build noise); ``"i8"`` lost 25 points of recall@1 on
    clustered vectors and is for experiments only (``python -m bench cache``).
    ``capacity``: expected entries (pre-sizes the exact tier). ``exact_below``:
    entries at which exact search gives way to HNSW (0: HNSW from the start).
    ``connectivity``, ``expansion_add``, ``expansion_search``: USearch's HNSW parameters.
    ``add_chunk``: inserts per USearch call (bounds how long a search waits for an add).
    ``build_threads``: threads for the one-off rebuild at the threshold. Default 1:
    USearch graphs built by concurrent inserts were measured to lose nodes (3 of 10k
    dim-384 entries no longer found as their own nearest neighbour with 2 threads, none
    with 1; ``bench/cache.py`` reports the build time of both).

    Adding an existing key replaces its vector (within one batch the last one wins).
    """

    def __init__(self, dim: int, *, dtype: Dtype | str = Dtype.F32, capacity: int = 0,
                 exact_below: int = DEFAULT_EXACT_BELOW, connectivity: int = 16,
                 expansion_add: int = 128, expansion_search: int = 64,
                 add_chunk: int = DEFAULT_ADD_CHUNK, build_threads: int = 1) -> None:
        try:
            self._dtype = Dtype(dtype)
        except ValueError:
            raise VectorInputError(f"unknown dtype {dtype!r}; use one of "
                                   f"{[d.value for d in Dtype]}") from None
        for name, value, low in (("dim", dim, 1), ("capacity", capacity, 0),
                                 ("exact_below", exact_below, 0), ("connectivity", connectivity, 2),
                                 ("expansion_add", expansion_add, 1),
                                 ("expansion_search", expansion_search, 1),
                                 ("add_chunk", add_chunk, 1),
                                 ("build_threads", build_threads, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise VectorInputError(f"{name} must be an integer >= {low}, got {value!r}")
        self._dim = dim
        self._core = _native.Core(dim, _native.SCALARS[self._dtype.value], exact_below,
                                  capacity, connectivity, expansion_add, expansion_search,
                                  add_chunk, build_threads)

    # --- properties -------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> Dtype:
        return self._dtype

    @property
    def exact_below(self) -> int:
        return self._core.exact_below

    @property
    def tier(self) -> Tier:
        """``Tier.EXACT`` until the index first reaches ``exact_below`` entries."""
        return Tier(self._core.tier)

    def __len__(self) -> int:
        return len(self._core)

    def memory_bytes(self) -> int:
        """Bytes the index holds for its entries (exact tier: matrix, keys and key map at
        their allocated capacity; HNSW tier: USearch's own accounting)."""
        return self._core.memory_bytes()

    # --- validation -------------------------------------------------------------------

    def _keys(self, keys: object) -> np.ndarray:
        if isinstance(keys, np.ndarray):
            if keys.dtype != _U64:
                if keys.dtype.kind not in "iu" or (keys.size and keys.min() < 0):
                    raise VectorInputError(f"keys must be non-negative integers (uint64), got "
                                           f"an array of {keys.dtype}")
                keys = keys.astype(_U64)
        else:
            try:
                keys = np.array(keys, dtype=_U64)
            except (TypeError, ValueError, OverflowError) as exc:
                raise VectorInputError(f"keys must be a uint64 array or a sequence of "
                                       f"integers in [0, 2**64): {exc}") from None
        if keys.ndim != 1:
            raise VectorInputError(f"keys must be one-dimensional, got shape {keys.shape}")
        return np.ascontiguousarray(keys)

    def _matrix(self, vectors: object, what: str) -> np.ndarray:
        if not isinstance(vectors, np.ndarray):
            raise VectorInputError(f"{what} must be a numpy float32 array, got "
                                   f"{type(vectors).__name__}; {_CONVERT}")
        if vectors.dtype != _F32:
            raise VectorInputError(f"{what} must be float32, got {vectors.dtype}; {_CONVERT}")
        if vectors.ndim != 2 or vectors.shape[1] != self._dim:
            raise VectorInputError(f"{what} must have shape (n, {self._dim}), got "
                                   f"{vectors.shape}")
        if not vectors.flags.c_contiguous:
            raise VectorInputError(f"{what} must be C-contiguous; {_CONVERT}")
        return vectors

    def _query(self, vector: object) -> np.ndarray:
        # The common case costs three attribute checks; anything else gets a message.
        if (type(vector) is np.ndarray and vector.dtype is _F32
                and vector.shape == (self._dim,) and vector.flags.c_contiguous):
            return vector
        if isinstance(vector, np.ndarray) and vector.dtype == _F32 \
                and vector.shape == (self._dim,) and vector.flags.c_contiguous:
            return vector
        if not isinstance(vector, np.ndarray):
            raise VectorInputError(f"the query must be a numpy float32 array, got "
                                   f"{type(vector).__name__}; {_CONVERT}")
        if vector.dtype != _F32:
            raise VectorInputError(f"the query must be float32, got {vector.dtype}; {_CONVERT}")
        if vector.shape != (self._dim,):
            raise VectorInputError(f"the query must have shape ({self._dim},), got "
                                   f"{vector.shape} (use search_batch for several)")
        raise VectorInputError(f"the query must be C-contiguous; {_CONVERT}")

    @staticmethod
    def _k(k: object) -> int:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise VectorInputError(f"k must be an integer >= 1, got {k!r}")
        return k

    # --- operations -------------------------------------------------------------------

    def add(self, keys: object, vectors: np.ndarray) -> None:
        """Insert or replace ``keys[i] -> vectors[i]``.

        ``keys``: uint64 array (or integers), ``vectors``: float32, shape ``(n, dim)``,
        C-contiguous, rows L2-normalised. Validated once per batch. Blocks for the
        batch's inserts (about 0.5-0.8 ms each at a million entries; exact-tier inserts
        are copies) and, once, for the rebuild when the batch reaches ``exact_below``:
        call it from a worker thread.
        """
        vectors = self._matrix(vectors, "vectors")
        keys = self._keys(keys)
        if keys.shape[0] != vectors.shape[0]:
            raise VectorInputError(f"{keys.shape[0]} keys for {vectors.shape[0]} vectors")
        try:
            self._core.add(keys, vectors)
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise _failed("add", exc) from exc

    def remove(self, keys: object) -> int:
        """Remove ``keys`` (absent ones are ignored); returns how many were removed."""
        keys = self._keys(keys)
        try:
            return self._core.remove(keys)
        except (RuntimeError, ValueError) as exc:
            raise _failed("remove", exc) from exc

    def search(self, vector: np.ndarray, k: int = 1) -> Matches:
        """The ``k`` entries most similar to ``vector`` (float32, shape ``(dim,)``): fewer
        when the index holds fewer; empty arrays when it is empty."""
        if k.__class__ is not int or k < 1:
            self._k(k)
        try:
            keys, sims = self._core.search(self._query(vector), k)
        except (RuntimeError, ValueError) as exc:
            raise _failed("search", exc) from exc
        return Matches(keys, sims)

    def search_batch(self, vectors: np.ndarray, k: int = 1) -> BatchMatches:
        """``search`` for each row of ``vectors`` (float32, ``(n, dim)``, C-contiguous)."""
        self._k(k)
        vectors = self._matrix(vectors, "queries")
        try:
            return BatchMatches(*self._core.search_batch(vectors, k))
        except (RuntimeError, ValueError) as exc:
            raise _failed("search", exc) from exc

    def clear(self) -> None:
        """Remove every entry; the index starts again on the exact tier."""
        self._core.clear()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (a temporary file beside it, fsynced,
        then renamed). The HNSW tier is serialised by USearch in memory first, so saving
        briefly needs about the index's size again."""
        path = os.fspath(path)
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            self._core.save(tmp)
            os.replace(tmp, path)
        except (RuntimeError, ValueError, OSError) as exc:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise
            raise _failed(f"save to {path}", exc) from exc

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace the content with a file written by ``save`` for the same ``dim`` and
        ``dtype``; the tier is the saved one."""
        try:
            self._core.load(os.fspath(path))
        except (RuntimeError, ValueError) as exc:
            raise _failed(f"load from {os.fspath(path)}", exc) from exc
