"""Settings of the response cache: ``[cache]``, its ``[cache.policy]`` per response type
and ``[cache.semantic]``."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..settings import Section


class CachePolicyConfig(Section, kw_only=True):
    """How one response type is cached: which tiers and for how long."""

    #: "exact" (the normalised request must match), "semantic" (also a verified paraphrase
    #: of the last user turn in the same scope), or "none" (never stored)
    tier: Literal["exact", "semantic", "none"]
    ttl: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600.0  # seconds


#: Response type -> policy (the seeds' table, each TTL the middle of its range).
DEFAULT_CACHE_POLICY: dict[str, CachePolicyConfig] = {
    "classification": CachePolicyConfig(tier="exact", ttl=48 * 3600.0),  # 24-72 h
    "factual_qa": CachePolicyConfig(tier="semantic", ttl=2 * 3600.0),  # 1-4 h
    "summarization": CachePolicyConfig(tier="exact", ttl=8 * 3600.0),  # 4-12 h
    "code": CachePolicyConfig(tier="exact", ttl=3 * 3600.0),  # 1-6 h
    "extraction": CachePolicyConfig(tier="exact", ttl=36 * 3600.0),  # 24-48 h
    "creative": CachePolicyConfig(tier="none", ttl=0.0),
    "general": CachePolicyConfig(tier="exact", ttl=3600.0),  # no type given
}


class SemanticConfig(Section):
    enabled: bool = True
    #: "minilm" (all-MiniLM-L6-v2 int8, shipped by a PyPI package; real paraphrases) or
    #: "lexical" (hashed n-grams: near-duplicates only, no model)
    embedder: Literal["minilm", "lexical"] = "minilm"
    #: pair verifier after the threshold: "full", "cheap" (numbers, names, question
    #: words only) or "off"
    verifier: Literal["full", "cheap", "off"] = "full"
    #: cosine similarity a hit needs; unset = the measured default for the embedder and
    #: verifier (see sidecar.cache.semantic.DEFAULT_THRESHOLDS)
    threshold: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    #: nearest entries looked at per lookup (the best that passes the verifier is served)
    candidates: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    #: entries per scope below which search is exact brute force, above it HNSW; unset =
    #: the measured crossover (sidecar.cache.vectors.DEFAULT_EXACT_BELOW)
    exact_below: Annotated[int, msgspec.Meta(ge=0)] | None = None
    #: HNSW storage: "f32", "f16" or "i8"; unset = sidecar.cache.vectors' default (f32: f16 and
    #: i8 were measured to lose recall@1, see python -m bench cache)
    dtype: Literal["f16", "f32", "i8"] | None = None
    #: dimension of client-supplied vectors (0: any, one dimension per scope)
    client_dim: Annotated[int, msgspec.Meta(ge=0, le=4096)] = 0


class CacheConfig(Section):
    enabled: bool = True
    max_entries: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 100_000
    max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 256 * 1024 * 1024
    #: an expired entry is kept this long to be served flagged stale when asked
    stale_for: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 86400.0
    #: never store conversations with more user turns than this
    max_turns: Annotated[int, msgspec.Meta(ge=1)] = 8
    #: never store answers sampled at a higher temperature
    max_temperature: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    #: where the cache is snapshotted; "" = the state directory (one file per socket),
    #: "off" = not persisted
    snapshot: str = ""
    snapshot_interval: Annotated[float, msgspec.Meta(ge=1)] = 300.0
    #: response types; a table given in the file is merged over these defaults
    policy: dict[str, CachePolicyConfig] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_CACHE_POLICY))
    semantic: SemanticConfig = SemanticConfig()
