"""Hypothesis over every request struct's fields, against a daemon on the shipped defaults.

Values come from the extremes of each field's type (ints at and past int64 and the wire's
bounds, NaN, infinities, huge and tiny floats, long and odd strings, nested junk where a
field takes any value), sometimes of the wrong type, and lease fields name real leases of
this peer, so settle/end/extend/release run their real paths. No reply may be INTERNAL,
the daemon log must hold no traceback, and no limit counter may go negative or be
switched off.
"""
from __future__ import annotations

import math

import msgspec
import msgspec.inspect as mi
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Daemon
from rawsock import Raw
from sidecar import Client
from sidecar.wire import REQUEST_TYPES, Error, ErrorCode

pytestmark = pytest.mark.timeout(600)

INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**40, 2**40 + 1, 2**53 + 1, 2**62, 2**63 - 1,
        2**64 - 1, -2**63, 999, 1000]
FLOATS = [0.0, -0.0, 1e-300, 5e-324, 1.0, 0.5, 86_400.0, 86_400.5, 1e6, 1e6 + 1, 1e15,
          1e300, -1e300, math.inf, -math.inf, math.nan, 3600.0, 32_503_680_000.5]
hostile_int = st.one_of(st.sampled_from(INTS), st.integers(-2**63, 2**64 - 1))
hostile_float = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True))
hostile_text = st.one_of(
    st.sampled_from(["", " ", "gpt-4o", "claude-3-5-sonnet", "default", "user", "o200k_base",
                     "general", "<|endoftext|>", "\x00", "é" * 300, "a" * 513, "x" * 5000]),
    st.text(max_size=40))
scalar = st.one_of(st.none(), st.booleans(), hostile_int, hostile_float, hostile_text,
                   st.binary(max_size=24))
anything = st.recursive(scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hostile_text, inner, max_size=4)),
    max_leaves=12)


def of_type(t: mi.Type, leases: st.SearchStrategy[str], junk: bool) -> st.SearchStrategy:
    """Values for a field of type ``t``: its extremes, and with ``junk`` now and then a
    value of another type."""
    if isinstance(t, mi.IntType):
        right = hostile_int
    elif isinstance(t, mi.FloatType):
        right = st.one_of(hostile_float, hostile_int)
    elif isinstance(t, mi.StrType):
        right = hostile_text
    elif isinstance(t, mi.BoolType):
        right = st.booleans()
    elif isinstance(t, mi.BytesType):
        right = st.binary(max_size=80)
    elif isinstance(t, mi.LiteralType):
        right = st.one_of(st.sampled_from(t.values), hostile_text)
    elif isinstance(t, mi.NoneType):
        right = st.none()
    elif isinstance(t, mi.UnionType):
        right = st.one_of(*(of_type(u, leases, junk) for u in t.types))
    elif isinstance(t, mi.ListType):
        right = st.lists(of_type(t.item_type, leases, junk), max_size=5)
    elif isinstance(t, mi.DictType):
        right = st.dictionaries(hostile_text, anything, max_size=5)
    elif isinstance(t, mi.StructType):
        right = struct_dict(t, leases, junk)
    else:  # Raw and object: any msgpack value
        return anything
    return st.one_of(right, anything) if junk else right


def struct_dict(t: mi.StructType, leases: st.SearchStrategy[str],
                junk: bool) -> st.SearchStrategy:
    fields = {}
    for f in t.fields:
        value = leases if f.name == "lease" else of_type(f.type, leases, junk)
        fields[f.name] = value if f.required else st.one_of(st.nothing(), value)
    required = {f.name: fields[f.name] for f in t.fields if f.required}
    optional = {f.name: fields[f.name] for f in t.fields if not f.required}
    return st.fixed_dictionaries(required, optional=optional)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One daemon on the shipped defaults (no config file) for the whole module."""
    workdir = tmp_path_factory.mktemp("fuzz")
    d = Daemon(workdir, workdir / "llm.sock").wait_ready()
    with Client(d.path) as c:  # leases of this peer, for settle/end/extend/release
        leases = [c.admit(user=f"u{i}", model="gpt-4o", input_tokens=10, max_tokens=10).lease
                  for i in range(8)]
    assert all(leases)
    yield d, leases
    assert d.stop() == 0


def test_hostile_fields_never_get_internal(fuzzed):
    daemon, leases = fuzzed
    lease = st.one_of(st.sampled_from(leases), hostile_text)
    ops = st.one_of(*(
        struct_dict(mi.type_info(t), lease, junk).map(
            lambda body, tag=t.__struct_config__.tag: {**body, "op": tag})
        for junk in (False, False, True) for t in REQUEST_TYPES))
    seen: dict[str, int] = {}

    with Raw(daemon.path, timeout=60) as raw:
        @settings(max_examples=1500, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(ops)
        def one(body):
            try:
                frame = msgspec.msgpack.encode(body)
            except (OverflowError, TypeError):  # not encodable: no client could send it
                return
            raw.send(frame, raw=True)
            reply = raw.recv()
            assert reply is not None, "the daemon closed the connection"
            if type(reply) is Error:
                assert reply.code != ErrorCode.INTERNAL, (body, reply.message)
                seen[reply.code.name] = seen.get(reply.code.name, 0) + 1
            else:
                seen[body["op"]] = seen.get(body["op"], 0) + 1

        one()
    print("replies by op or error:", dict(sorted(seen.items())))
    assert seen.get("WRONG_TYPE") and len(seen) > 10  # both typed errors and real ops ran

    with Client(daemon.path) as c:
        limits = c.limits()
        assert all(row.used >= 0 for row in limits.limits), [
            r for r in limits.limits if r.used < 0]
        # the token limits still hold: a request over the per-request cap is refused
        go = c.admit(user="after-fuzz", model="gpt-4o", input_tokens=60_000, max_tokens=1)
        assert not go.allowed and go.retry_after is None
        assert c.stats().ops["admit"].errors.get("INTERNAL", 0) == 0
    assert "Traceback" not in daemon.log(), daemon.log()[-4000:]


def test_overflowing_amounts_are_typed_errors_and_switch_nothing_off(daemon):
    """Issue 14.2/14.6: amounts past int64 or past what the engine holds, infinite or NaN
    floats are refused as WRONG_TYPE; limits keep counting."""
    bad = [
        {"op": "admit", "id": 1, "user": "a", "input_tokens": 2**63 - 1, "max_tokens": 1,
         "usd": 0.0},
        {"op": "admit", "id": 2, "user": "a", "model": "gpt-4o", "input_tokens": 2**62},
        {"op": "admit", "id": 3, "user": "a", "usd": math.inf},
        {"op": "admit", "id": 4, "user": "a", "usd": 1e300},
        {"op": "settle", "id": 5, "lease": "x", "usd": math.nan},
        {"op": "costs", "id": 6, "since": math.nan},
        {"op": "costs", "id": 7, "since": -1e300},
        {"op": "report", "id": 8, "model": "gpt-4o", "ok": False, "retry_after": math.inf},
        {"op": "count", "id": 9, "text": "a", "max_tokens": 2**63},
    ]
    with Raw(daemon.path) as raw:
        for body in bad:
            raw.send(body)
            reply = raw.recv()
            assert type(reply) is Error and reply.code == ErrorCode.WRONG_TYPE, (body, reply)
            assert reply.id == body["id"]
    with Client(daemon.path) as c:
        assert c.stats().circuits.get("gpt-4o", "closed") == "closed"
        # the default 50k tokens per request cap still refuses, nothing was reserved
        assert not c.admit(user="a", model="gpt-4o", input_tokens=50_001).allowed
        assert all(row.used >= 0 for row in c.limits().limits)
    assert "Traceback" not in daemon.log()


def test_price_past_what_a_call_may_cost_is_invalid_value(start_daemon):
    d = start_daemon('[pricing.overrides]\n"dear" = { input = 10000.0, output = 10000.0 }\n')
    with Client(d.path) as c:
        from sidecar.errors import InvalidValue
        with pytest.raises(InvalidValue, match="more than"):
            c.admit(user="a", model="dear", input_tokens=2**40, max_tokens=0)
        assert c.admit(user="a", model="dear", input_tokens=10, max_tokens=10).allowed
    assert "Traceback" not in d.log()
