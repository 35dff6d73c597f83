"""The daemon's own failures, made visible without flooding the log.

A broken sink (a full disk, a dead webhook) fails every time: ``ThrottledLog`` writes one
line a minute saying so and counting what it held back, while the component's own
counters (in ``stats``) carry the totals. A periodic task (housekeeping steps, cache
snapshots, cluster sync, the stalled-frame sweep) that raises must keep running: the next
tick may succeed, and a dead task fails silently (lease expiry, eviction or cache expiry
simply stop). But a bug that fails every tick must not write a traceback every second
either: ``TaskFailures`` counts each failure per task (``stats`` ``task_failures``,
Prometheus ``llm_sidecar_task_failures_total``) and logs its traceback at most once a
minute per task, saying how many failures the silence held back.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

#: Seconds between two lines of one throttled log.
INTERVAL = 60.0


class ThrottledLog:
    """``error`` logs at most once per ``interval`` seconds (monotonic clock)."""

    __slots__ = ("logger", "interval", "_next", "_held")

    def __init__(self, logger: logging.Logger, interval: float = INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self._next = 0.0
        self._held = 0  # lines held back since the last one logged

    def error(self, message: str, *args: object, exc_info: BaseException | None = None,
              now: float | None = None) -> None:
        """Log ``message % args`` (with ``exc_info``'s traceback), with how many were held
        back before it, unless a line went out less than ``interval`` seconds before
        ``now`` (default: the monotonic clock)."""
        if now is None:
            now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        self._next = now + self.interval
        held, self._held = self._held, 0
        self.logger.error(message + " (%d more since the last report; next report in "
                          "%.0f s at the earliest)", *args, held, self.interval,
                          exc_info=exc_info)


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
