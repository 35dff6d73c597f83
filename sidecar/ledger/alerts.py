"""Alerts: thresholds that fire exactly once when crossed, and their delivery to the log,
stats, a counter and an operator's command or webhook.

Four kinds: the average cost of a provider call up more than ``cost_increase`` day over day
(both days with at least ``min_requests`` calls); a budget crossing one of the limits'
``alert_thresholds`` (the limits engine detects the crossing); a call with tokens priced
at $0 (the bug class that hides real spend: a model missing from the price list, or
priced 0 by mistake; ``free_models`` exempts the ones meant to be free); and a model's
error ratio reaching ``error_ratio`` over a window of ``error_window`` seconds with at
least ``error_min_calls`` calls. Windows are aligned to the epoch, so with a pinned clock
a test knows exactly which call fires. The same kind and subject fire at most once per
day (cost), per window (errors) or per ``repeat`` seconds (zero price). Every method
takes ``now``.

Delivery to the operator is the ``Notifier``: ``send`` puts a payload on a bounded queue
without blocking the event loop (dropping it when the queue is full), and one daemon
worker thread hands each payload, in order, to the operator's command (as one JSON line
on its stdin) and/or POSTs it to a webhook. Failures are counted and logged at most once a
minute; they never reach the caller.
"""
from __future__ import annotations

import collections
import enum
import fnmatch
import http.client
import logging
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from fractions import Fraction
from typing import Any, NamedTuple, Sequence

import msgspec
import orjson

from .settings import AlertsConfig
from ..errors import ConfigError
from ..wire import AlertInfo
from ..failures import ThrottledLog

log = logging.getLogger("sidecar.alerts")

STDERR_LOG_CHARS = 200
USER_AGENT = "llm-sidecar"


class Sink(enum.Enum):
    """Where the notifier delivers a payload."""

    COMMAND = "command"
    WEBHOOK = "webhook"


class NotifierStats(NamedTuple):
    """A snapshot of a notifier's counters; ``_asdict()`` for a plain dict."""

    enabled: bool  # a command or a webhook is configured
    sent: int  # payloads every configured sink accepted
    failed: int  # failed sink attempts (a payload failing at both sinks counts 2)
    dropped: int  # payloads refused by send (queue full, closed) or discarded at close
    queued: int  # payloads waiting for the worker (the one being delivered excluded)
    last_error: str  # text of the latest failure, "" if none ever happened


def check_webhook(url: str, *, key: str = "alerts.webhook") -> None:
    """Raise ``ConfigError`` (under ``key``) unless ``url`` is an http(s) URL with a host.

    Used by ``Notifier`` and by config validation, so a bad URL is refused at start rather
    than failing every alert later.
    """
    hint = "an absolute http:// or https:// URL, such as https://alerts.example.com/hook"
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise ConfigError("webhook URL contains whitespace or control characters", key=key,
                          hint="percent-encode them (%20 for a space)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # parses the port, which urlsplit leaves unchecked until asked
    except ValueError as exc:
        raise ConfigError(f"invalid webhook URL ({exc})", key=key, hint=hint) from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"webhook URL scheme must be http or https, not "
                          f"{parts.scheme or 'none'!r}", key=key, hint=hint)
    if not parts.hostname:
        raise ConfigError("webhook URL has no host", key=key, hint=hint)
    if port == 0:
        raise ConfigError("webhook URL has port 0", key=key, hint=hint)
    if parts.username is not None or parts.password is not None:
        # urllib sends no credentials from the URL itself, and they would end up in logs.
        raise ConfigError("webhook URL carries credentials (user:password@)", key=key,
                          hint="put the token in the URL's path or query instead")


def _redact(url: str) -> str:
    # Webhook paths and queries often carry the secret (Slack, Discord): logs get only
    # where the alert went, never the token.
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turns a 3xx into an HTTPError: an alert is delivered only by a 2xx answer."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        """Follow no redirect (urllib then raises the 3xx as an HTTPError)."""
        return None


class Notifier:
    """Fire-and-forget delivery of alert payloads to a command and/or a webhook.

    ``send(payload)`` from the event loop (or any thread); ``stats()`` for the counters;
    ``close()`` at shutdown. ``command`` is an argv run once per payload, without a shell,
    with the payload as one JSON line on stdin; a non-zero exit or running past
    ``timeout`` seconds (the command is then killed) is a failure. ``webhook`` receives
    each payload as a JSON POST; anything but a 2xx answer within ``timeout`` is a failure
    (redirects are not followed, and proxy environment variables are ignored: the daemon
    reads its environment only through its config). With neither, the notifier is
    disabled and starts no thread.
    """

    def __init__(self, *, command: Sequence[str] = (), webhook: str = "", timeout: float = 5.0,
                 queue_max: int = 100) -> None:
        """Validate the sinks and start the worker thread if one is configured.

        Raises ``TypeError`` if ``command`` is a string (a one-word argv is ``["name"]``),
        ``ConfigError`` for an invalid ``webhook`` (see ``check_webhook``), and
        ``ValueError`` for a non-positive ``timeout`` or ``queue_max``.
        """
        if isinstance(command, (str, bytes)):
            raise TypeError(f"command must be a sequence of arguments, not a string "
                            f"({command!r}); write [{command!r}] for a single word")
        if timeout <= 0 or queue_max <= 0:
            raise ValueError(f"timeout and queue_max must be positive "
                             f"(got timeout={timeout}, queue_max={queue_max})")
        if webhook:
            check_webhook(webhook)
        self.command = tuple(command)
        self.webhook = webhook
        self.timeout = timeout
        self.queue_max = queue_max
        self.enabled = bool(self.command or self.webhook)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[dict[str, Any]] = collections.deque()
        self._closed = False
        self._abort = False  # close timed out: deliver nothing more
        self._proc: subprocess.Popen[bytes] | None = None  # the command running now
        self._dropped = 0
        # worker-thread state (read without the lock by stats(): single int/str stores)
        self._sent = 0
        self._failed = 0
        self._last_error = ""
        self._errors = ThrottledLog(log)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                   _NoRedirect())
        self._thread: threading.Thread | None = None
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="sidecar-notifier",
                                            daemon=True)
            self._thread.start()

    def __repr__(self) -> str:
        sinks = [s.value for s, on in ((Sink.COMMAND, self.command),
                                       (Sink.WEBHOOK, self.webhook)) if on]
        return f"<Notifier {'+'.join(sinks) or 'disabled'} sent={self._sent}>"

    def send(self, payload: dict[str, Any]) -> bool:
        """Queue ``payload`` for delivery; return False if it was not queued.

        Never blocks on delivery: safe on the event loop. The payload is serialised later
        on the worker thread, so the caller must not mutate it after this call. When
        disabled this returns False and counts nothing; when ``queue_max`` payloads are
        waiting, or after ``close``, the payload is dropped and counted in ``dropped``.
        """
        if not self.enabled:
            return False
        with self._lock:
            if self._closed or len(self._queue) >= self.queue_max:
                self._dropped += 1
                return False
            self._queue.append(payload)
            if len(self._queue) == 1:
                # The worker only waits on an empty queue; later appends would wake nobody.
                self._wake.notify()
        return True

    def stats(self) -> NotifierStats:
        """The notifier's counters now (see ``NotifierStats``)."""
        with self._lock:
            queued, dropped = len(self._queue), self._dropped
        return NotifierStats(enabled=self.enabled, sent=self._sent, failed=self._failed,
                             dropped=dropped, queued=queued, last_error=self._last_error)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting payloads and wait up to ``timeout`` s for the queue to drain.

        Past ``timeout`` the payloads still queued are discarded (counted in ``dropped``)
        and a running command is killed; a webhook request in flight is left to its own
        timeout, in the background. Idempotent.
        """
        thread = self._thread
        with self._lock:
            self._closed = True
            self._wake.notify()
        if thread is None:
            return
        thread.join(timeout)
        if not thread.is_alive():
            return
        with self._lock:
            self._abort = True
            self._dropped += len(self._queue)
            self._queue.clear()
            proc = self._proc
        if proc is not None:
            proc.kill()
        log.warning("notifier: delivery still under way after %.1f s at close; "
                    "the rest of the queue was discarded", timeout)

    # --- worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue or self._abort:
                    return
                payload = self._queue.popleft()
            try:
                self._deliver(payload)
            except Exception as exc:
                # A bug here must cost one alert, not every alert after it.
                log.exception("notifier: delivery failed unexpectedly")
                self._fail(None, f"internal error ({exc!r})")

    def _deliver(self, payload: dict[str, Any]) -> None:
        try:
            body = orjson.dumps(payload, default=str, option=orjson.OPT_NON_STR_KEYS)
        except orjson.JSONEncodeError as exc:
            self._fail(None, f"payload not serialisable ({exc})")
            return
        ok = True
        if self.command:
            ok = self._run_command(body + b"\n")
        if self.webhook:
            if self._abort:
                return  # close() gave up waiting: post nothing more, in the background
            ok = self._post(body) and ok
        if ok:
            self._sent += 1

    def _run_command(self, stdin: bytes) -> bool:
        # subprocess.run's own steps, with the Popen kept where close() can kill it.
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    close_fds=True)
        except OSError as exc:
            self._fail(Sink.COMMAND, f"cannot run {self.command[0]!r}: "
                                     f"{exc.strerror or exc}")
            return False
        with self._lock:
            self._proc = proc
        try:
            with proc:
                try:
                    _, stderr = proc.communicate(stdin, timeout=self.timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    self._fail(Sink.COMMAND, f"{self.command[0]!r} still running after "
                                             f"{self.timeout:g} s; killed")
                    return False
        finally:
            with self._lock:
                self._proc = None
        if proc.returncode != 0:
            text = stderr.decode("utf-8", "replace").strip()[:STDERR_LOG_CHARS]
            how = (f"exit status {proc.returncode}" if proc.returncode > 0
                   else f"killed by signal {-proc.returncode}")
            self._fail(Sink.COMMAND, f"{self.command[0]!r} failed ({how})"
                                     + (f": {text}" if text else ""))
            return False
        return True

    def _post(self, body: bytes) -> bool:
        request = urllib.request.Request(
            self.webhook, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT})
        where = _redact(self.webhook)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            exc.close()
            self._fail(Sink.WEBHOOK, f"{where} answered HTTP {exc.code}")
            return False
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # URLError, timeouts and resets are OSErrors; a malformed or cut answer is an
            # HTTPException (or, for some header damage, a ValueError).
            reason = getattr(exc, "reason", None) or exc
            self._fail(Sink.WEBHOOK, f"{where} unreachable ({reason})")
            return False
        if not 200 <= status < 300:
            self._fail(Sink.WEBHOOK, f"{where} answered HTTP {status}")
            return False
        return True

    def _fail(self, sink: Sink | None, text: str) -> None:
        self._failed += 1
        self._last_error = f"{sink.value}: {text}" if sink else text
        self._errors.error("notifier: %s (%d failures so far)", self._last_error, self._failed)

# --- the rules ------------------------------------------------------------------------

#: Alerts kept for ``stats``.
RECENT = 50


def _exact(value: float) -> tuple[int, int]:
    """``value`` as the decimal fraction it was written as (0.2 is 1/5, not the binary
    float just below), so a threshold is met exactly where the operator put it."""
    f = Fraction(repr(value))
    return f.numerator, f.denominator


class Kind(enum.Enum):
    COST_PER_REQUEST = "cost_per_request"
    BUDGET = "budget"
    ZERO_PRICE = "zero_price"
    ERROR_RATIO = "error_ratio"


class Alerts:
    """Decides when an alert fires; a fired alert is logged, counted, kept for ``stats``
    and handed to ``notifier`` (when the operator configured a command or webhook)."""

    def __init__(self, cfg: AlertsConfig, notifier: Notifier | None = None) -> None:
        self.reconfigure(cfg)
        self.notifier = notifier
        self.recent: collections.deque[AlertInfo] = collections.deque(maxlen=RECENT)
        self.counts: dict[str, int] = {}
        self._cost_day = -1  # the day the cost alert last fired
        self._zero: dict[str, float] = {}  # model -> when its zero-price alert last fired
        #: model -> [window start, calls, failures, fired in this window]
        self._errors: dict[str, list] = {}

    def reconfigure(self, cfg: AlertsConfig) -> None:
        self.cfg = cfg
        self._rise = _exact(1 + cfg.cost_increase)
        self._ratio = _exact(cfg.error_ratio)

    def fire(self, kind: Kind, subject: str, message: str, now: float, value: float = 0.0,
             threshold: float = 0.0) -> AlertInfo:
        alert = AlertInfo(kind=kind.value, subject=subject, message=message, at=now,
                          value=value, threshold=threshold)
        self.recent.append(alert)
        self.counts[kind.value] = self.counts.get(kind.value, 0) + 1
        log.warning("alert %s: %s", kind.value, message)
        if self.notifier is not None:
            self.notifier.send(msgspec.to_builtins(alert))
        return alert

    def cost_per_request(self, today: Sequence[int], yesterday: Sequence[int], day: int,
                         now: float) -> AlertInfo | None:
        """After each priced call: today's average cost per call against yesterday's,
        each day given as ``(calls, micro-dollars)`` (``CostTracker.day_totals``)."""
        rise, least = self.cfg.cost_increase, self.cfg.min_requests
        t_calls, t_micro = today
        y_calls, y_micro = yesterday
        if (not rise or self._cost_day == day or t_calls < least or y_calls < least
                or y_micro <= 0):
            return None
        num, den = self._rise  # t_micro/t_calls > (1 + rise) * y_micro/y_calls, in integers
        if t_micro * y_calls * den <= num * y_micro * t_calls:
            return None
        self._cost_day = day
        t, y = t_micro / t_calls / 1e6, y_micro / y_calls / 1e6
        return self.fire(Kind.COST_PER_REQUEST, "all",
                         f"average cost per request ${t:.6f} today is {t / y - 1:+.1%} on "
                         f"yesterday's ${y:.6f} ({t_calls} and {y_calls} calls)", now,
                         value=t, threshold=y * (1 + rise))

    def budget(self, crossed: str, who: str, model: str, now: float) -> AlertInfo:
        """The limits engine saw an admit cross ``crossed`` ("limit@80%")."""
        name, _, share = crossed.rpartition("@")
        return self.fire(Kind.BUDGET, crossed,
                         f"limit {name} crossed {share} (user {who or '-'}, model "
                         f"{model or '-'})", now, threshold=float(share.rstrip("%")) / 100)

    def priced(self, model: str, tokens: int, micro_usd: int, now: float) -> AlertInfo | None:
        """After each call: tokens that cost nothing, unless ``model`` is meant to be free."""
        if not self.cfg.zero_price or tokens <= 0 or micro_usd > 0:
            return None
        if any(fnmatch.fnmatchcase(model, pattern) for pattern in self.cfg.free_models):
            return None
        last = self._zero.get(model)
        if last is not None and now - last < self.cfg.repeat:
            return None
        self._zero[model] = now
        return self.fire(Kind.ZERO_PRICE, model,
                         f"{tokens} tokens of model {model!r} priced at $0: add its price "
                         f"(pricing.overrides) or list it in alerts.free_models", now,
                         value=float(tokens))

    def attempt(self, model: str, ok: bool, now: float) -> AlertInfo | None:
        """After each provider call: the model's error ratio in the current window."""
        ratio, window = self.cfg.error_ratio, self.cfg.error_window
        if not ratio:
            return None
        start = now - now % window
        state = self._errors.get(model)
        if state is None or state[0] != start:
            state = self._errors[model] = [start, 0, 0, False]
        state[1] += 1
        state[2] += not ok
        calls, failures = state[1], state[2]
        num, den = self._ratio
        if state[3] or calls < self.cfg.error_min_calls or failures * den < num * calls:
            return None
        state[3] = True
        return self.fire(Kind.ERROR_RATIO, model,
                         f"model {model!r} failed {failures} of {calls} calls "
                         f"({failures / calls:.0%}) in the current {window:g} s window",
                         now, value=failures / calls, threshold=ratio)

    def expire(self, now: float) -> None:
        """Forget error windows that are over (bounded memory across many models)."""
        window = self.cfg.error_window
        for model in [m for m, s in self._errors.items() if s[0] + window <= now]:
            del self._errors[model]
