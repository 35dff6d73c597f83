"""The SDK-independent half of the drop-in guards: the guarded ``create``, streams.

A provider module (``openai_guard``, ``anthropic_guard``) supplies an ``Adapter``: how a
request becomes guard fields, how a response becomes a ``CallResult``, how a cached or
fallback answer becomes the SDK's own type, and how a stream is accumulated and replayed.
This module runs the policy of ``sidecar.client.guard`` around the SDK call, blocking or asyncio;
streamed calls get the same policy up to their first chunk and then grow their lease with
``extend`` as the answer outgrows the reserved output.
"""
from __future__ import annotations

import abc

import asyncio
import contextvars
import random
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import msgspec

from ..client import guard
from ..client.aio import AsyncClient
from ..client.sync import Client
from ..errors import BudgetExhausted, Denied, SidecarError
from ..client.guard import CallResult, Guarded
from ..wire import Attempt, BeginReply

#: a stream extends its lease each time its output passes the reservation by this much
EXTEND_STEP = 64
#: the ``id`` of an answer made from a route's static fallback text
FALLBACK_ID = "sidecar-fallback-static"
#: request keywords that change nothing in the answer: never part of the cache identity
_NOT_SEMANTIC = frozenset({"stream", "stream_options", "timeout", "extra_headers",
                           "extra_query", "extra_body", "user", "metadata", "store"})


def given(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords actually given (the SDKs' ``NOT_GIVEN``/``omit`` sentinels dropped)."""
    return {k: v for k, v in kwargs.items() if type(v).__name__ not in ("NotGiven", "Omit")}


def plain(value: Any) -> Any:
    """A request value as JSON-like data (SDK params may be pydantic models)."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def sampling_params(kwargs: dict[str, Any], taken: frozenset[str]) -> dict[str, Any]:
    """Every request keyword that shapes the answer and has no guard field of its own."""
    return {k: plain(v) for k, v in kwargs.items() if k not in taken and k not in _NOT_SEMANTIC}


class Accumulator(abc.ABC):
    """What a stream delivered so far (one per stream; provider modules subclass it)."""

    input_tokens: int = 0
    final: bool = False  # the provider's own final usage has arrived

    @abc.abstractmethod
    def feed(self, chunk: Any) -> bool:
        """Take one chunk; False: do not pass it on to the app."""

    @abc.abstractmethod
    def output_estimate(self) -> int:
        """Output tokens so far: the provider's final count once it arrived, else an
        estimate from the deltas."""

    @abc.abstractmethod
    def result(self) -> CallResult:
        """The usage so far and the assembled answer in the non-streamed JSON shape."""

    @abc.abstractmethod
    def answer(self) -> Any:
        """The assembled answer as the SDK's non-streamed response type."""


class Adapter(abc.ABC):
    """One SDK's shapes (see the module docstring); subclassed per provider."""

    provider: str = ""

    @abc.abstractmethod
    def fields(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The guard's ``begin`` fields (cache identity, output reservation) of an SDK
        call's keywords."""

    @abc.abstractmethod
    def result(self, response: Any) -> CallResult:
        """A whole SDK response as the guard's ``CallResult`` (usage, what to cache)."""

    @abc.abstractmethod
    def answer(self, value: Any, kwargs: dict[str, Any]) -> Any:
        """A cached answer (or a static fallback's text) as the SDK's response type."""

    def stream_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The SDK keywords of a streamed call, and whether the app asked for usage."""
        return kwargs, True

    @abc.abstractmethod
    def accumulator(self, wants_usage: bool) -> Accumulator:
        """A fresh accumulator for one stream of this SDK."""

    @abc.abstractmethod
    def replay(self, response: Any, wants_usage: bool) -> list[Any]:
        """A complete answer as the chunks/events the SDK's stream would yield."""


def _one_provider(b: BeginReply, provider: str) -> BeginReply:
    """``b`` with only the chain models this SDK can call."""
    chain = [m for m in b.chain if m.provider in (provider, "")]
    return b if len(chain) == len(b.chain) else msgspec.structs.replace(b, chain=chain)


def _without_route(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if k not in ("route", "task")}


def _own_model(routed: BeginReply, own: BeginReply, provider: str) -> BeginReply:
    """The request's own model's begin, keeping the route's static fallback."""
    own = _one_provider(own, provider)
    if routed.static_fallback and not own.static_fallback:
        own = msgspec.structs.replace(own, static_fallback=routed.static_fallback)
    return own


class _ProviderClient:
    """A ``Client`` whose ``begin`` keeps only the chain models this SDK can call; a route
    with none of them left (none configured, or their circuits open) gives way to the
    request's own model as a one-model chain, with the route's static fallback."""

    def __init__(self, client: Client, provider: str) -> None:
        self._client = client
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def begin(self, **fields: Any) -> BeginReply:
        b = _one_provider(self._client.begin(**fields), self._provider)
        if b.outcome == "go" and not b.chain:
            self._client.release(b.lease)
            b = _own_model(b, self._client.begin(**_without_route(fields)), self._provider)
        return b


class _AsyncProviderClient:
    """``_ProviderClient`` for an ``AsyncClient``."""

    def __init__(self, client: AsyncClient, provider: str) -> None:
        self._client = client
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def begin(self, **fields: Any) -> BeginReply:
        b = _one_provider(await self._client.begin(**fields), self._provider)
        if b.outcome == "go" and not b.chain:
            await self._client.release(b.lease)
            b = _own_model(b, await self._client.begin(**_without_route(fields)),
                           self._provider)
        return b


def _end_usage(result: CallResult, model: str, attempts: list) -> dict[str, Any]:
    return dict(attempts=attempts, model=model, input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                cached_input_tokens=result.cached_input_tokens,
                reasoning_tokens=result.reasoning_tokens, tool_calls=result.tool_calls)


def _exhausted(reply: Any, tokens: int) -> BudgetExhausted:
    return BudgetExhausted(
        f"the stream was cut after about {tokens} output tokens: limit {reply.limit!r} "
        f"ran out ({reply.used:g} of {reply.amount:g} used)"
        + ("" if reply.retry_after is None else f"; retry after {reply.retry_after:g} s"))


class GuardedStream:
    """The SDK's stream of a guarded call: iterate it (or ``with`` it) as the SDK's own.
    ``outcome`` is the call's ``Guarded`` once the stream ended (None before); a cached
    or fallback answer is replayed in the SDK's chunk types (``outcome.source`` says)."""

    def __init__(self, chunks: Iterator[Any], response: Any = None) -> None:
        self._chunks = chunks
        self._abandon: Callable[[], None] | None = None  # closed before the first chunk
        self.response = response  # the SDK stream's HTTP response (None for a replay)
        self.outcome: Guarded | None = None

    def __iter__(self) -> GuardedStream:
        return self

    def __next__(self) -> Any:
        self._abandon = None
        return next(self._chunks)

    def close(self) -> None:
        """Stop early: the SDK stream is closed and the usage so far settled."""
        abandon, self._abandon = self._abandon, None
        if abandon is not None:
            abandon()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> GuardedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGuardedStream:
    """``GuardedStream`` for the asyncio SDK clients (``async for``, ``async with``)."""

    def __init__(self, chunks: AsyncIterator[Any], response: Any = None) -> None:
        self._chunks = chunks
        self._abandon: Callable[[], Awaitable[None]] | None = None
        self.response = response
        self.outcome: Guarded | None = None

    def __aiter__(self) -> AsyncGuardedStream:
        return self

    async def __anext__(self) -> Any:
        self._abandon = None
        return await self._chunks.__anext__()

    async def close(self) -> None:
        abandon, self._abandon = self._abandon, None
        if abandon is not None:
            await abandon()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGuardedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _sync_replay(items: list[Any]) -> GuardedStream:
    return GuardedStream(iter(items))


def _async_replay(items: list[Any]) -> AsyncGuardedStream:
    return AsyncGuardedStream(_aiter(items))


class _Streamed:
    """The bookkeeping of one live stream: the extend schedule and the final settle."""

    def __init__(self, b: BeginReply, model: str, attempts: list, acc: Accumulator) -> None:
        self.b = b
        self.model = model
        self.attempts = attempts
        self.acc = acc
        self.next_extend = b.output_tokens + EXTEND_STEP

    def extend_due(self) -> int | None:
        """The output so far when it passed another step beyond the reservation."""
        if self.acc.final:
            return None
        estimate = self.acc.output_estimate()
        if estimate <= self.next_extend:
            return None
        while estimate > self.next_extend:
            self.next_extend += EXTEND_STEP
        return estimate

    def input_tokens(self) -> int:
        return self.acc.input_tokens or self.b.input_tokens

    def failed(self, exc: BaseException) -> None:
        """The answering attempt broke mid-stream: report it failed (for its circuit)."""
        f = guard.classify(exc)
        last = self.attempts[-1]
        self.attempts[-1] = Attempt(model=last.model, ok=False, status=f.status,
                                    error=f.error, retry_after=f.retry_after,
                                    latency=last.latency)

    def outcome(self, usd: float) -> Guarded:
        try:
            value = self.acc.answer()
        except ValueError:  # cut before enough arrived to make a whole answer
            value = None
        return Guarded(value, "provider", self.model, tuple(self.attempts), usd)

    def end_fields(self, complete: bool) -> dict[str, Any]:
        result = self.acc.result()
        if not self.acc.final:  # cut short: the estimate of what was received
            result = result._replace(input_tokens=self.input_tokens(),
                                     output_tokens=self.acc.output_estimate())
        fields = _end_usage(result, self.model, self.attempts)
        if complete and result.cache is not None:
            fields["response"] = result.cache
        return fields


class GuardedCreate:
    """The guarded ``create`` of one SDK resource (chat completions, messages)."""

    def __init__(self, adapter: Adapter, create: Callable[..., Any], sidecar: Client,
                 defaults: dict[str, Any], outcome: contextvars.ContextVar) -> None:
        self._adapter = adapter
        self._create = create
        self._sidecar = sidecar
        self._defaults = defaults
        self._outcome = outcome

    def _prepare(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        overrides = kwargs.pop("sidecar", None) or {}
        kwargs = given(kwargs)
        if "messages" in kwargs:  # an iterable is read twice: for the key and the SDK
            kwargs["messages"] = list(kwargs["messages"])
        kwargs.pop("timeout", None)  # each attempt's timeout is the guard's
        return kwargs, {**self._adapter.fields(kwargs), **self._defaults, **overrides}

    def _finish(self, g: Guarded, kwargs: dict[str, Any]) -> Any:
        if g.source != "provider":  # a cached answer or fallback text, as the SDK's type
            g = g._replace(value=self._adapter.answer(g.value, kwargs))
        self._outcome.set(g)
        return g.value

    def _replayed(self, g: Guarded, kwargs: dict[str, Any], wants_usage: bool,
                  wrap: Callable[[list[Any]], Any]) -> Any:
        """A cached or fallback answer as a stream of the SDK's chunks."""
        stream = wrap(self._adapter.replay(self._finish(g, kwargs), wants_usage))
        stream.outcome = self._outcome.get()
        return stream

    def __call__(self, **kwargs: Any) -> Any:
        kwargs, fields = self._prepare(kwargs)
        if kwargs.get("stream"):
            return self._stream(kwargs, fields)

        def call(model: Any, timeout: float) -> CallResult:
            return self._adapter.result(
                self._create(**{**kwargs, "model": model.model, "timeout": timeout}))

        view = _ProviderClient(self._sidecar, self._adapter.provider)
        return self._finish(guard.run(view, call, **fields), kwargs)  # type: ignore[arg-type]

    def _stream(self, kwargs: dict[str, Any], fields: dict[str, Any]) -> GuardedStream:
        skw, wants_usage = self._adapter.stream_kwargs(kwargs)
        view = _ProviderClient(self._sidecar, self._adapter.provider)
        b = view.begin(**fields)
        if b.outcome == "hit":
            return self._replayed(guard.from_cache(b), kwargs, wants_usage,
                                  _sync_replay)
        attempts: list = []
        if b.outcome == "go":
            plan = guard.Plan(b, random.Random())
            attempts = plan.attempts
            while (tried := plan.next_try()) is not None:
                model, timeout = tried
                sdk = None
                try:  # a failure before the first chunk moves on along the chain
                    sdk = self._create(**{**skw, "model": model.model, "timeout": timeout})
                    chunks = iter(sdk)
                    first = next(chunks, None)
                except Exception as exc:  # every provider failure is an attempt to report
                    if sdk is not None:
                        sdk.close()
                    plan.failed(model, exc)
                    continue
                plan.succeeded(model)
                live = _Streamed(b, model.model, plan.attempts,
                                 self._adapter.accumulator(wants_usage))
                stream = GuardedStream(iter(()), getattr(sdk, "response", None))
                stream._chunks = self._pump(live, sdk, first, chunks, stream)
                stream._abandon = lambda: self._settle(live, sdk, first, stream)
                return stream
            self._sidecar.end(b.lease, attempts=plan.attempts)
        elif b.reason != "no_model":
            raise Denied(b.reason, b.limit, b.retry_after)
        stale = self._sidecar.cache_get(allow_stale=True, **guard.cache_fields(fields))
        return self._replayed(guard.fallback_or_raise(stale, b, attempts), kwargs,
                              wants_usage, _sync_replay)

    def _pump(self, live: _Streamed, sdk: Any, first: Any, chunks: Iterator[Any],
              stream: GuardedStream) -> Iterator[Any]:
        complete = False
        try:
            chunk = first
            while chunk is not None:
                show = live.acc.feed(chunk)
                if (estimate := live.extend_due()) is not None:
                    r = self._sidecar.extend(live.b.lease, input_tokens=live.input_tokens(),
                                             output_tokens=estimate, model=live.model)
                    if not r.allowed:
                        raise _exhausted(r, estimate)
                if show:
                    yield chunk
                chunk = next(chunks, None)
            complete = True
        except SidecarError:  # a cut stream, or the daemon: not the provider's failure
            raise
        except Exception as exc:  # the provider broke mid-stream: no fallback after it
            live.failed(exc)
            raise
        finally:  # ended, cut, failed or closed early: settle what was received
            self._settle(live, sdk, None, stream, complete)

    def _settle(self, live: _Streamed, sdk: Any, unread: Any, stream: GuardedStream,
                complete: bool = False) -> None:
        """Close the SDK stream and end the lease with the usage received."""
        if unread is not None:  # the first chunk, when the app never asked for it
            live.acc.feed(unread)
        sdk.close()
        done = self._sidecar.end(live.b.lease, **live.end_fields(complete))
        stream.outcome = live.outcome(done.usd)
        self._outcome.set(stream.outcome)


class AsyncGuardedCreate(GuardedCreate):
    """``GuardedCreate`` for the asyncio SDK clients and an ``AsyncClient``."""

    _sidecar: AsyncClient  # type: ignore[assignment]

    async def __call__(self, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs, fields = self._prepare(kwargs)
        if kwargs.get("stream"):
            return await self._astream(kwargs, fields)

        async def call(model: Any, timeout: float) -> CallResult:
            return self._adapter.result(
                await self._create(**{**kwargs, "model": model.model, "timeout": timeout}))

        view = _AsyncProviderClient(self._sidecar, self._adapter.provider)
        g = await guard.arun(view, call, **fields)  # type: ignore[arg-type]
        return self._finish(g, kwargs)

    async def _astream(self, kwargs: dict[str, Any],
                       fields: dict[str, Any]) -> AsyncGuardedStream:
        skw, wants_usage = self._adapter.stream_kwargs(kwargs)
        view = _AsyncProviderClient(self._sidecar, self._adapter.provider)
        b = await view.begin(**fields)
        if b.outcome == "hit":
            return self._replayed(guard.from_cache(b), kwargs, wants_usage,
                                  _async_replay)
        attempts: list = []
        if b.outcome == "go":
            plan = guard.Plan(b, random.Random())
            attempts = plan.attempts
            while (tried := await plan.anext_try()) is not None:
                model, timeout = tried
                sdk = None
                try:  # a failure before the first chunk moves on along the chain
                    sdk = await asyncio.wait_for(
                        self._create(**{**skw, "model": model.model, "timeout": timeout}),
                        timeout + 0.5)
                    chunks = sdk.__aiter__()
                    first = await asyncio.wait_for(anext(chunks, None), timeout + 0.5)
                except Exception as exc:  # every provider failure is an attempt to report
                    if sdk is not None:
                        await sdk.close()
                    plan.failed(model, exc)
                    continue
                plan.succeeded(model)
                live = _Streamed(b, model.model, plan.attempts,
                                 self._adapter.accumulator(wants_usage))
                stream = AsyncGuardedStream(_aiter([]), getattr(sdk, "response", None))
                stream._chunks = self._apump(live, sdk, first, chunks, stream)
                stream._abandon = lambda: self._asettle(live, sdk, first, stream)
                return stream
            await self._sidecar.end(b.lease, attempts=plan.attempts)
        elif b.reason != "no_model":
            raise Denied(b.reason, b.limit, b.retry_after)
        stale = await self._sidecar.cache_get(allow_stale=True,
                                              **guard.cache_fields(fields))
        return self._replayed(guard.fallback_or_raise(stale, b, attempts), kwargs,
                              wants_usage, _async_replay)

    async def _apump(self, live: _Streamed, sdk: Any, first: Any,
                     chunks: AsyncIterator[Any], stream: AsyncGuardedStream
                     ) -> AsyncIterator[Any]:
        complete = False
        try:
            chunk = first
            while chunk is not None:
                show = live.acc.feed(chunk)
                if (estimate := live.extend_due()) is not None:
                    r = await self._sidecar.extend(live.b.lease,
                                                   input_tokens=live.input_tokens(),
                                                   output_tokens=estimate, model=live.model)
                    if not r.allowed:
                        raise _exhausted(r, estimate)
                if show:
                    yield chunk
                chunk = await anext(chunks, None)
            complete = True
        except SidecarError:  # a cut stream, or the daemon: not the provider's failure
            raise
        except Exception as exc:  # the provider broke mid-stream: no fallback after it
            live.failed(exc)
            raise
        finally:  # ended, cut, failed or closed early: settle what was received
            await self._asettle(live, sdk, None, stream, complete)

    async def _asettle(self, live: _Streamed, sdk: Any, unread: Any,
                       stream: AsyncGuardedStream, complete: bool = False) -> None:
        if unread is not None:
            live.acc.feed(unread)
        await sdk.close()
        done = await self._sidecar.end(live.b.lease, **live.end_fields(complete))
        stream.outcome = live.outcome(done.usd)
        self._outcome.set(stream.outcome)


class Delegate:
    """An SDK object with some attributes replaced; every other one is the SDK's."""

    def __init__(self, wrapped: Any, **replaced: Any) -> None:
        self._wrapped = wrapped
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)

    def __repr__(self) -> str:
        return f"<sidecar-guarded {self._wrapped!r}>"


class GuardedClient(Delegate):
    """An SDK client whose one completion endpoint goes through the sidecar.
    ``last_outcome`` is the ``Guarded`` of the last guarded call made in the current
    thread or asyncio task through this wrapper (None before the first)."""

    _outcome: contextvars.ContextVar

    @property
    def last_outcome(self) -> Guarded | None:
        return self._outcome.get()


def make_create(adapter: Adapter, client: Any, raw_create: Callable[[Any], Any],
                sidecar: Client | AsyncClient, defaults: dict[str, Any],
                is_async: bool, sdk_name: str
                ) -> tuple[GuardedCreate, contextvars.ContextVar]:
    """The guarded ``create`` over ``client.with_options(max_retries=0)``."""
    if is_async != isinstance(sidecar, AsyncClient) or not isinstance(
            sidecar, (Client, AsyncClient)):
        want = "sidecar.AsyncClient" if is_async else "sidecar.Client"
        raise TypeError(f"a {type(client).__name__} needs a {want} as its sidecar, "
                        f"got {type(sidecar).__name__}: pair blocking {sdk_name} clients "
                        "with Client and async ones with AsyncClient")
    # the guard retries and falls back itself: SDK retries would hide attempts from it
    create = raw_create(client.with_options(max_retries=0))
    outcome: contextvars.ContextVar = contextvars.ContextVar(f"sidecar_{sdk_name}",
                                                             default=None)
    kind = AsyncGuardedCreate if is_async else GuardedCreate
    return kind(adapter, create, sidecar, dict(defaults), outcome), outcome  # type: ignore[arg-type]
