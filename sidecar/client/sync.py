"""Clients of the daemon: ``Client`` (blocking, thread-safe) and ``AsyncClient`` (asyncio).

Both speak the framing of ``sidecar.framing``, assign request ids, check that replies come
back in order, raise ``sidecar.errors`` exceptions, and reconnect after a daemon restart:
a call that finds its connection dead before any reply arrived is sent once more on a
fresh connection when every request in it is idempotent. Each new connection starts with
``hello``, which checks the protocol version and learns the daemon's max frame size, so an
oversize request fails locally instead of costing the connection. Before ``hello`` each
connection checks who listens (``sidecar.peer.daemon_problem``): a socket in another
user's directory or served by an unexpected uid raises ``UntrustedSocket``, nothing sent.
"""
from __future__ import annotations

import asyncio
import math
import os
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Sequence, TypeVar

import msgspec

from ..version import __version__
from . import guard
from .guard import CallResult, Guarded
from ..wire.address import client_socket_path
from ..errors import (
    FrameTooLarge, ProtocolError, SidecarTimeout, SidecarUnavailable, UntrustedSocket,
    error_from_reply,
)
from ..wire.framing import DEFAULT_MAX_FRAME, FrameReader, OversizeFrame, append_frame
from ..wire.peer import daemon_problem
from ..wire import (
    PROTOCOL_VERSION, REPLY_DECODER, Admit, AdmitReply, Begin, BeginReply, CacheGet,
    CacheGetReply, CacheInvalidate, CachePut, CachePutReply, ChainModel, Costs, CostsReply,
    Count, CountReply, End, EndReply, Error, Extend, ExtendReply, Fingerprint,
    FingerprintReply, Hello, HelloReply, Limits, LimitsReply, Message, MetricsText, Ping,
    Pong, Release, ReleaseReply, Reply, Report, ReportReply, Request, Route, RouteReply,
    Settle, SettleReply, Stats, StatsReply,
)

R = TypeVar("R", bound=Reply)

DEFAULT_TIMEOUT = 5.0
_CLIENT_NAME = f"sidecar-python/{__version__}"
_RECV_SIZE = 256 * 1024


class _Dead(Exception):
    """The connection died before any reply of the call arrived (safe to resend)."""


def _check_reply(reply: Reply, expected_id: int) -> Reply:
    if type(reply) is Error:
        raise error_from_reply(reply.code, reply.message, reply.id)
    if reply.id != expected_id:
        raise ProtocolError(f"reply id {reply.id} does not match request id {expected_id}")
    return reply


def _encode_requests(encoder: msgspec.msgpack.Encoder, requests: Sequence[Request],
                     first_id: int, max_frame: int) -> tuple[bytearray, list[int]]:
    out = bytearray()
    ids = []
    for offset, request in enumerate(requests):
        request_id = first_id + offset
        mark = len(out)
        length = append_frame(encoder, msgspec.structs.replace(request, id=request_id), out)
        if length > max_frame:
            del out[mark:]
            raise FrameTooLarge(f"request of {length} bytes exceeds the daemon's max frame "
                                f"size of {max_frame} bytes")
        ids.append(request_id)
    return out, ids


def _count_request(text, messages, tools, model, encoding, max_tokens, special) -> Count:
    # Plain dicts encode to the same msgpack maps as Message structs: passed as they are.
    return Count(text=text, messages=messages, tools=tools, model=model, encoding=encoding,
                 max_tokens=max_tokens, special=special)


def _cache_put_request(response: Any, fields: dict[str, Any]) -> CachePut:
    """``response`` is any msgpack-encodable value; the daemon stores its bytes as sent."""
    return CachePut(response=msgspec.Raw(msgspec.msgpack.encode(response)), **fields)


def _end_request(lease: str, fields: dict[str, Any]) -> End:
    if "response" in fields:
        fields = dict(fields, response=msgspec.Raw(msgspec.msgpack.encode(fields["response"])))
    return End(lease=lease, **fields)


def _keep_for(hello: HelloReply) -> float:
    """How long a connection may sit unused and still be reused: half the daemon's idle
    timeout, so a request never meets the daemon closing it as idle."""
    return hello.idle_timeout / 2 if hello.idle_timeout > 0 else math.inf


def _unwrap(replies: list[Reply | BaseException], return_exceptions: bool) -> list:
    if not return_exceptions:
        for item in replies:
            if isinstance(item, BaseException):
                raise item
    return replies


# --- blocking client ------------------------------------------------------------------


class _SyncConnection:
    __slots__ = ("sock", "reader", "encoder", "next_id", "max_frame", "path", "kernel_timeout",
                 "keep_for", "sent_at")

    def __init__(self, path: str, timeout: float, expected_uid: int | None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.reader = FrameReader(DEFAULT_MAX_FRAME)
        self.encoder = msgspec.msgpack.Encoder()
        self.next_id = 1
        self.max_frame = DEFAULT_MAX_FRAME
        self.kernel_timeout = -1.0
        self.keep_for = math.inf
        self.sent_at = 0.0
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            # Blocking mode with kernel timeouts: Python's own timeout mode would poll()
            # before every send and recv, a syscall per call on the hot path.
            self.sock.settimeout(None)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise SidecarUnavailable(path, exc.strerror or str(exc)) from None
        except socket.timeout:
            self.sock.close()
            raise SidecarTimeout(f"connecting to {path} timed out after {timeout:g} s") from None
        except OSError as exc:
            self.sock.close()
            raise SidecarUnavailable(path, exc.strerror or str(exc)) from None
        problem = daemon_problem(self.sock, path, expected_uid)
        if problem is not None:
            self.sock.close()
            raise UntrustedSocket(path, problem)
        try:
            hello = self.exchange([Hello(client=_CLIENT_NAME)], timeout)[0]
        except _Dead:
            self.close()
            raise SidecarUnavailable(path, "connection closed during hello") from None
        except TimeoutError:
            self.close()
            raise SidecarTimeout(f"no hello from the daemon within {timeout:g} s") from None
        except BaseException:
            self.close()
            raise
        assert isinstance(hello, HelloReply)
        if hello.protocol != PROTOCOL_VERSION:
            self.close()
            raise ProtocolError(f"daemon speaks protocol {hello.protocol}, this client "
                                f"{PROTOCOL_VERSION}; upgrade the older side")
        self.max_frame = hello.max_frame
        self.reader.max_frame = max(hello.max_frame, DEFAULT_MAX_FRAME)
        self.keep_for = _keep_for(hello)

    def close(self) -> None:
        self.sock.close()

    def _last_words(self) -> None:
        """Raise the error a daemon sent before closing on us (a refused connection:
        forbidden, overloaded), if one is waiting unread; else return."""
        try:
            data = self.sock.recv(_RECV_SIZE, socket.MSG_DONTWAIT)
            frames = self.reader.feed(data) if data else []
        except (OSError, OversizeFrame):
            return
        for frame in frames:
            try:
                reply = REPLY_DECODER.decode(frame)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return
            if type(reply) is Error and reply.id is None:
                raise error_from_reply(reply.code, reply.message, None)

    def _set_timeout(self, timeout: float) -> None:
        # Each call passes its remaining time, a hair under the last one: keep the kernel
        # timeout unless it must grow or shrink by over 5% (the loop in ``exchange``
        # checks the exact deadline after every recv), saving two syscalls per call.
        if not 0.95 * self.kernel_timeout <= timeout <= self.kernel_timeout:
            seconds = int(timeout)
            value = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self.kernel_timeout = timeout

    def exchange(self, requests: Sequence[Request],
                 timeout: float) -> list[Reply | BaseException]:
        """Send ``requests`` and read their replies; a reply that is an error is returned
        as its exception. Raises ``TimeoutError`` past ``timeout`` seconds."""
        frames, ids = _encode_requests(self.encoder, requests, self.next_id, self.max_frame)
        self.next_id = ids[-1] + 1
        self.sent_at = time.monotonic()
        deadline = self.sent_at + timeout
        self._set_timeout(timeout)
        sock = self.sock
        try:
            sock.sendall(frames)
        except (BrokenPipeError, ConnectionResetError):
            self._last_words()
            raise _Dead() from None
        except BlockingIOError:
            raise TimeoutError() from None
        replies: list[Reply | BaseException] = []
        pending: list[memoryview] = []
        try:
            while len(replies) < len(ids):
                if not pending:
                    if time.monotonic() > deadline:
                        raise TimeoutError()
                    try:
                        data = sock.recv(_RECV_SIZE)
                    except BlockingIOError:
                        raise TimeoutError() from None
                    if not data:
                        if not replies:
                            raise _Dead()
                        raise SidecarUnavailable(self.path, "daemon closed the connection")
                    pending = self.reader.feed(data)
                    pending.reverse()
                    continue
                reply = REPLY_DECODER.decode(pending.pop())
                expected = ids[len(replies)]
                if type(reply) is Error and reply.id is None:
                    # The daemon gave up on this connection (oversize, stall, overload).
                    raise error_from_reply(reply.code, reply.message, None)
                try:
                    replies.append(_check_reply(reply, expected))
                except ProtocolError:
                    raise
                except Exception as exc:
                    replies.append(exc)
        except ConnectionResetError:
            if not replies:
                raise _Dead() from None
            raise SidecarUnavailable(self.path, "connection reset by the daemon") from None
        except (msgspec.DecodeError, msgspec.ValidationError, OversizeFrame) as exc:
            raise ProtocolError(f"undecodable reply from the daemon: {exc}") from None
        return replies


class Client:
    """Blocking client; safe to share between threads (each call holds one pooled
    connection, so calls from different threads run concurrently).

    ``socket`` defaults to ``LLM_SIDECAR_SOCKET``, else the first default path that
    exists. ``timeout`` (seconds) bounds every call unless the call gives its own.
    ``expected_uid``: the daemon's uid, if not ours, root's or that of the owner of a
    socket directory no one else may write (``sidecar.peer.trusted_uids``).
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_idle: int = 8,
                 expected_uid: int | None = None) -> None:
        self.path = str(client_socket_path(socket))
        self.expected_uid = expected_uid
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_SyncConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _acquire(self, timeout: float) -> _SyncConnection:
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            if self._idle:
                now = time.monotonic()
                while self._idle:
                    conn = self._idle.pop()
                    if now - conn.sent_at < conn.keep_for:
                        return conn
                    conn.close()  # unused too long: the daemon may be closing it as idle
        return _SyncConnection(self.path, timeout, self.expected_uid)

    def _release(self, conn: _SyncConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _exchange(self, requests: Sequence[Request], timeout: float | None,
                  return_exceptions: bool) -> list[Reply | BaseException]:
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        retried = False
        while True:
            conn = self._acquire(timeout)
            try:
                replies = conn.exchange(requests, max(deadline - time.monotonic(), 1e-3))
            except _Dead:
                conn.close()
                if retried or not all(r.idempotent for r in requests):
                    raise SidecarUnavailable(self.path, "connection lost before a reply") from None
                retried = True
                continue
            except TimeoutError:
                conn.close()  # a late reply would desynchronise it
                raise SidecarTimeout(f"no reply from the daemon within {timeout:g} s") from None
            except FrameTooLarge:
                self._release(conn)  # nothing was sent
                raise
            except BaseException:
                conn.close()
                raise
            self._release(conn)
            return _unwrap(replies, return_exceptions)

    def call(self, request: Request, *, timeout: float | None = None) -> Reply:
        """Send one request and return its reply (an Error reply raises)."""
        return self._exchange([request], timeout, False)[0]  # type: ignore[return-value]

    def batch(self, requests: Sequence[Request], *, timeout: float | None = None,
              return_exceptions: bool = False) -> list:
        """Pipeline ``requests`` on one connection; replies in the same order. With
        ``return_exceptions`` a failed request's slot holds its exception instead of
        the first failure being raised (after all replies were read)."""
        if not requests:
            return []
        return self._exchange(requests, timeout, return_exceptions)

    def hello(self, *, timeout: float | None = None) -> HelloReply:
        return self.call(Hello(client=_CLIENT_NAME), timeout=timeout)  # type: ignore[return-value]

    def ping(self, *, timeout: float | None = None) -> float:
        """Round trip to the daemon; returns its duration in seconds."""
        start = time.perf_counter()
        reply = self.call(Ping(), timeout=timeout)
        assert type(reply) is Pong
        return time.perf_counter() - start

    def fingerprint(self, text: str, *, timeout: float | None = None) -> FingerprintReply:
        """Normalised form and 128-bit key of ``text`` under the daemon's spec."""
        return self.call(Fingerprint(text=text), timeout=timeout)  # type: ignore[return-value]

    def stats(self, *, timeout: float | None = None) -> StatsReply:
        return self.call(Stats(), timeout=timeout)  # type: ignore[return-value]

    def admit(self, *, timeout: float | None = None, **fields: Any) -> AdmitReply:
        """Reserve before a call; fields as ``protocol.Admit`` (user, model, text or
        messages or input_tokens, max_tokens, wait, ...). A ``wait`` longer than the
        client's timeout extends this call's timeout to match."""
        request = Admit(**fields)
        budget = max(timeout or self.timeout, request.wait + self.timeout)
        return self.call(request, timeout=budget)  # type: ignore[return-value]

    def settle(self, lease: str, *, timeout: float | None = None, **usage: Any) -> SettleReply:
        """Report what the call used: input_tokens, output_tokens, cached_input_tokens,
        reasoning_tokens, usd (optional)."""
        return self.call(Settle(lease=lease, **usage), timeout=timeout)  # type: ignore

    def release(self, lease: str, *, timeout: float | None = None) -> ReleaseReply:
        return self.call(Release(lease=lease), timeout=timeout)  # type: ignore[return-value]

    def limits(self, user: str | None = None, *, timeout: float | None = None) -> LimitsReply:
        return self.call(Limits(user=user), timeout=timeout)  # type: ignore[return-value]

    def costs(self, *, timeout: float | None = None, **fields: Any) -> CostsReply:
        """Spend, tokens and cache savings; fields as ``protocol.Costs`` (since, until,
        by = "model" | "user" | "route", top)."""
        return self.call(Costs(**fields), timeout=timeout)  # type: ignore[return-value]

    def metrics(self, *, timeout: float | None = None) -> str:
        """Every metric in the Prometheus text format."""
        return self.call(MetricsText(), timeout=timeout).text  # type: ignore[attr-defined]

    def cache_get(self, *, timeout: float | None = None, **fields: Any) -> CacheGetReply:
        """Look up a cached answer; fields as ``protocol.CacheGet`` (namespace, model,
        messages or text, temperature, params, tools, response_format, allow_stale,
        no_cache). ``reply.value()`` is the stored response on a hit."""
        return self.call(CacheGet(**fields), timeout=timeout)  # type: ignore[return-value]

    def cache_put(self, response: Any, *, timeout: float | None = None,
                  **fields: Any) -> CachePutReply:
        """Store ``response`` (any msgpack-encodable value) for the request described by
        ``fields`` (as ``cache_get``, plus kind, ttl, error, tool_calls, no_store)."""
        return self.call(_cache_put_request(response, fields), timeout=timeout)  # type: ignore

    def cache_invalidate(self, *, key: bytes | None = None, namespace: str | None = None,
                         all: bool = False, timeout: float | None = None) -> int:
        """Remove one entry (``key``), a namespace's, or all; returns how many."""
        reply = self.call(CacheInvalidate(key=key, namespace=namespace, all=all),
                          timeout=timeout)
        return reply.removed  # type: ignore[attr-defined]

    def begin(self, *, timeout: float | None = None, **fields: Any) -> BeginReply:
        """Before an LLM call: cache, count, route, admit in one round trip; fields as
        ``protocol.Begin``."""
        return self.call(Begin(**fields), timeout=timeout)  # type: ignore[return-value]

    def end(self, lease: str, *, timeout: float | None = None, **fields: Any) -> EndReply:
        """After it: attempts, usage, and the ``response`` to cache (any msgpack-encodable
        value); fields as ``protocol.End``."""
        return self.call(_end_request(lease, fields), timeout=timeout)  # type: ignore

    def extend(self, lease: str, *, timeout: float | None = None,
               **fields: Any) -> ExtendReply:
        """Grow a lease to a stream's usage so far (``protocol.Extend``)."""
        return self.call(Extend(lease=lease, **fields), timeout=timeout)  # type: ignore

    def route(self, *, timeout: float | None = None, **fields: Any) -> RouteReply:
        return self.call(Route(**fields), timeout=timeout)  # type: ignore[return-value]

    def report(self, model: str, ok: bool, *, timeout: float | None = None,
               **fields: Any) -> ReportReply:
        return self.call(Report(model=model, ok=ok, **fields), timeout=timeout)  # type: ignore

    def guarded(self, call: Callable[[ChainModel, float], CallResult], **fields: Any) -> Guarded:
        """Run ``call(model, timeout)`` under the guard: cache, limits, the route's chain
        with back-off and one deadline, circuits, fallbacks (``sidecar.guard``)."""
        return guard.run(self, call, **fields)

    def count_tokens(self, text: str | None = None, *,
                     messages: Sequence[Message | Mapping[str, Any]] | None = None,
                     tools: Sequence[Mapping[str, Any]] | None = None, model: str = "",
                     encoding: str = "", max_tokens: int | None = None, special: bool = False,
                     timeout: float | None = None) -> CountReply:
        """Tokens of ``text`` or of a chat (``messages``, ``tools``) for ``model`` or
        ``encoding``; see ``protocol.Count``."""
        return self.call(_count_request(text, messages, tools, model, encoding, max_tokens,
                                        special), timeout=timeout)  # type: ignore[return-value]


# --- asyncio client -------------------------------------------------------------------


class _AsyncProtocol(asyncio.Protocol):
    def __init__(self, path: str) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(DEFAULT_MAX_FRAME)
        self.encoder = msgspec.msgpack.Encoder()
        self.waiting: deque[tuple[int, asyncio.Future[Reply]]] = deque()
        self.next_id = 1
        self.max_frame = DEFAULT_MAX_FRAME
        self.lost: BaseException | None = None
        self.keep_for = math.inf
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            for body in frames:
                reply = REPLY_DECODER.decode(body)
                if type(reply) is Error and reply.id is None:
                    self._fail(error_from_reply(reply.code, reply.message, None))
                    return
                if not self.waiting:
                    raise ProtocolError(f"unexpected reply id {reply.id}")
                expected, fut = self.waiting.popleft()
                if reply.id != expected:
                    raise ProtocolError(f"reply id {reply.id} does not match {expected}")
                if not fut.done():
                    fut.set_result(reply)
        except (msgspec.DecodeError, msgspec.ValidationError, OversizeFrame) as exc:
            self._fail(ProtocolError(f"undecodable reply from the daemon: {exc}"))
        except ProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(_Dead())

    def _fail(self, exc: BaseException) -> None:
        if self.lost is None:
            self.lost = exc
        while self.waiting:
            _, fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    def send(self, requests: Sequence[Request]) -> list[asyncio.Future[Reply]]:
        if self.lost is not None or self.transport is None or self.transport.is_closing():
            raise _Dead()
        frames, ids = _encode_requests(self.encoder, requests, self.next_id, self.max_frame)
        self.next_id = ids[-1] + 1
        loop = asyncio.get_running_loop()
        futures = []
        for request_id in ids:
            fut: asyncio.Future[Reply] = loop.create_future()
            self.waiting.append((request_id, fut))
            futures.append(fut)
        self.sent_at = time.monotonic()
        self.transport.write(frames)
        return futures


class AsyncClient:
    """asyncio client: one connection, any number of concurrent calls pipelined on it.

    Use as ``async with AsyncClient() as c:`` or call ``close()``. Works on any asyncio
    event loop, uvloop included.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, expected_uid: int | None = None) -> None:
        self.path = str(client_socket_path(socket))
        self.expected_uid = expected_uid  # as ``Client``'s
        self.timeout = timeout
        self._proto: _AsyncProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        await self._connection(self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()

    async def _connection(self, timeout: float) -> _AsyncProtocol:
        proto = self._proto
        if proto is not None and proto.lost is None:
            if proto.waiting or time.monotonic() - proto.sent_at < proto.keep_for:
                return proto
            self._proto = None  # unused too long: the daemon may be closing it as idle
            proto.transport.close()
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            proto = self._proto
            if proto is not None and proto.lost is None:
                return proto
            loop = asyncio.get_running_loop()
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_unix_connection(lambda: _AsyncProtocol(self.path), self.path),
                    timeout)
            except asyncio.TimeoutError:
                raise SidecarTimeout(f"connecting to {self.path} timed out") from None
            except OSError as exc:
                raise SidecarUnavailable(self.path, exc.strerror or str(exc)) from None
            problem = daemon_problem(proto.transport.get_extra_info("socket"), self.path,
                                     self.expected_uid)
            if problem is not None:
                proto.transport.close()
                raise UntrustedSocket(self.path, problem)
            (fut,) = proto.send([Hello(client=_CLIENT_NAME)])
            try:
                hello = await asyncio.wait_for(fut, timeout)
            except _Dead:
                raise SidecarUnavailable(self.path, "connection closed during hello") from None
            except asyncio.TimeoutError:
                proto.transport.close()
                raise SidecarTimeout("no hello from the daemon") from None
            if type(hello) is Error:
                raise error_from_reply(hello.code, hello.message, hello.id)
            assert isinstance(hello, HelloReply)
            if hello.protocol != PROTOCOL_VERSION:
                proto.transport.close()
                raise ProtocolError(f"daemon speaks protocol {hello.protocol}, this client "
                                    f"{PROTOCOL_VERSION}; upgrade the older side")
            proto.max_frame = hello.max_frame
            proto.reader.max_frame = max(hello.max_frame, DEFAULT_MAX_FRAME)
            proto.keep_for = _keep_for(hello)
            self._proto = proto
            return proto

    async def _exchange(self, requests: Sequence[Request], timeout: float | None,
                        return_exceptions: bool) -> list:
        timeout = self.timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        retried = False
        while True:
            proto = await self._connection(timeout)
            try:
                futures = proto.send(requests)
                done = await asyncio.wait_for(
                    asyncio.gather(*futures, return_exceptions=True),
                    max(deadline - loop.time(), 1e-3))
            except asyncio.TimeoutError:
                raise SidecarTimeout(f"no reply from the daemon within {timeout:g} s") from None
            except _Dead:
                done = [_Dead()]
            if any(isinstance(r, _Dead) for r in done):
                got_any = any(isinstance(r, Reply) for r in done)
                if retried or got_any or not all(r.idempotent for r in requests):
                    raise SidecarUnavailable(self.path, "connection lost before a reply")
                retried = True
                continue
            replies: list[Reply | BaseException] = []
            for reply in done:
                if isinstance(reply, BaseException):
                    replies.append(reply)
                elif type(reply) is Error:
                    replies.append(error_from_reply(reply.code, reply.message, reply.id))
                else:
                    replies.append(reply)
            return _unwrap(replies, return_exceptions)

    async def call(self, request: Request, *, timeout: float | None = None) -> Reply:
        return (await self._exchange([request], timeout, False))[0]

    async def batch(self, requests: Sequence[Request], *, timeout: float | None = None,
                    return_exceptions: bool = False) -> list:
        if not requests:
            return []
        return await self._exchange(requests, timeout, return_exceptions)

    async def hello(self, *, timeout: float | None = None) -> HelloReply:
        return await self.call(Hello(client=_CLIENT_NAME), timeout=timeout)  # type: ignore

    async def ping(self, *, timeout: float | None = None) -> float:
        start = time.perf_counter()
        reply = await self.call(Ping(), timeout=timeout)
        assert type(reply) is Pong
        return time.perf_counter() - start

    async def fingerprint(self, text: str, *, timeout: float | None = None) -> FingerprintReply:
        return await self.call(Fingerprint(text=text), timeout=timeout)  # type: ignore

    async def stats(self, *, timeout: float | None = None) -> StatsReply:
        return await self.call(Stats(), timeout=timeout)  # type: ignore

    async def admit(self, *, timeout: float | None = None, **fields: Any) -> AdmitReply:
        """As ``Client.admit``. An admit that may wait goes over a connection of its own:
        replies come back in order, so on the shared connection it would hold up every
        other call until it is let in."""
        request = Admit(**fields)
        budget = max(timeout or self.timeout, request.wait + self.timeout)
        if request.wait > 0:
            async with AsyncClient(self.path, timeout=self.timeout,
                                   expected_uid=self.expected_uid) as own:
                return await own.call(request, timeout=budget)  # type: ignore[return-value]
        return await self.call(request, timeout=budget)  # type: ignore[return-value]

    async def settle(self, lease: str, *, timeout: float | None = None,
                     **usage: Any) -> SettleReply:
        return await self.call(Settle(lease=lease, **usage), timeout=timeout)  # type: ignore

    async def release(self, lease: str, *, timeout: float | None = None) -> ReleaseReply:
        return await self.call(Release(lease=lease), timeout=timeout)  # type: ignore

    async def limits(self, user: str | None = None, *,
                     timeout: float | None = None) -> LimitsReply:
        return await self.call(Limits(user=user), timeout=timeout)  # type: ignore

    async def costs(self, *, timeout: float | None = None, **fields: Any) -> CostsReply:
        return await self.call(Costs(**fields), timeout=timeout)  # type: ignore

    async def metrics(self, *, timeout: float | None = None) -> str:
        return (await self.call(MetricsText(), timeout=timeout)).text  # type: ignore

    async def cache_get(self, *, timeout: float | None = None,
                        **fields: Any) -> CacheGetReply:
        return await self.call(CacheGet(**fields), timeout=timeout)  # type: ignore

    async def cache_put(self, response: Any, *, timeout: float | None = None,
                        **fields: Any) -> CachePutReply:
        return await self.call(_cache_put_request(response, fields),  # type: ignore
                               timeout=timeout)

    async def cache_invalidate(self, *, key: bytes | None = None,
                               namespace: str | None = None, all: bool = False,
                               timeout: float | None = None) -> int:
        reply = await self.call(CacheInvalidate(key=key, namespace=namespace, all=all),
                                timeout=timeout)
        return reply.removed  # type: ignore[attr-defined]

    async def begin(self, *, timeout: float | None = None, **fields: Any) -> BeginReply:
        return await self.call(Begin(**fields), timeout=timeout)  # type: ignore

    async def end(self, lease: str, *, timeout: float | None = None, **fields: Any) -> EndReply:
        return await self.call(_end_request(lease, fields), timeout=timeout)  # type: ignore

    async def extend(self, lease: str, *, timeout: float | None = None,
                     **fields: Any) -> ExtendReply:
        return await self.call(Extend(lease=lease, **fields), timeout=timeout)  # type: ignore

    async def route(self, *, timeout: float | None = None, **fields: Any) -> RouteReply:
        return await self.call(Route(**fields), timeout=timeout)  # type: ignore

    async def report(self, model: str, ok: bool, *, timeout: float | None = None,
                     **fields: Any) -> ReportReply:
        return await self.call(Report(model=model, ok=ok, **fields),  # type: ignore
                               timeout=timeout)

    async def guarded(self, call: Callable[[ChainModel, float], Awaitable[CallResult]],
                      **fields: Any) -> Guarded:
        """``Client.guarded`` for asyncio: ``call`` is a coroutine function."""
        return await guard.arun(self, call, **fields)

    async def count_tokens(self, text: str | None = None, *,
                           messages: Sequence[Message | Mapping[str, Any]] | None = None,
                           tools: Sequence[Mapping[str, Any]] | None = None, model: str = "",
                           encoding: str = "", max_tokens: int | None = None,
                           special: bool = False, timeout: float | None = None) -> CountReply:
        return await self.call(_count_request(text, messages, tools, model, encoding,  # type: ignore
                                              max_tokens, special), timeout=timeout)
