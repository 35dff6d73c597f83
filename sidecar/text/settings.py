"""Settings of text handling: ``[normalize]`` (filler words) and ``[tokens]`` (which
encoding counts which model, estimate ratios for models without a public tokenizer)."""
from __future__ import annotations

from typing import Annotated

import msgspec

from ..settings import Section
from .normalize import DEFAULT_FILLER_WORDS

#: The encodings the counter ships (``sidecar.text.tokens`` checks it has each).
KNOWN_ENCODINGS = ("o200k_base", "cl100k_base")


class NormalizeConfig(Section):
    filler_words: tuple[str, ...] = DEFAULT_FILLER_WORDS


#: Model-name prefixes -> encoding; the longest matching prefix wins.
DEFAULT_MODEL_ENCODINGS: dict[str, str] = {
    "gpt-5": "o200k_base", "gpt-4.1": "o200k_base", "gpt-4.5": "o200k_base",
    "gpt-4o": "o200k_base", "chatgpt-4o": "o200k_base", "gpt-oss": "o200k_base",
    "o1": "o200k_base", "o3": "o200k_base", "o4": "o200k_base",
    "gpt-4": "cl100k_base", "gpt-3.5": "cl100k_base", "gpt-35": "cl100k_base",
    "text-embedding-3": "cl100k_base", "text-embedding-ada-002": "cl100k_base",
}

#: Model-name prefixes without a public tokenizer -> tokens per o200k_base token. These
#: are starting points from public comparisons, not calibrated here: set your own.
DEFAULT_ESTIMATE_RATIOS: dict[str, float] = {
    "claude": 1.20, "gemini": 1.05, "mistral": 1.15, "llama": 1.10, "command": 1.10,
    "default": 1.20,
}

PositiveRatio = Annotated[float, msgspec.Meta(gt=0, le=10)]


class TokensConfig(Section):
    models: dict[str, str] = msgspec.field(default_factory=lambda: dict(DEFAULT_MODEL_ENCODINGS))
    estimate_ratios: dict[str, PositiveRatio] = msgspec.field(
        default_factory=lambda: dict(DEFAULT_ESTIMATE_RATIOS))
    #: texts at least this long are counted on a worker thread, off the event loop
    offload_chars: Annotated[int, msgspec.Meta(ge=0)] = 65536
