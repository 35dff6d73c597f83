"""The Unix-socket server: accept loop, one protocol object per connection, backpressure.

Frames are decoded, handled and answered in arrival order within one ``data_received``
call, and the replies of a burst go out in one write, so a pipelining client gets its
answers in order with one syscall per burst. A connection's trouble stays its own: a bad
frame gets an ``Error`` reply, an oversize length prefix or a stalled partial frame
closes that connection only. Memory per connection is bounded by the max frame size
(input) and by pausing reads while the peer does not drain its replies (output). The
number of connections is bounded three ways: in all, per uid and per pid of the peer
(``SO_PEERCRED``); a connection silent for ``server.idle_timeout`` is closed, so
forgotten connections give their slots back.
"""
from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import os
import socket
import termios
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Callable

import msgspec

from ..wire.framing import FrameReader, OversizeFrame, append_frame
from ..errors import RequestError
from .handlers import Deferred, Handlers
from ..ledger.metrics import MASK, OP_BOUNDS_NS, Metrics, OpMetrics
from ..wire.peer import HasSockopt, Peer, groups_of, peer_of
from ..wire import ENVELOPE_DECODER, OPS, REQUEST_DECODER, Error, ErrorCode
from ..failures import ThrottledLog

if TYPE_CHECKING:
    from ..config import Config
    from ..config.root import AccessConfig

log = logging.getLogger("sidecar.server")

_WRITE_HIGH_WATER = 1 << 20


def _access(rules: AccessConfig, peer: Peer, sock: HasSockopt) -> bool | None:
    """What ``[server.access]`` grants ``peer``: True (operator), False (app) or None
    (nothing: the connection is refused). Root and the daemon's own uid are operators."""
    groups: frozenset[int] = frozenset()
    if rules.operator_gids or rules.app_gids:
        groups = groups_of(sock) | {peer.gid}
    if (peer.uid in (0, os.getuid()) or peer.uid in rules.operator_uids
            or not groups.isdisjoint(rules.operator_gids)):
        return True
    if (not (rules.app_uids or rules.app_gids) or peer.uid in rules.app_uids
            or not groups.isdisjoint(rules.app_gids)):
        return False
    return None


def _classify(body: memoryview, exc: Exception) -> tuple[Error, str]:
    """Turn a frame that failed typed decoding into an Error reply and the op to blame."""
    try:
        env = ENVELOPE_DECODER.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        env = None
    request_id = None
    op = Metrics.INVALID
    if env is not None:
        if type(env.id) is int and 0 <= env.id < 2**63:
            request_id = env.id
        if isinstance(env.op, str) and env.op in OPS:
            op = env.op
    message = str(exc)
    if isinstance(exc, RecursionError):
        code = ErrorCode.MALFORMED
        message = "values nested too deeply"
    elif not isinstance(exc, msgspec.ValidationError):
        code = ErrorCode.MALFORMED
    elif env is not None and env.op is not None and op == Metrics.INVALID:
        code = ErrorCode.UNKNOWN_OP
        message = f"unknown op {env.op!r}; this daemon knows: {', '.join(OPS)}"
    elif message.startswith("Object missing required field"):
        code = ErrorCode.MISSING_FIELD
    else:
        code = ErrorCode.WRONG_TYPE
    return Error(id=request_id, code=code, message=message), op


#: a client that keeps hitting one of our bugs must not fill the disk with the same
#: traceback: one a minute, the rest counted (each is an INTERNAL error in stats)
_internal_log = ThrottledLog(log)


def _error_reply(request_id: int, what: str, exc: Exception) -> Error:
    """The one place where an exception from an op becomes an Error reply."""
    if isinstance(exc, RequestError):
        return Error(id=request_id, code=exc.code, message=exc.detail)
    _internal_log.error("%s (id %d) failed", what, request_id, exc_info=exc)
    return Error(id=request_id, code=ErrorCode.INTERNAL,
                 message="internal error; the daemon log has the details")


#: The peer of a connection refused before its credentials were read: uid -1 matches no
#: user, so nothing is ever granted to it.
_UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)


class Connection(asyncio.Protocol):
    __slots__ = ("server", "transport", "reader", "partial_since", "closing", "waiting",
                 "peer", "operator", "active", "quiet_since")

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(server.config.server.max_frame_bytes)
        self.partial_since: float | None = None
        self.closing = False
        #: True while a reply is computed off the loop: reading pauses, order is kept.
        self.waiting = False
        #: Who connected (SO_PEERCRED at connect time), read once.
        self.peer = _UNKNOWN_PEER
        #: Whether the peer may use the operator ops (``[server.access]``), decided once.
        self.operator = False
        #: Set by any traffic, cleared by the sweep: a flag store costs the hot path less
        #: than a clock read, and the sweep dates the silence to within its interval.
        self.active = True
        self.quiet_since = 0.0

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        server = self.server
        cfg = server.config.server
        if len(server.connections) >= cfg.max_connections:
            self.refuse("max_connections", f"connection limit of {cfg.max_connections} "
                        "reached (server.max_connections)")
            return
        try:
            self.peer = peer = peer_of(transport.get_extra_info("socket"))
        except OSError as exc:  # never seen on a Unix socket; refuse rather than guess
            self.abort(ErrorCode.INTERNAL, f"cannot read the peer's credentials: {exc}")
            return
        if server.per_uid.get(peer.uid, 0) >= cfg.max_connections_per_uid:
            self.refuse("max_connections_per_uid",
                        f"uid {peer.uid} already holds {cfg.max_connections_per_uid} "
                        "connections (server.max_connections_per_uid); close idle ones")
            return
        if server.per_pid.get(peer.pid, 0) >= cfg.max_connections_per_pid:
            self.refuse("max_connections_per_pid",
                        f"pid {peer.pid} already holds {cfg.max_connections_per_pid} "
                        "connections (server.max_connections_per_pid); close idle ones")
            return
        granted = _access(cfg.access, peer, transport.get_extra_info("socket"))
        if granted is None:
            self.abort(ErrorCode.FORBIDDEN,
                       f"uid {peer.uid} (gid {peer.gid}) may not use this daemon: it is in "
                       "neither server.access.app_uids/app_gids nor operator_uids/"
                       "operator_gids")
            return
        self.operator = granted
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        server.track(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.closing = True
        self.server.handlers.connection_closed(self)  # its admission slices end

    def pause_writing(self) -> None:
        # The peer is not reading its replies: stop reading its requests.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.active = True  # the peer read its replies: not idle
        if self.transport is not None and not self.closing and not self.waiting:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.active = True
        try:
            frames = self.reader.feed(data)
        except OversizeFrame as exc:
            self.server.metrics.op(Metrics.INVALID).observe(0, ErrorCode.TOO_LARGE)
            self.abort(ErrorCode.TOO_LARGE, str(exc))
            return
        if frames:
            self._run(frames, 0)
        if self.reader.pending:
            # The stall clock runs for the frame now incomplete, from when the previous
            # one completed: a busy pipeline whose reads end mid-frame is never "stalled".
            if frames or self.partial_since is None:
                self.partial_since = time.monotonic()
        else:
            self.partial_since = None

    def _run(self, frames: list[memoryview], first: int) -> None:
        out = bytearray()
        handlers = self.server.handlers  # ops act for this peer (leases, operator ops)
        handlers.owner, handlers.owner_pid = self.peer.uid, self.peer.pid
        handlers.conn = self
        handlers.operator = self.operator
        try:
            pending = self.server.process(frames, out, first)
        except Exception as exc:  # a bug of ours: this stream is lost, not the others
            _internal_log.error("closing a connection after an internal error", exc_info=exc)
            self.transport.write(out)  # type: ignore[union-attr]
            self.abort(ErrorCode.INTERNAL, "internal error; the daemon log has details")
            return
        self.transport.write(out)  # type: ignore[union-attr]
        if pending is not None:
            index, deferred, metrics, start = pending
            if not self.waiting:
                self.waiting = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            deferred.future.add_done_callback(
                lambda _: self._resume(frames, index, deferred, metrics, start))
        elif self.waiting:
            self.waiting = False
            if not self.closing:
                self.transport.resume_reading()  # type: ignore[union-attr]

    def _resume(self, frames: list[memoryview], index: int, deferred: Deferred,
                metrics: OpMetrics, start: int) -> None:
        if self.closing or self.transport is None or self.transport.is_closing():
            return
        self.active = True  # the idle clock restarts when the reply goes out
        out = bytearray()
        self.server.finish(deferred, metrics, start, out)
        self.transport.write(out)
        self._run(frames, index + 1)

    def eof_received(self) -> bool:
        return False  # close our side too once the replies are written

    # -- helpers ---------------------------------------------------------------------

    def refuse(self, bound: str, message: str) -> None:
        """Turn the connection away at a configured bound (counted by the bound's key)."""
        closed = self.server.metrics.connections_closed
        closed[bound] = closed.get(bound, 0) + 1
        self.abort(ErrorCode.OVERLOADED, message)

    def abort(self, code: ErrorCode, message: str) -> None:
        """Send a final Error (id None) and close after it is written."""
        self.closing = True
        out = bytearray()
        append_frame(self.server.encoder, Error(id=None, code=code, message=message), out)
        assert self.transport is not None
        self.transport.write(out)
        self.transport.close()

    def idle(self) -> bool:
        """Nothing buffered either way and no unread bytes in the kernel."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True
        if self.waiting or self.reader.pending or transport.get_write_buffer_size():
            return False
        sock = transport.get_extra_info("socket")
        if sock is None:
            return True
        unread = array.array("i", [0])
        try:
            fcntl.ioctl(sock.fileno(), termios.FIONREAD, unread, True)
        except OSError:
            return True
        return unread[0] == 0


class Server:
    """Listens on one Unix socket and serves every connection through ``Handlers``."""

    def __init__(self, config: Config, handlers: Handlers, metrics: Metrics) -> None:
        self.config = config
        self.handlers = handlers
        self.metrics = metrics
        self.encoder = msgspec.msgpack.Encoder()
        self.connections: set[Connection] = set()
        #: connections held by each peer uid and pid; entries at zero are dropped
        self.per_uid: dict[int, int] = {}
        self.per_pid: dict[int, int] = {}
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._dispatch = {
            cls: (fn, metrics.op(cls.__struct_config__.tag))
            for cls, fn in handlers.table.items()
        }

    def apply(self, config: Config) -> None:
        """Take the reloadable parts of a new config (frame limits)."""
        self.config = config
        for conn in self.connections:
            conn.reader.max_frame = config.server.max_frame_bytes

    def track(self, conn: Connection) -> None:
        """Count an accepted connection (its peer's is already read)."""
        self.connections.add(conn)
        uid, pid = conn.peer.uid, conn.peer.pid
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        self.per_pid[pid] = self.per_pid.get(pid, 0) + 1
        self.metrics.connections_now += 1
        self.metrics.connections_total += 1

    def forget(self, conn: Connection) -> None:
        """Uncount a connection that is closing (once: later calls do nothing)."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for counts, key in ((self.per_uid, conn.peer.uid), (self.per_pid, conn.peer.pid)):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
        self.metrics.connections_now -= 1

    async def start(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(
            lambda: Connection(self), sock=sock, backlog=1024)
        self._sweeper = loop.create_task(self._sweep())

    def process(self, frames: list[memoryview], out: bytearray,
                first: int = 0) -> tuple[int, Deferred, OpMetrics, int] | None:
        """Decode each frame from ``first`` on, run its op, append the reply frames to
        ``out`` in order. Stops at a reply computed off the loop and returns it with its
        frame index (the caller resumes after it), else returns None.

        The hot path of the daemon: one clock read per frame (a frame's latency runs from
        the end of the previous one), the ring store of ``OpMetrics.observe`` inlined.
        """
        clock = time.perf_counter_ns
        decode = REQUEST_DECODER.decode
        dispatch = self._dispatch
        encoder = self.encoder
        start = clock()
        for index in range(first, len(frames)):
            body = frames[index]
            try:
                request = decode(body)
            except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
                reply, op = _classify(body, exc)
                metrics = self.metrics.op(op)
            else:
                handler, metrics = dispatch[type(request)]
                try:
                    reply = handler(request)
                except Exception as exc:
                    reply = _error_reply(request.id, type(request).__name__, exc)
                if type(reply) is Deferred:
                    return index, reply, metrics, start
            try:
                append_frame(encoder, reply, out)
            except Exception as exc:
                _internal_log.error("encoding a %s reply failed", type(reply).__name__,
                                    exc_info=exc)
                reply = Error(id=reply.id, code=ErrorCode.INTERNAL,
                              message="reply could not be encoded")
                append_frame(encoder, reply, out)
            end = clock()
            count = metrics.requests
            ns = end - start
            metrics.latency_ns[count & MASK] = ns
            metrics.buckets[bisect_left(OP_BOUNDS_NS, ns)] += 1
            metrics.sum_ns += ns
            metrics.requests = count + 1
            if type(reply) is Error:
                metrics.errors[reply.code] = metrics.errors.get(reply.code, 0) + 1
            start = end
        return None

    def finish(self, deferred: Deferred, metrics: OpMetrics, start: int,
               out: bytearray) -> None:
        """Append the reply of a finished ``Deferred`` and record its latency."""
        try:
            reply = deferred.future.result()
        except Exception as exc:
            reply = _error_reply(deferred.request_id, "deferred op", exc)
        append_frame(self.encoder, reply, out)
        metrics.observe(time.perf_counter_ns() - start,
                        reply.code if type(reply) is Error else None)

    async def _sweep(self) -> None:
        """Close connections whose partial frame stalled past ``frame_timeout``, and
        those silent past ``idle_timeout`` (see ``_close_idle``)."""
        while True:
            cfg = self.config.server
            await asyncio.sleep(min(1.0, cfg.frame_timeout / 4, cfg.idle_timeout / 4))
            timeout, idle_timeout = cfg.frame_timeout, cfg.idle_timeout
            with self.metrics.task_failures.guard("server.sweep"):  # must outlive a bug
                now = time.monotonic()
                for conn in list(self.connections):
                    if conn.partial_since is not None:
                        if now - conn.partial_since > timeout:
                            log.info("closing a connection whose partial frame stalled "
                                     "for %.1f s", now - conn.partial_since)
                            self.metrics.op(Metrics.INVALID).observe(0, ErrorCode.MALFORMED)
                            conn.abort(ErrorCode.MALFORMED, "incomplete frame stalled for "
                                       f"more than {timeout:g} s")
                    elif conn.active:
                        conn.active = False
                        conn.quiet_since = now
                    elif now - conn.quiet_since > idle_timeout:
                        self._close_idle(conn)

    def _close_idle(self, conn: Connection) -> None:
        """Close a connection that has been silent for ``idle_timeout``, unless a reply
        is being computed for it or a request just arrived. Closed without a frame, as
        an HTTP keep-alive timeout: the clients retire pooled connections before it (they
        learn the timeout from ``hello``) and reconnect."""
        transport = conn.transport
        if conn.waiting or conn.closing or transport is None:
            return
        if transport.get_write_buffer_size():
            # Its replies sat unread all that time (its requests wait unread behind
            # them): the peer is stuck, and close() would wait for it to read for ever.
            transport.abort()
        elif conn.idle():
            transport.close()
        else:
            return
        conn.closing = True
        self.forget(conn)
        closed = self.metrics.connections_closed
        closed["idle"] = closed.get("idle", 0) + 1

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> int:
        """Answer what has arrived, then close each connection; returns how many were
        still busy when ``timeout`` ran out (those are closed anyway)."""
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle():
                    conn.closing = True
                    if conn.transport is not None:
                        conn.transport.close()
                    self.forget(conn)
            if self.connections:
                await asyncio.sleep(0.005)
        busy = len(self.connections)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            await self._server.wait_closed()
        return busy


class MetricsListener:
    """``GET /metrics`` on a loopback TCP port, for a Prometheus scraper. One request per
    connection (HTTP/1.0 style: the reply closes it); a request head larger than 8 KiB or
    slower than 5 s is dropped. Runs on the event loop, so the exposition reads the
    daemon's state between requests, never during one."""

    MAX_HEAD = 8192
    TIMEOUT = 5.0

    def __init__(self, render: Callable[[], bytes], content_type: str) -> None:
        self.render = render
        self.content_type = content_type
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=self.MAX_HEAD)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.TIMEOUT)
            method, _, rest = head.partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif path != b"/metrics":
                status, body, kind = b"404 Not Found", b"try /metrics\n", b"text/plain"
            else:
                status, body, kind = b"200 OK", self.render(), self.content_type.encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n"
                         + (body if method != b"HEAD" else b""))
            await asyncio.wait_for(writer.drain(), self.TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError,
                ConnectionError):
            log.debug("metrics listener: dropped a bad or slow request")
        finally:
            writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


__all__ = ["Connection", "MetricsListener", "Peer", "Server"]
