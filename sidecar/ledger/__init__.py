"""The ledger: what calls did and cost. The request log (one JSON line per call), the
cost tracker (hour rows by user, model, route), Prometheus metrics, alerts and their
delivery, and ``accounting``, which turns each begin/end into all of them."""
from __future__ import annotations

from .requestlog import RequestLog, RequestLogStats

__all__ = ["RequestLog", "RequestLogStats"]
