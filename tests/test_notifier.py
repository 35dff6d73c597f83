"""sidecar.alerts.Notifier: payloads reach a real command and a real local HTTP server in
order; failures (exit status, timeout, non-2xx, unreachable) are counted and survived; a
flood against a stuck command is dropped without blocking; bad webhook URLs are refused."""
from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from sidecar.ledger.alerts import Notifier, NotifierStats, check_webhook
from sidecar.errors import ConfigError

APPEND_STDIN = "import sys; open(sys.argv[1], 'ab').write(sys.stdin.buffer.read())"

# Signals it has started, then blocks until the gate file exists: the test decides when
# the worker is free again, with no timing involved.
GATED = """
import os, sys, time
out, started, gate = sys.argv[1:]
data = sys.stdin.buffer.read()
open(started, 'a').close()
while not os.path.exists(gate):
    time.sleep(0.01)
open(out, 'ab').write(data)
"""

# Payloads marked slow outlive the notifier's timeout; the others are appended.
SLOW_IF_ASKED = """
import json, sys, time
data = sys.stdin.buffer.read()
if json.loads(data).get("slow"):
    time.sleep(30)
open(sys.argv[1], 'ab').write(data)
"""

FAIL_LOUDLY = "import sys; sys.stdin.read(); sys.stderr.write('boom: ' + 'x' * 500); sys.exit(3)"


def python(script: str, *args: object) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def wait_for_file(path: Path, limit: float = 30.0) -> None:
    """Until ``path`` exists; fails only if it never appears (a lower-bound wait)."""
    deadline = time.monotonic() + limit
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


class Hook(http.server.ThreadingHTTPServer):
    """A webhook receiver on 127.0.0.1 answering ``status`` and recording each POST."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), HookHandler)
        self.status = 204
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}/hooks/T0KEN?x=1"


class HookHandler(http.server.BaseHTTPRequestHandler):
    server: Hook

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, dict(self.headers), body))
        self.send_response(self.server.status)
        if self.server.status in (301, 302, 307):
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep the test output clean (the default writes every request to stderr)."""


@pytest.fixture
def hook():
    server = Hook()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_command_gets_each_payload_as_one_json_line_in_order(tmp_path):
    out = tmp_path / "alerts.jsonl"
    n = Notifier(command=python(APPEND_STDIN, out))
    payloads = [{"alert": "budget", "i": i, "text": "ünïcode"} for i in range(20)]
    assert all(n.send(p) for p in payloads)
    n.close(timeout=60)
    assert out.read_bytes().count(b"\n") == 20
    assert read_lines(out) == payloads
    stats = n.stats()
    assert isinstance(stats, NotifierStats)
    assert stats == NotifierStats(enabled=True, sent=20, failed=0, dropped=0, queued=0,
                                  last_error="")


def test_webhook_receives_json_posts(hook):
    n = Notifier(webhook=hook.url)
    payloads = [{"alert": "spend", "i": i, "path": Path("/x")} for i in range(5)]
    for p in payloads:
        assert n.send(p)
    n.close(timeout=30)
    assert n.stats().sent == 5 and n.stats().failed == 0
    assert [json.loads(body) for _, _, body in hook.received] == [
        {"alert": "spend", "i": i, "path": "/x"} for i in range(5)]
    path, headers, _ = hook.received[0]
    assert path == "/hooks/T0KEN?x=1"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "llm-sidecar"


def test_both_sinks_count_one_send(tmp_path, hook):
    out = tmp_path / "alerts.jsonl"
    n = Notifier(command=python(APPEND_STDIN, out), webhook=hook.url)
    n.send({"a": 1})
    n.close(timeout=30)
    assert read_lines(out) == [{"a": 1}]
    assert [json.loads(b) for _, _, b in hook.received] == [{"a": 1}]
    assert (n.stats().sent, n.stats().failed) == (1, 0)


@pytest.mark.parametrize("status", [500, 404, 302])
def test_webhook_non_2xx_is_a_failure(tmp_path, hook, status, caplog):
    hook.status = status
    out = tmp_path / "alerts.jsonl"
    n = Notifier(command=python(APPEND_STDIN, out), webhook=hook.url)
    for i in range(3):
        n.send({"i": i})
    n.close(timeout=30)
    stats = n.stats()
    # The command took each payload; the webhook failed each: none counts as sent.
    assert (stats.sent, stats.failed, stats.dropped) == (0, 3, 0)
    assert f"HTTP {status}" in stats.last_error
    assert "T0KEN" not in stats.last_error  # the URL's secret part stays out of logs
    assert read_lines(out) == [{"i": i} for i in range(3)]
    assert len(hook.received) == 3  # 3xx not followed: nothing posted to /elsewhere
    logged = [r for r in caplog.records if r.name == "sidecar.alerts"]
    assert len(logged) == 1 and "T0KEN" not in logged[0].getMessage()


def test_unreachable_webhook_is_a_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    n = Notifier(webhook=f"http://127.0.0.1:{port}/hook", timeout=5)
    n.send({"a": 1})
    n.close(timeout=30)
    stats = n.stats()
    assert (stats.sent, stats.failed) == (0, 1)
    assert "unreachable" in stats.last_error


def test_failing_command_logs_its_stderr_once(tmp_path, caplog):
    n = Notifier(command=python(FAIL_LOUDLY))
    n.send({"a": 1})
    n.send({"a": 2})
    n.close(timeout=60)
    stats = n.stats()
    assert (stats.sent, stats.failed) == (0, 2)
    assert "exit status 3" in stats.last_error and "boom: xxx" in stats.last_error
    assert len(stats.last_error) < 300  # stderr cut to its first 200 characters
    logged = [r for r in caplog.records if r.name == "sidecar.alerts"]
    assert len(logged) == 1 and "boom" in logged[0].getMessage()


def test_missing_command_is_a_failure(tmp_path):
    n = Notifier(command=[str(tmp_path / "no-such-command")])
    n.send({"a": 1})
    n.close(timeout=30)
    assert (n.stats().sent, n.stats().failed) == (0, 1)
    assert "cannot run" in n.stats().last_error


def test_command_past_its_timeout_is_killed_and_delivery_goes_on(tmp_path):
    out = tmp_path / "alerts.jsonl"
    n = Notifier(command=python(SLOW_IF_ASKED, out), timeout=1.5)
    n.send({"i": 0})
    n.send({"i": 1, "slow": True})
    n.send({"i": 2})
    n.close(timeout=60)
    stats = n.stats()
    assert (stats.sent, stats.failed) == (2, 1)
    assert "killed" in stats.last_error
    assert read_lines(out) == [{"i": 0}, {"i": 2}]


def test_flood_while_the_command_is_stuck_drops_without_blocking(tmp_path):
    out, started, gate = (tmp_path / n for n in ("alerts.jsonl", "started", "gate"))
    n = Notifier(command=python(GATED, out, started, gate), timeout=60, queue_max=5)
    assert n.send({"i": 0})
    wait_for_file(started)  # the worker holds payload 0 until the gate opens
    results = [n.send({"i": i}) for i in range(1, 51)]
    assert results == [True] * 5 + [False] * 45
    stats = n.stats()
    assert (stats.sent, stats.dropped, stats.queued) == (0, 45, 5)
    gate.touch()
    n.close(timeout=60)
    assert read_lines(out) == [{"i": i} for i in range(6)]
    stats = n.stats()
    assert (stats.sent, stats.failed, stats.dropped, stats.queued) == (6, 0, 45, 0)


def test_close_past_its_timeout_discards_the_queue_and_kills_the_command(tmp_path):
    out, started, gate = (tmp_path / n for n in ("alerts.jsonl", "started", "gate"))
    n = Notifier(command=python(GATED, out, started, gate), timeout=60, queue_max=10)
    for i in range(4):
        assert n.send({"i": i})
    wait_for_file(started)
    n.close(timeout=0.1)  # the gate never opens
    assert n.send({"i": 9}) is False
    stats = n.stats()
    assert stats.sent == 0
    assert stats.dropped == 3 + 1  # the queue behind the stuck payload, and the late send
    assert not out.exists()


def test_disabled_notifier_does_nothing():
    n = Notifier()
    assert n.enabled is False
    assert n.send({"a": 1}) is False
    n.close()
    n.close()
    assert n.stats() == NotifierStats(enabled=False, sent=0, failed=0, dropped=0, queued=0,
                                      last_error="")


def test_close_is_idempotent_and_refuses_later_sends(tmp_path):
    out = tmp_path / "alerts.jsonl"
    n = Notifier(command=python(APPEND_STDIN, out))
    n.send({"a": 1})
    n.close(timeout=30)
    n.close(timeout=30)
    assert n.send({"a": 2}) is False
    assert (n.stats().sent, n.stats().dropped) == (1, 1)
    assert read_lines(out) == [{"a": 1}]


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook",
    "example.com/hook",
    "localhost:8080/hook",
    "http://",
    "https:///path-only",
    "http://example.com:99999/hook",
    "http://example.com:0/hook",
    "http://user:secret@example.com/hook",
    "http://example.com/a hook",
    "http://example.com/\nhook",
])
def test_invalid_webhook_urls_are_refused(url):
    with pytest.raises(ConfigError) as info:
        check_webhook(url)
    assert info.value.key == "alerts.webhook"
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError):
        Notifier(webhook=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/hook", "https://example.com",
                                 "https://[::1]:443/a?b=c", "HTTPS://Example.COM/x"])
def test_valid_webhook_urls_pass(url):
    check_webhook(url)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError):
        Notifier(command="notify-send")
    with pytest.raises(ValueError):
        Notifier(command=["true"], timeout=0)
    with pytest.raises(ValueError):
        Notifier(command=["true"], queue_max=0)

