"""The floor: the least a uvloop server speaking the sidecar framing must do to answer a ping.

``python -m bench.floor SOCKET`` listens on SOCKET; per ``data_received`` it splits frames
with ``sidecar.wire.framing.FrameReader``, decodes each body with
``sidecar.wire.REQUEST_DECODER``, appends ``Pong(id=request.id)`` with ``append_frame``
to one bytearray and writes it with one ``transport.write``. No metrics, no dispatch table,
no error replies (an undecodable frame closes the connection); every request, whatever its
op, is answered with a Pong. SIGTERM or SIGINT stops it, removes the socket, exits 0.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import msgspec
import uvloop

from sidecar.wire.framing import FrameReader, OversizeFrame, append_frame
from sidecar.wire import REQUEST_DECODER, Pong

_ENCODER = msgspec.msgpack.Encoder()
_DECODE_ERRORS = (OversizeFrame, msgspec.DecodeError, msgspec.ValidationError)


class FloorProtocol(asyncio.Protocol):
    __slots__ = ("transport", "reader")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
            if not frames:
                return
            out = bytearray()
            decode = REQUEST_DECODER.decode
            for body in frames:
                append_frame(_ENCODER, Pong(id=decode(body).id), out)
        except _DECODE_ERRORS:
            self.transport.close()  # type: ignore[union-attr]
            return
        self.transport.write(out)  # type: ignore[union-attr]


async def serve(path: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    server = await loop.create_unix_server(FloorProtocol, path=path, backlog=1024)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    print(f"floor serving on {path} (pid {os.getpid()})", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.floor SOCKET", file=sys.stderr)
        return 2
    uvloop.run(serve(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
