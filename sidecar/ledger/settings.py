"""Settings of the ledger: ``[ledger]`` (request log, cost rows) and ``[alerts]``."""
from __future__ import annotations

from typing import Annotated

import msgspec

from ..settings import Section


class LedgerConfig(Section):
    """The request log (JSON lines, size-rotated) and the cost tracker."""

    #: a file path, "" for the state directory, or "off"
    request_log: str = ""
    max_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 64 * 1024 * 1024  # per file
    keep: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 5  # rotated files kept
    queue: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10_000  # records waiting
    retention_days: Annotated[int, msgspec.Meta(ge=2, le=400)] = 8  # cost rows by hour
    max_rows: Annotated[int, msgspec.Meta(ge=1000)] = 500_000  # then new users fold


class AlertsConfig(Section):
    """Thresholds of ``sidecar.ledger.alerts`` and where alerts are sent besides the log."""

    cost_increase: Annotated[float, msgspec.Meta(ge=0)] = 0.2  # day over day; 0: off
    min_requests: Annotated[int, msgspec.Meta(ge=1)] = 20  # calls on each day compared
    zero_price: bool = True
    free_models: tuple[str, ...] = ()  # glob patterns meant to cost $0
    error_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # per model; 0: off
    error_window: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0
    error_min_calls: Annotated[int, msgspec.Meta(ge=1)] = 20
    repeat: Annotated[float, msgspec.Meta(ge=0)] = 3600.0  # zero-price alerts per model
    command: tuple[str, ...] = ()  # argv; gets each alert as a JSON line on stdin
    webhook: str = ""  # an http(s) URL; each alert is POSTed as JSON
    notify_timeout: Annotated[float, msgspec.Meta(gt=0, le=300)] = 5.0
