"""The request log's records: one flat JSON object per guarded request, built on the
event loop from what ``begin`` and ``end`` saw.

A record is a ``RequestRecord`` (a msgspec Struct: cheap to build on the event loop,
serialised by the log's thread). Keys use the OpenTelemetry GenAI semantic-convention
names where one exists (``gen_ai.request.model``, ``gen_ai.usage.input_tokens``,
``user.id``, ``error.type``, ...) and ``sidecar.*`` names otherwise; README's
"Accounting" section lists them. ``outcome`` says which kind of record it is: ``ok`` or
``error`` (the call ended), ``hit`` (served from the cache), ``deny`` (refused before any
provider call) or ``settled`` (a bare ``settle`` of an ``admit`` lease). Every key is
always present, so a reader never needs a default.
"""
from __future__ import annotations

import msgspec

from ..wire import Attempt

#: ``gen_ai.operation.name`` of every call the sidecar guards.
OPERATION = "chat"

#: Python field name -> key in the log.
_KEYS = {
    "user": "user.id",
    "route": "sidecar.route",
    "template": "gen_ai.prompt.name",
    "template_version": "sidecar.prompt.version",
    "operation": "gen_ai.operation.name",
    "requested": "gen_ai.request.model",
    "model": "gen_ai.response.model",
    "provider": "gen_ai.provider.name",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "cached_tokens": "gen_ai.usage.cache_read.input_tokens",
    "reasoning_tokens": "gen_ai.usage.reasoning.output_tokens",
    "usd": "sidecar.cost_usd",
    "duration": "sidecar.duration_s",
    "fallback_depth": "sidecar.fallback_depth",
    "attempts": "sidecar.attempts",
    "cache_tier": "sidecar.cache.tier",
    "similarity": "sidecar.cache.similarity",
    "guardrails": "sidecar.guardrails",
    "reason": "sidecar.deny.reason",
    "limit": "sidecar.deny.limit",
    "error": "error.type",
}


class RequestRecord(msgspec.Struct, kw_only=True, rename=_KEYS):
    """One request log record; the JSON keys are ``_KEYS``' values."""

    ts: float  # epoch seconds
    request_id: str
    outcome: str  # "ok", "error", "hit", "deny", "settled"
    user: str = ""  # the user, else the key
    route: str = ""
    template: str = ""  # begin's template and its version
    template_version: str = ""
    operation: str = OPERATION
    requested: str = ""  # the chain's first model
    model: str = ""  # the model that answered
    provider: str = ""  # its provider
    input_tokens: int = 0  # includes cached
    output_tokens: int = 0  # includes reasoning
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usd: float = 0.0
    duration: float = 0.0  # begin to end, seconds
    fallback_depth: int = 0  # position of the answering model in the chain
    attempts: list[Attempt] = []  # model, ok, status, error, retry_after, latency
    cache_tier: str = ""  # "exact", "semantic" or "miss"
    similarity: float = 0.0
    guardrails: list[str] = []  # guardrail outcomes: none run in the sidecar yet
    reason: str = ""  # a denial's reason and limit
    limit: str = ""
    error: str = ""  # the first failed attempt's error when no model answered
