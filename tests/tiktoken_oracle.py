"""tiktoken itself, made to work offline from the same installed files (tests only).

tiktoken downloads encodings by URL into a cache keyed by the URL's SHA-1; seeding that
cache with the files bpe-openai ships lets ``tiktoken.get_encoding`` run unchanged, with its
own patterns and its own hash checks.
"""
import gzip
import hashlib
import os
import tempfile
from pathlib import Path

_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
_cache = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))


def get(name: str):
    from sidecar.text.tokens import source_path

    os.environ["TIKTOKEN_CACHE_DIR"] = str(_cache)
    target = _cache / hashlib.sha1(_URLS[name].encode()).hexdigest()
    if not target.exists():
        raw = source_path(name).read_bytes()
        target.write_bytes(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    import tiktoken

    return tiktoken.get_encoding(name)
