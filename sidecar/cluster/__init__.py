"""Cluster mode: several daemons share limits and budgets through Redis, exactly, and
keep deciding when Redis fails.

``quota`` holds the logic (leases on shared counters, adjustments, membership, degraded
mode), ``scripts`` the Lua it runs in Redis, ``store`` the Redis client (the only module
here, and in the daemon, that imports ``redis``). Without ``cluster.redis_url`` none of
this is loaded and the daemon runs standalone.
"""
from .quota import Cluster, Policy, Refusal, Shared
from .store import RedisStore, StoreUnavailable

__all__ = ["Cluster", "Policy", "RedisStore", "Refusal", "Shared", "StoreUnavailable"]
