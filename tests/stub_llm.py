"""A local stand-in for the OpenAI and Anthropic HTTP APIs, for running the real SDKs in tests.

``StubLLM`` is a real HTTP/1.1 server on 127.0.0.1 (ephemeral port, one thread per
connection) that answers ``POST /v1/chat/completions`` like OpenAI and ``POST /v1/messages``
like Anthropic, streamed (SSE) or not, with deterministic text and token counts. A test
scripts what the next requests get (a reply, an HTTP error with the vendor's error body and
``Retry-After``, a hang, an unparsable body, a stream cut after k chunks) per model or for
any model, and reads back every request the stub received. Dependency-free on purpose: the
stub must not share a single line of HTTP code with the SDKs it is testing.

Example::

    with StubLLM(reply="four") as stub:
        stub.script(Fail(429, retry_after=7), model="gpt-4o")
        client = openai.OpenAI(base_url=stub.openai_base_url, api_key="k", max_retries=0)
        ...
        assert stub.models() == ["gpt-4o"]
"""
from __future__ import annotations

import collections
import contextlib
import enum
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

DEFAULT_REPLY = "stub answer"
# A fixed creation time: responses are byte-for-byte reproducible (no clock read).
CREATED = 1_700_000_000


class Api(enum.Enum):
    """Which vendor endpoint a request hit."""

    OPENAI_CHAT = "/v1/chat/completions"
    ANTHROPIC_MESSAGES = "/v1/messages"
    UNKNOWN = ""


# --- scripted outcomes: a tagged union, consumed one per request -------------------------

@dataclass(frozen=True, slots=True)
class Reply:
    """A successful answer. ``None`` fields take the stub's defaults.

    Token counts default to the number of whitespace-separated words in the prompt
    (every message's text, plus Anthropic's ``system``) and in the reply text.
    ``cached_tokens`` is reported as OpenAI's ``prompt_tokens_details.cached_tokens`` and
    Anthropic's ``cache_read_input_tokens``; like the real APIs, OpenAI's ``prompt_tokens``
    includes it and Anthropic's ``input_tokens`` does not.
    """

    text: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int = 0
    cache_creation_tokens: int = 0  # Anthropic only
    reasoning_tokens: int = 0  # OpenAI only (included in completion_tokens)


@dataclass(frozen=True, slots=True)
class Fail:
    """An HTTP error with the vendor's error JSON; ``retry_after`` sets ``Retry-After``."""

    status: int
    retry_after: float | None = None
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Hang:
    """Send nothing for ``seconds`` (ended early by the stub's shutdown).

    With ``after_chunks`` the stall comes mid-stream, after that many SSE events (or,
    for a non-streamed call, after the headers and part of the body).
    """

    seconds: float = 60.0
    after_chunks: int | None = None


@dataclass(frozen=True, slots=True)
class Malformed:
    """Status 200 with a body that is not JSON (a streamed call: an SSE event that is not)."""


@dataclass(frozen=True, slots=True)
class BreakStream:
    """Close the connection after ``after_chunks`` SSE events, without ending the body.

    A non-streamed call gets its headers and half its declared ``Content-Length``.
    """

    after_chunks: int = 1


Outcome = Reply | Fail | Hang | Malformed | BreakStream


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the stub received it; header names are lower-case."""

    api: Api
    method: str
    path: str
    model: str | None
    stream: bool
    body: Any
    headers: dict[str, str] = field(repr=False)


# --- wire bodies --------------------------------------------------------------------------

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", None),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")


def _text_words(content: Any) -> int:
    """Words in a message's content: a string or a list of ``{"type": "text"}`` parts."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(len(p.get("text", "").split()) for p in content if isinstance(p, dict))
    return 0


def prompt_words(body: dict) -> int:
    """The stub's default input token count for a request body."""
    n = sum(_text_words(m.get("content")) for m in body.get("messages", ())
            if isinstance(m, dict))
    return n + _text_words(body.get("system"))


def stream_pieces(text: str) -> list[str]:
    """The reply split one word per chunk; the pieces concatenate back to ``text``."""
    return [p for p in _WORD_BOUNDARY.split(text) if p]


@dataclass(frozen=True, slots=True)
class _Usage:
    input: int
    output: int
    cached: int
    cache_creation: int
    reasoning: int

    def openai(self) -> dict:
        return {
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.input + self.output,
            "prompt_tokens_details": {"cached_tokens": self.cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning,
                                          "audio_tokens": 0,
                                          "accepted_prediction_tokens": 0,
                                          "rejected_prediction_tokens": 0},
        }

    def anthropic(self, output: int | None = None) -> dict:
        return {
            "input_tokens": self.input,
            "output_tokens": self.output if output is None else output,
            "cache_read_input_tokens": self.cached,
            "cache_creation_input_tokens": self.cache_creation,
        }


def _openai_error(status: int, message: str) -> dict:
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _anthropic_error(status: int, message: str) -> dict:
    return {"type": "error",
            "error": {"type": _ANTHROPIC_ERRORS.get(status, "api_error"), "message": message}}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class _Exchange:
    """The bodies for one successful request: a whole JSON body and the SSE events."""

    def __init__(self, api: Api, seq: int, model: str, text: str, usage: _Usage,
                 include_usage: bool) -> None:
        self.api = api
        self.model = model
        self.text = text
        self.usage = usage
        self.include_usage = include_usage
        self.id = f"chatcmpl-stub{seq:06d}" if api is Api.OPENAI_CHAT else f"msg_stub{seq:06d}"

    def whole(self) -> dict:
        if self.api is Api.OPENAI_CHAT:
            return {
                "id": self.id, "object": "chat.completion", "created": CREATED,
                "model": self.model, "system_fingerprint": "fp_stub",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": self.text,
                                         "refusal": None}}],
                "usage": self.usage.openai(),
            }
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model,
            "content": [{"type": "text", "text": self.text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": self.usage.anthropic(),
        }

    def events(self) -> Iterator[bytes]:
        """The SSE events of the streamed form, each complete with its blank line."""
        if self.api is Api.OPENAI_CHAT:
            yield from self._openai_events()
        else:
            yield from self._anthropic_events()

    def _openai_chunk(self, delta: dict, finish: str | None) -> bytes:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": CREATED,
                 "model": self.model, "system_fingerprint": "fp_stub",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None,
                              "finish_reason": finish}]}
        if self.include_usage:
            chunk["usage"] = None  # as the real API: null on all but the last chunk
        return b"data: " + _json(chunk) + b"\n\n"

    def _openai_events(self) -> Iterator[bytes]:
        yield self._openai_chunk({"role": "assistant", "content": "", "refusal": None}, None)
        for piece in stream_pieces(self.text):
            yield self._openai_chunk({"content": piece}, None)
        yield self._openai_chunk({}, "stop")
        if self.include_usage:
            yield b"data: " + _json({
                "id": self.id, "object": "chat.completion.chunk", "created": CREATED,
                "model": self.model, "system_fingerprint": "fp_stub", "choices": [],
                "usage": self.usage.openai()}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    def _anthropic_events(self) -> Iterator[bytes]:
        def event(name: str, data: dict) -> bytes:
            return b"event: " + name.encode() + b"\ndata: " + _json({"type": name, **data}) + b"\n\n"

        start = self.whole()
        start.update(content=[], stop_reason=None)
        # The real API reports a placeholder output count here and the cumulative total in
        # message_delta: a guard that adds the two up over-counts, as it would in production.
        start["usage"] = self.usage.anthropic(output=min(1, self.usage.output))
        yield event("message_start", {"message": start})
        yield event("content_block_start",
                    {"index": 0, "content_block": {"type": "text", "text": ""}})
        yield event("ping", {})
        for piece in stream_pieces(self.text):
            yield event("content_block_delta",
                        {"index": 0, "delta": {"type": "text_delta", "text": piece}})
        yield event("content_block_stop", {"index": 0})
        yield event("message_delta", {
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": self.usage.anthropic()})
        yield event("message_stop", {})


# --- the server ---------------------------------------------------------------------------

class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins every handler thread: nothing leaks
    block_on_close = True

    def __init__(self, stub: StubLLM) -> None:
        self.stub = stub
        self.open_sockets: set[socket.socket] = set()
        self.sockets_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def process_request(self, request, client_address) -> None:
        with self.sockets_lock:
            self.open_sockets.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self.sockets_lock:
            self.open_sockets.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        """Wake handler threads parked on idle keep-alive connections."""
        with self.sockets_lock:
            sockets = list(self.open_sockets)
        for s in sockets:
            with contextlib.suppress(OSError):  # already closed by its client: fine
                s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        # A client that timed out or closed its pool mid-reply is a normal event here.
        if not isinstance(exc, OSError):
            self.stub.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: without this, Nagle's algorithm and the
    # client's delayed ACK hold every response ~40 ms
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # the stub's requests are in StubLLM.requests, not on stderr

    def do_GET(self) -> None:
        self._record(None)
        self._send_json(404, {"error": {"message": "stub: no such endpoint"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = raw.decode(errors="replace")
        rec = self._record(body)
        stub = self.server.stub
        if rec.api is Api.UNKNOWN or not isinstance(body, dict):
            self._send_json(404 if rec.api is Api.UNKNOWN else 400,
                            {"error": {"message": f"stub: cannot serve {self.path}"}})
            return
        outcome = stub.next_outcome(rec.model)
        match outcome:
            case Fail():
                self._fail(rec.api, outcome)
            case Hang(after_chunks=None):
                stub.stopping.wait(outcome.seconds)
                self.close_connection = True
            case Malformed():
                self._malformed(rec)
            case Reply() | Hang() | BreakStream():
                exchange = stub.exchange(rec, body, outcome)
                if rec.stream:
                    self._stream(exchange, outcome)
                else:
                    self._whole(exchange, outcome)

    def _record(self, body: Any) -> Recorded:
        path = self.path.split("?", 1)[0]
        api = next((a for a in (Api.OPENAI_CHAT, Api.ANTHROPIC_MESSAGES) if a.value == path),
                   Api.UNKNOWN)
        is_dict = isinstance(body, dict)
        rec = Recorded(api=api, method=self.command, path=self.path,
                       model=body.get("model") if is_dict else None,
                       stream=bool(body.get("stream")) if is_dict else False, body=body,
                       headers={k.lower(): v for k, v in self.headers.items()})
        self.server.stub.record(rec)
        return rec

    def _request_id_header(self, api: Api) -> tuple[str, str]:
        rid = f"req_stub{self.server.stub.seq():06d}"
        return ("x-request-id", rid) if api is Api.OPENAI_CHAT else ("request-id", rid)

    def _send_json(self, status: int, obj: Any, extra: tuple[tuple[str, str], ...] = ()) -> None:
        data = _json(obj)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _fail(self, api: Api, fail: Fail) -> None:
        message = fail.message or f"stub: scripted {fail.status}"
        body = (_openai_error(fail.status, message) if api is Api.OPENAI_CHAT
                else _anthropic_error(fail.status, message))
        extra = [self._request_id_header(api)]
        if fail.retry_after is not None:
            ra = fail.retry_after
            extra.append(("Retry-After", str(int(ra)) if ra == int(ra) else str(ra)))
        self._send_json(fail.status, body, tuple(extra))

    def _malformed(self, rec: Recorded) -> None:
        extra = (self._request_id_header(rec.api),)
        if rec.stream:
            self._start_sse(extra)
            # Anthropic's SDK skips events without a name, so the torn one is named.
            name = b"" if rec.api is Api.OPENAI_CHAT else b"event: message_start\n"
            self._chunk(name + b'data: {"id": "broken\n\n')
            self._chunk(b"")
            return
        data = b'{"id": "broken", "choices": [{'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _whole(self, exchange: _Exchange, outcome: Outcome) -> None:
        data = _json(exchange.whole())
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header(*self._request_id_header(exchange.api))
        self.end_headers()
        match outcome:
            case Reply():
                self.wfile.write(data)
            case BreakStream():
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            case Hang():
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.server.stub.stopping.wait(outcome.seconds)
                self.close_connection = True

    def _start_sse(self, extra: tuple[tuple[str, str], ...]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        for k, v in extra:
            self.send_header(k, v)
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _stream(self, exchange: _Exchange, outcome: Outcome) -> None:
        self._start_sse((self._request_id_header(exchange.api),))
        for i, event in enumerate(exchange.events()):
            match outcome:
                case BreakStream(after_chunks=k) if i == k:
                    self.close_connection = True  # no terminating chunk: a torn body
                    return
                case Hang(after_chunks=k) if i == k:
                    self.server.stub.stopping.wait(outcome.seconds)
                    self.close_connection = True
                    return
            self._chunk(event)
        self._chunk(b"")


class StubLLM:
    """The stub server; start with ``with StubLLM() as stub`` or the ``stub_llm`` fixture.

    Outcomes scripted with ``script()`` are consumed one per request: the model's own
    queue first, then the queue for any model, then a ``Reply()`` with the default text.
    """

    def __init__(self, reply: str = DEFAULT_REPLY) -> None:
        self.reply = reply
        self.replies: dict[str, str] = {}  # model -> default text for that model
        self.errors: list[BaseException] = []  # stub bugs raised in handler threads
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._queues: dict[str | None, collections.deque[Outcome]] = {}
        self._requests: list[Recorded] = []
        self._seq = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    def start(self) -> StubLLM:
        self._server = _Server(self)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="stub-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake hung handlers, cut idle connections, join every thread."""
        if self._server is None:
            return
        self.stopping.set()
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = None

    def __enter__(self) -> StubLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # addresses
    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def openai_base_url(self) -> str:
        """For ``OpenAI(base_url=...)``: the SDK appends ``/chat/completions``."""
        return self.url + "/v1"

    @property
    def anthropic_base_url(self) -> str:
        """For ``Anthropic(base_url=...)``: the SDK appends ``/v1/messages``."""
        return self.url

    # scripting
    def script(self, *outcomes: Outcome, model: str | None = None) -> None:
        """Queue outcomes for the next requests naming ``model`` (``None``: any model)."""
        with self._lock:
            self._queues.setdefault(model, collections.deque()).extend(outcomes)

    def pending(self, model: str | None = None) -> int:
        """Scripted outcomes not yet consumed for ``model`` (``None``: the any-model queue)."""
        with self._lock:
            return len(self._queues.get(model, ()))

    def next_outcome(self, model: str | None) -> Outcome:
        with self._lock:
            for key in (model, None) if model is not None else (None,):
                queue = self._queues.get(key)
                if queue:
                    return queue.popleft()
        return Reply()

    # records
    def record(self, rec: Recorded) -> None:
        with self._lock:
            self._requests.append(rec)

    @property
    def requests(self) -> list[Recorded]:
        """Every request received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def models(self) -> list[str | None]:
        """The ``model`` of each request, in arrival order."""
        return [r.model for r in self.requests]

    def clear(self) -> None:
        """Forget recorded requests and scripted outcomes."""
        with self._lock:
            self._requests.clear()
            self._queues.clear()

    # bodies
    def seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def exchange(self, rec: Recorded, body: dict, outcome: Outcome) -> _Exchange:
        reply = outcome if isinstance(outcome, Reply) else Reply()
        model = rec.model or ""
        text = reply.text if reply.text is not None else self.replies.get(model, self.reply)
        prompt = prompt_words(body)
        cached = reply.cached_tokens
        if rec.api is Api.OPENAI_CHAT:
            fresh = reply.input_tokens if reply.input_tokens is not None else prompt
            input_tokens = fresh  # OpenAI's prompt_tokens counts cached tokens too
        else:
            full = reply.input_tokens if reply.input_tokens is not None else prompt
            input_tokens = max(full - cached - reply.cache_creation_tokens, 0)
        output = reply.output_tokens if reply.output_tokens is not None else len(text.split())
        usage = _Usage(input=input_tokens, output=output, cached=cached,
                       cache_creation=reply.cache_creation_tokens,
                       reasoning=reply.reasoning_tokens)
        options = body.get("stream_options") or {}
        return _Exchange(rec.api, self.seq(), model, text, usage,
                         include_usage=bool(options.get("include_usage")))


@pytest.fixture
def stub_llm() -> Iterator[StubLLM]:
    """A started ``StubLLM``; fails the test if a handler thread raised."""
    with StubLLM() as stub:
        yield stub
    assert not stub.errors, f"stub handler raised: {stub.errors!r}"
