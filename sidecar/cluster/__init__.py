"""Cluster mode: several daemons share limits and budgets through Redis, exactly, and
keep deciding when Redis fails.

``quota`` holds the logic (leases on shared counters, adjustments, membership, degraded
mode), ``scripts`` the Lua it runs in Redis, ``store`` the Redis client (the only module
here, and in the daemon, that imports ``redis``). Without ``cluster.redis_url`` the store
is never loaded (nor is ``redis``) and the daemon runs standalone.
"""
from .quota import Cluster, Policy, Refusal, Shared

__all__ = ["Cluster", "Policy", "Refusal", "Shared"]
