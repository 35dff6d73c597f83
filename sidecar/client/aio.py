"""The asyncio client, ``AsyncClient``: one connection, any number of concurrent calls
pipelined on it, on any asyncio event loop (uvloop included). It behaves as ``Client``
does (``sidecar.client.sync``): request ids with replies checked in order,
``sidecar.errors`` exceptions, one resend on a fresh connection of a call whose requests
are all idempotent when the connection died before any reply, ``hello`` with the protocol
version and max frame size on each new connection, and the check of who listens on the
socket (``UntrustedSocket``) before it.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Sequence

import msgspec

from . import guard
from ._common import (
    CLIENT_NAME, DEFAULT_TIMEOUT, Dead, cache_put_request, count_request, encode_requests,
    end_request, keep_for, unwrap,
)
from .fast import FastPath
from .slices import FAILURES, Slices
from .guard import CallResult, Guarded
from ..wire.address import client_socket_path
from ..errors import (
    ProtocolError, SidecarError, SidecarTimeout, SidecarUnavailable, UntrustedSocket,
    error_from_reply,
)
from ..wire.framing import DEFAULT_MAX_FRAME, FrameReader, OversizeFrame
from ..wire.peer import daemon_problem, peer_of
from ..wire import (
    PROTOCOL_VERSION, REPLY_DECODER, Admit, AdmitReply, Begin, BeginReply, CacheGet,
    CacheGetReply, CacheInvalidate, CachePutReply, ChainModel, Costs, CostsReply, CountReply,
    EndReply, Error, Extend, ExtendReply, Fingerprint, FingerprintReply, Hello, HelloReply,
    Limits, LimitsReply, Message, MetricsText, Ping, Pong, Release, ReleaseReply, Reply,
    Report, ReportReply, Request, Route, RouteReply, Settle, SettleReply, SliceReply, Stats,
    StatsReply,
)


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
        self._fail(Dead())

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
            raise Dead()
        frames, ids = encode_requests(self.encoder, requests, self.next_id, self.max_frame)
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
                 timeout: float = DEFAULT_TIMEOUT, expected_uid: int | None = None,
                 shared_memory: bool = True) -> None:
        self.path = str(client_socket_path(socket))
        self.expected_uid = expected_uid  # as ``Client``'s
        self.timeout = timeout
        #: exact hits read from the daemon's segment, as ``Client``'s: None until the
        #: first connection (which tells the daemon's uid), False when off
        self.fast: FastPath | None | bool = None if shared_memory else False
        #: plain admits taken from slices, renewed over this client's connection
        self.slices = Slices() if shared_memory else None
        self._slices_lock: asyncio.Lock | None = None
        self._slices_proto: _AsyncProtocol | None = None
        self._proto: _AsyncProtocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        await self._connection(self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.slices is not None:
            ends = self.slices.ends()
            if ends and self._proto is not None and self._proto is self._slices_proto:
                with contextlib.suppress(*FAILURES):  # (closing the connection ends them too)
                    await self._exchange(ends, None, True)  # the calls not taken go back
            self.slices.release_slab()
        if isinstance(self.fast, FastPath):
            if self._proto is not None:
                await self._report_hits()
            self.fast.close()
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
            if self.fast is None:  # the daemon's uid, as the kernel vouches
                self.fast = FastPath(self.path,
                                     peer_of(proto.transport.get_extra_info("socket")).uid)
            (fut,) = proto.send([Hello(client=CLIENT_NAME)])
            try:
                hello = await asyncio.wait_for(fut, timeout)
            except Dead:
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
            proto.keep_for = keep_for(hello)
            self._proto = proto
            return proto

    async def _exchange(self, requests: Sequence[Request], timeout: float | None,
                        return_exceptions: bool) -> list:
        told = self.fast.report() if isinstance(self.fast, FastPath) else None
        if told is not None:  # the segment's hits ride ahead, as ``Client``'s do
            replies = await self._exchange([told, *requests], timeout, True)
            return unwrap(replies[1:], return_exceptions)
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
            except Dead:
                done = [Dead()]
            if any(isinstance(r, Dead) for r in done):
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
            return unwrap(replies, return_exceptions)

    async def call(self, request: Request, *, timeout: float | None = None) -> Reply:
        return (await self._exchange([request], timeout, False))[0]

    async def batch(self, requests: Sequence[Request], *, timeout: float | None = None,
                    return_exceptions: bool = False) -> list:
        if not requests:
            return []
        return await self._exchange(requests, timeout, return_exceptions)

    async def hello(self, *, timeout: float | None = None) -> HelloReply:
        return await self.call(Hello(client=CLIENT_NAME), timeout=timeout)  # type: ignore

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
        """As ``Client.admit`` (a plain admit from a slice, with no round trip). An admit
        that may wait goes over a connection of its own: replies come back in order, so
        on the shared connection it would hold up every other call until it is let in."""
        if self.slices is not None:
            got = self.slices.take(fields)
            if type(got) is tuple:
                got = await self._renew_slice(got)
            if got is not None:
                return got  # type: ignore[return-value]
        request = Admit(**fields)
        budget = max(timeout or self.timeout, request.wait + self.timeout)
        if request.wait > 0:
            async with AsyncClient(self.path, timeout=self.timeout,
                                   expected_uid=self.expected_uid,
                                   shared_memory=False) as own:  # one admit, no hits
                return await own.call(request, timeout=budget)  # type: ignore[return-value]
        return await self.call(request, timeout=budget)  # type: ignore[return-value]

    async def _renew_slice(self, shape: tuple) -> AdmitReply | None:
        """Ask for the shape's next slice over this client's connection, which the
        daemon binds its slices to (a new connection: a new slab, no slices yet)."""
        slices: Slices = self.slices  # type: ignore[assignment]
        if self._slices_lock is None:
            self._slices_lock = asyncio.Lock()
        async with self._slices_lock:
            again = slices.retake(shape)
            if again is not None:
                return again
            try:
                proto = await self._connection(self.timeout)
            except FAILURES:
                return None
            fresh = proto is not self._slices_proto
            self._slices_proto = proto
            plan = slices.renew(shape, fresh)
            requests = next(plan)
            while True:
                try:
                    requests = plan.send(await self._slice_exchange(requests, proto))
                except StopIteration as done:
                    return done.value

    async def _slice_exchange(self, requests: list[Request],
                              proto: _AsyncProtocol) -> SliceReply | None:
        if self._proto is not proto:  # reconnected: the old connection's slices are gone
            self._slices_proto = None
            return None
        try:
            last = (await self._exchange(requests, None, True))[-1]
        except FAILURES:
            last = None
        if last is None or isinstance(last, BaseException):
            self._slices_proto = None  # (a refused slab: the next ask starts afresh)
            return None
        return last

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
        hit = await self._fast_lookup(fields, False, timeout)
        return hit or await self.call(CacheGet(**fields), timeout=timeout)  # type: ignore

    async def cache_put(self, response: Any, *, timeout: float | None = None,
                        **fields: Any) -> CachePutReply:
        return await self.call(cache_put_request(response, fields),  # type: ignore
                               timeout=timeout)

    async def cache_invalidate(self, *, key: bytes | None = None,
                               namespace: str | None = None, all: bool = False,
                               timeout: float | None = None) -> int:
        reply = await self.call(CacheInvalidate(key=key, namespace=namespace, all=all),
                                timeout=timeout)
        return reply.removed  # type: ignore[attr-defined]

    async def begin(self, *, timeout: float | None = None, **fields: Any) -> BeginReply:
        """As ``Client.begin``: an exact hit comes from the shared-memory segment."""
        hit = await self._fast_lookup(fields, True, timeout)
        return hit or await self.call(Begin(**fields), timeout=timeout)  # type: ignore

    async def _fast_lookup(self, fields: dict[str, Any], begin: bool,
                           timeout: float | None) -> Any:
        if self.fast is False:
            return None
        if self.fast is None:
            await self._connection(self.timeout if timeout is None else timeout)
        fast: FastPath = self.fast  # type: ignore[assignment]
        hit = fast.lookup(fields, begin)  # no I/O: nothing here waits
        if hit is not None and fast.due:
            await self._report_hits()
        return hit

    async def _report_hits(self) -> None:
        """Tell the daemon the hits read from the segment now (lost if it cannot be told:
        they were answered all the same)."""
        told = self.fast.report(force=True) if isinstance(self.fast, FastPath) else None
        if told is not None:
            try:
                await self._exchange((told,), None, True)
            except SidecarError:
                self.fast.untold += len(told.hits)  # type: ignore[union-attr]

    async def end(self, lease: str, *, timeout: float | None = None, **fields: Any) -> EndReply:
        return await self.call(end_request(lease, fields), timeout=timeout)  # type: ignore

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
        return await self.call(count_request(text, messages, tools, model, encoding,  # type: ignore
                                             max_tokens, special), timeout=timeout)
