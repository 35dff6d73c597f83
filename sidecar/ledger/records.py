"""The request log's records: one flat JSON object per guarded request, built on the
event loop from what ``begin`` and ``end`` saw.

Keys use the OpenTelemetry GenAI semantic-convention names where one exists
(``gen_ai.request.model``, ``gen_ai.usage.input_tokens``, ``user.id``, ``error.type``, ...)
and ``sidecar.*`` names otherwise; README's "Request log" section lists them. ``outcome``
says which kind of record it is: ``ok`` or ``error`` (the call ended), ``hit`` (served
from the cache), ``deny`` (refused before any provider call) or ``settled`` (a bare
``settle`` of an ``admit`` lease).
"""
from __future__ import annotations

from typing import Sequence

from ..protocol import Attempt

#: ``gen_ai.operation.name`` of every call the sidecar guards.
OPERATION = "chat"


def request_record(*, ts: float, request_id: str, outcome: str, user: str, route: str,
                   template: str = "", template_version: str = "", requested: str = "",
                   model: str = "", provider: str = "", fallback_depth: int = 0,
                   attempts: Sequence[Attempt] = (), input_tokens: int = 0,
                   output_tokens: int = 0, cached_tokens: int = 0, reasoning_tokens: int = 0,
                   duration: float = 0.0, cache_tier: str = "", similarity: float = 0.0,
                   usd: float = 0.0, error: str = "", reason: str = "",
                   limit: str = "") -> dict[str, object]:
    """One request log record; see the module docstring for the names."""
    record: dict[str, object] = {
        "ts": round(ts, 6),
        "request_id": request_id,
        "outcome": outcome,
        "user.id": user,
        "sidecar.route": route,
        "gen_ai.operation.name": OPERATION,
        "gen_ai.request.model": requested,
        "gen_ai.response.model": model,
        "gen_ai.provider.name": provider,
        "gen_ai.usage.input_tokens": input_tokens,
        "gen_ai.usage.output_tokens": output_tokens,
        "gen_ai.usage.cache_read.input_tokens": cached_tokens,
        "gen_ai.usage.reasoning.output_tokens": reasoning_tokens,
        "sidecar.cost_usd": usd,
        "sidecar.duration_s": round(duration, 6),
        "sidecar.fallback_depth": fallback_depth,
        "sidecar.attempts": [
            {"model": a.model, "ok": a.ok, "status": a.status, "error": a.error,
             "latency_s": a.latency} for a in attempts],
        "sidecar.cache.tier": cache_tier,
        "sidecar.cache.similarity": similarity,
        "sidecar.guardrails": [],  # guardrail outcomes: none run in the sidecar yet
        "error.type": error,
    }
    if template:
        record["gen_ai.prompt.name"] = template
        record["sidecar.prompt.version"] = template_version
    if reason:
        record["sidecar.deny.reason"] = reason
        record["sidecar.deny.limit"] = limit
    return record
