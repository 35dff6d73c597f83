"""The guarded call, client side: begin, the provider calls with fallbacks, end.

``run``/``arun`` (behind ``Client.guarded`` / ``AsyncClient.guarded``) wrap any provider
call: ``call(model, timeout)`` gets a ``protocol.ChainModel`` and the seconds it may take,
and returns a ``CallResult`` (what to give the app, the usage, what to cache). The policy:

- ``begin`` first: a cached answer returns at once (no provider touched); a denial raises
  ``Denied`` (no provider touched);
- then the chain in order: a failed attempt moves on to the next model, after a pause
  drawn uniformly below the route's back-off bound for that retry ("full jitter");
  every attempt and pause fits in the one deadline of the call, and at most
  ``max_attempts`` calls are made; a model that answered with Retry-After is not called
  again before it passes; a permanent error (a 4xx other than 408/409/429) rules that
  model out for the call; the chain starts over when it runs out and attempts remain;
- ``end`` reports every attempt (circuit breakers), settles the usage of the answer and
  stores it in the cache;
- when every attempt failed: a stale cached answer (flagged), else the route's static
  fallback (flagged), else ``AllAttemptsFailed`` naming every attempt.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

from ..errors import AllAttemptsFailed, Denied
from ..wire import Attempt, BeginReply, CacheGetReply, ChainModel, EndReply


class GuardClient(Protocol):
    """What ``run`` needs of a blocking client (``Client``, or a view of one): the guard
    depends on these three calls, not on a client class."""

    def begin(self, **fields: Any) -> BeginReply: ...

    def end(self, lease: str, **fields: Any) -> EndReply: ...

    def cache_get(self, **fields: Any) -> CacheGetReply: ...


class AsyncGuardClient(Protocol):
    """``GuardClient`` for ``arun``: the same calls as coroutines (``AsyncClient``)."""

    async def begin(self, **fields: Any) -> BeginReply: ...

    async def end(self, lease: str, **fields: Any) -> EndReply: ...

    async def cache_get(self, **fields: Any) -> CacheGetReply: ...


class CallResult(NamedTuple):
    """What one successful provider call gives back."""

    value: Any  # returned to the app as is
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache: Any = None  # msgpack-encodable answer to cache; None: store nothing
    error: bool = False  # an answer that is an error: never cached
    tool_calls: bool = False  # an answer that calls tools: never cached


class Guarded(NamedTuple):
    """The outcome of a guarded call."""

    value: Any  # the provider's answer, or the cached / fallback one
    source: str  # "provider", "cache", "stale" or "static"
    model: str  # the model that answered ("" from the cache)
    attempts: tuple[Attempt, ...]
    usd: float  # what the provider call cost
    tier: str = ""  # cache tier of a hit
    similarity: float = 0.0


class Failure(NamedTuple):
    retryable: bool  # the same model may be tried again
    status: int
    retry_after: float
    error: str


def _retry_after(headers: Any) -> float:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), 0 if none."""
    if headers is None:
        return 0.0
    try:
        value = headers.get("retry-after") or headers.get("Retry-After")
    except AttributeError:
        return 0.0
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time()) if when else 0.0


def classify(exc: BaseException) -> Failure:
    """What a provider exception means for the guard: SDK status errors (``status_code``,
    ``response.headers``), timeouts and connection errors are understood."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None) or getattr(response, "status_code", 0) or 0
    if not isinstance(status, int):
        status = 0
    name = type(exc).__name__
    error = f"{name}: {exc}"[:300]
    retry_after = _retry_after(getattr(response, "headers", None))
    if status:
        return Failure(status in (408, 409, 429) or status >= 500, status, retry_after, error)
    return Failure(True, 0, retry_after, error)  # timeouts, resets, malformed answers


class Plan:
    """The attempt loop's state: which model next, after which pause, with which timeout.
    Shared by ``run``, ``arun`` and the SDK integrations' streamed calls."""

    def __init__(self, b: BeginReply, rng: random.Random) -> None:
        self.begin = b
        self.chain = list(b.chain)
        self.deadline = time.monotonic() + b.deadline
        self.attempts: list[Attempt] = []
        self.ruled_out: set[str] = set()
        self.not_before: dict[str, float] = {}
        self.next = 0
        self.rng = rng
        self.started = 0.0  # when the current attempt began

    def pick(self) -> tuple[ChainModel, float] | None:
        """The next model and how long to wait for it first; None when done."""
        if len(self.attempts) >= self.begin.max_attempts:
            return None
        now = time.monotonic()
        if now >= self.deadline:
            return None
        n = len(self.chain)
        order = [self.chain[(self.next + i) % n] for i in range(n)]
        usable = [m for m in order if m.model not in self.ruled_out]
        if not usable:
            return None
        ready = [m for m in usable if self.not_before.get(m.model, 0.0) <= now]
        if ready:
            return ready[0], 0.0
        soonest = min(usable, key=lambda m: self.not_before[m.model])
        wait = self.not_before[soonest.model] - now
        return (soonest, wait) if now + wait < self.deadline else None

    def pause(self) -> float:
        """Full jitter below the back-off bound of this retry, within the deadline."""
        if not self.attempts or not self.begin.backoff:
            return 0.0
        bound = self.begin.backoff[min(len(self.attempts) - 1, len(self.begin.backoff) - 1)]
        return min(self.rng.uniform(0.0, bound), max(0.0, self.deadline - time.monotonic()))

    def timeout(self, model: ChainModel) -> float:
        return max(0.001, min(model.timeout, self.deadline - time.monotonic()))

    def _begin_try(self, picked: tuple[ChainModel, float] | None
                   ) -> tuple[ChainModel, float] | None:
        if picked is None or time.monotonic() >= self.deadline:
            return None
        self.started = time.monotonic()
        return picked[0], self.timeout(picked[0])

    def next_try(self) -> tuple[ChainModel, float] | None:
        """The next attempt's ``(model, timeout)`` after its pause, or None when the
        plan is done. Report each attempt with ``failed`` or ``succeeded``."""
        picked = self.pick()
        if picked is not None:
            wait = max(picked[1], self.pause())
            if wait > 0.0:  # sleep(0) would still hand the GIL away: ~60 us per call
                time.sleep(wait)
        return self._begin_try(picked)

    async def anext_try(self) -> tuple[ChainModel, float] | None:
        """``next_try`` pausing with ``asyncio.sleep``."""
        picked = self.pick()
        if picked is not None:
            wait = max(picked[1], self.pause())
            if wait > 0.0:  # sleep(0) would still go round the event loop once
                await asyncio.sleep(wait)
        return self._begin_try(picked)

    def failed(self, model: ChainModel, exc: BaseException,
               classify_: Callable[[BaseException], Failure] = classify) -> None:
        f = classify_(exc)
        latency = time.monotonic() - self.started
        self.attempts.append(Attempt(model=model.model, ok=False, status=f.status,
                                     error=f.error, retry_after=f.retry_after, latency=latency))
        if not f.retryable:
            self.ruled_out.add(model.model)
        if f.retry_after:
            self.not_before[model.model] = time.monotonic() + f.retry_after
        self.next = (self.chain.index(model) + 1) % len(self.chain)

    def succeeded(self, model: ChainModel) -> None:
        self.attempts.append(Attempt(model=model.model, ok=True,
                                     latency=time.monotonic() - self.started))


def _end_fields(result: CallResult | None, model: str) -> dict[str, Any]:
    if result is None:
        return {}
    fields: dict[str, Any] = dict(
        model=model, input_tokens=result.input_tokens, output_tokens=result.output_tokens,
        cached_input_tokens=result.cached_input_tokens,
        reasoning_tokens=result.reasoning_tokens, error=result.error,
        tool_calls=result.tool_calls)
    if result.cache is not None:
        fields["response"] = result.cache
    return fields


def from_cache(b: BeginReply) -> Guarded:
    """The outcome of a ``begin`` answered from the cache."""
    return Guarded(b.value(), "stale" if b.stale else "cache", "", (), 0.0, b.tier,
                   b.similarity)


def cache_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The begin fields a stale lookup takes (the cache's view of the request)."""
    keep = ("namespace", "model", "messages", "text", "temperature", "params", "tools",
            "response_format", "vector")
    out = {k: v for k, v in fields.items() if k in keep}
    if not out.get("model"):
        out["model"] = f"route:{fields.get('route') or fields.get('task') or '-'}"
    return out


def run(client: GuardClient, call: Callable[[ChainModel, float], CallResult], *,
        classify_: Callable[[BaseException], Failure] = classify,
        rng: random.Random | None = None, **fields: Any) -> Guarded:
    """The blocking guarded call (see the module docstring)."""
    b = client.begin(**fields)
    if b.outcome == "hit":
        return from_cache(b)
    if b.outcome == "deny":
        if b.reason != "no_model":
            raise Denied(b.reason, b.limit, b.retry_after)
        return fallback_or_raise(client.cache_get(allow_stale=True, **cache_fields(fields)),
                                  b, [])
    plan = Plan(b, rng or random.Random())
    while (tried := plan.next_try()) is not None:
        model, timeout = tried
        try:
            result = call(model, timeout)
        except Exception as exc:  # every provider failure is an attempt to report
            plan.failed(model, exc, classify_)
            continue
        plan.succeeded(model)
        done = client.end(b.lease, attempts=plan.attempts, **_end_fields(result, model.model))
        return Guarded(result.value, "provider", model.model, tuple(plan.attempts), done.usd)
    client.end(b.lease, attempts=plan.attempts)
    stale = client.cache_get(allow_stale=True, **cache_fields(fields))
    return fallback_or_raise(stale, b, plan.attempts)


async def arun(client: AsyncGuardClient,
               call: Callable[[ChainModel, float], Awaitable[CallResult]], *,
               classify_: Callable[[BaseException], Failure] = classify,
               rng: random.Random | None = None, **fields: Any) -> Guarded:
    """``run`` for asyncio: ``call`` is a coroutine function."""
    b = await client.begin(**fields)
    if b.outcome == "hit":
        return from_cache(b)
    if b.outcome == "deny":
        if b.reason != "no_model":
            raise Denied(b.reason, b.limit, b.retry_after)
        stale = await client.cache_get(allow_stale=True, **cache_fields(fields))
        return fallback_or_raise(stale, b, [])
    plan = Plan(b, rng or random.Random())
    while (tried := await plan.anext_try()) is not None:
        model, timeout = tried
        try:
            result = await asyncio.wait_for(call(model, timeout), timeout + 0.5)
        except Exception as exc:  # every provider failure is an attempt to report
            plan.failed(model, exc, classify_)
            continue
        plan.succeeded(model)
        done = await client.end(b.lease, attempts=plan.attempts,
                                **_end_fields(result, model.model))
        return Guarded(result.value, "provider", model.model, tuple(plan.attempts), done.usd)
    await client.end(b.lease, attempts=plan.attempts)
    stale = await client.cache_get(allow_stale=True, **cache_fields(fields))
    return fallback_or_raise(stale, b, plan.attempts)


def fallback_or_raise(stale: Any, b: BeginReply, attempts: list[Attempt]) -> Guarded:
    """When no provider answered (every attempt failed, or every circuit is open): a
    stale cached answer, the route's static fallback, or raise. (A limit's denial is
    raised before: serving cached answers past a limit would be spending for free.)"""
    if stale.hit:
        return Guarded(stale.value(), "stale", "", tuple(attempts), 0.0, stale.tier,
                       stale.similarity)
    if b.static_fallback:
        return Guarded(b.static_fallback, "static", "", tuple(attempts), 0.0)
    if b.outcome == "deny":
        raise Denied(b.reason, b.limit, b.retry_after)
    raise AllAttemptsFailed(list(attempts))
