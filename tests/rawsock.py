"""A bare socket speaking the framing by hand, for sending what no client would."""
from __future__ import annotations

import contextlib
import socket

import msgspec

from sidecar.wire.framing import FrameReader
from sidecar.wire import REPLY_DECODER, Reply


class Raw:
    def __init__(self, path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.reader = FrameReader(64 * 1024 * 1024)
        self.frames: list[bytes] = []

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj, raw: bool = False) -> None:
        body = obj if raw else msgspec.msgpack.encode(obj)
        self.sock.sendall(len(body).to_bytes(4, "big") + body)

    def recv(self) -> Reply | None:
        """Next reply, or None at EOF."""
        while not self.frames:
            data = self.sock.recv(1 << 20)
            if not data:
                return None
            self.frames += [bytes(f) for f in self.reader.feed(data)]
        return REPLY_DECODER.decode(self.frames.pop(0))

    def closed_by_peer(self) -> bool:
        """Drain replies until EOF; True when the daemon closed the connection."""
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while self.recv() is not None:
                continue  # replies to garbage are not the point: reaching EOF is
        return True
