"""Failures of the daemon's periodic tasks (housekeeping steps, cache snapshots, cluster
sync, the stalled-frame sweep), made visible without stopping the task or flooding the log.

A periodic task that raises must keep running: the next tick may succeed, and a dead
task fails silently (lease expiry, eviction or cache expiry simply stop). But a bug that
fails every tick must not write a traceback every second either. So each failure is
counted per task (``stats`` ``task_failures``, Prometheus
``llm_sidecar_task_failures_total``) and its traceback logged at most once a minute per
task (``sidecar.throttle``), saying how many failures the silence held back.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from .throttle import INTERVAL, ThrottledLog

log = logging.getLogger("sidecar.periodic")


class TaskFailures:
    """Failure counts by task name, and each task's throttled traceback log."""

    def __init__(self, log_every: float = INTERVAL) -> None:
        self.log_every = log_every
        self.counts: dict[str, int] = {}
        self._logs: dict[str, ThrottledLog] = {}

    def record(self, task: str, exc: BaseException, now: float | None = None) -> None:
        """Count a failure of ``task``; log its traceback unless the task logged one less
        than ``log_every`` seconds before ``now`` (default: the monotonic clock)."""
        self.counts[task] = self.counts.get(task, 0) + 1
        throttled = self._logs.get(task)
        if throttled is None:
            throttled = self._logs[task] = ThrottledLog(log, self.log_every)
        throttled.error("periodic task %s failed (%d failures since start); it keeps "
                        "running", task, self.counts[task], exc_info=exc, now=now)

    @contextlib.contextmanager
    def guard(self, task: str) -> Iterator[None]:
        """``with failures.guard("name"):`` runs one step of a periodic task; an exception
        is recorded and swallowed (cancellation is not an exception: it passes)."""
        try:
            yield
        except Exception as exc:
            self.record(task, exc)
