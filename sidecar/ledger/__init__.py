"""Accounting: the request log and the cost tracker."""
from __future__ import annotations

from .requestlog import RequestLog, RequestLogStats

__all__ = ["RequestLog", "RequestLogStats"]
