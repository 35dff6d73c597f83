"""The scalars of the protocol: its version, the bounds every number and name on the wire
is held to (so nothing a peer sends can overflow or disable what the daemon computes), and
the error codes ``Error`` replies carry."""
from __future__ import annotations

import enum
from typing import Annotated

import msgspec

#: Bumped on any incompatible change of framing or of an existing message.
PROTOCOL_VERSION = 1

RequestId = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

# Every number on the wire is bounded to what the daemon can hold and compute with: the
# limits engine adds tokens and micro-dollars in int64, so one request's amounts (and
# their sums over a window) must stay far below 2**63; floats must be finite (a NaN
# fails every range check). The bounds are far beyond any real call.
#: tokens in one field of one request (~1.1e12)
MAX_TOKENS = 2**40
#: USD of one call (an explicit ``usd`` on admit, settle or end)
MAX_USD = 1e6
#: seconds of a provider's Retry-After or a call's latency (one day)
MAX_SECONDS = 86_400.0
#: epoch seconds accepted as a time (year 3000)
MAX_EPOCH = 32_503_680_000.0
#: characters of a caller's name for something (user, key, model, route, namespace, ...)
MAX_NAME = 512

Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOKENS)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=MAX_USD)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=MAX_SECONDS)]
Epoch = Annotated[float, msgspec.Meta(ge=0, le=MAX_EPOCH)]
Name = Annotated[str, msgspec.Meta(max_length=MAX_NAME)]
LeaseId = Annotated[str, msgspec.Meta(max_length=128)]
HttpStatus = Annotated[int, msgspec.Meta(ge=0, le=999)]

NIL = b"\xc0"  # msgpack nil: the default of opaque ``Raw`` fields (no value)
NIL_RAW = msgspec.Raw(NIL)


class ErrorCode(enum.IntEnum):
    """Integer codes carried by ``Error`` replies."""

    MALFORMED = 1  # not msgpack, or trailing bytes
    UNKNOWN_OP = 2  # no such op
    MISSING_FIELD = 3  # a required field is absent
    WRONG_TYPE = 4  # a field has the wrong type or an out-of-range value
    TOO_LARGE = 5  # the frame exceeds the max frame size; the connection is closed
    OVERLOADED = 6  # a configured bound (connections) is reached
    INTERNAL = 7  # a bug or backend failure inside the daemon
    INVALID_VALUE = 8  # well-typed but unacceptable (e.g. both text and messages)
    UNKNOWN_ENCODING = 9  # no such tokenizer encoding; the message lists the known ones
    FORBIDDEN = 10  # the peer's uid/gid may not do this (``[server.access]``)
