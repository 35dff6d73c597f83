"""Redis behind a narrow interface: the cluster's scripts run by SHA, one at a time or
as a batch. The only module of the package that imports ``redis``.

Standalone Redis batches go through one non-transactional pipeline (one round trip);
Redis Cluster batches go to each key's node concurrently (a script touches the keys of
one counter, which share a hash tag). A script missing from a node (``NOSCRIPT``, after a
restart or failover) is loaded again and the call retried. Every call is bounded by
``timeout``; any failure is raised as ``StoreUnavailable`` with the reason.
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..errors import StoreUnavailable
from . import scripts

Call = tuple[str, Sequence[str], Sequence[Any]]  # (script name, keys, args)


class RedisStore:
    """The scripts of ``scripts`` on a Redis (standalone or cluster) at ``url``."""

    NAMES = ("acquire", "report", "adjust", "heartbeat", "leave")

    def __init__(self, url: str, *, cluster: bool, timeout: float) -> None:
        self.url = url
        self.cluster = cluster
        self.timeout = timeout
        # No retries inside redis-py (its default retries for seconds): a failed call is
        # the cluster's signal to go degraded, and its next heartbeat is the retry.
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout,
                       decode_responses=True, retry=Retry(NoBackoff(), 0))
        if cluster:
            self.client: Any = RedisCluster.from_url(url, **options)
        else:
            self.client = aioredis.from_url(url, retry_on_timeout=False, **options)
        self._scripts = {name: self.client.register_script(getattr(scripts, name.upper()))
                         for name in self.NAMES}

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await asyncio.wait_for(
                self._scripts[name](keys=list(keys), args=list(args)), self.timeout * 2)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def batch(self, calls: Sequence[Call]) -> list[Any]:
        """Every call of ``calls``, results in order (pipelined where Redis allows)."""
        if not calls:
            return []
        try:
            if self.cluster:
                return await asyncio.wait_for(asyncio.gather(*(
                    self._scripts[name](keys=list(keys), args=list(args))
                    for name, keys, args in calls)), self.timeout * 4)
            pipe = self.client.pipeline(transaction=False)
            for name, keys, args in calls:
                await self._scripts[name](keys=list(keys), args=list(args), client=pipe)
            return await asyncio.wait_for(pipe.execute(), self.timeout * 4)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def close(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
