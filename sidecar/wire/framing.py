"""Length-prefixed msgpack frames: a 4-byte big-endian body length, then the body.

Shared by the daemon, both clients and the benchmark floor, so every side frames
identically. No sockets here: ``FrameReader`` turns received chunks into frame bodies,
``append_frame`` encodes a message straight into an output buffer.
"""
from __future__ import annotations

import msgspec

HEADER_SIZE = 4
DEFAULT_MAX_FRAME = 4 * 1024 * 1024
_HEADER_PAD = b"\0\0\0\0"


class OversizeFrame(Exception):
    """A length prefix announced more than the reader's max frame size."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"frame of {length} bytes exceeds the max frame size of {limit} bytes")


def append_frame(encoder: msgspec.msgpack.Encoder, message: object, out: bytearray) -> int:
    """Encode ``message`` as one frame at the end of ``out``; returns the body length.

    If encoding fails, ``out`` is left as it was and the error propagates.
    """
    start = len(out)
    out += _HEADER_PAD
    try:
        encoder.encode_into(message, out, -1)
    except BaseException:
        del out[start:]
        raise
    length = len(out) - start - HEADER_SIZE
    out[start:start + HEADER_SIZE] = length.to_bytes(HEADER_SIZE, "big")
    return length


class FrameReader:
    """Incremental frame splitter with a bounded buffer.

    ``feed`` returns the complete frame bodies in a chunk as memoryviews (valid until the
    caller drops them) and keeps at most one partial frame, never more than
    ``max_frame + 4`` bytes. A frame is copied at most once, however it was split.
    """

    __slots__ = ("max_frame", "_buf", "_need")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need = HEADER_SIZE  # bytes the buffered partial frame needs to be whole

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[memoryview]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        view = memoryview(data)
        end = len(view)
        pos = 0
        frames = []
        need = HEADER_SIZE
        while end - pos >= HEADER_SIZE:
            length = int.from_bytes(view[pos:pos + HEADER_SIZE], "big")
            if length > self.max_frame:
                raise OversizeFrame(length, self.max_frame)
            need = HEADER_SIZE + length
            if end - pos < need:
                break
            frames.append(view[pos + HEADER_SIZE:pos + need])
            pos += need
            need = HEADER_SIZE
        if pos < end:
            buf += view[pos:]
            self._need = need
        return frames
