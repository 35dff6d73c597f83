"""The cost tracker: spend, tokens and cache savings by hour, model, user and route.

Every guarded request adds to one row keyed by ``(hour, model, user, route)``: the hour
starts on the hour of the configured zone (the limits' zone, so "today" means the same
thing to a budget and to ``costs``), ``model`` is the model that answered (for a cache
hit or a denial: the model that would have been called). A row holds integer counters
only, money in micro-dollars, so totals are exact sums. ``summary`` folds rows into the
totals and unit economics ``costs`` shows: by model, user or route (top N), per hour and
per day.

Durability reuses the limits journal: each change is also added to a pending delta that
the daemon drains into a journal record (``Tallies``) with the next settle's spend or once
a second; ``snapshot`` gives the rows for a compaction and ``restore`` adds them back at
start. Rows older than ``retention_days`` are dropped; beyond ``max_rows`` rows an hour's
new users are folded into the user ``OTHER`` so memory stays bounded. Every method takes
``now``; nothing here reads a clock or does I/O.
"""
from __future__ import annotations

import enum
from datetime import datetime, timedelta
from typing import Iterable, NamedTuple, Sequence
from zoneinfo import ZoneInfo

import msgspec

from ..wire import CostGroup, CostPeriod, CostTotals

#: Stands for the users beyond ``max_rows`` (never a real user id: ids are not empty
#: and this one is not printable as one).
OTHER = "\x00other"

MICRO = 1_000_000


class Field(enum.IntEnum):
    """The counters of a row, in their order on disk (append only: never reorder)."""

    REQUESTS = 0  # provider calls that ended (answered or failed)
    ERRORS = 1  # of those, the ones no model answered
    HITS_EXACT = 2
    HITS_SEMANTIC = 3
    DENIALS = 4
    INPUT_TOKENS = 5  # includes cached input tokens
    OUTPUT_TOKENS = 6  # includes reasoning tokens
    CACHED_TOKENS = 7
    REASONING_TOKENS = 8
    MICRO_USD = 9
    SAVED_MICRO_USD = 10  # what the cache hits would have cost


WIDTH = len(Field)


class By(enum.Enum):
    MODEL = "model"
    USER = "user"
    ROUTE = "route"


class Tallies(msgspec.Struct, tag="tallies", forbid_unknown_fields=True):
    """A journal record: counters to add, as ``(hour, model, user, route, counts)``."""

    rows: list[tuple[int, str, str, str, list[int]]]


class Summary(NamedTuple):
    since: float  # the first hour counted (``since`` rounded down to its hour)
    until: float
    by: str
    totals: CostTotals
    groups: list[CostGroup]  # the top N by spend, then by requests
    other_groups: int  # groups beyond the top N (their sums are in ``totals``)
    hours: list[CostPeriod]
    days: list[CostPeriod]


def _totals(c: Sequence[int]) -> CostTotals:
    requests, hits = c[Field.REQUESTS], c[Field.HITS_EXACT] + c[Field.HITS_SEMANTIC]
    return CostTotals(
        requests=requests, errors=c[Field.ERRORS], hits_exact=c[Field.HITS_EXACT],
        hits_semantic=c[Field.HITS_SEMANTIC], denials=c[Field.DENIALS],
        input_tokens=c[Field.INPUT_TOKENS], output_tokens=c[Field.OUTPUT_TOKENS],
        cached_tokens=c[Field.CACHED_TOKENS], reasoning_tokens=c[Field.REASONING_TOKENS],
        usd=c[Field.MICRO_USD] / MICRO, saved_usd=c[Field.SAVED_MICRO_USD] / MICRO,
        cost_per_request=c[Field.MICRO_USD] / MICRO / requests if requests else 0.0,
        hit_rate=hits / (hits + requests) if hits + requests else 0.0,
    )


def _add(into: list[int], counts: Sequence[int]) -> None:
    for i, n in enumerate(counts):
        into[i] += n


#: A day without calls: ``(provider calls, micro-dollars)``.
_NO_CALLS = (0, 0)


class CostTracker:
    """Counters by ``(hour, model, user, route)``; see the module docstring."""

    def __init__(self, zone: str = "UTC", *, retention_days: int = 8,
                 max_rows: int = 500_000) -> None:
        self.zone = ZoneInfo(zone)
        self.retention_days = retention_days
        self.max_rows = max_rows
        self.rows: dict[tuple[int, str, str, str], list[int]] = {}
        self._pending: dict[tuple[int, str, str, str], list[int]] = {}
        self._hour = (0.0, 0.0)  # the hour last looked up: [start, end)
        self._day = (0.0, 0.0, 0)  # the day last looked up: [start, end), previous start
        #: day start -> (provider calls, micro-dollars): the day-over-day alert's input
        self._days: dict[int, list[int]] = {}
        self.folded = 0  # additions folded into OTHER because of max_rows

    def reconfigure(self, zone: str, retention_days: int, max_rows: int) -> None:
        """New settings (SIGHUP): rows already kept stay as they are; a new zone places
        the hours and days recorded from now on."""
        if ZoneInfo(zone) != self.zone:
            self.zone = ZoneInfo(zone)
            self._hour, self._day = (0.0, 0.0), (0.0, 0.0, 0)
        self.retention_days = retention_days
        self.max_rows = max_rows

    # -- time ---------------------------------------------------------------------

    def hour_of(self, now: float) -> int:
        """Start of the zone's hour holding ``now`` (cached: most calls share an hour)."""
        start, end = self._hour
        if not start <= now < end:
            local = datetime.fromtimestamp(now, self.zone).replace(minute=0, second=0,
                                                                  microsecond=0)
            start = local.timestamp()
            self._hour = (start, start + 3600.0)  # a DST change moves whole hours only
        return int(start)

    def day_of(self, when: float) -> int:
        """Start of the zone's day holding ``when`` (cached like ``hour_of``)."""
        start, end, _ = self._day
        if start <= when < end:
            return int(start)
        local = datetime.fromtimestamp(when, self.zone).replace(hour=0, minute=0, second=0,
                                                               microsecond=0)
        naive = local.replace(tzinfo=None)
        after = datetime.combine((naive + timedelta(days=1)).date(), naive.time(), self.zone)
        before = datetime.combine((naive - timedelta(days=1)).date(), naive.time(), self.zone)
        self._day = (local.timestamp(), after.timestamp(), int(before.timestamp()))
        return int(local.timestamp())

    # -- recording ------------------------------------------------------------------

    def _rows(self, now: float, model: str, user: str,
              route: str) -> tuple[list[int], list[int]]:
        """The row to add to and its pending delta (created, or folded into OTHER)."""
        hour = self.hour_of(now)
        key = (hour, model, user, route)
        row = self.rows.get(key)
        if row is None:
            if len(self.rows) >= self.max_rows:
                self.folded += 1
                key = (hour, model, OTHER, route)
                row = self.rows.get(key)
            if row is None:
                row = self.rows[key] = [0] * WIDTH
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = [0] * WIDTH
        return row, pending

    def request(self, now: float, model: str, user: str, route: str, *, input_tokens: int,
                output_tokens: int, cached_tokens: int, reasoning_tokens: int,
                micro_usd: int, error: bool) -> None:
        """A guarded call ended: its provider usage and cost (``error``: no model
        answered; whatever was billed still counts)."""
        for counts in self._rows(now, model, user, route):  # plain ints: the hot path
            counts[0] += 1  # Field.REQUESTS
            counts[1] += error  # Field.ERRORS
            counts[5] += input_tokens  # Field.INPUT_TOKENS
            counts[6] += output_tokens
            counts[7] += cached_tokens
            counts[8] += reasoning_tokens
            counts[9] += micro_usd  # Field.MICRO_USD
        day = self._days.setdefault(self.day_of(now), [0, 0])
        day[0] += 1
        day[1] += micro_usd

    def hit(self, now: float, model: str, user: str, route: str, *, semantic: bool,
            saved_micro_usd: int) -> None:
        """A request answered from the cache; ``saved_micro_usd`` is what ``model``
        would have charged for it."""
        tier = Field.HITS_SEMANTIC if semantic else Field.HITS_EXACT
        for counts in self._rows(now, model, user, route):
            counts[tier] += 1
            counts[Field.SAVED_MICRO_USD] += saved_micro_usd

    def denial(self, now: float, model: str, user: str, route: str) -> None:
        for counts in self._rows(now, model, user, route):
            counts[Field.DENIALS] += 1

    def day_totals(self, now: float) -> tuple[Sequence[int], Sequence[int]]:
        """``(today, yesterday)``, each ``(provider calls, micro-dollars)``, in the zone."""
        today = self.day_of(now)  # also caches yesterday's start in self._day
        return self._days.get(today, _NO_CALLS), self._days.get(self._day[2], _NO_CALLS)

    # -- durability -------------------------------------------------------------------

    def drain(self) -> Tallies | None:
        """The changes since the last drain, as one journal record (None: no change)."""
        if not self._pending:
            return None
        rows = [(*key, counts) for key, counts in self._pending.items()]
        self._pending = {}
        return Tallies(rows)

    def snapshot(self, chunk: int = 1000) -> list[Tallies]:
        """Every row, as journal records of at most ``chunk`` rows (for a compaction,
        which also stands for everything pending: the pending delta is cleared)."""
        self._pending = {}
        rows = [(*key, list(counts)) for key, counts in self.rows.items()]
        return [Tallies(rows[i:i + chunk]) for i in range(0, len(rows), chunk)]

    def restore(self, records: Iterable[Tallies], now: float) -> int:
        """Add persisted rows back (at start), skipping those past retention; returns how
        many rows were added."""
        oldest = self._oldest(now)
        added = 0
        for record in records:
            for hour, model, user, route, counts in record.rows:
                if hour < oldest:
                    continue
                row = self.rows.setdefault((hour, model, user, route), [0] * WIDTH)
                _add(row, counts[:WIDTH])
                day = self._days.setdefault(self.day_of(hour), [0, 0])
                day[0] += counts[Field.REQUESTS]
                day[1] += counts[Field.MICRO_USD]
                added += 1
        return added

    def _oldest(self, now: float) -> int:
        return self.hour_of(now) - self.retention_days * 86400

    def expire(self, now: float) -> int:
        """Drop rows (and day totals) past retention; returns how many rows went."""
        oldest = self._oldest(now)
        gone = [key for key in self.rows if key[0] < oldest]
        for key in gone:
            del self.rows[key]
        for day in [d for d in self._days if d < oldest - 86400]:
            del self._days[day]
        return len(gone)

    # -- reading ---------------------------------------------------------------------

    def summary(self, since: float, until: float, by: By, top: int = 10) -> Summary:
        """Totals of the hours from the one holding ``since`` to the one holding
        ``until`` (inclusive), grouped ``by``, with per-hour and per-day series."""
        first, last = self.hour_of(since), self.hour_of(until)
        total = [0] * WIDTH
        groups: dict[str, list[int]] = {}
        hours: dict[int, list[int]] = {}
        slot = {By.MODEL: 1, By.USER: 2, By.ROUTE: 3}[by]
        for key, counts in self.rows.items():
            if not first <= key[0] <= last:
                continue
            _add(total, counts)
            _add(groups.setdefault(key[slot], [0] * WIDTH), counts)
            _add(hours.setdefault(key[0], [0] * WIDTH), counts)
        days: dict[int, list[int]] = {}
        for hour, counts in hours.items():
            _add(days.setdefault(self.day_of(hour), [0] * WIDTH), counts)
        ranked = sorted(groups.items(), key=lambda kv: (-kv[1][Field.MICRO_USD],
                                                        -kv[1][Field.REQUESTS], kv[0]))
        return Summary(
            since=float(first), until=float(until), by=by.value, totals=_totals(total),
            groups=[CostGroup(key="(other users)" if k == OTHER else k, totals=_totals(c))
                    for k, c in ranked[:top]],
            other_groups=max(0, len(ranked) - top),
            hours=[CostPeriod(start=float(h), totals=_totals(c)) for h, c in sorted(hours.items())],
            days=[CostPeriod(start=float(d), totals=_totals(c)) for d, c in sorted(days.items())],
        )
