"""The blocking client, ``Client``: thread-safe, each call on one connection of a pool.
It speaks the framing of ``sidecar.wire.framing``, assigns request ids, checks that replies
come back in order, raises ``sidecar.errors`` exceptions, and reconnects after a daemon
restart: a call that finds its connection dead before any reply arrived is sent once more
on a fresh connection when every request in it is idempotent. Each new connection starts
with ``hello``, which checks the protocol version and learns the daemon's max frame size,
so an oversize request fails locally instead of costing the connection. Before ``hello``
each connection checks who listens (``sidecar.wire.peer.daemon_problem``): a socket in another
user's directory or served by an unexpected uid raises ``UntrustedSocket``, nothing sent.
"""
from __future__ import annotations

import math
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import msgspec

from . import guard
from ._common import (
    CLIENT_NAME, DEFAULT_TIMEOUT, Dead, cache_put_request, count_request, encode_requests,
    end_request, keep_for, unwrap,
)
from .guard import CallResult, Guarded
from ..wire.address import client_socket_path
from ..errors import (
    FrameTooLarge, ProtocolError, RequestError, SidecarError, SidecarTimeout, SidecarUnavailable,
    UntrustedSocket,
    error_from_reply,
)
from ..wire.framing import DEFAULT_MAX_FRAME, FrameReader, OversizeFrame
from ..wire.peer import daemon_problem, peer_of
from .fast import FastPath
from .slices import SyncSlices
from ..wire import (
    PROTOCOL_VERSION, REPLY_DECODER, Admit, AdmitReply, Begin, BeginReply, CacheGet,
    CacheGetReply, CacheInvalidate, CachePutReply, ChainModel, Costs, CostsReply, CountReply,
    EndReply, Error, Extend, ExtendReply, Fingerprint, FingerprintReply, Hello, HelloReply,
    Limits, LimitsReply, Message, MetricsText, Ping, Pong, Release, ReleaseReply, Reply,
    Report, ReportReply, Request, Route, RouteReply, Settle, SettleReply, Stats, StatsReply,
)

_RECV_SIZE = 256 * 1024


def _check_reply(reply: Reply, expected_id: int) -> Reply:
    if type(reply) is Error:
        raise error_from_reply(reply.code, reply.message, reply.id)
    if reply.id != expected_id:
        raise ProtocolError(f"reply id {reply.id} does not match request id {expected_id}")
    return reply



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
            hello = self.exchange([Hello(client=CLIENT_NAME)], timeout)[0]
        except Dead:
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
        self.keep_for = keep_for(hello)

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
        frames, ids = encode_requests(self.encoder, requests, self.next_id, self.max_frame)
        self.next_id = ids[-1] + 1
        self.sent_at = time.monotonic()
        deadline = self.sent_at + timeout
        self._set_timeout(timeout)
        sock = self.sock
        try:
            sock.sendall(frames)
        except (BrokenPipeError, ConnectionResetError):
            self._last_words()
            raise Dead() from None
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
                            raise Dead()
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
                except RequestError as exc:  # this request's error; the stream is fine
                    replies.append(exc)
        except ConnectionResetError:
            if not replies:
                raise Dead() from None
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
    socket directory no one else may write (``sidecar.wire.peer.trusted_uids``).
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT, max_idle: int = 8,
                 expected_uid: int | None = None, shared_memory: bool = True) -> None:
        self.path = str(client_socket_path(socket))
        self.expected_uid = expected_uid
        #: exact hits read from the daemon's segment (``sidecar.client.fast``); None
        #: until the first lookup, False when off
        self.fast: FastPath | None | bool = None if shared_memory else False
        #: plain admits taken from slices the daemon granted (``sidecar.client.slices``)
        self.slices = SyncSlices(lambda: _SyncConnection(self.path, self.timeout,
                                                         self.expected_uid),
                                 timeout) if shared_memory else None
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
        if self.slices is not None:
            self.slices.close()
        if isinstance(self.fast, FastPath):
            if not self._closed:
                self._report_hits()
            self.fast.close()
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
        told = self.fast.report() if isinstance(self.fast, FastPath) else None
        if told is not None:
            # the segment's hits ride ahead of the next round trip, so the daemon's stats
            # and request log see them before anything this client does after them
            replies = self._exchange([told, *requests], timeout, True)
            return unwrap(replies[1:], return_exceptions)  # (hits it refused: answered anyway)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        retried = False
        while True:
            conn = self._acquire(timeout)
            try:
                replies = conn.exchange(requests, max(deadline - time.monotonic(), 1e-3))
            except Dead:
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
            return unwrap(replies, return_exceptions)

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
        return self.call(Hello(client=CLIENT_NAME), timeout=timeout)  # type: ignore[return-value]

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
        slices = self.slices
        if slices is not None and not self._closed:  # a plain admit: from a slice
            reply = slices.admit(fields)
            if reply is not None:
                return reply
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
        hit = self._fast_lookup(fields, False) if self.fast is not False else None
        return hit or self.call(CacheGet(**fields), timeout=timeout)  # type: ignore

    def cache_put(self, response: Any, *, timeout: float | None = None,
                  **fields: Any) -> CachePutReply:
        """Store ``response`` (any msgpack-encodable value) for the request described by
        ``fields`` (as ``cache_get``, plus kind, ttl, error, tool_calls, no_store)."""
        return self.call(cache_put_request(response, fields), timeout=timeout)  # type: ignore

    def cache_invalidate(self, *, key: bytes | None = None, namespace: str | None = None,
                         all: bool = False, timeout: float | None = None) -> int:
        """Remove one entry (``key``), a namespace's, or all; returns how many."""
        reply = self.call(CacheInvalidate(key=key, namespace=namespace, all=all),
                          timeout=timeout)
        return reply.removed  # type: ignore[attr-defined]

    def begin(self, *, timeout: float | None = None, **fields: Any) -> BeginReply:
        """Before an LLM call: cache, count, route, admit in one round trip; fields as
        ``protocol.Begin``. An exact hit comes from the shared-memory segment, with no
        round trip, when the daemon publishes one."""
        hit = self._fast_lookup(fields, True) if self.fast is not False else None
        return hit or self.call(Begin(**fields), timeout=timeout)  # type: ignore

    def _fast_lookup(self, fields: dict[str, Any], begin: bool) -> Any:
        """The segment's reply, or None (the socket must answer)."""
        fast = self.fast
        if fast is None:
            conn = self._acquire(self.timeout)  # the daemon's uid, as the kernel vouches
            try:
                uid = peer_of(conn.sock).uid
            finally:
                self._release(conn)
            fast = self.fast = FastPath(self.path, uid)
        hit = fast.lookup(fields, begin)  # type: ignore[union-attr]
        if hit is not None and fast.due:  # type: ignore[union-attr]
            self._report_hits()
        return hit

    def _report_hits(self) -> None:
        """Tell the daemon the hits read from the segment now (lost if it cannot be told:
        they were answered all the same)."""
        told = self.fast.report(force=True) if isinstance(self.fast, FastPath) else None
        if told is not None:
            try:
                self._exchange((told,), None, True)
            except SidecarError:
                self.fast.untold += len(told.hits)  # type: ignore[union-attr]

    def end(self, lease: str, *, timeout: float | None = None, **fields: Any) -> EndReply:
        """After it: attempts, usage, and the ``response`` to cache (any msgpack-encodable
        value); fields as ``protocol.End``."""
        return self.call(end_request(lease, fields), timeout=timeout)  # type: ignore

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
        with back-off and one deadline, circuits, fallbacks (``sidecar.client.guard``)."""
        return guard.run(self, call, **fields)

    def count_tokens(self, text: str | None = None, *,
                     messages: Sequence[Message | Mapping[str, Any]] | None = None,
                     tools: Sequence[Mapping[str, Any]] | None = None, model: str = "",
                     encoding: str = "", max_tokens: int | None = None, special: bool = False,
                     timeout: float | None = None) -> CountReply:
        """Tokens of ``text`` or of a chat (``messages``, ``tools``) for ``model`` or
        ``encoding``; see ``protocol.Count``."""
        return self.call(count_request(text, messages, tools, model, encoding, max_tokens,
                                       special), timeout=timeout)  # type: ignore[return-value]
