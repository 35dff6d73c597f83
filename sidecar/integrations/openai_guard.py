"""The OpenAI SDK's shapes for the drop-in guard: ``chat.completions.create`` requests as
guard fields, ``ChatCompletion`` usage and tool calls, streamed chunks accumulated into
the non-streamed answer, and cached answers replayed as ``ChatCompletionChunk`` objects."""
from __future__ import annotations

from typing import Any

import openai
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ..client.aio import AsyncClient
from ..client.sync import Client
from ..client.guard import CallResult
from . import _base
from ._base import FALLBACK_ID, Accumulator, Adapter, Delegate, GuardedClient

#: request keywords with a guard field of their own
_TAKEN = frozenset({"model", "messages", "temperature", "tools", "response_format"})


def _usage(usage: Any) -> tuple[int, int, int, int]:
    """(input incl. cached, output incl. reasoning, cached input, reasoning) of a usage."""
    if usage is None:
        return 0, 0, 0, 0
    prompt = getattr(usage, "prompt_tokens_details", None)
    completion = getattr(usage, "completion_tokens_details", None)
    return (usage.prompt_tokens or 0, usage.completion_tokens or 0,
            (getattr(prompt, "cached_tokens", 0) or 0) if prompt else 0,
            (getattr(completion, "reasoning_tokens", 0) or 0) if completion else 0)


class OpenAIAdapter(Adapter):
    provider = "openai"

    def fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        fields: dict[str, Any] = {"model": kwargs.get("model", ""),
                                  "messages": _base.plain(list(kwargs.get("messages", ())))}
        max_tokens = kwargs.get("max_completion_tokens", kwargs.get("max_tokens"))
        if max_tokens is not None:
            fields["max_tokens"] = max_tokens
        for name in ("temperature", "tools", "response_format"):
            if kwargs.get(name) is not None:
                fields[name] = _base.plain(kwargs[name])
        params = _base.sampling_params(kwargs, _TAKEN)
        if params:
            fields["params"] = params
        return fields

    def result(self, response: ChatCompletion) -> CallResult:
        inp, out, cached, reasoning = _usage(response.usage)
        return CallResult(response, inp, out, cached, reasoning,
                          cache=response.model_dump(mode="json"),
                          tool_calls=any(c.message.tool_calls for c in response.choices))

    def answer(self, value: Any, kwargs: dict[str, Any]) -> ChatCompletion:
        if isinstance(value, dict):
            return ChatCompletion.model_validate(value)
        return ChatCompletion.model_validate({  # a route's static fallback text
            "id": FALLBACK_ID, "object": "chat.completion", "created": 0,
            "model": kwargs.get("model", ""),
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": str(value)}}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

    def stream_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        options = dict(kwargs.get("stream_options") or {})
        wants = bool(options.get("include_usage"))
        options["include_usage"] = True  # the final chunk's usage is what gets settled
        return {**kwargs, "stream_options": options}, wants

    def accumulator(self, wants_usage: bool) -> Accumulator:
        return _Chunks(wants_usage)

    def replay(self, response: ChatCompletion, wants_usage: bool) -> list[ChatCompletionChunk]:
        head = {"id": response.id, "object": "chat.completion.chunk",
                "created": response.created, "model": response.model,
                "system_fingerprint": response.system_fingerprint}
        chunks: list[dict[str, Any]] = []

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> None:
            chunks.append({**head, "choices": [{"index": index, "delta": delta,
                                                "logprobs": None, "finish_reason": finish}]})

        for choice in response.choices:
            msg = choice.message
            chunk(choice.index, {"role": "assistant", "content": ""})
            if msg.content:
                chunk(choice.index, {"content": msg.content})
            if msg.refusal:
                chunk(choice.index, {"refusal": msg.refusal})
            if msg.tool_calls:
                chunk(choice.index, {"tool_calls": [
                    {"index": i, **tc.model_dump(mode="json")}
                    for i, tc in enumerate(msg.tool_calls)]})
            chunk(choice.index, {}, choice.finish_reason)
        if wants_usage and response.usage is not None:
            chunks.append({**head, "choices": [],
                           "usage": response.usage.model_dump(mode="json")})
        return [ChatCompletionChunk.model_validate(c) for c in chunks]


class _Chunks(Accumulator):
    """``ChatCompletionChunk``s so far: per choice its text, refusal and tool calls."""

    def __init__(self, wants_usage: bool) -> None:
        self.wants_usage = wants_usage
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: Any = None
        self.chars = 0
        self.pieces = 0

    def feed(self, chunk: ChatCompletionChunk) -> bool:
        if not self.head:
            self.head = {"id": chunk.id, "created": chunk.created, "model": chunk.model,
                         "system_fingerprint": chunk.system_fingerprint}
        if chunk.usage is not None:
            self.usage = chunk.usage
            self.input_tokens = chunk.usage.prompt_tokens or 0
            self.final = True
        for c in chunk.choices:
            st = self.choices.setdefault(c.index, {"content": [], "refusal": [], "tools": {},
                                                   "finish_reason": None})
            d = c.delta
            for name in ("content", "refusal"):
                text = getattr(d, name, None)
                if text:
                    st[name].append(text)
                    self.chars += len(text)
                    self.pieces += 1
            for tc in d.tool_calls or ():
                t = st["tools"].setdefault(tc.index, {"id": "", "type": "function",
                                                      "function": {"name": "",
                                                                   "arguments": ""}})
                if tc.id:
                    t["id"] = tc.id
                if tc.function is not None:
                    t["function"]["name"] += tc.function.name or ""
                    args = tc.function.arguments or ""
                    t["function"]["arguments"] += args
                    self.chars += len(args)
                    self.pieces += 1
            if c.finish_reason:
                st["finish_reason"] = c.finish_reason
        # the usage chunk the guard asked for is not shown to an app that did not
        return self.wants_usage or bool(chunk.choices) or chunk.usage is None

    def output_estimate(self) -> int:
        if self.usage is not None:
            return self.usage.completion_tokens or 0
        # one chunk is about one token; long chunks count four characters a token
        return max(self.pieces, (self.chars + 3) // 4)

    def _json(self) -> dict[str, Any]:
        choices = []
        for index in sorted(self.choices):
            st = self.choices[index]
            message: dict[str, Any] = {"role": "assistant",
                                       "content": "".join(st["content"]) or None,
                                       "refusal": "".join(st["refusal"]) or None}
            if st["tools"]:
                message["tool_calls"] = [st["tools"][i] for i in sorted(st["tools"])]
            choices.append({"index": index, "finish_reason": st["finish_reason"] or "stop",
                            "logprobs": None, "message": message})
        inp, out, _, _ = _usage(self.usage)
        if self.usage is not None:
            usage = self.usage.model_dump(mode="json")
        else:
            out = self.output_estimate()
            usage = {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}
        return {**self.head, "object": "chat.completion", "choices": choices, "usage": usage}

    def result(self) -> CallResult:
        inp, out, cached, reasoning = _usage(self.usage)
        tools = any(st["tools"] for st in self.choices.values())
        return CallResult(None, inp, out, cached, reasoning, cache=self._json(),
                          tool_calls=tools)

    def answer(self) -> ChatCompletion:
        return ChatCompletion.model_validate(self._json())


def guard_openai(client: openai.OpenAI | openai.AsyncOpenAI, sidecar: Client | AsyncClient,
                 **defaults: Any) -> GuardedClient:
    """``client`` with ``chat.completions.create`` guarded by the sidecar (see
    ``sidecar.integrations``); every other attribute is the client's own."""
    is_async = isinstance(client, openai.AsyncOpenAI)
    if not is_async and not isinstance(client, openai.OpenAI):
        raise TypeError(f"guard_openai takes an openai.OpenAI or openai.AsyncOpenAI, "
                        f"got {type(client).__name__}")
    create, outcome = _base.make_create(OpenAIAdapter(), client,
                                        lambda c: c.chat.completions.create, sidecar,
                                        defaults, is_async, "openai")
    completions = Delegate(client.chat.completions, create=create)
    wrapper = GuardedClient(client, chat=Delegate(client.chat, completions=completions))
    wrapper._outcome = outcome
    return wrapper
