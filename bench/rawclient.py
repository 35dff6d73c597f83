"""A minimal blocking ping client used against both servers, so they are compared like-with-like.

It speaks only the framing: ``Ping`` frames encoded with ``sidecar.wire.framing.append_frame``
go out with one ``sendall``, replies are split with ``FrameReader`` and decoded with
``REPLY_DECODER``, and every reply's id is checked. No hello, no timeouts, no retries,
no pooling: the socket is plain blocking, so a round trip costs one send and usually one
recv. Latencies are taken with ``time.perf_counter_ns`` around encode, send, receive and
decode of each request (sequential) or each batch (pipelined).
"""
from __future__ import annotations

import socket
import time
from collections import deque

import msgspec

from sidecar.wire.framing import FrameReader, append_frame
from sidecar.wire import REPLY_DECODER, Ping, Pong

_RECV_SIZE = 256 * 1024


class RawClient:
    __slots__ = ("path", "sock", "reader", "encoder", "next_id")

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = FrameReader()
        self.encoder = msgspec.msgpack.Encoder()
        self.next_id = 1

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self) -> list[memoryview]:
        data = self.sock.recv(_RECV_SIZE)
        if not data:
            raise ConnectionError(f"{self.path}: server closed the connection")
        return self.reader.feed(data)

    def sequential(self, n: int) -> list[int]:
        """``n`` pings one at a time; returns each round trip in nanoseconds."""
        sock, encoder, decode = self.sock, self.encoder, REPLY_DECODER.decode
        recv, clock = self._recv, time.perf_counter_ns
        out = bytearray()
        latencies = [0] * n
        request_id = self.next_id
        for i in range(n):
            t0 = clock()
            out.clear()
            append_frame(encoder, Ping(id=request_id), out)
            sock.sendall(out)
            frames = recv()
            while not frames:
                frames = recv()
            reply = decode(frames[0])
            t1 = clock()
            if type(reply) is not Pong or reply.id != request_id or len(frames) != 1:
                raise RuntimeError(f"unexpected reply {reply!r} to ping id {request_id}")
            latencies[i] = t1 - t0
            request_id += 1
        self.next_id = request_id
        return latencies

    def pipelined(self, batches: int, size: int) -> list[int]:
        """``batches`` times: ``size`` pings in one ``sendall``, then read all ``size``
        replies; returns each batch's duration in nanoseconds."""
        sock, encoder, decode = self.sock, self.encoder, REPLY_DECODER.decode
        recv, clock = self._recv, time.perf_counter_ns
        out = bytearray()
        latencies = [0] * batches
        request_id = self.next_id
        for b in range(batches):
            t0 = clock()
            out.clear()
            for offset in range(size):
                append_frame(encoder, Ping(id=request_id + offset), out)
            sock.sendall(out)
            expected = request_id
            end = request_id + size
            while expected < end:
                for body in recv():
                    reply = decode(body)
                    if type(reply) is not Pong or reply.id != expected:
                        raise RuntimeError(f"unexpected reply {reply!r}, wanted pong {expected}")
                    expected += 1
            latencies[b] = clock() - t0
            request_id = end
        self.next_id = request_id
        return latencies

    def streamed(self, batches: int, size: int, depth: int) -> list[int]:
        """``batches`` batches of ``size`` pings with ``depth`` batches in flight: the next
        batch goes out as soon as a whole batch of replies is in, so the client's work
        overlaps the server's. Returns each batch's time from send to its last reply."""
        sock, encoder, decode = self.sock, self.encoder, REPLY_DECODER.decode
        recv, clock = self._recv, time.perf_counter_ns
        latencies = []
        sent_at: deque[int] = deque()
        next_send = self.next_id
        end = next_send + batches * size
        out = bytearray()

        def send_batch() -> None:
            nonlocal next_send
            out.clear()
            for offset in range(size):
                append_frame(encoder, Ping(id=next_send + offset), out)
            sent_at.append(clock())
            sock.sendall(out)
            next_send += size

        for _ in range(min(depth, batches)):
            send_batch()
        expected = self.next_id
        while expected < end:
            for body in recv():
                reply = decode(body)
                if type(reply) is not Pong or reply.id != expected:
                    raise RuntimeError(f"unexpected reply {reply!r}, wanted pong {expected}")
                expected += 1
                if (expected - self.next_id) % size == 0:
                    latencies.append(clock() - sent_at.popleft())
                    if next_send < end:
                        send_batch()
        self.next_id = end
        return latencies
