"""Issue 14: no request may switch a guard off, lose a lease, or act for another peer.

Engine cases run in process with a pinned clock; wire cases against a real daemon.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import tempfile
from pathlib import Path

import pytest

from rawsock import Raw
from sidecar import Client
from sidecar.errors import Forbidden, InvalidValue
from sidecar.limits.engine import Engine, Estimate, Subject, Usage, parse_rule

ALICE = Subject(user="alice", model="gpt-4o")


def rule(name, scope, metric, window, amount, **kw):
    return parse_rule(name, scope, metric, window, amount, **kw)


def engine() -> Engine:
    return Engine([rule("tpm", "global", "total_tokens", "60s", 1000),
                   rule("conc", "user", "concurrent", "", 1),
                   rule("usd", "global", "usd", "day", 1.0)])


def test_engine_refuses_amounts_it_cannot_hold_before_changing_anything():
    e = engine()
    for bad in [Estimate(2**63 - 1, 1, 0), Estimate(-5, 0, 0), Estimate(0, 0, 2**62),
                Estimate(1.5, 0, 0)]:
        with pytest.raises((ValueError, OverflowError, TypeError)):
            e.admit(ALICE, bad, 0.0, b"fingerprint")
    assert all(s.used == 0 for s in e.state(0.0))
    assert e.admit(ALICE, Estimate(10, 10, 10), 0.0).allowed  # and nothing was switched off
    assert not e.admit(Subject(user="bob"), Estimate(990, 0, 0), 0.0).allowed


def test_a_settle_with_bad_numbers_keeps_its_lease():
    """Issue 14.5: the lease, its slot and its estimate survive a settle that fails."""
    e = engine()
    d = e.admit(ALICE, Estimate(100, 100, 1000), 0.0)
    for bad in [Usage(2**63, 0, 0), Usage(-1, 0, 0), Usage(0, 0, 2**62)]:
        with pytest.raises((ValueError, OverflowError)):
            e.settle(d.lease, bad, 1.0)
    assert e.open_leases == 1
    assert not e.admit(ALICE, Estimate(1, 1, 1), 1.0).allowed  # the slot is still held
    done = e.settle(d.lease, Usage(50, 50, 500), 2.0)
    assert done.found and not done.duplicate and done.micro_usd == 500
    assert {s.name: s.used for s in e.state(2.0)}["tpm"] == 100


def test_duplicate_settle_reports_what_was_recorded():
    """Issue 14.10: a resend with other numbers reports the first settle's cost, and a
    settle after a release says nothing was charged."""
    e = engine()
    d = e.admit(ALICE, Estimate(100, 100, 1000), 0.0)
    assert e.settle(d.lease, Usage(10, 10, 700), 1.0).micro_usd == 700
    again = e.settle(d.lease, Usage(999, 999, 99_999), 2.0)
    assert again.duplicate and again.micro_usd == 700 and not again.released
    d2 = e.admit(Subject(user="bob"), Estimate(1, 1, 1), 3.0)
    assert e.release(d2.lease, 3.0)
    late = e.settle(d2.lease, Usage(5, 5, 5), 4.0)
    assert late.found and late.duplicate and late.released and late.micro_usd == 0


def test_lease_ids_are_unguessable_and_bound_to_their_owner():
    """Issue 14.9: 128 random bits; another uid's settle, extend or release finds nothing."""
    e = engine()
    ids = [e.admit(Subject(user=f"u{i}"), Estimate(1, 0, 0), 0.0, b"", 1000).lease
           for i in range(200)]
    assert len(set(ids)) == 200
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{32}", i) for i in ids)
    lease = ids[0]
    assert not e.settle(lease, Usage(1, 0, 0), 1.0, 1001).found
    assert e.extend(lease, Usage(500, 0, 0), 1.0, 1001).reason == "unknown_lease"
    assert not e.release(lease, 1.0, 1001)
    assert e.lease_subject(lease, 1001) is None
    assert e.lease_subject(lease, 1000).user == "u0"
    assert e.settle(lease, Usage(1, 0, 0), 1.0, 1000).found


def test_wire_settle_with_bad_numbers_keeps_the_lease(daemon):
    with Client(daemon.path) as c:
        go = c.admit(user="alice", model="gpt-4o", input_tokens=10, max_tokens=10)
        with pytest.raises(InvalidValue):  # cached input above input: refused, lease kept
            c.settle(go.lease, input_tokens=1, cached_input_tokens=5)
        first = c.settle(go.lease, input_tokens=10, output_tokens=5)
        assert first.found and not first.duplicate and first.usd > 0
        again = c.settle(go.lease, input_tokens=10_000, output_tokens=10_000)
        assert again.duplicate and again.usd == first.usd
        go2 = c.admit(user="alice", model="gpt-4o", input_tokens=10, max_tokens=10)
        assert c.release(go2.lease).released
        late = c.settle(go2.lease, input_tokens=10, output_tokens=5)
        assert late.duplicate and late.released and late.usd == 0.0
    assert "Traceback" not in daemon.log()


def test_end_reports_attempts_only_for_a_lease_it_holds(daemon):
    """A forged end (unknown lease) must not move a circuit; a resent end counts once."""
    failed = [{"model": "gpt-4o", "ok": False, "status": 500}] * 5
    with Client(daemon.path) as c:
        from sidecar.wire import Attempt
        attempts = [Attempt(**a) for a in failed]
        r = c.end("f00dfeed-" + "0" * 32, attempts=attempts)
        assert not r.found
        assert c.stats().circuits.get("gpt-4o", "closed") == "closed"


NOBODY = 65534


def as_uid(uid: int, fn):
    """``fn()`` in a forked child running as ``uid`` (modules already imported, so no new
    interpreter has to be readable by it); returns its result or re-raises its error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                result = ("ok", fn())
            except Exception as exc:  # carried to the parent, which re-raises it
                result = ("error", repr(exc))
            os.write(write, pickle.dumps(result))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "the child failed before it could answer"
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


@pytest.fixture
def shared_daemon(start_daemon):
    """A daemon whose socket any uid may open (a world-readable directory, mode 0666)."""
    def start(extra: str = ""):
        where = Path(tempfile.mkdtemp(prefix="shared-sidecar-"))
        where.chmod(0o755)
        return start_daemon('[server]\nsocket_mode = "0666"\n' + extra,
                            socket_path=where / "llm.sock")
    return start


root_only = pytest.mark.skipif(os.geteuid() != 0,
                               reason="needs root to act as another uid (setuid)")


@root_only
def test_another_uid_cannot_end_my_lease(shared_daemon):
    d = shared_daemon()
    with Client(d.path) as c:
        go = c.admit(user="alice", model="gpt-4o", input_tokens=10, max_tokens=10)

    def steal():
        with Client(d.path) as c:
            return (c.settle(go.lease, input_tokens=1).found, c.release(go.lease).released,
                    c.extend(go.lease, output_tokens=10**6).reason)

    assert as_uid(NOBODY, steal) == (False, False, "unknown_lease")
    with Client(d.path) as c:
        done = c.settle(go.lease, input_tokens=10)
        assert done.found and not done.duplicate


@root_only
@pytest.mark.parametrize("op", ["admit", "begin"])
def test_a_long_text_counted_off_the_loop_keeps_its_peer(shared_daemon, op):
    """An admit or begin whose text is counted on a worker thread ends after other peers'
    requests ran on the loop; its lease is still the asking peer's."""
    d = shared_daemon('[tokens]\noffload_chars = 1000\n[cache.semantic]\nenabled = false\n'
                      '[[limits.rules]]\nname = "big"\nscope = "user"\n'
                      'metric = "total_tokens"\nwindow = "60s"\namount = 100000000\n')
    text = " ".join(f"w{i}q{i * 7919 % 100003}" for i in range(300_000))  # a slow count
    with Raw(d.path, timeout=60) as mine:
        mine.send({"op": op, "id": 1, "user": "alice", "model": "gpt-4o", "text": text})

        def meanwhile():  # another peer's requests while the text is counted
            with Client(d.path) as c:
                return sum(c.ping() > 0 for _ in range(200))

        assert as_uid(NOBODY, meanwhile) == 200
        reply = mine.recv()
    assert reply.lease, reply
    with Client(d.path) as c:
        assert c.release(reply.lease).released  # root's own lease, not nobody's


@root_only
def test_operator_ops_are_forbidden_to_apps(shared_daemon):
    d = shared_daemon()

    def app():
        out = []
        with Client(d.path) as c:
            for call in (lambda: c.cache_invalidate(all=True),
                         lambda: c.report("gpt-4o", ok=False, status=500),
                         lambda: c.costs(by="user"),
                         lambda: c.limits()):
                try:
                    call()
                    out.append("allowed")
                except Forbidden as exc:
                    out.append(f"forbidden: {exc.detail[:20]}")
            out.append(c.costs(by="model").by)  # aggregates stay open
            out.append(c.admit(user="alice", model="gpt-4o", input_tokens=5).allowed)
            out.append(len(c.limits(user="alice").limits) > 0)
        return out

    got = as_uid(NOBODY, app)
    assert all(g.startswith("forbidden") for g in got[:4]), got
    assert got[4:] == ["model", True, True]
    with Client(d.path) as c:  # root is an operator
        assert c.cache_invalidate(all=True) == 0
        assert c.costs(by="user").by == "user"
        assert c.report("gpt-4o", ok=True).state == "closed"


@root_only
def test_operators_and_apps_by_config(shared_daemon):
    d = shared_daemon(f"[server.access]\napp_uids = [{NOBODY - 1}]\n"
                      f"operator_uids = [{NOBODY}]\n")

    def operator():
        with Client(d.path) as c:
            return c.costs(by="user").by

    assert as_uid(NOBODY, operator) == "user"  # an operator needs no app entry

    def outsider():
        with Client(d.path) as c:
            try:
                c.ping()
            except Forbidden as exc:
                return exc.detail
        return "served"

    detail = as_uid(NOBODY - 2, outsider)
    assert "server.access" in detail


@root_only
def test_isolated_cache_namespaces_per_uid(shared_daemon):
    d = shared_daemon("[server.access]\nisolate_cache = true\n")
    with Client(d.path) as c:
        assert c.cache_put(text="what is two plus two", model="gpt-4o",
                           response="four").stored

    def look():
        with Client(d.path) as c:
            miss = c.cache_get(text="what is two plus two", model="gpt-4o").hit
            c.cache_put(text="what is two plus two", model="gpt-4o", response="mine")
            return miss, c.cache_get(text="what is two plus two", model="gpt-4o").value()

    assert as_uid(NOBODY, look) == (False, "mine")
    with Client(d.path) as c:  # root (an operator) sees the shared namespace, unchanged
        assert c.cache_get(text="what is two plus two", model="gpt-4o").value() == "four"


def test_one_owner_holds_a_bounded_number_of_open_leases():
    """Memory per peer: past max_open_leases_per_uid the owner is denied until one of its
    leases ends; other owners (and owner-less callers) are not affected."""
    e = Engine([rule("conc", "global", "concurrent", "", 1000)], max_open_leases_per_uid=3)
    mine = [e.admit(Subject(user=f"u{i}"), Estimate(1, 0, 0), 0.0, b"", 7) for i in range(3)]
    assert all(d.allowed for d in mine)
    over = e.admit(Subject(user="u9"), Estimate(1, 0, 0), 0.0, b"", 7)
    assert not over.allowed and over.denial.limit == "open_leases"
    assert math.isinf(over.denial.retry_after) and not over.denial.never
    assert e.admit(Subject(user="u9"), Estimate(1, 0, 0), 0.0, b"", 8).allowed
    assert e.admit(Subject(user="u9"), Estimate(1, 0, 0), 0.0).allowed
    e.settle(mine[0].lease, Usage(1, 0, 0), 1.0, 7)
    assert e.admit(Subject(user="u9"), Estimate(1, 0, 0), 1.0, b"", 7).allowed
    e.release(mine[1].lease, 1.0, 7)
    assert e.admit(Subject(user="u10"), Estimate(1, 0, 0), 1.0, b"", 7).allowed
    assert not e.admit(Subject(user="u11"), Estimate(1, 0, 0), 1.0, b"", 7).allowed
    e.expire(1000.0)  # every lease expired: the owner holds none
    assert e.admit(Subject(user="u12"), Estimate(1, 0, 0), 1000.0, b"", 7).allowed


def test_open_lease_cap_over_the_wire(start_daemon):
    d = start_daemon("[limits]\nmax_open_leases_per_uid = 2\n")
    with Client(d.path) as c:
        a = c.admit(user="a", model="gpt-4o", input_tokens=5)
        b = c.admit(user="b", model="gpt-4o", input_tokens=5)
        over = c.admit(user="c", model="gpt-4o", input_tokens=5)
        assert a.allowed and b.allowed and not over.allowed
        assert over.limit == "open_leases" and over.retry_after is None
        c.release(a.lease)
        assert c.admit(user="c", model="gpt-4o", input_tokens=5).allowed
        assert c.stats().limit_denials.get("open_leases") == 1


def test_rule_amounts_and_prices_past_what_the_engine_counts_are_config_errors(tmp_path):
    from sidecar import config as config_mod
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match="larger than a limit can count"):
        rule("huge", "global", "total_tokens", "60s", 1e300)
    bad = tmp_path / "price.toml"
    bad.write_text('[pricing.overrides]\n"m" = { input = 1e300, output = 1.0 }\n')
    with pytest.raises(ConfigError):
        config_mod.load(bad, env={})
