"""The drop-in SDK guards: the real openai and anthropic SDKs against tests/stub_llm.py,
through a real daemon. Fallback order, circuits, Retry-After, the deadline, stale and
static fallbacks, denials, the cache (whole and replayed as a stream), streamed and whole
answers settling alike, and a budget running out mid-stream; sync and async."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anthropic
import openai
import pytest
from anthropic.types import Message, RawMessageStartEvent
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from sidecar import AsyncClient, Client
from sidecar.errors import AllAttemptsFailed, BudgetExhausted, Denied
from sidecar.integrations import (
    FALLBACK_ID, AsyncGuardedStream, GuardedStream, guard_anthropic, guard_openai,
)
from stub_llm import BreakStream, Fail, Hang, Malformed, Reply, StubLLM, stub_llm  # noqa: F401

pytestmark = pytest.mark.timeout(60)

CONFIG = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "rpm"
scope = "user"
metric = "requests"
window = "60s"
amount = 1000
[[limits.rules]]
name = "out"
scope = "user"
metric = "output_tokens"
window = "60s"
amount = 100000

[routes.gpt]
models = [{model = "gpt-4o", provider = "openai", timeout = 2},
          {model = "claude-stub-1", provider = "anthropic", timeout = 2},
          {model = "gpt-4o-mini", provider = "openai", timeout = 2}]
max_attempts = 4
deadline = 5
backoff_base = 0.01
backoff_max = 0.05
static_fallback = "sorry, try again later"

[routes.claude]
models = [{model = "claude-stub-1", provider = "anthropic", timeout = 2},
          {model = "gpt-4o", provider = "openai", timeout = 2},
          {model = "claude-stub-2", provider = "anthropic", timeout = 2}]
max_attempts = 4
deadline = 5
backoff_base = 0.01
backoff_max = 0.05
static_fallback = "sorry, try again later"

[routes.solo]
models = [{model = "gpt-solo", provider = "openai", timeout = 1}]
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


@dataclass(frozen=True)
class Kit:
    """One SDK: how to make its clients, guard them, ask, and read answers."""

    name: str
    route: str
    first: str
    second: str
    guard: Callable[..., Any]

    def client(self, stub: StubLLM) -> Any:
        if self.name == "openai":
            return openai.OpenAI(base_url=stub.openai_base_url, api_key="sk-test",
                                 max_retries=3, timeout=10.0)
        return anthropic.Anthropic(base_url=stub.anthropic_base_url, api_key="sk-ant-test",
                                   max_retries=3, timeout=10.0)

    def aclient(self, stub: StubLLM) -> Any:
        if self.name == "openai":
            return openai.AsyncOpenAI(base_url=stub.openai_base_url, api_key="sk-test",
                                      max_retries=3, timeout=10.0)
        return anthropic.AsyncAnthropic(base_url=stub.anthropic_base_url,
                                        api_key="sk-ant-test", max_retries=3, timeout=10.0)

    def request(self, question: str, model: str | None, max_tokens: int, **kw) -> dict:
        messages = [{"role": "user", "content": question}]
        if self.name == "openai":
            return dict(model=model or self.first, messages=messages, max_tokens=max_tokens,
                        **kw)
        return dict(model=model or self.first, max_tokens=max_tokens, system="be brief",
                    messages=messages, **kw)

    def ask(self, w: Any, question: str = "what is two plus two", model: str | None = None,
            max_tokens: int = 50, **kw) -> Any:
        req = self.request(question, model, max_tokens, **kw)
        if self.name == "openai":
            return w.chat.completions.create(**req)
        return w.messages.create(**req)

    async def aask(self, w: Any, question: str = "what is two plus two",
                   model: str | None = None, max_tokens: int = 50, **kw) -> Any:
        req = self.request(question, model, max_tokens, **kw)
        if self.name == "openai":
            return await w.chat.completions.create(**req)
        return await w.messages.create(**req)

    def text(self, response: Any) -> str:
        if self.name == "openai":
            assert isinstance(response, ChatCompletion)
            return response.choices[0].message.content
        assert isinstance(response, Message)
        return "".join(b.text for b in response.content if b.type == "text")

    def stream_text(self, chunks: list) -> str:
        if self.name == "openai":
            assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert isinstance(chunks[0], RawMessageStartEvent)
        return "".join(e.delta.text for e in chunks
                       if e.type == "content_block_delta" and e.delta.type == "text_delta")

    def tokens(self, response: Any) -> tuple[int, int]:
        u = response.usage
        if self.name == "openai":
            return u.prompt_tokens, u.completion_tokens
        return u.input_tokens, u.output_tokens


OPENAI = Kit("openai", "gpt", "gpt-4o", "gpt-4o-mini", guard_openai)
ANTHROPIC = Kit("anthropic", "claude", "claude-stub-1", "claude-stub-2", guard_anthropic)
KITS = pytest.mark.parametrize("kit", [OPENAI, ANTHROPIC], ids=["openai", "anthropic"])


@KITS
def test_fallback_order_skips_other_providers(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG)
    stub_llm.replies[kit.second] = "four"
    stub_llm.script(Fail(500), model=kit.first)
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route)
        r = kit.ask(w)
        assert kit.text(r) == "four"
        # the other provider's model in the chain is never tried; no SDK retries
        assert stub_llm.models() == [kit.first, kit.second]
        g = w.last_outcome
        assert g.source == "provider" and g.model == kit.second and g.usd > 0
        assert [(a.model, a.ok, a.status) for a in g.attempts] == [
            (kit.first, False, 500), (kit.second, True, 0)]
        assert w.api_key == raw.api_key  # everything else is the SDK client's
    assert d.stop() == 0


@KITS
def test_stream_falls_back_before_its_first_chunk(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG)
    stub_llm.script(Fail(503), model=kit.first)
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route)
        with kit.ask(w, stream=True) as stream:
            assert isinstance(stream, GuardedStream)
            chunks = list(stream)
        assert kit.stream_text(chunks) == "stub answer"
        assert stub_llm.models() == [kit.first, kit.second]
        assert stream.outcome.model == kit.second and stream.outcome.source == "provider"
        assert w.last_outcome is stream.outcome
    assert d.stop() == 0


def test_circuit_opens_after_three_failures(start_daemon, stub_llm):
    d = start_daemon(CONFIG)
    stub_llm.script(Fail(500), Fail(500), Fail(500), model="gpt-4o")
    with Client(d.path) as sc, OPENAI.client(stub_llm) as raw:
        w = guard_openai(raw, sc, user="u", route="gpt", no_store=True)
        for i in range(3):
            OPENAI.ask(w, f"question {i}")
            assert w.last_outcome.model == "gpt-4o-mini"
        assert sc.stats().circuits["gpt-4o"] == "open"
        stub_llm.clear()
        OPENAI.ask(w, "another")
        assert stub_llm.models() == ["gpt-4o-mini"]  # the open circuit is skipped
    assert d.stop() == 0


def test_retry_after_is_honoured(start_daemon, stub_llm):
    d = start_daemon(CONFIG.replace("[circuits]\nopen_for = 1.0", "[circuits]\nopen_for = 0.05"))
    stub_llm.script(Fail(429, retry_after=0.4), model="gpt-solo")
    with Client(d.path) as sc, OPENAI.client(stub_llm) as raw:
        w = guard_openai(raw, sc, user="alice", route="solo")
        start = time.monotonic()
        r = OPENAI.ask(w, model="gpt-solo")
        assert time.monotonic() - start >= 0.4
        assert r.choices[0].message.content == "stub answer"
        assert stub_llm.models() == ["gpt-solo", "gpt-solo"]
        a = w.last_outcome.attempts[0]
        assert a.status == 429 and a.retry_after == 0.4
    assert d.stop() == 0


def test_deadline_with_a_hanging_provider_then_static_fallback(start_daemon, stub_llm):
    d = start_daemon(CONFIG.replace("deadline = 3", "deadline = 0.6"))
    stub_llm.script(*[Hang(5)] * 5, model="gpt-solo")
    with Client(d.path) as sc, OPENAI.client(stub_llm) as raw:
        w = guard_openai(raw, sc, user="alice", route="solo")
        r = OPENAI.ask(w, model="gpt-solo")
        # every attempt went out with a read timeout inside the route's 0.6 s deadline
        timeouts = [float(q.headers["x-stainless-read-timeout"]) for q in stub_llm.requests]
        assert timeouts and all(t <= 0.6 for t in timeouts)
        assert isinstance(r, ChatCompletion) and r.id == FALLBACK_ID
        assert r.choices[0].message.content == "sorry, try again later"
        assert w.last_outcome.source == "static"
        assert 1 <= len(stub_llm.models()) <= 3
    assert d.stop() == 0


@KITS
def test_stale_then_static_fallback(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG)
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route, kind="short")
        fresh = kit.ask(w)
        time.sleep(0.6)  # the entry (ttl 0.5 s) expires, kept for stale serves
        stub_llm.script(*[Fail(500)] * 8)
        stale = kit.ask(w)
        assert w.last_outcome.source == "stale" and stale == fresh
        assert w.last_outcome.value is stale
        assert len(w.last_outcome.attempts) == 4
        static = kit.ask(w, "a question never answered")
        assert w.last_outcome.source == "static" and static.id == FALLBACK_ID
        assert kit.text(static) == "sorry, try again later"
        with kit.ask(w, "another one", stream=True) as stream:  # replayed as a stream
            assert kit.stream_text(list(stream)) == "sorry, try again later"
        assert stream.outcome.source == "static"
    assert d.stop() == 0


@KITS
def test_stream_and_whole_settle_the_same(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG)
    stub_llm.script(Reply(text="the answer is four", cached_tokens=2))
    stub_llm.script(Reply(text="the answer is four", cached_tokens=2))
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route)
        whole = kit.ask(w, sidecar={"namespace": "a"})
        g_whole = w.last_outcome
        before = {u.name: u.used for u in sc.limits("alice").limits}
        with kit.ask(w, stream=True, sidecar={"namespace": "b"}) as stream:
            chunks = list(stream)
        g_stream = stream.outcome
        after = {u.name: u.used for u in sc.limits("alice").limits}
        assert kit.stream_text(chunks) == kit.text(whole)
        assert g_stream.usd == pytest.approx(g_whole.usd) and g_whole.usd > 0
        assert after["out"] - before["out"] == before["out"] == kit.tokens(whole)[1]
        assert kit.tokens(g_stream.value) == kit.tokens(whole)
        # the assembled stream was cached: the same request, not streamed, hits it
        n = len(stub_llm.requests)
        again = kit.ask(w, sidecar={"namespace": "b"})
        assert len(stub_llm.requests) == n and w.last_outcome.source == "cache"
        assert kit.text(again) == kit.text(whole) and kit.tokens(again) == kit.tokens(whole)
        assert type(again) is type(whole)
    assert d.stop() == 0


@KITS
def test_stream_and_whole_leave_the_same_ledger(start_daemon, stub_llm, kit, tmp_path):
    log = tmp_path / "requests.jsonl"
    d = start_daemon(CONFIG + f'[ledger]\nrequest_log = "{log}"\n')
    for _ in range(2):
        stub_llm.script(Reply(text="the answer is four", cached_tokens=2))
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        whole = kit.guard(raw, sc, user="whole", route=kit.route)
        kit.ask(whole, sidecar={"namespace": "a", "template": "qa", "template_version": "1"})
        streamed = kit.guard(raw, sc, user="stream", route=kit.route)
        with kit.ask(streamed, stream=True, sidecar={"namespace": "b", "template": "qa",
                                                     "template_version": "1"}) as stream:
            list(stream)
        by_user = {g.key: g.totals for g in sc.costs(by="user").groups}
    assert d.stop() == 0
    assert by_user["whole"] == by_user["stream"] and by_user["whole"].usd > 0
    assert by_user["whole"].cached_tokens == 2
    records = {r["user.id"]: r for r in map(json.loads, log.read_text().splitlines())}
    same = ("outcome", "gen_ai.request.model", "gen_ai.response.model", "gen_ai.provider.name",
            "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
            "gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.reasoning.output_tokens",
            "sidecar.cost_usd", "sidecar.fallback_depth", "gen_ai.prompt.name",
            "sidecar.prompt.version")
    assert [records["whole"][k] for k in same] == [records["stream"][k] for k in same]
    assert records["whole"]["outcome"] == "ok" and records["whole"]["gen_ai.prompt.name"] == "qa"


@KITS
def test_cache_hit_never_touches_the_provider(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG)
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route)
        first = kit.ask(w)
        assert w.last_outcome.source == "provider"
        hit = kit.ask(w)
        assert hit == first and w.last_outcome.source == "cache"
        assert w.last_outcome.value is hit
        extra = {"stream_options": {"include_usage": True}} if kit.name == "openai" else {}
        with kit.ask(w, stream=True, **extra) as stream:
            chunks = list(stream)
        assert stream.outcome.source == "cache" and stream.response is None
        assert kit.stream_text(chunks) == kit.text(first)
        if kit.name == "openai":
            assert chunks[-1].choices == [] and chunks[-1].usage == first.usage
        else:
            assert chunks[-2].usage.output_tokens == first.usage.output_tokens
        assert len(stub_llm.requests) == 1
    assert d.stop() == 0


@KITS
def test_a_denied_request_never_reaches_the_provider(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG.replace("amount = 1000", "amount = 1"))
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route, no_store=True)
        kit.ask(w)
        with pytest.raises(Denied) as info:
            kit.ask(w, "other question")
        assert info.value.reason == "limit" and info.value.limit == "rpm"
        with pytest.raises(Denied):
            kit.ask(w, "other question", stream=True)
        assert len(stub_llm.requests) == 1
    assert d.stop() == 0


@KITS
def test_budget_exhausted_mid_stream(start_daemon, stub_llm, kit):
    d = start_daemon(CONFIG.replace("amount = 100000", "amount = 100"))
    stub_llm.replies[kit.first] = "word " * 300
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route)
        stream = kit.ask(w, max_tokens=10, stream=True)
        got = []
        with pytest.raises(BudgetExhausted, match="out"):
            for chunk in stream:
                got.append(chunk)
        assert 60 < len(got) < 200  # cut at the second extend (past 10 + 2 * 64 tokens)
        assert stream.response.is_closed
        g = stream.outcome
        assert g.source == "provider" and g.usd > 0
        used = {u.name: u.used for u in sc.limits("alice").limits}
        assert 74 < used["out"] < 200  # what was received was settled
        assert sc.stats().open_leases == 0
        with pytest.raises(Denied):  # the budget is spent: nothing more goes out
            kit.ask(w, "next", max_tokens=5)
        assert len(stub_llm.requests) == 1
    assert d.stop() == 0


def test_mid_stream_failure_settles_and_raises(start_daemon, stub_llm):
    d = start_daemon(CONFIG)
    stub_llm.replies["gpt-4o"] = "one two three four five six"
    stub_llm.script(BreakStream(after_chunks=4), model="gpt-4o")
    with Client(d.path) as sc, OPENAI.client(stub_llm) as raw:
        w = guard_openai(raw, sc, user="alice", route="gpt")
        got = []
        with pytest.raises(Exception) as info:
            for chunk in OPENAI.ask(w, stream=True):
                got.append(chunk)
        assert not isinstance(info.value, BudgetExhausted)
        assert len(got) == 4 and stub_llm.models() == ["gpt-4o"]  # no fallback after it
        a = w.last_outcome.attempts[-1]
        assert w.last_outcome.model == "gpt-4o" and a.model == "gpt-4o" and not a.ok
        assert sc.stats().open_leases == 0
        again = OPENAI.ask(w)  # the cut answer was not cached
        assert w.last_outcome.source == "provider" and OPENAI.text(again)
    assert d.stop() == 0


@KITS
def test_malformed_first_chunk_falls_back_and_unread_stream_settles(start_daemon, stub_llm,
                                                                     kit):
    d = start_daemon(CONFIG)
    stub_llm.script(Malformed(), model=kit.first)
    with Client(d.path) as sc, kit.client(stub_llm) as raw:
        w = kit.guard(raw, sc, user="alice", route=kit.route, no_store=True)
        with kit.ask(w, stream=True) as stream:
            assert kit.stream_text(list(stream)) == "stub answer"
        assert stub_llm.models() == [kit.first, kit.second]
        assert stream.outcome.attempts[0].status == 0  # a malformed answer: retryable
        stream = kit.ask(w, "never read", stream=True)
        assert sc.stats().open_leases == 1
        stream.close()  # closed before its first chunk was asked for
        assert sc.stats().open_leases == 0 and stream.response.is_closed
        assert stream.outcome.usd > 0  # the first chunk (and prompt) was settled
    assert d.stop() == 0


def test_a_route_without_the_sdks_provider_uses_the_requests_model(start_daemon, stub_llm):
    d = start_daemon(CONFIG)
    with Client(d.path) as sc, ANTHROPIC.client(stub_llm) as raw:
        w = guard_anthropic(raw, sc, user="alice", route="solo")  # only an openai model
        assert ANTHROPIC.text(ANTHROPIC.ask(w)) == "stub answer"
        assert stub_llm.models() == ["claude-stub-1"] and w.last_outcome.model == "claude-stub-1"
        assert sc.stats().open_leases == 0  # the route's lease was released
        stub_llm.script(Fail(500), model="claude-stub-1")
        r = ANTHROPIC.ask(w, "fails")  # the route's static fallback still applies
        assert r.id == FALLBACK_ID and w.last_outcome.source == "static"
    assert d.stop() == 0


def test_mismatched_clients_are_refused(daemon, stub_llm):
    with Client(daemon.path) as sc, ANTHROPIC.client(stub_llm) as raw:
        with pytest.raises(TypeError, match="AsyncClient"):
            guard_openai(OPENAI.aclient(stub_llm), sc)
        with pytest.raises(TypeError, match="openai.OpenAI"):
            guard_openai(raw, sc)


@KITS
def test_async(start_daemon, stub_llm, run_async, kit):
    d = start_daemon(CONFIG.replace("amount = 100000", "amount = 100"))

    async def main():
        async with AsyncClient(d.path) as sc:
            raw = kit.aclient(stub_llm)
            try:
                w = kit.guard(raw, sc, user="alice", route=kit.route)
                stub_llm.script(Fail(500), model=kit.first)
                r = await kit.aask(w)
                assert kit.text(r) == "stub answer" and w.last_outcome.model == kit.second
                assert stub_llm.models() == [kit.first, kit.second]
                hit = await kit.aask(w)
                assert hit == r and w.last_outcome.source == "cache"
                async with await kit.aask(w, stream=True) as stream:  # replayed
                    assert isinstance(stream, AsyncGuardedStream)
                    chunks = [c async for c in stream]
                assert kit.stream_text(chunks) == "stub answer"
                assert stream.outcome.source == "cache" and len(stub_llm.requests) == 2
                # streamed from the provider, after a failure before the first chunk
                stub_llm.script(Fail(503), model=kit.first)
                async with await kit.aask(w, "stream me", stream=True) as stream:
                    chunks = [c async for c in stream]
                assert kit.stream_text(chunks) == "stub answer"
                assert stream.outcome.model == kit.second
                # the streamed answer settles as the whole one did
                stub_llm.script(Fail(503), model=kit.first)
                await kit.aask(w, "stream me", sidecar={"namespace": "x"})
                assert w.last_outcome.model == kit.second
                assert stream.outcome.usd == pytest.approx(w.last_outcome.usd)
                # a budget running out mid-stream
                for model in (kit.first, kit.second):  # the first's circuit may be open
                    stub_llm.replies[model] = "word " * 300
                stream = await kit.aask(w, "long", max_tokens=10, stream=True)
                got = []
                with pytest.raises(BudgetExhausted):
                    async for chunk in stream:
                        got.append(chunk)
                assert 60 < len(got) < 200 and stream.response.is_closed
                assert (await sc.stats()).open_leases == 0
            finally:
                await raw.close()

    run_async(main())
    assert d.stop() == 0


def test_readme_snippet(start_daemon, stub_llm, monkeypatch):
    d = start_daemon(CONFIG)
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## OpenAI and Anthropic SDKs", 1)[1]
    # fenced "py", not "python": test_lifecycle runs those against a daemon with no provider
    code = section.split("```py\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("LLM_SIDECAR_SOCKET", str(d.path))
    monkeypatch.setenv("OPENAI_BASE_URL", stub_llm.openai_base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    exec(compile(code, "README.md", "exec"), {})
    assert stub_llm.models() == ["gpt-4o"]  # the streamed repeat was served by the cache
    assert d.stop() == 0
