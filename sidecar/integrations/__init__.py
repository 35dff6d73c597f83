"""Drop-in guards for the OpenAI and Anthropic Python SDKs.

``guard_openai(client, sidecar, **defaults)`` and ``guard_anthropic(...)`` wrap an SDK
client (blocking with a ``sidecar.Client``, asyncio with a ``sidecar.AsyncClient``) so
that ``chat.completions.create`` / ``messages.create`` go through the sidecar: cache,
limits, the route's chain with fallbacks and circuits (only chain models of the SDK's own
provider, or the request's model when the route has none), stale and static fallbacks.
Everything else is the SDK client's own. ``defaults`` are guard fields (``user``,
``route``, ``namespace``, ``kind``, ...); a call overrides them with ``sidecar={...}``.
The SDK's own retries are off: the guard retries.

Answers keep the SDK's types. A cached or stale answer is the stored response validated
back into that type; a route's static fallback text becomes a response with ``id``
``"sidecar-fallback-static"``. ``wrapper.last_outcome`` (per thread / asyncio task) is
the ``sidecar.Guarded`` of the last call: ``source`` is "provider", "cache", "stale" or
"static". ``stream=True`` returns a ``GuardedStream`` (``AsyncGuardedStream``) yielding
the SDK's chunks, or a cached answer replayed as such chunks; its lease grows with the
answer (``extend``) and a budget running out mid-stream cuts it with ``BudgetExhausted``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import FALLBACK_ID, AsyncGuardedStream, GuardedClient, GuardedStream

if TYPE_CHECKING:
    from ..client.aio import AsyncClient
    from ..client.sync import Client

__all__ = ["FALLBACK_ID", "AsyncGuardedStream", "GuardedClient", "GuardedStream",
           "guard_anthropic", "guard_openai"]


def guard_openai(client: Any, sidecar: Client | AsyncClient, **defaults: Any) -> GuardedClient:
    """An ``openai.OpenAI`` / ``openai.AsyncOpenAI`` whose ``chat.completions.create``
    is guarded (see the module docstring). Needs the ``openai`` package."""
    from .openai_guard import guard_openai as guard

    return guard(client, sidecar, **defaults)


def guard_anthropic(client: Any, sidecar: Client | AsyncClient,
                    **defaults: Any) -> GuardedClient:
    """An ``anthropic.Anthropic`` / ``anthropic.AsyncAnthropic`` whose ``messages.create``
    is guarded (see the module docstring). Needs the ``anthropic`` package."""
    from .anthropic_guard import guard_anthropic as guard

    return guard(client, sidecar, **defaults)
