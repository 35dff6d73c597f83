"""native/pretokenize.pxi (tiktoken's regex split step, hand-compiled) against tiktoken itself.

The oracle is tiktoken 0.14 with the real cl100k_base / o200k_base ranks (shipped, gzipped, by the
bpe-openai package; no download).  For a text, the pieces of the Cython splitter are BPE-encoded
*without any further splitting* and concatenated; the result must equal
``enc.encode_ordinary(text)``.  BPE never crosses a piece boundary, so identical splits give
identical tokens, and a wrong split almost always changes them.  The pieces are also compared with
``regex.findall(pat_str, text)`` (the ``regex`` module; its Unicode tables may be newer than
tiktoken's, so that comparison is restricted to text whose classes agree, see below).

Run ``python tests/test_pretokenize.py --blob`` with unicodedata2==16.0.0 installed to regenerate
the PT_UCD_BLOB table of native/pretokenize.pxi.
"""
from __future__ import annotations

import base64
import functools
import os
import random
import sys
import time
import zlib
from pathlib import Path

import pytest
import regex
import tiktoken
from hypothesis import HealthCheck, given, settings, strategies as st

import tiktoken_oracle
from sidecar._native import tokens as _tokens_mod
from sidecar._native.tokens import _pretokenize

PT_CL100K, PT_O200K = 1, 2
KINDS = {"cl100k_base": PT_CL100K, "o200k_base": PT_O200K}


# --------------------------------------------------------------------------- encodings (offline)

def encoding(name: str) -> "tiktoken.Encoding":
    """The real encoding: tiktoken's own definition, offline (see tiktoken_oracle)."""
    return tiktoken_oracle.get(name)


@functools.lru_cache(None)
def _ranks(name: str) -> dict[bytes, int]:
    return encoding(name)._mergeable_ranks


@functools.lru_cache(None)
def _marker_encoding(name: str) -> "tiktoken.Encoding":
    """Same ranks, but the regex only splits at NUL: pieces joined with NUL are BPE'd unsplit."""
    return tiktoken.Encoding(name=name + "_nul_split", pat_str=r"[^\x00]+|\x00",
                             mergeable_ranks=_ranks(name), special_tokens={})


@functools.lru_cache(None)
def _raw_encoding(name: str) -> "tiktoken.Encoding":
    """Same ranks, no splitting at all."""
    return tiktoken.Encoding(name=name + "_raw", pat_str=r"[\s\S]+", mergeable_ranks=_ranks(name),
                             special_tokens={})


def bpe_of_pieces(name: str, pieces: list[str]) -> list[int]:
    """Concatenated BPE of each piece with no further splitting (one tiktoken call if no NUL)."""
    if any("\x00" in p for p in pieces):
        raw = _raw_encoding(name)
        return [t for p in pieces for t in raw.encode_ordinary(p)]
    m = _marker_encoding(name)
    nul = m.encode_single_token(b"\x00")
    return [t for t in m.encode_ordinary("\x00".join(pieces)) if t != nul]


def check_text(name: str, text: str) -> None:
    pieces = _pretokenize(text, KINDS[name])
    assert "".join(pieces) == text
    assert all(pieces)
    want = encoding(name).encode_ordinary(text)
    got = bpe_of_pieces(name, pieces)
    if got != want:
        ref = regex.findall(encoding(name)._pat_str, text)
        diff = next((i for i, (a, b) in enumerate(zip(pieces, ref)) if a != b), min(len(pieces), len(ref)))
        raise AssertionError(
            f"{name}: token mismatch for {text[:200]!r}: first differing piece #{diff}: "
            f"ours {pieces[diff:diff + 3]!r} regex {ref[diff:diff + 3]!r}")


# ------------------------------------------------------- the regex module as a piece-level reference

@functools.lru_cache(None)
def _table() -> bytes:
    """Class id (see gen_ucd_blob) of every code point, decoded from the module's PT_UCD_BLOB."""
    raw = zlib.decompress(base64.b85decode(_tokens_mod.PT_UCD_BLOB))
    out = bytearray()
    v = shift = 0
    for b in raw:
        v |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            out += bytes([v & 7]) * (v >> 3)
            v = shift = 0
    assert len(out) == 0x110000
    return bytes(out)


_REGEX_CLASSES = [(6, regex.compile(r"\s")), (1, regex.compile(r"[\p{Lu}\p{Lt}]")), (2, regex.compile(r"\p{Ll}")),
                  (3, regex.compile(r"[\p{Lm}\p{Lo}]")), (4, regex.compile(r"\p{M}")), (5, regex.compile(r"\p{N}"))]


@functools.lru_cache(None)
def _regex_agrees(ch: str) -> bool:
    """Whether the regex module (its own Unicode version) classifies ch as our tables do."""
    want = _table()[ord(ch)]
    got = next((cid for cid, rx in _REGEX_CLASSES if rx.fullmatch(ch)), 0)
    return got == want


def check_regex(name: str, text: str) -> bool:
    """Compare pieces with regex.findall when the regex module's tables agree on every char."""
    if not all(_regex_agrees(ch) for ch in set(text)):
        return False
    assert _pretokenize(text, KINDS[name]) == regex.findall(encoding(name)._pat_str, text)
    return True


# --------------------------------------------------------------------------- 1. hypothesis

INTERESTING = (
    list("aZqsSdDmMtTlLvVeErR09'’\"!?.,;:-_/\\()[]{}<>@#$%^&*+=|~`")
    + ["'s", "'S", "'LL", "'ll", "'ve", "'Re", "'d", "'m", "'t", "'x", "'ſ", "ſ", "\u212a"]
    + [" ", "  ", "\t", "\r\n", "\n", "\r", "\n\n", "\u00a0", "\u3000", "\u0085", "\u200b", "\ufeff",
       "\u180e", "\u001c", "\u001f", "\u000b", "\u000c", "\u2028", "\u2029", "\u202f", "\u205f", "\u1680"]
    + ["\u0301", "\u0308", "\u20dd", "\u0903", "\u01c5", "\u1f88", "\u02b0", "\u3005", "\u4e2d", "\u6587",
       "\uac00", "\ud55c", "\u0627", "\u0644", "\u0915", "\u093f", "\u0660", "\u0669", "\u0966", "\u2160",
       "\u2167", "\u00b2", "\u00b9", "\u00bd", "\u2460", "\u00e9", "\u00c9", "\u00df", "\u0130", "\u0131",
       "\u03a3", "\u03c3", "\u0416", "\u0436", "\U0001F600", "\U0001F44D", "\U0001F3FD", "\u200d",
       "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\ufe0f", "\U00020000", "\U0001D400", "\U0001E900",
       "\u1c89", "\u1c8a", "\U00010D50", "\U00011F00", "\U0001E030", "\ufffd", "\x00", "\x7f"]
)
_ALPHABET = st.one_of(st.sampled_from(INTERESTING),
                      st.characters(exclude_categories=("Cs",)),
                      st.characters(max_codepoint=0x2FF, exclude_categories=("Cs",)))
TEXTS = st.lists(_ALPHABET, max_size=40).map("".join)


@pytest.mark.parametrize("name", sorted(KINDS))
@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS)
def test_hypothesis_matches_tiktoken(name, text):
    check_text(name, text)
    check_regex(name, text)


# --------------------------------------------------------------------------- 2. every code point

# Each code point c is put in one string holding several contexts, chosen so that the piece
# structure depends on the class of c (L, and in o200k Lu/Lt vs Ll vs Lm/Lo/M; N; White_Space;
# other) in ways that change ASCII-rich tokens: "a{c}b", " {c}x", "{c}{c} ", "1{c}", "'{c}",
# "{c}\n", "{c}'s", "{c}1234", "AB{c}cd", "x {c}  y", "{c}'LL".  Tested this way, tables of
# Unicode 15.1 or 17.0 instead of 16.0 fail for > 98% of the code points whose class differs.
CONTEXT = "a{c}b {c}x{c}{c} 1{c}'{c}\n{c}'s{c}1234AB{c}cd x {c}  y{c}'LL\n\n"


def _context_text(cps) -> str:
    return "".join([CONTEXT.replace("{c}", chr(cp)) for cp in cps])


def _all_code_points():
    return [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF]


def _check_code_points(name: str, cps: list[int]) -> list[int]:
    """Code points of cps (a chunk) whose context text mismatches tiktoken (empty if none)."""
    enc, kind = encoding(name), KINDS[name]
    text = _context_text(cps)
    if "\x00" in text:
        return [cp for cp in cps if not _text_ok(name, _context_text([cp]))]
    m = _marker_encoding(name)
    nul = m.encode_single_token(b"\x00")
    got = [t for t in m.encode_ordinary("\x00".join(_pretokenize(text, kind))) if t != nul]
    if got == enc.encode_ordinary(text):
        return []
    return [cp for cp in cps if not _text_ok(name, _context_text([cp]))]


def _text_ok(name: str, text: str) -> bool:
    return bpe_of_pieces(name, _pretokenize(text, KINDS[name])) == encoding(name).encode_ordinary(text)


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_code_point_matches_tiktoken(name):
    from concurrent.futures import ThreadPoolExecutor
    encoding(name), _marker_encoding(name), _raw_encoding(name)
    t0 = time.perf_counter()
    cps = _all_code_points()
    step = 8192
    chunks = [cps[i:i + step] for i in range(0, len(cps), step)]
    with ThreadPoolExecutor(2) as pool:  # tiktoken releases the GIL while encoding
        bad = [cp for res in pool.map(lambda ch: _check_code_points(name, ch), chunks) for cp in res]
    print(f"{name}: {len(cps)} code points checked in {time.perf_counter() - t0:.1f}s")
    assert not bad, f"{name}: {len(bad)} mismatching code points, first: {[hex(c) for c in bad[:50]]}"


# --------------------------------------------------------------------------- 3. corpus

def _corpus_files() -> list[Path]:
    files = sorted(Path("/usr/share/common-licenses").glob("*"))
    stdlib = Path(os.__file__).parent
    files += sorted(stdlib.glob("*.py"))[:60]
    files += sorted(Path("/usr/share/doc").glob("*/copyright"))[:80]
    return [f for f in files if f.is_file()]


def _synthetic_corpus(seed: int) -> list[str]:
    rng = random.Random(seed)
    ws = [" ", "  ", "\t", "\n", "\r\n", "\n\n", " \n", "\t\n", "\u00a0", "\u3000", "\r", "  \r\n  "]
    out = [
        "The quick brown fox's tail; it'LL jump — isn't it? “Quoted” text… and 'single' quotes.\n",
        '{"key": [1, 2.5e-10, null, true], "nested": {"a\\u00e9": "x\\ny"}, "n": 1234567890123}\n',
        "def f(x):\n\treturn x ** 2  # comment\n\n\nclass A:\n    pass\n    \n",
        "中文文本测试，包括标点。日本語のテキスト、カタカナ。한국어 텍스트입니다.",
        "👨‍👩‍👧‍👦 family, 👍🏽 thumbs, 🏳️‍🌈 flag, 1️⃣ keycap, e\u0301 \u0915\u094d\u0937 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
        "123456789012345678901234567890 3.14159 1,000,000 \u0661\u0662\u0663\u0664 \u2160\u2161\u2162 x²³",
        "CamelCaseWords HTTPServer XMLHttpRequest iPhone ǅemal ÀÉÎõü ΣΑΣ σας ДЖ джж İstanbul ſtraße",
        "path/to/file.txt\n/usr/bin\n// comment\n//\n/\n!!\n/",
    ]
    for _ in range(200):
        out.append("".join(rng.choice(ws) for _ in range(rng.randint(1, 30))) + rng.choice(["x", "1", "!", ""]))
    out.append(" " * 5000 + "\t" * 300 + "\r\n" * 200 + "end")
    out.append("9" * 1001)
    out.append("word " * 2000)
    return out


@pytest.mark.parametrize("name", sorted(KINDS))
def test_corpus_matches_tiktoken(name):
    seed = int(os.environ.get("PT_TEST_SEED", "20240607"))
    print(f"corpus seed {seed}")
    texts = _synthetic_corpus(seed)
    for f in _corpus_files():
        texts.append(f.read_bytes().decode("utf-8", "replace"))
    assert len(texts) > 250
    compared = 0
    for text in texts:
        check_text(name, text)
        compared += check_regex(name, text)
    assert compared > 200


# --------------------------------------------------------------------------- targeted cases

@pytest.mark.parametrize("name,text,pieces", [
    ("cl100k_base", "I'm  here\n\n  x", ["I", "'m", " ", " here", "\n\n", " ", " x"]),
    ("cl100k_base", "ab  \n", ["ab", "  \n"]),
    ("cl100k_base", "x  \n  ", ["x", "  \n  "]),           # \s++$ beats \s*[\r\n]
    ("o200k_base", "x  \n  ", ["x", "  \n", "  "]),          # no \s++$ in o200k
    ("cl100k_base", "12345", ["123", "45"]),
    ("o200k_base", "HTTPServer's", ["HTTPServer's"]),
    ("o200k_base", "HELLOworld", ["HELLOworld"]),
    ("o200k_base", "helloWORLD", ["hello", "WORLD"]),
    ("o200k_base", "ABC'S DEF", ["ABC'S", " DEF"]),
    ("o200k_base", "\u02b0A", ["\u02b0", "A"]),               # Lm in both classes: [U]* gives it back
    ("o200k_base", "A\u02b0B", ["A\u02b0", "B"]),
    ("o200k_base", "!\n/x", ["!\n/", "x"]),
    ("o200k_base", "a\u0301", ["a\u0301"]),
    ("cl100k_base", "a\u0301", ["a", "\u0301"]),
    ("cl100k_base", "'\u017fa", ["'\u017f", "a"]),           # (?i) s matches U+017F
])
def test_known_splits(name, text, pieces):
    assert _pretokenize(text, KINDS[name]) == pieces
    check_text(name, text)


def test_widths_agree():
    # the same text stored as 1-, 2- and 4-byte PEP 393 strings splits the same way
    base = "Hello  world's 123456 \u00e9\u00e0!!\n\n\t x\u00a0y "
    for name, kind in KINDS.items():
        p1 = _pretokenize(base, kind)
        p2 = _pretokenize(base + "\u0100", kind)
        p4 = _pretokenize(base + "\U00010000", kind)
        assert p2[:len(p1) - 1] == p1[:-1] and p4[:len(p1) - 1] == p1[:-1]


def test_regex_module_tables_mostly_agree():
    # sanity of the piece-level reference: the regex module disagrees with Unicode 16.0 only on
    # code points (un)assigned in another Unicode version
    t = _table()
    bad = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and not _regex_agrees(chr(cp))]
    _regex_agrees.cache_clear()
    assert t[ord("a")] == 2 and t[ord("A")] == 1 and t[0x3000] == 6 and t[0x0301] == 4 and t[0x0660] == 5
    assert len(bad) < 20000, len(bad)


def test_unicode_table_blob_is_reproducible():
    import unicodedata2 as ud2  # pinned in the test extras to the version tiktoken uses

    assert ud2.unidata_version == _tokens_mod.PT_UCD_VERSION
    assert gen_ucd_blob(ud2) == _tokens_mod.PT_UCD_BLOB


# --------------------------------------------------------------------------- table generator

_WHITE_SPACE = [(0x09, 0x0D), (0x20, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
_CLASS_ID = {"Lu": 1, "Lt": 1, "Ll": 2, "Lm": 3, "Lo": 3, "Mn": 4, "Mc": 4, "Me": 4, "Nd": 5, "Nl": 5, "No": 5}


def gen_ucd_blob(ud) -> str:
    """PT_UCD_BLOB for a unicodedata-like module: runs of (length, class id) as varint(len*8+id)."""
    ws = {cp for a, b in _WHITE_SPACE for cp in range(a, b + 1)}
    cls = bytes(6 if cp in ws else _CLASS_ID.get(ud.category(chr(cp)), 0) for cp in range(0x110000))
    out = bytearray()
    start = 0
    for cp in range(1, 0x110001):
        if cp == 0x110000 or cls[cp] != cls[start]:
            v = (cp - start) * 8 + cls[start]
            while v >= 0x80:
                out.append(0x80 | (v & 0x7F))
                v >>= 7
            out.append(v)
            start = cp
    return base64.b85encode(zlib.compress(bytes(out), 9)).decode()


if __name__ == "__main__" and "--blob" in sys.argv:
    import unicodedata2
    blob = gen_ucd_blob(unicodedata2)
    print(f'PT_UCD_VERSION = "{unicodedata2.unidata_version}"')
    print("PT_UCD_BLOB = (")
    for i in range(0, len(blob), 96):
        print(f'    "{blob[i:i + 96]}"')
    print(")")
