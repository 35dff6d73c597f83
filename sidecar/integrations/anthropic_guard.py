"""The Anthropic SDK's shapes for the drop-in guard: ``messages.create`` requests as guard
fields (``system`` as a system message), ``Message`` usage (cache reads and writes are
input) and tool use, streamed events accumulated into the non-streamed message, and cached
answers replayed as the SDK's raw stream events."""
from __future__ import annotations

import json
from typing import Any

import anthropic
from anthropic.types import (
    Message, RawContentBlockDeltaEvent, RawContentBlockStartEvent, RawContentBlockStopEvent,
    RawMessageDeltaEvent, RawMessageStartEvent, RawMessageStopEvent,
)

from ..client.aio import AsyncClient
from ..client.sync import Client
from ..client.guard import CallResult
from . import _base
from ._base import FALLBACK_ID, Accumulator, Adapter, Delegate, GuardedClient

_TAKEN = frozenset({"model", "messages", "system", "temperature", "tools"})


def _usage(usage: Any) -> tuple[int, int, int]:
    """(input incl. cache reads and writes, output, cache reads) of a usage."""
    if usage is None:
        return 0, 0, 0
    read = getattr(usage, "cache_read_input_tokens", 0) or 0
    write = getattr(usage, "cache_creation_input_tokens", 0) or 0
    return (usage.input_tokens or 0) + read + write, usage.output_tokens or 0, read


class AnthropicAdapter(Adapter):
    provider = "anthropic"

    def fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        messages = _base.plain(list(kwargs.get("messages", ())))
        if kwargs.get("system"):
            messages.insert(0, {"role": "system", "content": _base.plain(kwargs["system"])})
        fields: dict[str, Any] = {"model": kwargs.get("model", ""), "messages": messages}
        if kwargs.get("max_tokens") is not None:
            fields["max_tokens"] = kwargs["max_tokens"]
        for name in ("temperature", "tools"):
            if kwargs.get(name) is not None:
                fields[name] = _base.plain(kwargs[name])
        params = _base.sampling_params(kwargs, _TAKEN)
        if params:
            fields["params"] = params
        return fields

    def result(self, response: Message) -> CallResult:
        inp, out, cached = _usage(response.usage)
        return CallResult(response, inp, out, cached, 0,
                          cache=response.model_dump(mode="json"),
                          tool_calls=any(b.type == "tool_use" for b in response.content))

    def answer(self, value: Any, kwargs: dict[str, Any]) -> Message:
        if isinstance(value, dict):
            return Message.model_validate(value)
        return Message.model_validate({  # a route's static fallback text
            "id": FALLBACK_ID, "type": "message", "role": "assistant",
            "model": kwargs.get("model", ""), "content": [{"type": "text", "text": str(value)}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}})

    def accumulator(self, wants_usage: bool) -> Accumulator:
        return _Events()

    def replay(self, response: Message, wants_usage: bool) -> list[Any]:
        whole = response.model_dump(mode="json")
        usage = whole["usage"]
        start = {**whole, "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage, "output_tokens": 0}}
        events: list[Any] = [RawMessageStartEvent.model_validate(
            {"type": "message_start", "message": start})]
        for i, block in enumerate(whole["content"]):
            kind = block.get("type")
            delta: dict[str, Any] | None = None
            if kind == "text":
                first, delta = {**block, "text": ""}, {"type": "text_delta",
                                                       "text": block["text"]}
            elif kind == "tool_use":
                first, delta = {**block, "input": {}}, {"type": "input_json_delta",
                                                        "partial_json": json.dumps(
                                                            block["input"])}
            elif kind == "thinking":
                first, delta = {**block, "thinking": ""}, {"type": "thinking_delta",
                                                           "thinking": block["thinking"]}
            else:
                first = block
            events.append(RawContentBlockStartEvent.model_validate(
                {"type": "content_block_start", "index": i, "content_block": first}))
            if delta is not None:
                events.append(RawContentBlockDeltaEvent.model_validate(
                    {"type": "content_block_delta", "index": i, "delta": delta}))
            events.append(RawContentBlockStopEvent.model_validate(
                {"type": "content_block_stop", "index": i}))
        events.append(RawMessageDeltaEvent.model_validate({
            "type": "message_delta",
            "delta": {"stop_reason": whole["stop_reason"],
                      "stop_sequence": whole["stop_sequence"]},
            "usage": {k: usage.get(k) for k in ("input_tokens", "output_tokens",
                                                "cache_read_input_tokens",
                                                "cache_creation_input_tokens")}}))
        events.append(RawMessageStopEvent.model_validate({"type": "message_stop"}))
        return events


class _Events(Accumulator):
    """Raw stream events so far: the message, its content blocks, the final usage."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {}
        self.blocks: dict[int, dict[str, Any]] = {}
        self.partial_json: dict[int, list[str]] = {}
        self.usage: dict[str, Any] = {}
        self.output = 0
        self.chars = 0
        self.pieces = 0

    def feed(self, event: Any) -> bool:
        kind = event.type
        if kind == "message_start":
            self.message = event.message.model_dump(mode="json")
            # its output_tokens is a placeholder: only message_delta's count is final
            self.usage = {**self.message["usage"], "output_tokens": 0}
            self.input_tokens = _usage(event.message.usage)[0]
        elif kind == "content_block_start":
            self.blocks[event.index] = event.content_block.model_dump(mode="json")
        elif kind == "content_block_delta":
            block = self.blocks.setdefault(event.index, {"type": "text", "text": ""})
            d = event.delta
            text = ""
            if d.type == "text_delta":
                text = d.text
                block["text"] = block.get("text", "") + text
            elif d.type == "input_json_delta":
                text = d.partial_json
                self.partial_json.setdefault(event.index, []).append(text)
            elif d.type == "thinking_delta":
                text = d.thinking
                block["thinking"] = block.get("thinking", "") + text
            elif d.type == "signature_delta":
                block["signature"] = d.signature
            if text:
                self.chars += len(text)
                self.pieces += 1
        elif kind == "content_block_stop":
            parts = self.partial_json.pop(event.index, None)
            if parts is not None:
                self.blocks[event.index]["input"] = json.loads("".join(parts) or "{}")
        elif kind == "message_delta":
            self.message.update(stop_reason=event.delta.stop_reason,
                                stop_sequence=event.delta.stop_sequence)
            for k, v in event.usage.model_dump(mode="json").items():
                if v is not None:
                    self.usage[k] = v
            self.output = event.usage.output_tokens or 0
            self.input_tokens = _usage(_Usage(self.usage))[0]
            self.final = True
        return True

    def output_estimate(self) -> int:
        if self.final:
            return self.output
        return max(self.pieces, (self.chars + 3) // 4)

    def _json(self) -> dict[str, Any]:
        usage = dict(self.usage)
        usage["output_tokens"] = self.output_estimate()
        return {**self.message, "content": [self.blocks[i] for i in sorted(self.blocks)],
                "usage": usage}

    def result(self) -> CallResult:
        inp, _, cached = _usage(_Usage(self.usage))
        tools = any(b.get("type") == "tool_use" for b in self.blocks.values())
        return CallResult(None, inp, self.output_estimate(), cached, 0, cache=self._json(),
                          tool_calls=tools)

    def answer(self) -> Message:
        return Message.model_validate(self._json())


class _Usage:
    """Attribute access to a usage dict, for ``_usage``."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.input_tokens = d.get("input_tokens") or 0
        self.output_tokens = d.get("output_tokens") or 0
        self.cache_read_input_tokens = d.get("cache_read_input_tokens") or 0
        self.cache_creation_input_tokens = d.get("cache_creation_input_tokens") or 0


def guard_anthropic(client: anthropic.Anthropic | anthropic.AsyncAnthropic,
                    sidecar: Client | AsyncClient, **defaults: Any) -> GuardedClient:
    """``client`` with ``messages.create`` guarded by the sidecar (see
    ``sidecar.integrations``); every other attribute is the client's own."""
    is_async = isinstance(client, anthropic.AsyncAnthropic)
    if not is_async and not isinstance(client, anthropic.Anthropic):
        raise TypeError(f"guard_anthropic takes an anthropic.Anthropic or "
                        f"anthropic.AsyncAnthropic, got {type(client).__name__}")
    create, outcome = _base.make_create(AnthropicAdapter(), client,
                                        lambda c: c.messages.create, sidecar, defaults,
                                        is_async, "anthropic")
    wrapper = GuardedClient(client, messages=Delegate(client.messages, create=create))
    wrapper._outcome = outcome
    return wrapper
