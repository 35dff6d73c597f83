"""Sharing this daemon's limits with the cluster: which rules are shared, the amounts
the engine enforces while Redis answers or not, and the cluster's say on an admit (taken
from this daemon's leases, or asked of Redis), a refusal releasing the engine's lease.

``ClusterOps`` is one part of ``Handlers``, which mixes it in and owns the cluster and
the engine; the admits that ask it are in ``limits`` and ``calls``.
"""
from __future__ import annotations

import functools
import time
from typing import Awaitable

from ...cluster.quota import Policy, Refusal, Shared
from ...config import Config
from ...limits.engine import NEED_AT, Decision, Denial, Kind, shape_of, compile_rules


class ClusterOps:
    """Which rules the cluster shares and its say on admits; mixed into ``Handlers``,
    whose attributes these methods use."""

    def _configure_cluster(self, config: Config) -> None:
        """Tell the cluster which rules it shares: every non-shadow sliding or calendar
        rule (per-request caps and concurrency stay per daemon)."""
        assert self.cluster is not None
        policies = {row.name: row.degraded or config.cluster.degraded
                    for row in config.limits.rules}
        shared = []
        for i, r in enumerate(self.engine.rules):
            if r.shadow or r.kind not in (Kind.SLIDING, Kind.HOUR, Kind.DAY):
                continue
            sliding = r.kind is Kind.SLIDING
            shared.append(Shared(
                index=i, name=r.name, shape=shape_of(r), sliding=sliding,
                span=r.span / r.buckets if sliding else 0.0, buckets=r.buckets,
                amount=r.amount, need_at=NEED_AT[r.metric],
                policy=Policy(policies[r.name]),
                period=None if sliding else functools.partial(self.engine.period, r.kind)))
        self.cluster.configure(shared)
        self._cluster_mode(self.cluster.degraded)

    def _cluster_mode(self, degraded: bool) -> None:
        """Each shared rule's amount in the engine: the full amount while Redis answers
        (the cluster's leases decide), the degraded policy's while it does not."""
        cluster = self.cluster
        assert cluster is not None
        rules = compile_rules(self.config.limits)
        if degraded:
            rules = [r._replace(amount=cluster.share(cluster.rules[i]))
                     if i in cluster.rules and cluster.rules[i].policy is Policy.LOCAL_SHARE
                     else r for i, r in enumerate(rules)]
        self.engine.reconfigure(rules, **self._engine_settings(self.config))
        self.engine.track([i in cluster.rules for i in range(len(rules))])

    def _share(self, decision: Decision,
               now: float) -> Denial | Awaitable[Denial | None] | None:
        """The cluster's say on an admitted ``decision``: None (agreed from this
        daemon's leases), a Denial (refused; the engine's reservation is released), or
        an awaitable of either (Redis must be asked first)."""
        assert self.cluster is not None
        took = self.cluster.take(decision.lease, decision.tracked, now)
        if took is None:
            return None
        if isinstance(took, Refusal):
            return self._refused(decision, took)
        return self._share_after(decision, took, now)

    async def _share_after(self, decision: Decision, short: list,
                           now: float) -> Denial | None:
        assert self.cluster is not None
        refusal = None
        for _ in range(16):  # leases spent meanwhile by concurrent admits: ask again
            refusal = await self.cluster.acquire(short, now)
            if refusal is not None:
                break
            now = time.time()
            took = self.cluster.take(decision.lease, decision.tracked, now)
            if took is None:
                return None
            if isinstance(took, Refusal):
                refusal = took
                break
            short = took
        if refusal is None:  # concurrent admits kept winning: try again shortly
            rule = short[0][0].rule
            refusal = Refusal(rule.name, 0, rule.amount, 0.01, "busy")
        return self._refused(decision, refusal)

    def _refused(self, decision: Decision, refusal: Refusal) -> Denial:
        self.engine.release(decision.lease, time.time())
        self._wake_waiters()
        self.denials[refusal.limit] = self.denials.get(refusal.limit, 0) + 1
        self.accounting.limit_denial(refusal.reason, refusal.limit)
        return Denial(refusal.limit, refusal.reason, refusal.used, refusal.amount,
                      refusal.retry_after)
