"""What both clients share about an exchange with the daemon: the ``Dead`` signal (the
connection died before any reply of a call arrived, so an idempotent call may be sent
once more on a fresh connection), requests framed with consecutive ids and checked
against the max frame size the daemon's ``hello`` announced (an oversize request fails
locally instead of costing the connection), the requests built from a call's arguments
(an answer to cache encoded to msgpack first), how long an idle connection may be
reused, and a batch's replies with its errors raised or returned.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import msgspec

from ..version import __version__
from ..errors import FrameTooLarge
from ..wire.framing import append_frame
from ..wire import CachePut, Count, End, HelloReply, Reply, Request

DEFAULT_TIMEOUT = 5.0
CLIENT_NAME = f"sidecar-python/{__version__}"


class Dead(Exception):
    """The connection died before any reply of the call arrived (safe to resend)."""


def encode_requests(encoder: msgspec.msgpack.Encoder, requests: Sequence[Request],
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


def count_request(text, messages, tools, model, encoding, max_tokens, special) -> Count:
    # Plain dicts encode to the same msgpack maps as Message structs: passed as they are.
    return Count(text=text, messages=messages, tools=tools, model=model, encoding=encoding,
                 max_tokens=max_tokens, special=special)


def cache_put_request(response: Any, fields: dict[str, Any]) -> CachePut:
    """``response`` is any msgpack-encodable value; the daemon stores its bytes as sent."""
    return CachePut(response=msgspec.Raw(msgspec.msgpack.encode(response)), **fields)


def end_request(lease: str, fields: dict[str, Any]) -> End:
    if "response" in fields:
        fields = dict(fields, response=msgspec.Raw(msgspec.msgpack.encode(fields["response"])))
    return End(lease=lease, **fields)


def keep_for(hello: HelloReply) -> float:
    """How long a connection may sit unused and still be reused: half the daemon's idle
    timeout, so a request never meets the daemon closing it as idle."""
    return hello.idle_timeout / 2 if hello.idle_timeout > 0 else math.inf


def unwrap(replies: list[Reply | BaseException], return_exceptions: bool) -> list:
    if not return_exceptions:
        for item in replies:
            if isinstance(item, BaseException):
                raise item
    return replies
