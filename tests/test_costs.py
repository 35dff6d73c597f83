"""The cost tracker and the alert rules, in process, with a pinned clock."""
from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest

from sidecar.ledger.alerts import Alerts, Kind
from sidecar.ledger.settings import AlertsConfig
from sidecar.ledger.costs import OTHER, By, CostTracker, Tallies

# 2026-11-23 10:15:00 UTC, a Monday
NOW = datetime(2026, 11, 23, 10, 15, tzinfo=ZoneInfo("UTC")).timestamp()
HOUR, DAY = 3600.0, 86400.0


def call(t: CostTracker, now: float, model: str = "m", user: str = "u", route: str = "r",
         micro: int = 1000, inp: int = 100, out: int = 10, error: bool = False) -> None:
    t.request(now, model, user, route, input_tokens=inp, output_tokens=out, cached_tokens=0,
              reasoning_tokens=0, micro_usd=micro, error=error)


def test_totals_are_exact_sums_by_group_hour_and_day():
    t = CostTracker()
    call(t, NOW, "a", "alice", micro=1_234_567, inp=1200, out=500)
    t.request(NOW + 60, "a", "bob", "r", input_tokens=1000, output_tokens=300,
              cached_tokens=400, reasoning_tokens=120, micro_usd=3, error=False)
    call(t, NOW + HOUR, "b", "alice", micro=10, error=True)
    t.hit(NOW + HOUR, "a", "bob", "r", semantic=True, saved_micro_usd=500_000)
    t.hit(NOW + HOUR, "a", "bob", "r", semantic=False, saved_micro_usd=250_000)
    t.denial(NOW + HOUR, "a", "carol", "r")
    s = t.summary(NOW, NOW + HOUR, By.MODEL)
    tot = s.totals
    assert (tot.requests, tot.errors, tot.hits_exact, tot.hits_semantic, tot.denials) == (
        3, 1, 1, 1, 1)
    assert (tot.input_tokens, tot.output_tokens, tot.cached_tokens, tot.reasoning_tokens) == (
        2300, 810, 400, 120)
    assert tot.usd == 1.234580 and tot.saved_usd == 0.75
    assert tot.cost_per_request == pytest.approx(1.234580 / 3)
    assert tot.hit_rate == 2 / 5
    assert [(g.key, g.totals.usd) for g in s.groups] == [("a", 1.23457), ("b", 0.00001)]
    assert [h.start for h in s.hours] == [NOW - 900, NOW - 900 + HOUR]
    assert [h.totals.requests for h in s.hours] == [2, 1]
    assert [d.start for d in s.days] == [NOW - 10 * HOUR - 900]
    users = t.summary(NOW, NOW + HOUR, By.USER, top=1)
    assert [g.key for g in users.groups] == ["alice"] and users.other_groups == 2
    # the hour window: only the second hour
    assert t.summary(NOW + HOUR, NOW + HOUR, By.ROUTE).totals.requests == 1


def test_hours_and_days_follow_the_zone():
    t = CostTracker("Asia/Kolkata")  # UTC+5:30: hours start at :30 UTC
    call(t, NOW)
    s = t.summary(NOW, NOW, By.MODEL)
    assert s.hours[0].start == datetime(2026, 11, 23, 9, 30, tzinfo=ZoneInfo("UTC")).timestamp()
    assert s.days[0].start == datetime(2026, 11, 22, 18, 30, tzinfo=ZoneInfo("UTC")).timestamp()


def test_drain_snapshot_restore_round_trip():
    t = CostTracker()
    call(t, NOW, "a", micro=7)
    call(t, NOW + HOUR, "b", micro=11)
    first = t.drain()
    assert first is not None and t.drain() is None
    call(t, NOW + HOUR, "b", micro=13)
    second = t.drain()
    assert second is not None and len(second.rows) == 1 and second.rows[0][4][9] == 13
    wire = [msgspec.msgpack.decode(msgspec.msgpack.encode(r), type=Tallies)
            for r in (first, second)]
    again = CostTracker()
    assert again.restore(wire, NOW + HOUR) == 3
    assert again.summary(NOW, NOW + HOUR, By.MODEL) == t.summary(NOW, NOW + HOUR, By.MODEL)
    from_snapshot = CostTracker()
    from_snapshot.restore(t.snapshot(chunk=1), NOW + HOUR)
    assert from_snapshot.rows == t.rows
    assert t.drain() is None  # a snapshot stands for everything pending


def test_retention_and_row_bound():
    t = CostTracker(retention_days=2, max_rows=1000)
    call(t, NOW - 3 * DAY)
    call(t, NOW)
    assert t.expire(NOW) == 1 and len(t.rows) == 1
    assert CostTracker(retention_days=2).restore(t.snapshot() + [Tallies(
        [(int(NOW - 3 * DAY), "m", "u", "r", [1] * 11)])], NOW) == 1
    for i in range(1500):
        call(t, NOW, user=f"user{i}")
    assert len(t.rows) <= 1001 and t.folded == 501
    folded = t.summary(NOW, NOW, By.USER, top=10_000)
    assert sum(g.totals.requests for g in folded.groups) == 1501
    assert "(other users)" in [g.key for g in folded.groups]
    assert OTHER not in [g.key for g in folded.groups]


def _alerts(**kw) -> Alerts:
    return Alerts(AlertsConfig(**kw))


def test_cost_per_request_fires_only_above_twenty_percent():
    t = CostTracker()
    alerts = _alerts(min_requests=10)
    yesterday = NOW - DAY
    for _ in range(10):
        call(t, yesterday, micro=1_000_000)
    for _ in range(10):  # exactly +20%: not "more than"
        call(t, NOW, micro=1_200_000)
        assert alerts.cost_per_request(*t.day_totals(NOW), t.day_of(NOW), NOW) is None
    call(t, NOW, micro=1_200_001)  # 11 calls, average just above 1.2
    fired = alerts.cost_per_request(*t.day_totals(NOW), t.day_of(NOW), NOW)
    assert fired is not None and fired.kind == Kind.COST_PER_REQUEST.value
    call(t, NOW, micro=5_000_000)  # once a day
    assert alerts.cost_per_request(*t.day_totals(NOW), t.day_of(NOW), NOW) is None
    assert alerts.counts == {"cost_per_request": 1} and list(alerts.recent) == [fired]


def test_cost_per_request_needs_enough_calls_on_both_days():
    t = CostTracker()
    alerts = _alerts(min_requests=5)
    for _ in range(4):
        call(t, NOW - DAY, micro=1)
    for _ in range(5):
        call(t, NOW, micro=100)
    assert alerts.cost_per_request(*t.day_totals(NOW), t.day_of(NOW), NOW) is None
    call(t, NOW - DAY + 1, micro=1)
    assert alerts.cost_per_request(*t.day_totals(NOW), t.day_of(NOW), NOW) is not None


def test_zero_price_alert_respects_free_models_and_repeat():
    alerts = _alerts(free_models=("local-*",), repeat=60.0)
    assert alerts.priced("gpt-x", 10, 0, NOW) is not None
    assert alerts.priced("gpt-x", 10, 0, NOW + 59.9) is None
    assert alerts.priced("gpt-x", 10, 0, NOW + 60) is not None
    assert alerts.priced("gpt-y", 0, 0, NOW) is None  # no tokens: nothing hidden
    assert alerts.priced("gpt-y", 10, 1, NOW) is None
    assert alerts.priced("local-llama", 10, 0, NOW) is None
    assert _alerts(zero_price=False).priced("gpt-x", 10, 0, NOW) is None


def test_error_ratio_fires_at_the_threshold_once_per_window():
    alerts = _alerts(error_ratio=0.3, error_window=60.0, error_min_calls=10)
    start = NOW - NOW % 60
    outcomes = [True] * 7 + [False] * 2
    for i, ok in enumerate(outcomes):
        assert alerts.attempt("m", ok, start + i) is None
    fired = alerts.attempt("m", False, start + 9)  # 3 of 10: exactly 30%
    assert fired is not None and fired.value == 0.3 and fired.subject == "m"
    assert alerts.attempt("m", False, start + 10) is None  # once per window
    assert alerts.attempt("m", False, start + 60) is None  # a new window: 1 call
    alerts.expire(start + 200)
    assert alerts._errors == {}


def test_error_ratio_below_min_calls_stays_quiet():
    alerts = _alerts(error_ratio=0.5, error_min_calls=4)
    start = NOW - NOW % 300
    assert [alerts.attempt("m", False, start + i) for i in range(3)] == [None] * 3
    assert alerts.attempt("m", False, start + 3) is not None


def test_budget_alert_names_the_limit():
    alerts = _alerts()
    fired = alerts.budget("usd_per_day@80%", "alice", "gpt-4o", NOW)
    assert fired.kind == "budget" and fired.threshold == 0.8 and "alice" in fired.message
