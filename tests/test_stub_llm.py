"""The real openai and anthropic SDKs, sync and async, against tests/stub_llm.py."""
from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx2
import openai
import pytest

from stub_llm import (
    Api, BreakStream, Fail, Hang, Malformed, Reply, StubLLM, prompt_words, stream_pieces,
    stub_llm,  # noqa: F401 - the fixture
)

pytestmark = pytest.mark.timeout(30)

GPT = "gpt-4o-mini"
# Made-up names: the anthropic SDK warns (an error here) on models it lists as deprecated.
CLAUDE = "claude-stub-1"
MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus two"}]
CLAUDE_MESSAGES = [{"role": "user", "content": [{"type": "text", "text": "what is two plus two"}]}]
SHORT = 0.3  # client timeout for hang tests, seconds


def oai(stub: StubLLM, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=stub.openai_base_url, api_key="sk-test",
                         **{"max_retries": 0, "timeout": 10.0, **kw})


def aoai(stub: StubLLM, **kw) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stub.openai_base_url, api_key="sk-test",
                              **{"max_retries": 0, "timeout": 10.0, **kw})


def ant(stub: StubLLM, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stub.anthropic_base_url, api_key="sk-ant-test",
                               **{"max_retries": 0, "timeout": 10.0, **kw})


def aant(stub: StubLLM, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=stub.anthropic_base_url, api_key="sk-ant-test",
                                    **{"max_retries": 0, "timeout": 10.0, **kw})


def chat(client: openai.OpenAI, model: str = GPT, **kw):
    return client.chat.completions.create(model=model, messages=MESSAGES, **kw)


def message(client: anthropic.Anthropic, model: str = CLAUDE, **kw):
    return client.messages.create(model=model, max_tokens=64, system="be brief",
                                  messages=CLAUDE_MESSAGES, **kw)


# --- OpenAI ---------------------------------------------------------------------------------

def test_openai_whole(stub_llm):
    with oai(stub_llm) as client:
        r = chat(client)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == "stub answer"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == GPT and r.object == "chat.completion"
    assert r.usage.prompt_tokens == 7 == prompt_words({"messages": MESSAGES})
    assert r.usage.completion_tokens == 2 and r.usage.total_tokens == 9
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0
    (rec,) = stub_llm.requests
    assert (rec.api, rec.method, rec.path, rec.model, rec.stream) == (
        Api.OPENAI_CHAT, "POST", "/v1/chat/completions", GPT, False)
    assert rec.body["messages"] == MESSAGES
    assert rec.headers["authorization"] == "Bearer sk-test"


def test_openai_stream_usage_matches_whole(stub_llm):
    stub_llm.reply = "four is the answer"
    with oai(stub_llm) as client:
        whole = chat(client)
        with chat(client, stream=True, stream_options={"include_usage": True}) as stream:
            assert isinstance(stream, openai.Stream)
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert pieces == ["four ", "is ", "the ", "answer"] == stream_pieces(stub_llm.reply)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert stub_llm.requests[1].stream and stub_llm.requests[1].body["stream_options"] == {
        "include_usage": True}


def test_openai_stream_without_usage(stub_llm):
    with oai(stub_llm) as client:
        chunks = list(chat(client, stream=True))
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "stub answer"


def test_openai_async(stub_llm, run_async):
    async def go():
        async with aoai(stub_llm) as client:
            whole = await client.chat.completions.create(model=GPT, messages=MESSAGES)
            stream = await client.chat.completions.create(
                model=GPT, messages=MESSAGES, stream=True,
                stream_options={"include_usage": True})
            assert isinstance(stream, openai.AsyncStream)
            chunks = [c async for c in stream]
            return whole, chunks

    whole, chunks = run_async(go())
    assert whole.choices[0].message.content == "stub answer"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "stub answer"
    assert chunks[-1].usage == whole.usage


def test_openai_raw_response_headers(stub_llm):
    with oai(stub_llm) as client:
        raw = client.chat.completions.with_raw_response.create(model=GPT, messages=MESSAGES)
    assert raw.status_code == 200 and raw.headers["x-request-id"].startswith("req_stub")
    assert raw.parse().usage.total_tokens == 9


# --- Anthropic -----------------------------------------------------------------------------

def test_anthropic_whole(stub_llm):
    with ant(stub_llm) as client:
        m = message(client)
    assert (m.type, m.role, m.model, m.stop_reason) == ("message", "assistant", CLAUDE, "end_turn")
    assert [(b.type, b.text) for b in m.content] == [("text", "stub answer")]
    assert (m.usage.input_tokens, m.usage.output_tokens) == (7, 2)  # system counts too
    assert m.usage.cache_read_input_tokens == 0 and m.usage.cache_creation_input_tokens == 0
    (rec,) = stub_llm.requests
    assert (rec.api, rec.path, rec.model, rec.stream) == (
        Api.ANTHROPIC_MESSAGES, "/v1/messages", CLAUDE, False)
    assert rec.headers["authorization"] == "Bearer sk-ant-test"  # 2.x: no x-api-key
    assert "anthropic-version" in rec.headers


def test_anthropic_stream_events(stub_llm):
    stub_llm.reply = "four is the answer"
    with ant(stub_llm) as client:
        whole = message(client)
        with message(client, stream=True) as stream:
            assert isinstance(stream, anthropic.Stream)
            events = list(stream)
    assert [e.type for e in events] == [  # the SDK drops the stub's "ping"
        "message_start", "content_block_start", *["content_block_delta"] * 4,
        "content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.usage.input_tokens == whole.usage.input_tokens
    assert events[0].message.usage.output_tokens == 1  # placeholder, as the real API sends
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert {d.type for d in deltas} == {"text_delta"}
    assert "".join(d.text for d in deltas) == whole.content[0].text
    final = events[-2]
    assert final.delta.stop_reason == "end_turn"
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_anthropic_stream_helper(stub_llm):
    stub_llm.script(Reply("cached words here", cached_tokens=3, cache_creation_tokens=2))
    stub_llm.script(Reply("cached words here", cached_tokens=3, cache_creation_tokens=2))
    with ant(stub_llm) as client:
        whole = message(client)
        with client.messages.stream(model=CLAUDE, max_tokens=64, system="be brief",
                                    messages=CLAUDE_MESSAGES) as stream:
            assert isinstance(stream, anthropic.MessageStream)
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
    assert text == "cached words here" == final.content[0].text
    assert final.usage == whole.usage
    assert (whole.usage.input_tokens, whole.usage.cache_read_input_tokens,
            whole.usage.cache_creation_input_tokens) == (2, 3, 2)


def test_anthropic_async(stub_llm, run_async):
    async def go():
        async with aant(stub_llm) as client:
            whole = await client.messages.create(model=CLAUDE, max_tokens=64,
                                                 messages=CLAUDE_MESSAGES)
            stream = await client.messages.create(model=CLAUDE, max_tokens=64,
                                                  messages=CLAUDE_MESSAGES, stream=True)
            assert isinstance(stream, anthropic.AsyncStream)
            events = [e async for e in stream]
            async with client.messages.stream(model=CLAUDE, max_tokens=64,
                                              messages=CLAUDE_MESSAGES) as helper:
                assert isinstance(helper, anthropic.AsyncMessageStream)
                final = await helper.get_final_message()
            return whole, events, final

    whole, events, final = run_async(go())
    assert events[-2].usage.output_tokens == whole.usage.output_tokens == 2
    assert final.usage == whole.usage and final.content[0].text == "stub answer"


# --- failures ------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_500(stub_llm, stream):
    stub_llm.script(Fail(500), Fail(500))
    with oai(stub_llm) as o, ant(stub_llm) as a:
        with pytest.raises(openai.InternalServerError) as oe:
            chat(o, stream=stream)
        with pytest.raises(anthropic.InternalServerError) as ae:
            message(a, stream=stream)
    assert oe.value.status_code == 500 and oe.value.body["type"] == "server_error"
    assert ae.value.status_code == 500 and ae.value.body["error"]["type"] == "api_error"
    assert ae.value.response.headers["request-id"].startswith("req_stub")


@pytest.mark.parametrize("stream", [False, True])
def test_429_retry_after(stub_llm, stream):
    stub_llm.script(Fail(429, retry_after=7), Fail(429, retry_after=7))
    with oai(stub_llm) as o, ant(stub_llm) as a:
        with pytest.raises(openai.RateLimitError) as oe:
            chat(o, stream=stream)
        with pytest.raises(anthropic.RateLimitError) as ae:
            message(a, stream=stream)
    for e in (oe.value, ae.value):
        assert e.status_code == 429 and e.response.headers["retry-after"] == "7"
    assert oe.value.code == "rate_limit_exceeded"
    assert ae.value.body["error"]["type"] == "rate_limit_error"


def test_sdk_retries_honour_retry_after(stub_llm):
    stub_llm.script(Fail(429, retry_after=0.05), Fail(503, retry_after=0.05))
    with oai(stub_llm, max_retries=2) as client:
        assert chat(client).choices[0].message.content == "stub answer"
    assert [r.headers["x-stainless-retry-count"] for r in stub_llm.requests] == ["0", "1", "2"]


@pytest.mark.parametrize("stream", [False, True])
def test_hang_times_out(stub_llm, stream):
    stub_llm.script(Hang(60), Hang(60))
    with oai(stub_llm, timeout=SHORT) as o, ant(stub_llm, timeout=SHORT) as a:
        with pytest.raises(openai.APITimeoutError):
            chat(o, stream=stream)
        with pytest.raises(anthropic.APITimeoutError):
            message(a, stream=stream)


def assert_transport_error(exc: BaseException, sdk_error: type, transport: type) -> None:
    """``exc`` is the transport's error, bare (anthropic < 2.17 mid-stream) or wrapped in
    the SDK's own error class (openai, and anthropic >= 2.17): a guard must take both."""
    if isinstance(exc, sdk_error):
        assert anthropic_wraps_mid_stream() or sdk_error.__module__.startswith("openai")
        exc = exc.__cause__
    else:
        assert not anthropic_wraps_mid_stream()
    assert isinstance(exc, transport)


def anthropic_wraps_mid_stream() -> bool:
    major, minor = (int(p) for p in anthropic.__version__.split(".")[:2])
    return (major, minor) >= (2, 17)


def test_hang_mid_stream(stub_llm):
    stub_llm.script(Hang(60, after_chunks=2), Hang(60, after_chunks=2))
    with oai(stub_llm, timeout=SHORT) as o, ant(stub_llm, timeout=SHORT) as a:
        with pytest.raises(openai.APITimeoutError):  # openai wraps mid-stream errors
            list(chat(o, stream=True))
        # anthropic < 2.17 lets httpx2's error through mid-stream; 2.17 wraps it like openai.
        with pytest.raises((httpx2.ReadTimeout, anthropic.APITimeoutError)) as ae:
            list(message(a, stream=True))
        assert_transport_error(ae.value, anthropic.APITimeoutError, httpx2.ReadTimeout)


def test_malformed_body(stub_llm):
    stub_llm.script(*[Malformed()] * 4)
    with oai(stub_llm) as o, ant(stub_llm) as a:
        # Neither SDK wraps a JSON error: a guard must catch ValueError itself.
        with pytest.raises(json.JSONDecodeError):
            chat(o)
        with pytest.raises(json.JSONDecodeError):
            message(a)
        with pytest.raises(json.JSONDecodeError):
            list(chat(o, stream=True))
        with pytest.raises(json.JSONDecodeError):
            list(message(a, stream=True))


def test_broken_stream(stub_llm):
    stub_llm.script(*[BreakStream(after_chunks=2)] * 4)
    with oai(stub_llm) as o, ant(stub_llm) as a:
        with pytest.raises(openai.APIConnectionError) as oe:
            list(chat(o, stream=True))
        assert isinstance(oe.value.__cause__, httpx2.RemoteProtocolError)
        got = []
        with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as ae:
            for event in message(a, stream=True):
                got.append(event.type)
        assert_transport_error(ae.value, anthropic.APIConnectionError, httpx2.RemoteProtocolError)
        assert got == ["message_start", "content_block_start"]
        # A torn non-streamed body fails inside the SDK's send: wrapped by both.
        with pytest.raises(openai.APIConnectionError):
            chat(o)
        with pytest.raises(anthropic.APIConnectionError):
            message(a)


# --- scripting and records -----------------------------------------------------------------

def test_per_model_queue_then_global_then_default(stub_llm):
    stub_llm.script(Fail(500), model="gpt-4o")
    stub_llm.script(Reply("from the global queue"))
    stub_llm.replies["gpt-4.1"] = "per-model default"
    with oai(stub_llm) as client:
        with pytest.raises(openai.InternalServerError):
            chat(client, model="gpt-4o")
        assert chat(client, model="gpt-4o").choices[0].message.content == "from the global queue"
        assert chat(client, model="gpt-4o").choices[0].message.content == "stub answer"
        assert chat(client, model="gpt-4.1").choices[0].message.content == "per-model default"
    assert stub_llm.models() == ["gpt-4o", "gpt-4o", "gpt-4o", "gpt-4.1"]
    assert stub_llm.pending() == stub_llm.pending("gpt-4o") == 0


def test_scripted_token_counts(stub_llm):
    stub_llm.script(Reply("x", input_tokens=1000, output_tokens=50, cached_tokens=600,
                          reasoning_tokens=20))
    with oai(stub_llm) as client:
        u = chat(client).usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (1000, 50, 1050)
    assert u.prompt_tokens_details.cached_tokens == 600
    assert u.completion_tokens_details.reasoning_tokens == 20


def test_untouched_stub_records_nothing(stub_llm):
    assert stub_llm.requests == [] and stub_llm.models() == []


def test_stop_wakes_hangs_and_joins_threads():
    before = set(threading.enumerate())
    stub = StubLLM().start()
    stub.script(Hang(60), model=GPT)
    o = oai(stub)
    a = ant(stub)
    message(a)  # leaves an idle keep-alive connection, a handler parked in recv
    t = threading.Thread(target=lambda: pytest.raises(openai.APIConnectionError, chat, o))
    t.start()
    while len(stub.requests) < 2:
        time.sleep(0.01)
    stub.stop()  # wakes the hang and the parked handler (the suite's timeout bounds it)
    t.join(5)
    assert not t.is_alive()
    o.close()
    a.close()
    assert set(threading.enumerate()) == before
    stub.stop()  # idempotent
