"""The response cache: keys under the normalisation spec, store policy, TTL and stale
serves, bounds, snapshots; in process and through a real daemon."""
import os

import msgspec
import pytest
from hypothesis import given, settings, strategies as st

from sidecar import Client
from sidecar import config as config_mod
from sidecar.cache.keys import request_key
from sidecar.cache.snapshot import SnapshotError, decode_snapshot
from sidecar.cache.store import Cache
from sidecar.errors import InvalidValue
from sidecar.text.normalize import Normalizer
from sidecar.wire import CacheGet, CacheInvalidate, CachePut  # noqa: F401

NORM = Normalizer()
HOUR = 3600.0


def cache(**overrides) -> Cache:
    cfg = config_mod.load(None, {})
    return Cache(msgspec.structs.replace(cfg.cache, **overrides), NORM)


def wire(request_type, /, **fields):
    """A request as the daemon gets it: encoded, then decoded by its typed decoder."""
    return msgspec.msgpack.decode(msgspec.msgpack.encode(
        {"op": request_type.__struct_config__.tag, **fields}), type=request_type)


def put(c: Cache, now: float = 0.0, response: object = "answer", **fields):
    return c.put(wire(CachePut, response=response, **fields), now)


def get(c: Cache, now: float = 0.0, **fields):
    return c.get(wire(CacheGet, **fields), now)


def key(**fields) -> bytes:
    return request_key(NORM, wire(CacheGet, **fields)).key


# --- keys ---------------------------------------------------------------------------------

WORDS = st.lists(st.sampled_from(["what", "is", "the", "capital", "of", "france", "2", "-5",
                                  "3.14", "buy", "sell", "phone", "why", "how"]),
                 min_size=1, max_size=8)


@given(WORDS, st.lists(st.sampled_from(["please", "Please,", "just", "could", "you"]),
                       max_size=3), st.booleans())
@settings(max_examples=200, deadline=None)
def test_exact_key_ignores_what_normalisation_folds(words, fillers, shout):
    plain = " ".join(words)
    noisy = " ".join(fillers) + "  " + (plain.upper() if shout else plain) + " ?!"
    assert key(text=plain, model="gpt-4o") == key(text=noisy, model="gpt-4o")


@given(WORDS)
@settings(max_examples=100, deadline=None)
def test_exact_key_sees_everything_that_shapes_the_answer(words):
    text = " ".join(words)
    base = dict(text=text, model="gpt-4o", temperature=0.0)
    k = key(**base)
    assert k != key(**dict(base, model="gpt-4o-mini"))
    assert k != key(**dict(base, temperature=0.7))
    assert k != key(**dict(base, namespace="tenant-b"))
    assert k != key(**dict(base, params={"top_p": 0.5}))
    assert k != key(**dict(base, tools=[{"type": "function", "function": {"name": "f"}}]))
    assert k != key(**dict(base, response_format={"type": "json_object"}))
    system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": text}]
    assert k != key(**dict(base, text=None, messages=system))
    assert k == key(**dict(base, text=None, messages=[{"role": "user", "content": text}]))


def test_params_order_does_not_matter():
    assert key(text="hi", params={"top_p": 1, "seed": 7}) == key(text="hi",
                                                                 params={"seed": 7, "top_p": 1})


def test_numbers_and_signs_are_part_of_the_key():
    assert key(text="what is 5") != key(text="what is -5")
    assert key(text="what is 3.14") != key(text="what is 314")


# --- policy -------------------------------------------------------------------------------


def test_hit_miss_and_scope_isolation():
    c = cache()
    stored = put(c, text="What is the capital of France?", model="gpt-4o", namespace="a",
                 response={"text": "Paris"})
    assert stored.stored and stored.tier == "exact" and stored.ttl == HOUR  # "general"
    hit = get(c, 1.0, text="please, what is the capital of france", model="gpt-4o",
              namespace="a")
    assert hit.hit and hit.tier == "exact" and hit.similarity == 1.0 and not hit.stale
    assert hit.value() == {"text": "Paris"}
    assert hit.query == "What is the capital of France?" and hit.cached_at == 0.0
    assert not get(c, 1.0, text="what is the capital of france", model="gpt-4o",
                   namespace="b").hit  # tenant b never sees tenant a
    assert not get(c, 1.0, model="gpt-4o", namespace="a", messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?"}]).hit


@pytest.mark.parametrize("fields,reason", [
    (dict(error=True), "error"),
    (dict(tool_calls=True), "tool_calls"),
    (dict(no_store=True), "no_store"),
    (dict(kind="creative"), "policy"),
    (dict(temperature=1.5), "temperature"),
    (dict(text=None, messages=[{"role": "user", "content": "x"},
                               {"role": "assistant", "content": None,
                                "tool_calls": [{"id": "1", "type": "function"}]},
                               {"role": "tool", "tool_call_id": "1", "content": "42"}]),
     "tool_turns"),
    (dict(text=None, messages=[{"role": "user", "content": f"q{i}"} for i in range(9)]),
     "too_many_turns"),
])
def test_what_is_never_stored(fields, reason):
    c = cache()
    reply = put(c, **{"text": "what is 6 times 7", **fields})
    assert not reply.stored and reply.reason == reason
    assert c.stats("off").not_stored == {reason: 1}
    assert len(c.exact) == 0


def test_unknown_kind_and_both_text_and_messages_are_refused():
    c = cache()
    with pytest.raises(InvalidValue, match="unknown response kind"):
        put(c, text="x", kind="poetry")
    with pytest.raises(InvalidValue, match="not both"):
        get(c, text="x", messages=[{"role": "user", "content": "x"}])


def test_ttl_by_kind_and_stale_only_when_asked():
    c = cache(stale_for=HOUR)
    assert put(c, text="is this spam", kind="classification").ttl == 48 * HOUR
    assert put(c, text="sum up", kind="summarization", ttl=60.0).ttl == 60.0  # override
    assert get(c, 47 * HOUR, text="is this spam").hit
    assert not get(c, 48 * HOUR, text="is this spam").hit  # expired
    late = get(c, 48 * HOUR + 1, text="is this spam", allow_stale=True)
    assert late.hit and late.stale
    assert not get(c, 49 * HOUR, text="is this spam", allow_stale=True).hit  # past stale
    s = c.stats("off").tiers["exact"]
    assert s.stale_serves == 1 and s.expirations == 1 and s.hits == 1


def test_no_cache_bypasses_the_lookup():
    c = cache()
    put(c, text="hello")
    reply = get(c, text="hello", no_cache=True)
    assert not reply.hit and reply.reason == "bypassed" and c.stats("off").bypassed == 1


def test_eviction_under_byte_pressure_keeps_recently_used():
    c = cache(max_bytes=10_000)
    body = "x" * 900
    put(c, text="keep me", response=body)
    for i in range(30):
        put(c, float(i), text=f"question {i}", response=body)
        assert get(c, float(i), text="keep me").hit  # used: never the oldest
    s = c.stats("off").tiers["exact"]
    assert s.bytes <= 10_000 and s.evictions > 0 and s.entries < 31
    assert not get(c, 99.0, text="question 0").hit


def test_entry_count_bound_and_invalidate():
    c = cache(max_entries=3)
    for ns in ("a", "a", "b"):
        put(c, text=f"q {len(c.exact)}", namespace=ns)
    put(c, text="q 3", namespace="b")
    assert len(c.exact) == 3
    assert c.invalidate(wire(CacheInvalidate, namespace="b")) == 2
    k = key(text="q 1", namespace="a")
    assert c.invalidate(wire(CacheInvalidate, key=k)) == 1
    assert c.invalidate(wire(CacheInvalidate, all=True)) == 0
    with pytest.raises(InvalidValue):
        c.invalidate(wire(CacheInvalidate))


def test_snapshot_round_trip_and_corruption():
    c = cache()
    put(c, 10.0, text="a question", response={"answer": [1, 2]}, kind="code")
    blob = c.snapshot()
    fresh = cache()
    assert fresh.restore(blob, 20.0) == 1
    hit = get(fresh, 30.0, text="a question")
    assert hit.hit and hit.value() == {"answer": [1, 2]} and hit.cached_at == 10.0
    for bad in (blob[:-3], b"garbage", blob[:20] + b"\x00" + blob[21:]):
        with pytest.raises(SnapshotError):
            decode_snapshot(bad)
    other = Cache(c.config, Normalizer(["please", "kindly"]))  # another spec
    assert other.restore(blob, 20.0) == 0


# --- through the daemon -------------------------------------------------------------------


def test_cache_ops_stats_and_restart(start_daemon):
    d = start_daemon()
    with Client(d.path) as c:
        miss = c.cache_get(text="What is 6 x 7?", model="gpt-4o")
        assert not miss.hit and miss.reason == "miss" and len(miss.key) == 16
        stored = c.cache_put({"choices": [{"message": {"content": "42"}}]},
                             text="What is 6 x 7?", model="gpt-4o", kind="factual_qa")
        assert stored.stored and stored.key == miss.key
        hit = c.cache_get(text="what is 6 x 7", model="gpt-4o")
        assert hit.hit and hit.value()["choices"][0]["message"]["content"] == "42"
        refused = c.cache_put("oops", text="x", error=True)
        assert not refused.stored and refused.reason == "error"
        stats = c.stats().cache
        assert stats.tiers["exact"].entries == 1 and stats.tiers["exact"].hits == 1
        assert stats.not_stored == {"error": 1} and stats.snapshot.endswith(".snapshot")
    assert d.stop() == 0  # SIGTERM writes the snapshot
    d2 = start_daemon(socket_path=d.path)
    with Client(d2.path) as c:
        assert c.cache_get(text="what is 6 x 7", model="gpt-4o").hit
        assert c.cache_invalidate(all=True) == 1
        assert not c.cache_get(text="what is 6 x 7", model="gpt-4o").hit
    assert d2.stop() == 0


def test_corrupt_snapshot_is_reported_and_skipped(start_daemon):
    d = start_daemon()
    with Client(d.path) as c:
        c.cache_put("v", text="q")
        path = c.stats().cache.snapshot
    assert d.stop() == 0
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    d2 = start_daemon(socket_path=d.path)
    with Client(d2.path) as c:
        assert not c.cache_get(text="q").hit  # started empty, and serving
        assert c.cache_put("v2", text="q").stored
    assert d2.stop() == 0
    assert "cache snapshot" in d2.log() and "unusable" in d2.log()
    assert os.path.exists(path + ".corrupt")


def test_bad_cache_requests_get_typed_errors(start_daemon):
    from sidecar.errors import InvalidValue as Invalid

    d = start_daemon()
    with Client(d.path) as c:
        with pytest.raises(Invalid, match="unknown response kind"):
            c.cache_put("v", text="q", kind="poetry")
        with pytest.raises(Invalid):
            c.cache_invalidate()
        assert c.ping() > 0  # and the daemon goes on serving
    assert d.stop() == 0


_SORTED = msgspec.msgpack.Encoder(order="sorted")


def _generic_text_key(n: Normalizer, namespace: str, model: str, temperature, text: str):
    return n.key_of(_SORTED.encode(["exact", namespace, model, temperature, {}, None, None,
                                    [("user", n.normalize(text), None, None, None)]]))


@settings(max_examples=300, deadline=None)
@given(namespace=st.text(max_size=40), model=st.text(max_size=300),
       temperature=st.none() | st.floats(allow_nan=False, allow_infinity=False),
       text=st.text(max_size=400))
def test_the_native_text_key_hashes_what_msgspec_encodes(namespace, model, temperature, text):
    """The one-pass native key of a one-turn request (the segment's lookups, the daemon's
    common case) is the XXH3 of the very bytes the generic path encodes."""
    n = Normalizer()
    try:
        expected = _generic_text_key(n, namespace, model, temperature, text)
    except UnicodeEncodeError:  # a lone surrogate: neither may key it
        with pytest.raises(UnicodeEncodeError):
            n.text_key(namespace, model, temperature, text)
        return
    assert n.text_key(namespace, model, temperature, text) == expected


@pytest.mark.parametrize("size", [31, 32, 255, 256, 1023, 1024, 65535, 65536, 300_000])
def test_the_native_text_key_at_every_string_header_size(size):
    n = Normalizer()
    for text in ("a" * size, "é" * (size // 2), "x" * (size - 3) + " 漢"):
        assert n.text_key("ns" * (size // 200), "m" * min(size, 600), 0.5, text) == \
            _generic_text_key(n, "ns" * (size // 200), "m" * min(size, 600), 0.5, text)
    with pytest.raises(TypeError):
        n.text_key("", "m", 1, "text")  # an int temperature: the caller converts it first


def test_request_key_takes_the_native_path_only_when_nothing_else_shapes_the_answer():
    """A request with params takes the generic path; with the same params empty, the
    native one: both agree when there is nothing to tell them apart."""
    n = Normalizer()
    plain = CacheGet(model="m", text="Please, what is 2+2?", temperature=0.2)
    assert request_key(n, plain).key == _generic_text_key(n, "", "m", 0.2, plain.text)
    with_params = CacheGet(model="m", text="Please, what is 2+2?", temperature=0.2,
                           params={"top_p": 0.5})
    assert request_key(n, with_params).key != request_key(n, plain).key
