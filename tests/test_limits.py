"""The limits engine with an injected clock, and the admit/settle/release/limits ops
through a real daemon."""
import math
import multiprocessing
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from sidecar import Client
from sidecar import config as config_mod
from sidecar._native.window import SlidingWindow
from sidecar.errors import ConfigError
from sidecar.wire import Admit
from sidecar.limits.engine import (
    Engine, Estimate, Kind, Subject, Usage, compile_rules, parse_rule,
)

ALICE = Subject(user="alice", model="gpt-4o")


def rule(name, scope, metric, window, amount, **kw):
    return parse_rule(name, scope, metric, window, amount, **kw)


# --- the sliding window ----------------------------------------------------------------


def test_window_edges_are_exact():
    w = SlidingWindow(60.0, 60)  # 1 s buckets
    assert w.add(10.25, 7) == 10
    assert w.used(70.99) == 7  # bucket 10 is still one of buckets 10..70
    assert w.used(71.0) == 0  # bucket 71 begins: bucket 10 leaves
    w = SlidingWindow(60.0, 60)
    w.add(10.25, 7)
    assert w.retry_after(30.0, 1, 7) == pytest.approx(41.0)  # at 71.0, exactly
    assert w.retry_after(30.0, 0, 7) == 0.0
    assert math.isinf(w.retry_after(30.0, 8, 7))


def test_window_never_overshoots_any_interval():
    # Whatever the arrival times, the admitted sum in any 60 s interval stays <= limit.
    import random

    rng = random.Random(7)
    limit, span = 50, 60.0
    w = SlidingWindow(span, 60)
    admitted = []
    t = 0.0
    for _ in range(5000):
        t += rng.expovariate(2.0)
        n = rng.randint(1, 5)
        if w.used(t) + n <= limit:
            w.add(t, n)
            admitted.append((t, n))
    for i, (start, _) in enumerate(admitted):
        total = sum(n for (s, n) in admitted[i:] if s < start + span)
        assert total <= limit


def test_window_adjust_and_bounds():
    w = SlidingWindow(10.0, 10)
    b = w.add(5.0, 10)
    assert w.adjust(b, -4, 6.0) and w.used(6.0) == 6
    assert w.adjust(b, -100, 6.0) and w.used(6.0) == 0  # never below zero
    assert not w.adjust(b, 5, 30.0)  # long gone
    with pytest.raises(ValueError):
        SlidingWindow(0.0, 10)


# --- rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,fragment", [
    (("r", "planet", "requests", "60s", 1), "unknown scope"),
    (("r", "user", "tokens", "60s", 1), "unknown metric"),
    (("r", "user", "requests", "fortnight", 1), "invalid window"),
    (("r", "user", "requests", "60s", 0), "positive"),
    (("r", "user", "requests", "60s", 1.5), "whole number"),
    (("r", "tier", "requests", "60s", 1), "tier scope needs match"),
    (("r", "user", "concurrent", "60s", 1), "no window"),
    (("r", "user", "requests", "request", 1), "always 1"),
])
def test_bad_rules_are_refused(args, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        parse_rule(*args, where="limits.toml")
    assert info.value.source == "limits.toml" and info.value.key == "limits.rules.r"
    assert info.value.hint


def test_malformed_limit_in_a_config_file(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[[limits.rules]]\nname = "x"\nscope = "user"\nmetric = "requests"\n'
                 'window = "60 parsecs"\namount = 5\n')
    with pytest.raises(ConfigError) as info:
        config_mod.load(p, {})
    assert info.value.source == str(p) and info.value.key == "limits.rules.x"
    assert "invalid window" in str(info.value) and "hint:" in str(info.value)


def test_default_rules_are_the_seeds():
    rules = {r.name: r for r in compile_rules(config_mod.load(None, {}).limits)}
    assert rules["authenticated-rpm"].amount == 30 and rules["anonymous-rpm"].amount == 5
    assert rules["authenticated-rpm"].burst == rules["anonymous-rpm"].burst == 2.0
    assert rules["global-tpm"].amount == 150_000 and rules["user-tpm"].amount == 10_000
    assert rules["request-tokens"].kind is Kind.REQUEST
    assert rules["user-hour-tokens"].amount == 200_000
    assert rules["user-day-tokens"].amount == 1_000_000
    assert rules["global-hour-tokens"].amount == 5_000_000
    assert rules["global-day-usd"].amount == 500 * 1_000_000


# --- admit / settle / release ------------------------------------------------------------


def test_all_or_none_across_limits():
    e = Engine([rule("rpm", "user", "requests", "60s", 10),
                rule("tpm", "user", "total_tokens", "60s", 100)])
    ok = e.admit(ALICE, Estimate(60, 0, 0), 0.0)
    assert ok.allowed
    denied = e.admit(ALICE, Estimate(60, 0, 0), 1.0)
    assert not denied.allowed and denied.denial.limit == "tpm"
    assert denied.denial.used == 60 and denied.denial.amount == 100
    assert denied.denial.retry_after == pytest.approx(60.0)  # bucket 0 leaves at 61
    # the denied admit reserved nothing anywhere
    state = {s.name: s.used for s in e.state(1.0)}
    assert state == {"rpm": 1, "tpm": 60}


def test_denial_names_the_limit_that_frees_last():
    e = Engine([rule("rpm", "user", "requests", "10s", 1, buckets=10),
                rule("day", "user", "requests", "day", 1)])
    e.admit(ALICE, Estimate(0, 0, 0), 100.0)
    d = e.admit(ALICE, Estimate(0, 0, 0), 101.0)
    assert d.denial.limit == "day"
    assert d.denial.retry_after == pytest.approx(86400 - 101.0)


def test_per_request_cap_and_tiers():
    e = Engine([rule("cap", "global", "total_tokens", "request", 1000),
                rule("auth", "tier", "requests", "60s", 2, match="authenticated"),
                rule("anon", "tier", "requests", "60s", 1, match="anonymous")])
    big = e.admit(ALICE, Estimate(900, 200, 0), 0.0)
    assert not big.allowed and big.denial.limit == "cap" and math.isinf(big.denial.retry_after)
    anon_a = Subject(key="10.0.0.1")
    assert e.admit(anon_a, Estimate(1, 1, 0), 0.0).allowed
    assert not e.admit(anon_a, Estimate(1, 1, 0), 0.0).allowed
    assert e.admit(Subject(key="10.0.0.2"), Estimate(1, 1, 0), 0.0).allowed  # own key
    assert e.admit(ALICE, Estimate(1, 1, 0), 0.0).allowed  # authenticated: other rule


def test_settle_replaces_estimate_and_is_idempotent():
    e = Engine([rule("tpm", "user", "total_tokens", "60s", 1000),
                rule("usd", "global", "usd", "day", 1.0)])
    d = e.admit(ALICE, Estimate(100, 400, 300_000), 0.0)
    first = e.settle(d.lease, Usage(120, 30, 50_000), 1.0)
    assert first.found and not first.duplicate
    again = e.settle(d.lease, Usage(999, 999, 999_999), 2.0)
    assert again.duplicate
    state = {s.name: s.used for s in e.state(2.0)}
    assert state == {"tpm": 150, "usd": 50_000}
    assert not e.settle("no-such-lease", Usage(1, 1, 1), 2.0).found


def test_release_gives_everything_back():
    e = Engine([rule("rpm", "user", "requests", "60s", 1),
                rule("conc", "user", "concurrent", "", 1)])
    d = e.admit(ALICE, Estimate(5, 5, 0), 0.0)
    assert not e.admit(ALICE, Estimate(5, 5, 0), 1.0).allowed
    assert e.release(d.lease, 2.0)
    assert not e.release(d.lease, 2.0)
    assert e.admit(ALICE, Estimate(5, 5, 0), 3.0).allowed


def test_lease_expiry_frees_concurrency_and_keeps_spend():
    e = Engine([rule("conc", "user", "concurrent", "", 1),
                rule("day", "user", "total_tokens", "day", 1000)], lease_ttl=30.0)
    d = e.admit(ALICE, Estimate(300, 100, 0), 0.0)
    blocked = e.admit(ALICE, Estimate(1, 1, 0), 10.0)
    assert not blocked.allowed and blocked.denial.limit == "conc"
    assert math.isinf(blocked.denial.retry_after)
    count, spent = e.expire(30.0)
    assert count == 1 and [(x.rule, x.amount) for x in spent] == [("day", 400)]
    later = e.admit(ALICE, Estimate(1, 1, 0), 31.0)
    assert later.allowed  # the slot came back
    state = {s.name: s.used for s in e.state(31.0)}
    assert state["day"] == 402  # the expired lease kept its 400
    # a late settle still replaces the estimate with the truth, and frees no second slot
    late = e.settle(d.lease, Usage(50, 50, 0), 40.0)
    assert late.found and late.expired
    assert [(x.rule, x.amount) for x in late.spent] == [("day", -300)]  # the correction
    assert {s.name: s.used for s in e.state(40.0)}["day"] == 102
    assert {s.name: s.used for s in e.state(40.0)}["conc"] == 1


def test_calendar_day_in_a_dst_zone():
    e = Engine([rule("day", "user", "requests", "day", 1)], zone="Europe/Berlin")
    berlin = ZoneInfo("Europe/Berlin")
    # 2026-03-29 is 23 hours long in Berlin (clocks go forward at 02:00)
    start = datetime(2026, 3, 29, 0, 0, tzinfo=berlin).timestamp()
    end = datetime(2026, 3, 30, 0, 0, tzinfo=berlin).timestamp()
    assert end - start == 23 * 3600
    assert e.period(Kind.DAY, start + 5) == (start, end)
    assert e.admit(ALICE, Estimate(0, 0, 0), start + 5).allowed
    d = e.admit(ALICE, Estimate(0, 0, 0), end - 1)
    assert not d.allowed and d.denial.retry_after == pytest.approx(1.0)
    assert e.admit(ALICE, Estimate(0, 0, 0), end).allowed
    # the repeated hour in October is two distinct hour periods
    fall = datetime(2026, 10, 25, 2, 30, tzinfo=berlin)
    first = fall.replace(fold=0).timestamp()
    second = fall.replace(fold=1).timestamp()
    assert second - first == 3600
    assert e.period(Kind.HOUR, first)[0] != e.period(Kind.HOUR, second)[0]


def test_burst_allowance_paces_the_amount():
    # 30 per 60 s with a 2 s burst allowance: one request per 2 s, up to 2 s ahead of pace
    e = Engine([rule("auth", "tier", "requests", "60s", 30, match="authenticated",
                     burst="2s")])
    assert e.admit(ALICE, Estimate(0, 0, 0), 100.0).allowed
    assert e.admit(ALICE, Estimate(0, 0, 0), 100.0).allowed  # 2 s ahead: still allowed
    d = e.admit(ALICE, Estimate(0, 0, 0), 100.0)
    assert not d.allowed and d.denial.reason == "burst" and d.denial.limit == "auth"
    assert d.denial.retry_after == pytest.approx(2.0)  # exact: at 102.0 it is on pace
    assert d.denial.used == 2 and d.denial.amount == 30
    assert not e.admit(ALICE, Estimate(0, 0, 0), 101.999).allowed
    assert e.admit(ALICE, Estimate(0, 0, 0), 102.0).allowed
    assert e.admit(Subject(user="bob"), Estimate(0, 0, 0), 100.0).allowed  # own pace


def test_burst_never_exceeds_pace_plus_allowance():
    import random

    rng = random.Random(11)
    amount, span, burst = 30, 60.0, 2.0
    e = Engine([rule("r", "user", "requests", "60s", amount, burst="2s", buckets=60)])
    per = span / amount
    admitted = []
    t = 0.0
    for _ in range(3000):
        t += rng.expovariate(1.5)
        if e.admit(ALICE, Estimate(0, 0, 0), t).allowed:
            admitted.append(t)
    assert len(admitted) > 100
    # any k consecutive admissions span at least (k - 1) * per - burst seconds
    for i in range(len(admitted)):
        for j in range(i + 1, min(i + 40, len(admitted))):
            assert admitted[j] - admitted[i] >= (j - i) * per - burst - 1e-9
    # and the window still caps every 60 s interval
    for i, start in enumerate(admitted):
        assert sum(1 for x in admitted[i:] if x < start + span) <= amount


def test_burst_paces_tokens_and_release_gives_pace_back():
    e = Engine([rule("tpm", "user", "total_tokens", "60s", 6000, burst="2s")])  # 100/s
    big = e.admit(ALICE, Estimate(500, 0, 0), 0.0)  # on pace: any size passes
    assert big.allowed
    d = e.admit(ALICE, Estimate(1, 0, 0), 0.0)  # 5 s ahead now
    assert not d.allowed and d.denial.reason == "burst"
    assert d.denial.retry_after == pytest.approx(3.0)
    assert e.release(big.lease, 0.5)
    assert e.admit(ALICE, Estimate(1, 0, 0), 0.5).allowed
    settled = e.admit(ALICE, Estimate(300, 0, 0), 1.0)  # ahead by 3.01 s
    e.settle(settled.lease, Usage(50, 0, 0), 1.0)  # used far less: pace given back
    assert e.admit(ALICE, Estimate(1, 0, 0), 1.0).allowed


def test_burst_needs_a_sliding_window():
    with pytest.raises(ConfigError, match="sliding window"):
        parse_rule("b", "user", "requests", "day", 5, burst="2s")
    with pytest.raises(ConfigError, match="out of range"):
        parse_rule("b", "user", "requests", "10s", 5, burst="20s")
    with pytest.raises(ConfigError, match="invalid burst"):
        parse_rule("b", "user", "requests", "10s", 5, burst="soon")


def test_leases_an_admit_expires_are_handed_to_the_next_expire():
    e = Engine([rule("day", "user", "total_tokens", "day", 10_000)], lease_ttl=10.0)
    e.admit(ALICE, Estimate(300, 0, 0), 0.0)
    assert e.admit(Subject(user="bob"), Estimate(1, 0, 0), 20.0).allowed  # expires alice's
    assert e.open_leases == 1
    count, spent = e.expire(20.0)
    assert count == 0 and [(x.key, x.amount) for x in spent] == [("alice", 300)]
    assert e.expire(21.0) == (0, [])


def test_shadow_rules_count_and_allow():
    e = Engine([rule("strict", "user", "requests", "60s", 1, shadow=True)])
    e.admit(ALICE, Estimate(0, 0, 0), 0.0)
    d = e.admit(ALICE, Estimate(0, 0, 0), 1.0)
    assert d.allowed and d.shadow_denials == ("strict",)
    assert {s.name: s.used for s in e.state(1.0)}["strict"] == 2


def test_near_limit_is_reported():
    e = Engine([rule("rpm", "user", "requests", "60s", 5)], near_fraction=0.8)
    names = [e.admit(ALICE, Estimate(0, 0, 0), float(i)).near for i in range(5)]
    assert names == [(), (), (), ("rpm",), ("rpm",)]


def test_retry_loop_guard():
    e = Engine([rule("rpm", "user", "requests", "60s", 100)], retry_loop_max=3,
               retry_loop_window=10.0)
    same = b"\x01" * 16
    for i in range(3):
        assert e.admit(ALICE, Estimate(0, 0, 0), float(i), same).allowed
    d = e.admit(ALICE, Estimate(0, 0, 0), 3.0, same)
    assert not d.allowed and d.denial.reason == "retry_loop"
    assert d.denial.retry_after == pytest.approx(7.0)
    assert e.admit(ALICE, Estimate(0, 0, 0), 3.0, b"\x02" * 16).allowed  # other prompt
    assert e.admit(Subject(user="bob"), Estimate(0, 0, 0), 3.0, same).allowed  # other user
    assert e.admit(ALICE, Estimate(0, 0, 0), 10.5, same).allowed  # window moved on


def test_retry_loop_keys_leave_after_their_window_a_budget_at_a_time():
    e = Engine([rule("rpm", "user", "requests", "60s", 1000)], retry_loop_max=3,
               retry_loop_window=10.0)
    for i in range(100):
        e.admit(ALICE, Estimate(0, 0, 0), i / 100, i.to_bytes(16, "big"))
    e.admit(Subject(user="bob"), Estimate(0, 0, 0), 5.0, b"\x01" * 16)
    e.evict_idle(9.0)  # wraparound=False once made this an IndexError: none may leave yet
    assert e.retry_loop_keys == 101
    e.evict_idle(11.0, budget=30)  # every alice key is past its window: 30 per call
    assert e.retry_loop_keys == 71
    e.evict_idle(11.0)
    assert e.retry_loop_keys == 1  # bob's admit at 5.0 is still in its window
    e.evict_idle(15.0)
    assert e.retry_loop_keys == 0 and e.retry_loop_forgotten == 0


def test_retry_loop_keys_are_capped_and_a_loop_under_the_cap_is_caught():
    e = Engine([rule("rpm", "user", "requests", "60s", 1)], retry_loop_max=3,
               retry_loop_window=10.0, retry_loop_max_keys=50)
    same = b"\xff" * 16
    for i in range(49):  # 49 other prompts: with the looping one, exactly at the cap
        e.admit(ALICE, Estimate(0, 0, 0), 0.0, i.to_bytes(16, "big"))
        if i % 20 == 0:  # denied by rpm (it allows one): still attempts of a loop
            assert e.admit(ALICE, Estimate(0, 0, 0), 0.0, same).denial.reason == "limit"
    d = e.admit(ALICE, Estimate(0, 0, 0), 1.0, same)
    assert d.denial.reason == "retry_loop" and e.retry_loop_forgotten == 0
    for i in range(100, 300):  # distinct prompts from now on: the map stays at its cap
        e.admit(ALICE, Estimate(0, 0, 0), 2.0, i.to_bytes(16, "big"))
    assert e.retry_loop_keys == 50 and e.retry_loop_forgotten == 200
    # at the cap the least recently admitted key went first: the loop is forgotten
    assert e.admit(ALICE, Estimate(0, 0, 0), 3.0, same).denial.reason == "limit"
    e.reconfigure(e.rules, zone="UTC", lease_ttl=300, near_fraction=0.8, retry_loop_max=3,
                  retry_loop_window=10.0, retry_loop_max_keys=10)
    e.evict_idle(3.0)  # a lowered cap applies at the next tick
    assert e.retry_loop_keys == 10


@pytest.mark.parametrize("line", ["retry_loop_max_keys = 0", "retry_loop_max = 1001"])
def test_retry_loop_memory_bounds_are_validated(tmp_path, line):
    p = tmp_path / "c.toml"
    p.write_text(f"[limits]\n{line}\n")
    with pytest.raises(ConfigError, match=line.split(" ")[0]):
        config_mod.load(p, {})
    assert config_mod.load(None, {}).limits.retry_loop_max_keys == 10_000


def test_idle_counters_are_evicted():
    e = Engine([rule("rpm", "user", "requests", "10s", 5, buckets=10)])
    for i in range(100):
        e.release(e.admit(Subject(user=f"u{i}"), Estimate(0, 0, 0), 0.0).lease, 0.0)
    d = e.admit(Subject(user="keeper"), Estimate(0, 0, 0), 0.0)
    assert e.evict_idle(20.0) == 100  # the keeper's lease still points at its counter
    assert len(e.state(20.0)) == 1
    assert e.settle(d.lease, Usage(0, 0, 0), 20.0).found


def test_reconfigure_keeps_counters_of_unchanged_rules():
    e = Engine([rule("rpm", "user", "requests", "60s", 5), rule("old", "user", "requests", "day", 9)])
    e.admit(ALICE, Estimate(0, 0, 0), 0.0)
    e.reconfigure([rule("rpm", "user", "requests", "60s", 1)], zone="UTC", lease_ttl=300,
                  near_fraction=0.8, retry_loop_max=0, retry_loop_window=60)
    d = e.admit(ALICE, Estimate(0, 0, 0), 1.0)
    assert not d.allowed and d.denial.used == 1 and d.denial.amount == 1


# --- through the daemon -----------------------------------------------------------------


LIMITED = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "hundred"
scope = "global"
metric = "requests"
window = "60s"
amount = 100
"""


def _admit_many(path, n, out):
    with Client(path, timeout=30) as c:
        allowed = 0
        for _ in range(n):
            allowed += c.admit(user="u", input_tokens=1, max_tokens=1).allowed
    out.put(allowed)


def test_four_processes_admit_exactly_the_limit(start_daemon):
    d = start_daemon(LIMITED)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_admit_many, args=(str(d.path), 1000, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert sum(results) == 100


def test_ops_round_trip(start_daemon):
    d = start_daemon(LIMITED.replace("amount = 100", "amount = 2"))
    with Client(d.path) as c:
        a = c.admit(user="alice", model="gpt-4o", text="What is the capital of France?",
                    max_tokens=50)
        assert a.allowed and a.lease and a.input_tokens > 0 and a.output_tokens == 50
        assert a.usd > 0 and a.usd_known
        s = c.settle(a.lease, input_tokens=10, output_tokens=5)
        assert s.found and not s.duplicate and 0 < s.usd < a.usd
        assert c.settle(a.lease, input_tokens=10, output_tokens=5).duplicate
        b = c.admit(user="alice", input_tokens=1)
        denied = c.admit(user="alice", input_tokens=1)
        assert not denied.allowed and denied.reason == "limit" and denied.limit == "hundred"
        assert denied.used == 2 and denied.amount == 2 and 0 < denied.retry_after <= 61
        assert c.release(b.lease).released and not c.release(b.lease).released
        rows = {r.name: r for r in c.limits().limits}
        assert rows["hundred"].used == 1
    assert d.stop() == 0


def test_admit_waits_in_line_until_room(start_daemon):
    d = start_daemon(LIMITED.replace('window = "60s"\namount = 100',
                                     'window = "2s"\namount = 1\nbuckets = 20'))
    with Client(d.path, timeout=10) as c:
        assert c.admit(user="a", input_tokens=1).allowed
        start = time.monotonic()
        waited = c.admit(user="a", input_tokens=1, wait=5.0)
        assert waited.allowed
        assert time.monotonic() - start >= 1.0  # let in only once the window had room
        quick = c.admit(user="a", input_tokens=1, wait=0.2)  # retry_after > wait: no queueing
        assert not quick.allowed
    assert d.stop() == 0


def test_waiters_are_served_first_come_first_served(start_daemon):
    d = start_daemon(LIMITED.replace('metric = "requests"\nwindow = "60s"\namount = 100',
                                     'metric = "concurrent"\namount = 1'))
    import threading

    order = []
    with Client(d.path, timeout=20) as c:
        first = c.admit(user="a", input_tokens=1)

        def waiter(tag):
            r = c.admit(user=tag, input_tokens=1, wait=15.0)
            order.append((tag, r.allowed))
            time.sleep(0.1)
            assert c.release(r.lease).released

        threads = []
        for tag in ("w1", "w2", "w3"):
            t = threading.Thread(target=waiter, args=(tag,))
            t.start()
            threads.append(t)
            time.sleep(0.5)  # arrive in this order
        c.release(first.lease)
        for t in threads:
            t.join(20)
    assert order == [("w1", True), ("w2", True), ("w3", True)]
    assert d.stop() == 0


def test_a_request_that_can_never_fit_does_not_wait(start_daemon):
    d = start_daemon(LIMITED.replace('metric = "requests"\nwindow = "60s"\namount = 100',
                                     'metric = "total_tokens"\nwindow = "request"\namount = 10'))
    with Client(d.path) as c:
        # answered at once: a call timeout shorter than the wait would fire otherwise
        r = c.call(Admit(user="a", input_tokens=100, wait=5.0), timeout=2.0)
        assert not r.allowed and r.retry_after is None


def test_alert_thresholds_are_crossed_once():
    e = Engine([rule("day", "global", "usd", "day", 1.0)], alert_thresholds=(0.5, 0.8, 1.0))
    crossed = [e.admit(ALICE, Estimate(0, 0, 300_000), float(i)).crossed for i in range(4)]
    assert crossed == [(), ("day@50%",), ("day@80%",), ()]  # the 4th would pass 100%: denied


def test_alerts_and_denials_in_stats_and_log(start_daemon):
    d = start_daemon('[limits]\nretry_loop_max = 0\nalert_thresholds = [0.5, 1.0]\n'
                     '[[limits.rules]]\nname = "tiny"\nscope = "user"\nmetric = "requests"\n'
                     'window = "60s"\namount = 2\n')
    with Client(d.path) as c:
        for _ in range(3):
            c.admit(user="alice", input_tokens=1)
        stats = c.stats()
    assert stats.limit_alerts == {"tiny@50%": 1, "tiny@100%": 1}
    assert stats.limit_denials == {"tiny": 1}
    assert stats.limit_near == {"tiny": 1}  # the second admit left it at 2 of 2
    assert d.stop() == 0
    assert "limit alert: tiny@100% crossed" in d.log()


# --- durability -------------------------------------------------------------------------

DAY = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "day"
scope = "user"
metric = "total_tokens"
window = "day"
amount = 1000000000
[[limits.rules]]
name = "minute"
scope = "user"
metric = "total_tokens"
window = "60s"
amount = 1000000000
"""


def _used(client, name, user="u"):
    return {r.name: r.used for r in client.limits(user).limits}.get(name, 0)


def test_settled_spend_survives_a_restart(start_daemon):
    d = start_daemon(DAY)
    with Client(d.path) as c:
        for k in (100, 250, 7):
            lease = c.admit(user="u", input_tokens=1, max_tokens=1).lease
            assert c.settle(lease, input_tokens=k).durable
        open_lease = c.admit(user="u", input_tokens=5000, max_tokens=0).lease
        assert _used(c, "day") == 357 + 5000
    assert d.stop() == 0
    d2 = start_daemon(DAY, socket_path=d.path)
    with Client(d2.path) as c:
        assert _used(c, "day") == 357  # the open lease's estimate was never settled
        assert _used(c, "minute") == 0  # windows of a minute or less are not persisted
        assert not c.settle(open_lease, input_tokens=1).found
    assert "3 spends and 3 cost rows restored" in d2.log()  # one row per settle


def test_kill_9_during_a_settle_storm_loses_no_acknowledged_settle(start_daemon):
    import random
    import signal
    import threading

    d = start_daemon(DAY)
    rng = random.Random(20261123)
    acked = [0]
    inflight = [0]
    failed = threading.Event()

    def storm():
        with Client(d.path, timeout=5) as c:
            try:
                while True:
                    lease = c.admit(user="u", input_tokens=1, max_tokens=1).lease
                    k = rng.randint(1, 1000)
                    inflight[0] = k
                    c.settle(lease, input_tokens=k)
                    acked[0] += k
                    inflight[0] = 0
            except Exception:
                failed.set()

    t = threading.Thread(target=storm)
    t.start()
    time.sleep(1.0)
    d.signal(signal.SIGKILL)
    assert failed.wait(15)
    t.join(15)
    d.proc.wait(15)
    assert acked[0] > 0
    d2 = start_daemon(DAY, socket_path=d.path)  # the stale socket is replaced
    with Client(d2.path) as c:
        used = _used(c, "day")
    print(f"acknowledged {acked[0]} tokens, in flight {inflight[0]}, restored {used}")
    assert used in (acked[0], acked[0] + inflight[0])


def test_snapshot_and_restore_in_process():
    rules = [rule("day", "user", "total_tokens", "day", 10_000),
             rule("long", "user", "total_tokens", "2h", 10_000),
             rule("short", "user", "total_tokens", "60s", 10_000)]
    e = Engine(rules)
    settled = e.admit(ALICE, Estimate(10, 10, 0), 100.0)
    spent = e.settle(settled.lease, Usage(30, 0, 0), 101.0).spent
    assert sorted(x.rule for x in spent) == ["day", "long"]
    e.admit(ALICE, Estimate(500, 0, 0), 102.0)  # open: not in the snapshot
    snap = e.snapshot(103.0)
    assert sorted((x.rule, x.amount) for x in snap) == [("day", 30), ("long", 30)]
    fresh = Engine(rules)
    assert fresh.restore(snap, 104.0) == 2
    assert {s.name: s.used for s in fresh.state(104.0)} == {"day": 30, "long": 30}
    changed = Engine([rule("day", "user", "total_tokens", "hour", 10_000)])
    assert changed.restore(snap, 104.0) == 0  # same name, other window: not taken


def test_async_waiting_admit_does_not_hold_up_other_calls(start_daemon, run_async):
    import asyncio

    from sidecar import AsyncClient

    d = start_daemon(LIMITED.replace('metric = "requests"\nwindow = "60s"\namount = 100',
                                     'metric = "concurrent"\namount = 1'))

    async def main():
        async with AsyncClient(d.path) as c:
            held = await c.admit(user="a", input_tokens=1)
            waiting = asyncio.ensure_future(c.admit(user="b", input_tokens=1, wait=10.0))
            await asyncio.sleep(0.2)
            await c.ping()  # answered while the admit still waits: no head-of-line block
            assert not waiting.done()
            assert (await c.release(held.lease)).released
            assert (await waiting).allowed

    run_async(main())
    assert d.stop() == 0


def test_eviction_is_incremental_and_spares_held_counters():
    e = Engine([rule("out", "user", "output_tokens", "10s", 5, buckets=10)])
    held = e.admit(Subject(user="keeper"), Estimate(0, 0, 0), 15.0)  # reserves 0 output tokens
    for i in range(50):
        e.release(e.admit(Subject(user=f"u{i}"), Estimate(0, 1, 0), 0.0).lease, 0.0)
    evicted = [e.evict_idle(20.0, budget=20) for _ in range(3)]
    assert evicted[:3] == [20, 20, 10]  # the keeper's empty counter is held by its lease
    assert e.settle(held.lease, Usage(0, 4, 0), 20.0).found
    assert {s.key: s.used for s in e.state(20.0)} == {"keeper": 4}


def test_extend_grows_a_lease_all_or_none():
    e = Engine([rule("tpm", "user", "total_tokens", "60s", 1000),
                rule("day", "global", "output_tokens", "day", 500)])
    d = e.admit(ALICE, Estimate(100, 100, 0), 0.0)
    assert e.extend(d.lease, Usage(100, 300, 0), 1.0) is None  # a stream past its estimate
    assert {s.name: s.used for s in e.state(1.0)} == {"tpm": 400, "day": 300}
    denied = e.extend(d.lease, Usage(100, 600, 0), 2.0)
    assert denied.limit == "day" and denied.used == 300 and denied.amount == 500
    assert {s.name: s.used for s in e.state(2.0)} == {"tpm": 400, "day": 300}  # none grew
    e.settle(d.lease, Usage(100, 350, 0), 3.0)
    assert {s.name: s.used for s in e.state(3.0)} == {"tpm": 450, "day": 350}
    assert e.extend("nope", Usage(1, 1, 0), 3.0).reason == "unknown_lease"
