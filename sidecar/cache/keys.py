"""Request keys, what identifies a cached answer: a request's exact key is the XXH3-128
(under the normalisation spec's seed) of a canonical msgpack encoding of everything that
shapes the answer: namespace, model, temperature and the other sampling parameters, tools,
response format, and every message's role and content, each text normalised by
``native/normalize``; so "Please, what is 2+2?" and "what is 2+2" share a key, while
another model, temperature, system prompt or tool set never does. The scope key (the same
without the last user turn) groups the entries a semantic search may compare.
"""
from __future__ import annotations

from typing import Callable

import msgspec

from ..errors import InvalidValue
from ..text.normalize import Normalizer
from ..wire import CacheRequest

#: Sorted map keys make the encoding canonical: {"a": 1, "b": 2} == {"b": 2, "a": 1}.
_CANONICAL = msgspec.msgpack.Encoder(order="sorted")


class RequestKey:
    """The keys of a request: ``key`` (16 bytes, the exact tier's) and, computed when
    first asked for, ``scope`` (16 bytes: all of the key but the last user turn, which a
    paraphrase of that turn must share to be served the same answer)."""

    __slots__ = ("key", "query", "user_turns", "tool_turns", "_scope", "_scope_of")

    def __init__(self, key: bytes, query: str, user_turns: int, tool_turns: bool,
                 scope_of: Callable[[], bytes]) -> None:
        self.key = key
        self.query = query  # the last user turn as sent ("" if none)
        self.user_turns = user_turns
        self.tool_turns = tool_turns  # a tool result or an assistant tool call is in the chat
        self._scope: bytes | None = None
        self._scope_of = scope_of

    @property
    def scope(self) -> bytes:
        if self._scope is None:
            self._scope = self._scope_of()
        return self._scope


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: the text ones, in order
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type", "text") == "text")
    return ""


def request_key(normalizer: Normalizer, req: CacheRequest) -> RequestKey:
    """The keys of ``req`` under ``normalizer``'s spec."""
    if req.messages is not None and req.text is not None:
        raise InvalidValue("give messages or text, not both")
    norm = normalizer.normalize
    shape = [req.namespace, req.model, req.temperature, req.params, req.tools,
             req.response_format]
    if req.messages is None:  # one user turn (or none): the common case, kept short
        if (req.text is not None and not req.params and req.tools is None
                and req.response_format is None):  # the same bytes hashed, natively
            key = normalizer.text_key(req.namespace, req.model, req.temperature, req.text)
        else:
            turns = [] if req.text is None else [("user", norm(req.text), None, None, None)]
            key = normalizer.key_of(_CANONICAL.encode(["exact", *shape, turns]))
        return RequestKey(key, req.text or "", int(req.text is not None), False,
                          lambda: normalizer.key_of(_CANONICAL.encode(["scope", *shape, []])))
    messages = req.messages
    turns = []
    context = []  # every turn but the last user turn: what a paraphrase must share
    query = ""
    user_turns = 0
    tool_turns = False
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for m in messages:
        content = m.content
        if isinstance(content, list):
            # text parts normalised; other parts (images, ...) kept as sent
            content = [dict(p, text=norm(str(p["text"]))) if isinstance(p, dict) and "text" in p
                       else p for p in content]
        elif isinstance(content, str):
            content = norm(content)
        row = (m.role, content, m.name, m.tool_call_id, m.tool_calls)
        if len(turns) != last_user:
            context.append(row)
        turns.append(row)
        if m.role == "user":
            user_turns += 1
            query = _text_of(m.content)
        if m.role == "tool" or m.tool_calls:
            tool_turns = True
    key = normalizer.key_of(_CANONICAL.encode(["exact", *shape, turns]))
    return RequestKey(key, query, user_turns, tool_turns, lambda: normalizer.key_of(
        _CANONICAL.encode(["scope", *shape, context])))
