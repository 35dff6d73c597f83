"""Prompt-text normalisation and fingerprints: the public face of ``sidecar._native.normalize``.

The spec (version 1) is documented in ``native/normalize.pyx``: NFKC + casefold,
punctuation and white-space folding that keeps signs, decimals and meaning-bearing symbols,
and configurable filler-word removal. A fingerprint is the XXH3-128 of the normalised text
under a seed derived from the spec version, the Unicode version and the filler words; its
``spec`` id travels with every key so keys from different specs are never compared.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple

from .._native import load
from ..errors import ConfigError

_native = load("normalize")

SPEC_VERSION: int = _native.SPEC_VERSION
UNICODE_VERSION: str = _native.UNICODE_VERSION

#: The seed's filler words: politeness and hedges that do not change what is asked.
DEFAULT_FILLER_WORDS: tuple[str, ...] = (
    "please", "can", "you", "could", "would", "just", "maybe", "actually", "basically",
)

_BARE = _native.Normalizer(())


class Fingerprint(NamedTuple):
    normalized: str
    key: bytes  # 16 bytes, big-endian XXH3-128
    spec: str


def canonical_filler_words(words: Iterable[str]) -> tuple[str, ...]:
    """Normalise filler words as the spec would and check each is one word.

    Raises ``ConfigError`` naming the offending entry.
    """
    out = []
    for word in words:
        if not isinstance(word, str):
            raise ConfigError(f"filler word {word!r} is not a string",
                              key="normalize.filler_words")
        norm = _BARE.normalize(word)
        if not norm or " " in norm:
            raise ConfigError(
                f"filler word {word!r} normalises to {norm!r}, not a single word",
                key="normalize.filler_words",
                hint="list single words such as \"please\"; punctuation and spaces fold away",
            )
        out.append(norm)
    return tuple(sorted(set(out)))


class Normalizer:
    """One normalisation spec: version 1 plus a set of filler words."""

    __slots__ = ("_core",)

    def __init__(self, filler_words: Iterable[str] = DEFAULT_FILLER_WORDS) -> None:
        self._core = _native.Normalizer(canonical_filler_words(filler_words))

    @property
    def spec(self) -> str:
        """Spec id, ``v<version>:<seed hex>``; equal ids mean comparable keys."""
        return self._core.spec

    @property
    def filler_words(self) -> tuple[str, ...]:
        return self._core.filler_words

    def normalize(self, text: str) -> str:
        """Return the normalised form of ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        return self._core.normalize(text)

    def fingerprint(self, text: str) -> Fingerprint:
        """Return the normalised form of ``text`` with its 128-bit key and spec id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        normalized, key = self._core.fingerprint(text)
        return Fingerprint(normalized, key, self._core.spec)

    def text_key(self, namespace: str, model: str, temperature: float | None,
                 text: str) -> bytes:
        """The exact cache key of a request that is ``text`` as one user turn, with no
        params, tools or response format (``sidecar.cache.keys.request_key``'s common
        case), computed natively in one pass."""
        return self._core.text_key(namespace, model, temperature, text)

    def key_of(self, data: bytes) -> bytes:
        """16-byte XXH3-128 of ``data`` under this spec's seed, for keys of structures
        (a whole chat request) whose texts went through ``normalize`` first."""
        if not isinstance(data, bytes):
            raise TypeError(f"data must be bytes, not {type(data).__name__}")
        return self._core.key_of(data)
