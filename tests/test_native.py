"""The compiled normalisation core against the slow reference in tests/oracle.py."""
import importlib
import importlib.machinery
import os
import subprocess
import sys

import pytest
import xxhash
from hypothesis import given, settings, strategies as st

import oracle
from gil import ticks_during
import sidecar._native
from sidecar.errors import ConfigError
from sidecar.text.normalize import DEFAULT_FILLER_WORDS, Normalizer, canonical_filler_words

FILLERS = canonical_filler_words(DEFAULT_FILLER_WORDS)
INTERESTING = list("aZ09 '’-.,#%?!_+$\u200b\t\n\u00a0ßİﬁ①²Ⅻ") + ["\U0001F600", "\ud800", "\U00020000"]
texts = st.text(alphabet=st.one_of(st.sampled_from(INTERESTING), st.characters()), max_size=80)
words = st.lists(st.sampled_from(["please", "can", "you", "tell", "me", "Just", "x", "5", "-", "?"]),
                 max_size=12).map(" ".join)


@pytest.mark.parametrize("name", sidecar._native.MODULES)
def test_every_native_module_is_compiled(name):
    module = importlib.import_module(f"sidecar._native.{name}")
    assert isinstance(module.__loader__, importlib.machinery.ExtensionFileLoader)
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert not hasattr(module, "__cached__") or module.__cached__ is None


def test_no_source_fallback_exists():
    pkg = sidecar._native.__path__[0]
    assert not [f for f in os.listdir(pkg) if f.endswith(".py") and f != "__init__.py"]


@given(texts)
@settings(max_examples=400)
def test_normalize_matches_reference(text):
    n = Normalizer(())
    assert n.normalize(text) == oracle.normalize(text)


@given(st.one_of(texts, words))
@settings(max_examples=400)
def test_fingerprint_matches_reference_with_fillers(text):
    n = Normalizer(DEFAULT_FILLER_WORDS)
    norm, key, spec = n.fingerprint(text)
    assert (norm, key) == oracle.fingerprint(text, FILLERS)
    assert spec == "v1:%016x" % oracle.spec_seed(FILLERS)


@given(texts)
def test_normalize_is_idempotent(text):
    n = Normalizer()
    once = n.normalize(text)
    assert n.normalize(once) == once


def test_every_code_point_is_classified_as_the_reference_does():
    # Each code point between letters and after a digit exercises every rule; chunks are
    # separated by spaces, which NFKC never composes across.
    n = Normalizer(())
    step = 4096
    for start in range(0, 0x110000, step):
        text = " ".join(f"x{chr(c)}y 7{chr(c)}" for c in range(start, min(start + step, 0x110000)))
        got = n.normalize(text)
        if got != oracle.normalize(text):
            for c in range(start, start + step):
                one = f"x{chr(c)}y 7{chr(c)}"
                assert n.normalize(one) == oracle.normalize(one), hex(c)


@pytest.mark.parametrize("text,expected", [
    ("Hello,   World!", "hello world"),
    ("Can you tell me the capital of FRANCE, please?", "tell me the capital of france"),
    ("What is -5 squared?", "what is -5 squared"),
    ("pi is 3.14, roughly", "pi is 3.14 roughly"),
    ("What is 2+2?", "what is 2+2"),
    ("1,000 or 1.5", "1,000 or 1.5"),
    ("I don’t know", "i dont know"),
    ("Learn C# fast", "learn c# fast"),
    ("50% off", "50% off"),
    ("ＦＵＬＬ　ｗｉｄｔｈ", "full width"),
    ("Straße", "strasse"),
    ("zero\u200bwidth", "zerowidth"),
    ("", ""),
    ("please", ""),
])
def test_spec_examples(text, expected):
    assert Normalizer().normalize(text) == expected


def test_keys_differ_across_specs_and_texts():
    a = Normalizer(("please",))
    b = Normalizer(("just",))
    assert a.spec != b.spec
    assert a.fingerprint("go now").key != b.fingerprint("go now").key
    assert a.fingerprint("go now").key == a.fingerprint("Go, now!").key
    assert a.fingerprint("buy").key != a.fingerprint("sell").key
    assert len(a.fingerprint("x").key) == 16


def test_lone_surrogates_are_removed_not_fatal():
    norm, key, _ = Normalizer(()).fingerprint("a\ud800b\udfff")
    assert norm == "ab"
    assert key == xxhash.xxh3_128_digest(b"ab", seed=oracle.spec_seed(()))


def test_large_input_releases_the_gil():
    text = "Some words, please! " * 1_000_000
    norm, during = ticks_during(lambda: Normalizer().normalize(text))
    assert norm == ("some words " * 1_000_000).strip()
    assert during > 0


@pytest.mark.parametrize("bad", [["two words"], ["!!!"], [""], [3]])
def test_bad_filler_words_are_rejected(bad):
    with pytest.raises(ConfigError, match="filler"):
        Normalizer(bad)


def test_type_errors():
    with pytest.raises(TypeError):
        Normalizer().normalize(b"bytes")
    with pytest.raises(TypeError):
        Normalizer().fingerprint(None)


def test_usearch_and_onnxruntime_load_in_any_order():
    # loaded after usearch's extension, onnxruntime used to crash the process at import
    for first, second in (("sidecar._native.vectors", "onnxruntime"),
                          ("onnxruntime", "sidecar._native.vectors")):
        r = subprocess.run([sys.executable, "-c", f"import {first}, {second}"],
                           capture_output=True, text=True, timeout=120, cwd="/")
        assert r.returncode == 0, (first, second, r.returncode, r.stderr[-500:])
