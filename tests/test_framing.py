"""Length-prefixed framing: any split of a byte stream yields the same frames."""
import msgspec
import pytest
from hypothesis import given, strategies as st

from sidecar.wire.framing import HEADER_SIZE, FrameReader, OversizeFrame, append_frame

bodies = st.lists(st.binary(max_size=300), max_size=30)


def frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


@given(bodies, st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_split_decodes_the_same_frames(payloads, cuts):
    stream = b"".join(frame(b) for b in payloads)
    points = sorted({c % (len(stream) + 1) for c in cuts})
    reader = FrameReader(max_frame=1024)
    got = []
    start = 0
    for point in [*points, len(stream)]:
        got += [bytes(f) for f in reader.feed(stream[start:point])]
        start = point
    assert got == payloads
    assert reader.pending == 0


@given(bodies)
def test_byte_at_a_time(payloads):
    stream = b"".join(frame(b) for b in payloads)
    reader = FrameReader(max_frame=1024)
    got = []
    for i in range(len(stream)):
        got += [bytes(f) for f in reader.feed(stream[i:i + 1])]
    assert got == payloads


@given(st.lists(st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1)), max_size=20))
def test_append_frame_round_trips(messages):
    enc = msgspec.msgpack.Encoder()
    out = bytearray()
    for m in messages:
        append_frame(enc, m, out)
    frames = FrameReader().feed(bytes(out))
    assert [msgspec.msgpack.decode(f) for f in frames] == messages


def test_failed_encode_leaves_the_buffer_untouched():
    out = bytearray(b"abc")
    with pytest.raises(OverflowError):
        append_frame(msgspec.msgpack.Encoder(), 2**70, out)
    assert out == b"abc"


def test_oversize_prefix_is_refused_before_buffering():
    reader = FrameReader(max_frame=100)
    with pytest.raises(OversizeFrame) as info:
        reader.feed((101).to_bytes(4, "big") + b"x")
    assert info.value.length == 101 and info.value.limit == 100
    assert reader.pending == 0


def test_exactly_max_is_accepted_and_partial_is_bounded():
    reader = FrameReader(max_frame=100)
    data = frame(b"y" * 100)
    assert reader.feed(data[:50]) == []
    assert reader.pending == 50
    assert [bytes(f) for f in reader.feed(data[50:])] == [b"y" * 100]
    assert reader.pending == 0


def test_empty_body_is_a_frame():
    assert [bytes(f) for f in FrameReader().feed(frame(b""))] == [b""]
    assert HEADER_SIZE == 4
