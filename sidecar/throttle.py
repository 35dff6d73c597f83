"""A log line at most once an interval: for a broken sink (a full disk, a dead webhook)
that fails every time, one line a minute says so and counts what it held back, and the
component's own counters (in ``stats``) carry the totals."""
from __future__ import annotations

import logging
import time

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
