"""What every part of the handlers shares: the deferred reply and small wire helpers."""
from __future__ import annotations

import asyncio
import math

from ..protocol import Reply


class Deferred:
    """A reply still being computed off the event loop (a worker thread)."""

    __slots__ = ("future", "request_id")

    def __init__(self, future: asyncio.Future[Reply], request_id: int) -> None:
        self.future = future
        self.request_id = request_id


#: The fields that identify a cached answer (``protocol.CacheRequest``'s own).
CACHE_FIELDS = ("namespace", "model", "messages", "text", "temperature", "params", "tools",
                 "response_format", "vector")


def wire_seconds(value: float) -> float | None:
    """A retry_after for the wire: None when no time can be promised."""
    return None if math.isinf(value) else round(value, 6)
