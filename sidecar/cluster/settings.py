"""Settings of cluster mode: ``[cluster]``."""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from ..settings import Section


class ClusterConfig(Section):
    """Several daemons sharing limits and budgets through Redis (``sidecar.cluster``)."""

    redis_url: str = ""  # "" = standalone; redis://[:password@]host:port/db, rediss://...
    redis_cluster: bool = False  # the URL names a node of a Redis Cluster
    name: str = "default"  # daemons with the same name (and Redis) share their limits
    timeout: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.05  # seconds per Redis call
    degraded: Literal["local_share", "fail_open", "fail_closed"] = "local_share"
    margin: Annotated[float, msgspec.Meta(ge=0, lt=1)] = 0.1  # local_share keeps this back
    expected_daemons: Annotated[int, msgspec.Meta(ge=1)] = 1  # before Redis was ever seen
    heartbeat: Annotated[float, msgspec.Meta(gt=0, le=60)] = 1.0  # seconds
    lease_ttl: Annotated[float, msgspec.Meta(gt=0, le=600)] = 5.0  # unreported lease lives
    divisor: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 4  # lease = remaining/(this x live)
