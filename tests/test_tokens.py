"""Token counts against tiktoken itself, chat accounting by the published rules, the
rank-table cache, and the count op through the daemon."""
import contextlib
import glob
import json
import os
import random
import select
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

import tiktoken_oracle
from gil import ticks_during
from rawsock import Raw
from sidecar import AsyncClient, Client
from sidecar.text import tokens
from sidecar._native import tokens as native_tokens
from sidecar.errors import InvalidValue, TokenizerUnavailable, UnknownEncoding
from sidecar.wire import Count, Ping, Pong

ENCODINGS = ["o200k_base", "cl100k_base"]
SPECIALS = ["<|endoftext|>", "<|endofprompt|>"]
MIX = list("aZ09 \t\n\r'sStTlLdDmMvVrReE.,!?-_/\\\"#@$%&*()[]{}<>") + [
    "\r\n", "\n\n", "'s", "'LL", "  ", "\u00a0", "\u3000", "\u0085", "\u200b", "\ufeff",
    "\u0301", "\u01c5", "\u02b0", "中", "文", "한", "ع", "ह", "\u0660", "\u2160", "²", "ſ",
    "\u212a", "🎉", "👩\u200d👩\u200d👧", "\U0001F1FA\U0001F1F8", "ǅ", "ﬁ", "１２３", "<|endoftext|>",
]
texts = st.lists(st.one_of(st.sampled_from(MIX), st.characters(exclude_categories=("Cs",))),
                 max_size=80).map("".join)


def corpus() -> list[str]:
    """Text found on this machine: prose, code, JSON, plus constructed hard cases."""
    paths = sorted(glob.glob("/usr/share/common-licenses/*"))[:6]
    paths += [os.path.join(os.path.dirname(os.__file__), n)
              for n in ("typing.py", "json/encoder.py", "textwrap.py")]
    found = []
    for path in paths:
        with contextlib.suppress(OSError, UnicodeDecodeError):  # the corpus is what exists
            with open(path, encoding="utf-8") as f:
                found.append(f.read())

    found.append(json.dumps({"users": [{"id": i, "name": f"user{i}", "tags": ["a", "b"]}
                                       for i in range(200)]}, indent=2))
    found += [
        " " * 1000, "\t\t  \r\n\r\n   \n" * 50, "x" + " " * 37 + "y", "\n" * 64,
        "3.14159265358979323846264338327950288419716939937510" * 3, "1234567890" * 40,
        "日本語のテキストを数えます。" * 40, "한국어 텍스트 " * 40, "مرحبا بالعالم " * 40,
        "👩‍👩‍👧‍👦🎉🇺🇸" * 40, "Ünïcödé façade naïve café " * 40, "HTTPServer XMLHttpRequest " * 40,
        "I'm we'll they've she'd it's DON'T I'M" * 20, "a" * 3000, "ab" * 2000,
    ]
    return found


def distinct_words(n: int) -> str:
    """``n`` random words: few repeated pieces, so few cache hits and a slow count."""
    rng = random.Random(20261123)
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                            for _ in range(rng.randint(3, 12))) for _ in range(n))


@pytest.fixture(scope="module", params=ENCODINGS)
def pair(request):
    return tokens.get_encoding(request.param), tiktoken_oracle.get(request.param)


def test_corpus_counts_equal_tiktoken(pair):
    ours, theirs = pair
    for text in corpus():
        assert ours.count(text) == len(theirs.encode_ordinary(text)), text[:60]


@given(texts)
@settings(max_examples=500, deadline=None)
def test_random_unicode_counts_equal_tiktoken(text):
    for name in ENCODINGS:
        ours, theirs = tokens.get_encoding(name), tiktoken_oracle.get(name)
        assert ours.count(text) == len(theirs.encode_ordinary(text))


@given(st.lists(st.sampled_from(MIX), max_size=60).map("".join))
@settings(max_examples=500, deadline=None)
def test_hard_mixtures_equal_tiktoken(text):
    for name in ENCODINGS:
        ours, theirs = tokens.get_encoding(name), tiktoken_oracle.get(name)
        assert ours.count(text) == len(theirs.encode_ordinary(text))


def test_lone_surrogates_as_tiktoken_handles_them(pair):
    ours, theirs = pair
    for text in ["a\ud800b", "\ud83d\ude00 pair made of halves", "\udfff", "x\ud800\ud800y"]:
        assert ours.count(text) == len(theirs.encode_ordinary(text))


def test_special_tokens_are_text_unless_asked(pair):
    ours, theirs = pair
    text = "hello <|endoftext|> world<|endoftext|>"
    assert ours.count(text) == len(theirs.encode_ordinary(text))
    assert ours.count(text, special=True) == len(theirs.encode(text, allowed_special="all"))
    assert ours.count(text, special=True) < ours.count(text)


def test_long_input_counts_and_releases_the_gil():
    enc = tokens.get_encoding("o200k_base")
    text = corpus()[0] * 300
    n, during = ticks_during(lambda: enc.count(text))
    assert n == len(tiktoken_oracle.get("o200k_base").encode_ordinary(text))
    assert during > 0


@pytest.mark.parametrize("letters", ["abcdé ", "abc ж ", "abc 中文 ", "ab 🎉 "])
def test_long_non_ascii_text_is_converted_without_the_gil(pair, letters):
    """A long text's UTF-8 is made inside the GIL-free part of the count: CPython's own
    conversion holds the GIL (~7 ms for 4 MB, an event-loop stall when a worker counts)
    and leaves a copy on the str, which is how this test tells them apart."""
    ours, theirs = pair
    rng = random.Random(5)
    text = "".join(rng.choice(letters) for _ in range(20_000))
    size = sys.getsizeof(text)
    n = ours.count(text)
    assert sys.getsizeof(text) == size, "the count converted the text under the GIL"
    assert n == len(theirs.encode_ordinary(text))  # tiktoken's conversion leaves a copy
    broken = text[:9_000] + "\ud800" + text[9_000:]  # a lone surrogate, as tiktoken takes it
    assert ours.count(broken) == len(theirs.encode_ordinary(broken))


def test_a_short_count_ends_while_another_thread_is_inside_a_long_one():
    """The piece cache has one lock and a long count holds it throughout; a short count
    on another thread (the daemon's event loop) must not wait for it. The long count's
    cache misses (written only by the lock's holder) show it was still going."""
    counter = native_tokens.Counter(tokens.load_rank_table("o200k_base"),
                                    native_tokens.PRETOKENIZERS["o200k_base"])
    huge = distinct_words(450_000)
    short = corpus()[0][:2000]
    counted = []
    long_count = threading.Thread(target=lambda: counted.append(counter.count(huge)))
    long_count.start()
    while counter.cache_misses == 0:  # until the long count is inside, holding the cache
        time.sleep(0)
    n = counter.count(short)
    misses_then = counter.cache_misses
    long_count.join()
    assert misses_then < counter.cache_misses, "the short count waited for the long one"
    assert counter.uncached == 1  # the short count went around the cache, the long one not
    oracle = tiktoken_oracle.get("o200k_base")
    assert n == len(oracle.encode_ordinary(short))
    assert counted == [len(oracle.encode_ordinary(huge))]


# --- models and chats -------------------------------------------------------------------


def test_model_map_and_estimates():
    assert tokens.count("hello world", model="gpt-4o").exact
    assert tokens.count("hello world", model="gpt-4o-mini-2024-07-18").encoding == "o200k_base"
    assert tokens.count("hello world", model="gpt-4-turbo").encoding == "cl100k_base"
    assert tokens.count("hello world", model="gpt-4.1-nano").encoding == "o200k_base"
    claude = tokens.count("hello world " * 100, model="claude-sonnet-4")
    base = tokens.count("hello world " * 100, encoding="o200k_base")
    assert not claude.exact and claude.estimate_ratio == 1.20
    assert claude.input_tokens == -(-base.input_tokens * 12 // 10)
    unknown = tokens.count("hi", model="some-new-model")
    assert not unknown.exact and unknown.estimate_ratio == 1.20


def test_unknown_encoding_lists_the_known_ones():
    with pytest.raises(UnknownEncoding, match="o200k_base, cl100k_base"):
        tokens.count("x", encoding="p50k_base")
    with pytest.raises(InvalidValue):
        tokens.count(encoding="o200k_base")
    with pytest.raises(InvalidValue):
        tokens.count("x", messages=[], encoding="o200k_base")


def published_chat(enc, messages, per_message=3, per_name=1):
    """OpenAI's published rule, written out independently of sidecar.tokens."""
    total = 3
    for m in messages:
        total += per_message
        for key, value in m.items():
            total += len(enc.encode_ordinary(value))
            if key == "name":
                total += per_name
    return total


CHAT = [
    {"role": "system", "content": "You are a helpful, pattern-following assistant."},
    {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
    {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
    {"role": "user", "content": "This late pivot means we don't have time to boil the ocean."},
]


@pytest.mark.parametrize("model,name", [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base"),
                                        ("gpt-3.5-turbo", "cl100k_base")])
def test_chat_accounting_follows_the_published_rule(model, name):
    got = tokens.count(messages=CHAT, model=model, max_tokens=100)
    expected = published_chat(tiktoken_oracle.get(name), CHAT)
    assert got.input_tokens == expected and got.exact
    assert got.output_tokens == 100 and got.total_tokens == expected + 100


def test_chat_accounting_0301_rule():
    got = tokens.count(messages=CHAT, model="gpt-3.5-turbo-0301")
    assert got.input_tokens == published_chat(tiktoken_oracle.get("cl100k_base"), CHAT, 4, -1)


def test_worked_example_by_hand():
    # gpt-4o, [{"role": "user", "content": "Hello!"}]: 3 (message) + 1 ("user") +
    # 2 ("Hello", "!") + 3 (reply priming) = 9.
    assert tokens.count(messages=[{"role": "user", "content": "Hello!"}],
                        model="gpt-4o").input_tokens == 9


def test_tools_and_images_are_flagged_estimates():
    weather = {"type": "function", "function": {
        "name": "get_current_weather",
        "description": "Get the current weather in a given location.",
        "parameters": {"type": "object", "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        }, "required": ["location"]}}}
    enc = tiktoken_oracle.get("o200k_base")
    n = lambda s: len(enc.encode_ordinary(s))  # noqa: E731
    tool_part = (7 + n("get_current_weather:Get the current weather in a given location")
                 + 3 + 3 + n("location:string:The city and state, e.g. San Francisco, CA")
                 + 3 - 3 + 3 + n("celsius") + 3 + n("fahrenheit") + n("unit:string:") + 12)
    plain = tokens.count(messages=CHAT[:1], model="gpt-4o")
    with_tools = tokens.count(messages=CHAT[:1], tools=[weather], model="gpt-4o")
    assert not with_tools.exact
    assert with_tools.input_tokens == plain.input_tokens + tool_part
    image = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                           {"type": "image_url", "image_url": {"url": "x"}}]}]
    got = tokens.count(messages=image, model="gpt-4o")
    assert not got.exact
    assert got.input_tokens == 3 + 3 + n("user") + n("What is this?") + 85


# --- rank tables ------------------------------------------------------------------------


def test_rank_table_cache_is_written_then_mapped(tmp_path):
    table = tokens.load_rank_table("cl100k_base", tmp_path)
    (cached,) = tmp_path.glob("cl100k_base-*.ranks")
    stamp = cached.stat().st_mtime_ns
    again = tokens.load_rank_table("cl100k_base", tmp_path)
    assert cached.stat().st_mtime_ns == stamp
    assert again.n_tokens == table.n_tokens == 100256
    assert again.rank(b"hello") == table.rank(b"hello") >= 0
    cached.write_bytes(b"garbage")  # unreadable cache: rebuilt, not trusted
    assert tokens.load_rank_table("cl100k_base", tmp_path).n_tokens == 100256
    assert cached.stat().st_size > 1000


def test_source_with_other_bytes_is_refused():
    raw = tokens.source_path("cl100k_base").read_bytes()
    import gzip

    content = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    tampered = content.replace(b"IQ== 0", b"Ig== 0", 1)
    with pytest.raises(TokenizerUnavailable, match="do not match"):
        tokens._convert("cl100k_base", tampered, b"\0" * 32)


# --- through the daemon -----------------------------------------------------------------


def test_count_op_both_clients(daemon, run_async):
    text = corpus()[0]
    expected = len(tiktoken_oracle.get("o200k_base").encode_ordinary(text))
    with Client(daemon.path) as c:
        r = c.count_tokens(text, model="gpt-4o", max_tokens=50)
        assert (r.input_tokens, r.output_tokens, r.total_tokens, r.exact, r.encoding) == \
            (expected, 50, expected + 50, True, "o200k_base")
        chat = c.count_tokens(messages=CHAT, model="gpt-4")
        assert chat.input_tokens == published_chat(tiktoken_oracle.get("cl100k_base"), CHAT)
        with pytest.raises(UnknownEncoding, match="known encodings"):
            c.count_tokens("x", encoding="r50k_base")
        assert not c.count_tokens("x", model="claude-opus-4").exact

    async def main():
        async with AsyncClient(daemon.path) as ac:
            r = await ac.count_tokens(text, encoding="o200k_base")
            assert r.input_tokens == expected

    run_async(main())


def test_large_count_runs_off_the_loop_and_keeps_order(start_daemon):
    d = start_daemon("[tokens]\noffload_chars = 1000\n")
    big = corpus()[0] * 40
    expected = len(tiktoken_oracle.get("o200k_base").encode_ordinary(big))
    with Client(d.path, timeout=60) as c:
        replies = c.batch([Ping(), Count(text=big, encoding="o200k_base"), Ping(),
                           Count(text="small", encoding="o200k_base"),
                           Count(text=big, encoding="nope"), Ping()], return_exceptions=True)
        assert isinstance(replies[0], Pong) and isinstance(replies[2], Pong)
        assert replies[1].input_tokens == expected
        assert replies[3].input_tokens == 1
        assert isinstance(replies[4], UnknownEncoding)
        assert isinstance(replies[5], Pong)
        assert [r.id for r in replies if not isinstance(r, Exception)] == sorted(
            r.id for r in replies if not isinstance(r, Exception))
        assert c.stats().ops["count"].requests == 3
    # While one connection waits for a long count, another is answered first.
    huge = distinct_words(450_000)
    with Raw(d.path, timeout=60) as waiting, Client(d.path) as other:
        other.ping()  # connected and warm: the next ping is one round trip
        waiting.send({"op": "count", "id": 1, "text": huge, "encoding": "o200k_base"})
        assert other.ping() > 0
        readable, _, _ = select.select([waiting.sock], [], [], 0)
        assert not readable  # the count is still running
        reply = waiting.recv()
    assert reply.input_tokens == len(tiktoken_oracle.get("o200k_base").encode_ordinary(huge))
    assert d.stop() == 0


@pytest.mark.parametrize("op", ["count", "admit", "begin"])
def test_a_long_text_never_holds_up_other_clients(start_daemon, op):
    """A count, admit or begin whose text is past offload_chars is counted on a worker
    thread: another connection's counts, admits and begins are answered while it runs
    (an admit or begin used to count on the event loop, and a short count to wait there
    for the worker's cache: every client froze)."""
    d = start_daemon("[tokens]\noffload_chars = 100000\n")
    huge = distinct_words(450_000)
    short = corpus()[0][:2000]
    oracle = tiktoken_oracle.get("o200k_base")
    expected = len(oracle.encode_ordinary(short))
    with Raw(d.path, timeout=60) as waiting, Client(d.path, timeout=60) as other:
        other.ping()  # connected and warm
        big = {"op": op, "id": 1, "text": huge, "model": "gpt-4o"}
        waiting.send(big if op == "count" else {**big, "user": "big"})
        # Many round trips: the long one is under way well before the last of them.
        for _ in range(50):
            assert other.count_tokens(short, model="gpt-4o").input_tokens == expected
        assert other.admit(user="u", text=short, model="gpt-4o").input_tokens == expected
        begun = other.begin(user="u", text=short, model="gpt-4o")
        assert (begun.outcome, begun.input_tokens) == ("go", expected)
        other.ping()  # one more turn of the loop: a reply finished before it is out by now
        readable, _, _ = select.select([waiting.sock], [], [], 0)
        assert not readable, f"the other client was answered only after the long {op}"
        reply = waiting.recv()
    assert reply.input_tokens == len(oracle.encode_ordinary(huge))
    assert d.stop() == 0


def test_cli_count(tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Hello, world! How many tokens is this?")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    run = lambda *a, **kw: subprocess.run([sys.executable, "-m", "sidecar", "count", *a],  # noqa: E731
                                          capture_output=True, text=True, env=env, cwd="/",
                                          timeout=60, **kw)
    expected = len(tiktoken_oracle.get("cl100k_base").encode_ordinary(f.read_text()))
    r = run("--encoding", "cl100k_base", str(f))
    assert r.returncode == 0 and r.stdout.strip() == str(expected)
    r = run("--model", "gpt-4", "--json", "-", input=f.read_text())
    data = json.loads(r.stdout)
    assert data["input_tokens"] == expected and data["exact"] is True
    r = run("--encoding", "nope", str(f))
    assert r.returncode == 2 and "known encodings" in r.stderr
