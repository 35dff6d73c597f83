"""What every part of the handlers shares: the deferred reply and small wire helpers."""
from __future__ import annotations

import asyncio
import math

from ...errors import InvalidValue
from ...limits.engine import MICRO
from ...wire import MAX_USD, Reply


class Deferred:
    """A reply still being computed off the event loop (a worker thread)."""

    __slots__ = ("future", "request_id")

    def __init__(self, future: asyncio.Future[Reply], request_id: int) -> None:
        self.future = future
        self.request_id = request_id


#: The fields that identify a cached answer (``protocol.CacheRequest``'s own).
CACHE_FIELDS = ("namespace", "model", "messages", "text", "temperature", "params", "tools",
                 "response_format", "vector")


#: the most one call may cost, in micro-dollars: the wire's own bound on ``usd``
MAX_MICRO = round(MAX_USD * MICRO)


def bounded_micro(micro: int) -> int:
    """``micro`` when one call may cost that much; a typed error when a price times the
    tokens asked for is beyond what a limit can count (the engine adds in int64)."""
    if micro > MAX_MICRO:
        raise InvalidValue(f"the call would cost ${micro / MICRO:,.0f}, more than the "
                           f"${MAX_USD:,.0f} one call may cost; check the token counts "
                           "and the model's price")
    return micro


def wire_seconds(value: float) -> float | None:
    """A retry_after for the wire: None when no time can be promised."""
    return None if math.isinf(value) else round(value, 6)
