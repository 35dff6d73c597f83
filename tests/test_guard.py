"""The guarded call: begin/end through a real daemon, the route's chain with back-off and
one deadline, circuit breakers, Retry-After, stale and static fallbacks. The provider is
a plain function here that answers or raises like an SDK would (tests/test_integrations
drives the real SDKs against a stub server)."""
import threading
import time
from types import SimpleNamespace

import pytest

from sidecar import CallResult, Client
from sidecar.errors import AllAttemptsFailed, Denied, InvalidValue
from sidecar.limits.pricing import PricingRegistry, Usage

CONFIG = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "rpm"
scope = "user"
metric = "requests"
window = "60s"
amount = 1000

[routes.chain]
models = [{model = "gpt-4o", provider = "openai", timeout = 2},
          {model = "gpt-4o-mini", provider = "openai", timeout = 2},
          {model = "claude-haiku", provider = "anthropic", timeout = 2}]
max_attempts = 4
deadline = 5
backoff_base = 0.01
backoff_max = 0.05

[routes.single]
models = [{model = "solo", timeout = 1}]
max_attempts = 3
deadline = 3
backoff_base = 0.01
backoff_max = 0.02
static_fallback = "sorry, try again later"

[circuits]
open_for = 1.0

[cache.policy.short]
tier = "exact"
ttl = 0.5
"""


class ProviderError(Exception):
    """Raised like an SDK's status error: ``status_code`` and ``response.headers``."""

    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status
        headers = {} if retry_after is None else {"retry-after": str(retry_after)}
        self.response = SimpleNamespace(status_code=status, headers=headers)


class Provider:
    """Answers per model from a script: an exception to raise, or text to answer."""

    def __init__(self, **script) -> None:
        self.script = {k: list(v) if isinstance(v, list) else v for k, v in script.items()}
        self.calls: list[tuple[str, float, float]] = []  # (model, timeout, when)
        self.lock = threading.Lock()

    def __call__(self, model, timeout):
        with self.lock:
            self.calls.append((model.model, timeout, time.monotonic()))
            step = self.script.get(model.model, "ok")
            if isinstance(step, list):
                step = step.pop(0) if len(step) > 1 else step[0]
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, (int, float)):  # hang that long, then time out
            time.sleep(min(step, timeout))
            raise TimeoutError("provider timed out")
        return CallResult(f"{step} from {model.model}", input_tokens=100, output_tokens=20,
                          cache={"text": f"{step} from {model.model}"})

    @property
    def models(self):
        return [c[0] for c in self.calls]


QUESTION = dict(user="alice", text="Summarise this week's sales numbers.")


def test_fallback_order_and_pricing_by_the_answering_model(start_daemon):
    d = start_daemon(CONFIG)
    p = Provider(**{"gpt-4o": ProviderError(500), "gpt-4o-mini": ProviderError(503)})
    with Client(d.path) as c:
        g = c.guarded(p, route="chain", max_tokens=50, **QUESTION)
        assert g.source == "provider" and g.model == "claude-haiku"
        assert p.models == ["gpt-4o", "gpt-4o-mini", "claude-haiku"]
        assert [(a.model, a.ok, a.status) for a in g.attempts] == [
            ("gpt-4o", False, 500), ("gpt-4o-mini", False, 503), ("claude-haiku", True, 0)]
        # priced as claude-haiku (the answer), not gpt-4o (the first model, estimated)
        reg = PricingRegistry()
        haiku = reg.cost("claude-haiku", Usage(100, 20, 0, 0)).micro_usd / 1e6
        assert g.usd == pytest.approx(haiku)
        assert haiku != reg.cost("gpt-4o", Usage(100, 20, 0, 0)).micro_usd / 1e6
        again = c.guarded(p, route="chain", max_tokens=50, **QUESTION)
        assert again.source == "cache" and again.value == {"text": "ok from claude-haiku"}
        assert len(p.calls) == 3  # the cache hit never reached the provider
    assert d.stop() == 0


def test_circuit_opens_after_three_failures_then_half_opens(start_daemon):
    d = start_daemon(CONFIG)
    p = Provider(**{"gpt-4o": ProviderError(500)})
    with Client(d.path) as c:
        for i in range(3):
            g = c.guarded(p, route="chain", user="u", text=f"question {i}", no_store=True)
            assert g.model == "gpt-4o-mini"
        assert c.stats().circuits["gpt-4o"] == "open"
        b = c.begin(route="chain", user="u", text="another")
        assert b.outcome == "go" and b.skipped == ["gpt-4o"]
        assert [m.model for m in b.chain] == ["gpt-4o-mini", "claude-haiku"]
        c.end(b.lease)
        time.sleep(1.1)  # open_for = 1 s
        probe = c.route(route="chain")
        assert probe.chain[0].model == "gpt-4o" and not probe.skipped  # the one probe
        assert c.route(route="chain").skipped == ["gpt-4o"]  # no second probe meanwhile
        assert c.report("gpt-4o", True).state == "closed"
        assert c.stats().circuits["gpt-4o"] == "closed"
    assert d.stop() == 0


def test_single_model_route_attempt_cap_and_static_fallback(start_daemon):
    d = start_daemon(CONFIG)
    p = Provider(solo=ProviderError(500))
    with Client(d.path) as c:
        g = c.guarded(p, route="single", **QUESTION)
        assert g.source == "static" and g.value == "sorry, try again later"
        assert len(p.calls) == 3  # max_attempts
        assert c.stats().circuits["solo"] == "open"  # 3 failures in a row
        b = c.begin(route="single", **QUESTION)
        assert b.outcome == "deny" and b.reason == "no_model" and 0 < b.retry_after <= 1.0
        g2 = c.guarded(p, route="single", **QUESTION)
        assert g2.source == "static" and len(p.calls) == 3  # nothing called: circuit open
    assert d.stop() == 0


def test_deadline_is_one_for_all_attempts(start_daemon):
    d = start_daemon(CONFIG.replace("deadline = 3", "deadline = 0.6"))
    p = Provider(solo=0.25)  # every attempt hangs 0.25 s, then times out
    with Client(d.path) as c:
        g = c.guarded(p, route="single", **QUESTION)
        assert g.source == "static"
        # each attempt starts, and its timeout ends, within the one deadline (0.6 s from
        # before the first attempt); 0.01 s covers the instant between the guard computing
        # an attempt's timeout and the provider noting its start
        first = p.calls[0][2]
        assert all(t <= 0.6 and when + t <= first + 0.6 + 0.01 for _, t, when in p.calls)
        assert 2 <= len(p.calls) <= 3
    assert d.stop() == 0


def test_retry_after_is_honoured(start_daemon):
    d = start_daemon(CONFIG.replace("[circuits]\nopen_for = 1.0", "[circuits]\nopen_for = 0.05"))
    p = Provider(solo=[ProviderError(429, retry_after=0.4), "ok"])
    with Client(d.path) as c:
        g = c.guarded(p, route="single", **QUESTION)
        assert g.source == "provider" and len(p.calls) == 2
        assert p.calls[1][2] - p.calls[0][2] >= 0.4  # not before the provider's Retry-After
        assert g.attempts[0].status == 429 and g.attempts[0].retry_after == 0.4
    assert d.stop() == 0


def test_stale_answer_when_everything_fails(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        fresh = c.guarded(Provider(), route="chain", kind="short", **QUESTION)
        assert fresh.source == "provider"
        time.sleep(0.6)  # the entry (ttl 0.5 s) expires, kept for stale serves
        broken = Provider(**{m: ProviderError(500) for m in ("gpt-4o", "gpt-4o-mini",
                                                              "claude-haiku")})
        g = c.guarded(broken, route="chain", kind="short", **QUESTION)
        assert g.source == "stale" and g.value == {"text": "ok from gpt-4o"}
        assert len(g.attempts) == 4  # max_attempts, then the stale answer
    assert d.stop() == 0


def test_all_attempts_failed_names_every_attempt(start_daemon):
    d = start_daemon(CONFIG)
    broken = Provider(**{"gpt-4o": ProviderError(500), "gpt-4o-mini": ProviderError(400),
                         "claude-haiku": ProviderError(502)})
    with Client(d.path) as c:
        with pytest.raises(AllAttemptsFailed) as info:
            c.guarded(broken, route="chain", no_store=True, **QUESTION)
        tried = [(a.model, a.status) for a in info.value.attempts]
        # 400 rules gpt-4o-mini out; the chain starts over with the others
        assert tried == [("gpt-4o", 500), ("gpt-4o-mini", 400), ("claude-haiku", 502),
                         ("gpt-4o", 500)]
        assert "gpt-4o-mini" in str(info.value)
    assert d.stop() == 0


def test_a_denied_call_never_reaches_the_provider(start_daemon):
    d = start_daemon(CONFIG.replace("amount = 1000", "amount = 1"))
    p = Provider()
    with Client(d.path) as c:
        assert c.guarded(p, route="chain", no_store=True, **QUESTION).source == "provider"
        with pytest.raises(Denied) as info:
            c.guarded(p, route="chain", no_store=True, user="alice", text="other question")
        assert info.value.reason == "limit" and info.value.limit == "rpm"
        assert info.value.retry_after and info.value.retry_after > 0
        assert len(p.calls) == 1
    assert d.stop() == 0


def test_downgrade_past_a_budget_fraction(start_daemon):
    d = start_daemon(CONFIG.replace('window = "60s"\namount = 1000', 'window = "day"\namount = 10'))
    with Client(d.path) as c:
        for i in range(8):
            b = c.begin(route="chain", user="bob", text=f"q{i}", no_store=True)
            assert not b.downgraded and b.chain[0].model == "gpt-4o"
            c.end(b.lease)
        b = c.begin(route="chain", user="bob", text="q9")  # 8 of 10 used: 80%
        assert b.downgraded and b.chain[0].model == "gpt-4o-mini"
        c.end(b.lease)
    assert d.stop() == 0


def test_routing_rules_pick_routes(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        assert c.route(task="classify").route == "small"
        assert c.route(task="code").route == "frontier"
        assert c.route(input_tokens=20_000).route == "frontier"
        assert c.route().route == "default"
        one = c.route(model="my-local-model")
        assert one.route == "" and [m.model for m in one.chain] == ["my-local-model"]
    assert d.stop() == 0


def test_async_guarded(start_daemon, run_async):
    from sidecar import AsyncClient

    d = start_daemon(CONFIG)

    async def provider(model, timeout):
        if model.model == "gpt-4o":
            raise ProviderError(500)
        return CallResult("async answer", input_tokens=10, output_tokens=5, cache="async answer")

    async def main():
        async with AsyncClient(d.path) as c:
            g = await c.guarded(provider, route="chain", **QUESTION)
            assert g.model == "gpt-4o-mini" and g.value == "async answer"
            again = await c.guarded(provider, route="chain", **QUESTION)
            assert again.source == "cache"

    run_async(main())
    assert d.stop() == 0


def test_an_unknown_kind_is_refused_at_begin(start_daemon):
    d = start_daemon(CONFIG)
    p = Provider()
    with Client(d.path) as c:
        with pytest.raises(InvalidValue, match="unknown response kind"):
            c.guarded(p, route="chain", kind="poetry", **QUESTION)
        assert p.calls == [] and c.limits().open_leases == 0  # nothing called, nothing held
    assert d.stop() == 0


def test_a_first_attempt_does_not_sleep(start_daemon, monkeypatch):
    """No pause before the first attempt: even ``sleep(0)`` hands the GIL (or the event
    loop) away, which cost about 60 us per guarded call."""
    from sidecar.client import guard

    slept = []
    d = start_daemon(CONFIG)
    monkeypatch.setattr(guard, "time", SimpleNamespace(sleep=slept.append,
                                                        monotonic=time.monotonic))
    p = Provider(**{"gpt-4o": ProviderError(500)})
    with Client(d.path) as c:
        g = c.guarded(p, route="chain", max_tokens=50, user="bob", text="first try?")
        assert g.model == "gpt-4o-mini" and len(slept) == 1 and 0 < slept[0] <= 0.05
        slept.clear()
        g = c.guarded(p, route="single", max_tokens=50, user="bob", text="one model?")
        assert g.model == "solo" and slept == []
    assert d.stop() == 0
