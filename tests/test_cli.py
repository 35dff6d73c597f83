"""The operator's command line against real daemons: the ``stats`` dashboard (sections,
numbers, ``--json``, ``--watch`` frames, outages, Ctrl-C, a TTY), ``costs`` (totals, top
groups, periods, WHEN forms), ``metrics``; and the pure pieces (WHEN parsing, tables)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pty
import re
import signal
import subprocess

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from clirun import cli, cli_argv, cli_env
from sidecar import Client
from sidecar.cli import parse_when
from sidecar.cli.render import _table
from sidecar.wire import Attempt

pytestmark = pytest.mark.timeout(60)

CONFIG = """
[cache.semantic]
enabled = false

[pricing.overrides]
"m-a" = { input = 2.0, output = 8.0 }
"m-b" = { input = 0.15, output = 0.6 }
"free-model" = { input = 0.0, output = 0.0 }

[limits]
retry_loop_max = 0
[[limits.rules]]
name = "per-user"
scope = "user"
metric = "requests"
window = "60s"
amount = 2
"""


def traffic(c: Client) -> None:
    """Two users, two models; prices per million tokens (see CONFIG):
    alice on m-a: 1,000 in x $2 + 500 out x $8 = $0.006000;
    bob on m-b: 2,000 in x $0.15 + 1,000 out x $0.6 = $0.000900;
    alice on m-b: 1,000 in x $0.15 + 1,000 out x $0.6 = $0.000750;
    then alice asks her first question again: an exact hit that saves $0.006000.
    Totals: 3 requests, $0.007650, $0.002550 a request, hit rate 1 / 4."""
    for user, model, text, tokens_in, tokens_out in (
            ("alice", "m-a", "q1", 1000, 500), ("bob", "m-b", "q2", 2000, 1000),
            ("alice", "m-b", "q3", 1000, 1000)):
        b = c.begin(model=model, user=user, text=text)
        assert b.outcome == "go"
        c.end(b.lease, model=model, input_tokens=tokens_in, output_tokens=tokens_out,
              attempts=[Attempt(model=model, ok=True, latency=0.25)], response={"a": text})
    assert c.begin(model="m-a", user="alice", text="q1").outcome == "hit"


def sections(text: str) -> dict[str, str]:
    """A dashboard's sections by heading."""
    parts = re.split(r"^== (.+) ==$", text, flags=re.M)
    return {title: body for title, body in zip(parts[1::2], parts[2::2])}


# --- stats ----------------------------------------------------------------------------

def test_stats_dashboard_shows_every_section_and_the_numbers(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        traffic(c)
        leases = [c.begin(model="m-a", user="carol", text=f"c{i}").lease for i in range(2)]
        assert c.begin(model="m-a", user="carol", text="c2").outcome == "deny"
        for lease in leases:
            c.release(lease)
        b = c.begin(model="free-model", user="dave", text="free")
        c.end(b.lease, model="free-model", input_tokens=10, output_tokens=5)
        alert = c.stats().alerts[-1]
    r = cli("stats", "--socket", str(d.path))
    assert r.returncode == 0, r.stderr
    got = sections(r.stdout)
    assert list(got) == ["daemon", "ops", "limits", "cluster", "caches", "shared memory",
                         "routes and circuits", "spend today", "latency", "alerts", "build"]
    assert got["cluster"].strip() == "standalone (no cluster.redis_url)"
    assert re.search(rf"^  pid +{d.pid}$", got["daemon"], re.M)
    assert re.search(rf"^  socket +{re.escape(str(d.path))}$", got["daemon"], re.M)
    # alice's exact hit was read from the shared-memory segment, and told in a hits op
    assert re.search(r"^  begin +7 +0 +[\d,.]+ +[\d,.]+ +[\d,.]+$", got["ops"], re.M)
    # (two hits ops: the hit rode ahead of carol's first begin; at close, the lookups
    # that went to the socket since were told)
    assert re.search(r"^  hits +2 +0 +[\d,.]+ +[\d,.]+ +[\d,.]+$", got["ops"], re.M)
    shm = got["shared memory"]
    assert re.search(rf"^  segment +{re.escape(str(d.path))}\.shm \(generation [0-9a-f]+\)$",
                     shm, re.M)
    assert re.search(r"^  answers +3 published, 0 too large", shm, re.M)
    # this test's process: one hit from the segment; 7 begins the segment could not answer
    # (3 first questions, carol's 3, dave's 1) went to the socket
    assert re.search(rf"^ +{os.getpid()} +{os.getuid()} +1 +7 +0 +0 +[\d:]+$", shm, re.M)
    assert re.search(r"^  open leases: 0$", got["limits"], re.M)
    assert re.search(r"^  per-user +1 +\d+ +0", got["limits"], re.M)
    assert re.search(r"^  exact +3 +\d+ +1 +", got["caches"], re.M)  # q1, q2, q3
    assert re.search(r"^  m-a +closed$", got["routes and circuits"], re.M)
    spend = got["spend today"]
    assert re.search(r"^  requests +4$", spend, re.M)  # the free model's call too
    assert re.search(r"^  hits exact +1$", spend, re.M)
    assert re.search(r"^  hit rate +20\.0%$", spend, re.M)
    assert re.search(r"^  denials +1$", spend, re.M)
    assert re.search(r"^  tokens in +4,010$", spend, re.M)
    assert re.search(r"^  USD +\$0\.007650$", spend, re.M)
    assert re.search(r"^  saved USD +\$0\.006000$", spend, re.M)
    assert re.search(r"^  m-a +1K-10K +1 +250\.0 +250\.0 +250\.0$", got["latency"], re.M)
    assert re.search(r"^  m-b +1K-10K +2 +250\.0", got["latency"], re.M)
    assert re.search(r"^  zero_price +1$", got["alerts"], re.M)
    at = dt.datetime.fromtimestamp(alert.at, dt.timezone.utc).strftime("%H:%M:%S")
    assert re.search(rf"^  {at} +zero_price +.*free-model", got["alerts"], re.M)
    assert re.search(r"^  native tokens +/\S+$", got["build"], re.M)


def test_stats_of_an_idle_daemon_says_none_instead_of_empty_tables(start_daemon):
    d = start_daemon(CONFIG)
    got = sections(cli("stats", "--socket", str(d.path)).stdout)
    for title in ("routes and circuits", "latency", "alerts"):
        assert got[title].strip() == "none", title
    assert got["limits"].strip().splitlines()[-1].strip() == "none"


def test_stats_json_is_the_reply_as_is(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        traffic(c)
        expected = msgspec.to_builtins(c.stats())
    r = cli("stats", "--socket", str(d.path), "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got.keys() == expected.keys()
    assert (got["pid"], got["socket"]) == (d.pid, str(d.path))
    assert got["spend_today"] == expected["spend_today"]


def test_watch_prints_frames_then_stops_at_count(start_daemon):
    d = start_daemon(CONFIG)
    r = cli("stats", "--socket", str(d.path), "--watch", "--count", "2", "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout  # not a TTY: no screen control
    assert len(re.findall(r"^llm-sidecar stats at \d\d:\d\d:\d\d UTC, every 0\.2 s",
                          r.stdout, re.M)) == 2
    assert r.stdout.count("== daemon ==") == 2 and r.stdout.count("== build ==") == 2
    r = cli("stats", "--socket", str(d.path), "--watch", "--json", "--count", "2",
            "--interval", "0.2")
    assert r.returncode == 0, r.stderr
    frames = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(frames) == 2 and all(f["pid"] == d.pid for f in frames)
    assert frames[1]["requests_total"] > frames[0]["requests_total"]


def test_watch_without_a_daemon_shows_why_and_exits_1(tmp_path):
    sock = str(tmp_path / "none.sock")
    r = cli("stats", "--socket", sock, "--watch", "--count", "2", "--interval", "0.2")
    assert r.returncode == 1  # no frame ever reached the daemon
    assert r.stdout.count(f"daemon unreachable: {sock}") == 2
    assert r.stderr.count("llm-sidecar serve") == 1  # the full hint once per outage
    r = cli("stats", "--socket", sock, "--watch", "--json", "--count", "2",
            "--interval", "0.2")
    assert (r.returncode, r.stdout) == (1, "")  # stdout stays JSON lines only
    assert "unreachable" in r.stderr


def test_watch_rides_out_an_outage_and_ctrl_c_exits_0(tmp_path, start_daemon):
    # Watching before the daemon exists: unreachable frames, then real ones once it
    # starts, then Ctrl-C ends the watch with 0 (a frame did reach it) and no traceback.
    path = tmp_path / "later.sock"
    proc = subprocess.Popen(cli_argv("stats", "--socket", str(path), "--watch",
                                     "--interval", "0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd="/")
    try:
        assert "daemon unreachable" in _read_until(proc, "daemon unreachable")
        start_daemon(CONFIG, socket_path=path)
        _read_until(proc, "== build ==")
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "unreachable" in stderr


def _read_until(proc: subprocess.Popen[str], marker: str) -> str:
    seen = []
    for line in proc.stdout:  # the test's timeout bounds a marker that never comes
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"{marker!r} never printed: {''.join(seen)}{proc.stderr.read()}")


def test_watch_on_a_tty_redraws_in_place(tmp_path):
    master, slave = pty.openpty()
    try:
        proc = subprocess.run(cli_argv("stats", "--socket", str(tmp_path / "none.sock"),
                                       "--watch", "--count", "1"),
                              stdout=slave, stderr=subprocess.PIPE, env=cli_env(), cwd="/",
                              timeout=60)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
    assert proc.returncode == 1
    assert out.startswith(b"\x1b[H\x1b[2Jllm-sidecar stats at ")
    assert b"daemon unreachable" in out


@pytest.mark.parametrize("args", [("--interval", "0.1"), ("--interval", "x"),
                                  ("--count", "0")])
def test_watch_options_are_checked(args, tmp_path):
    r = cli("stats", "--socket", str(tmp_path / "none.sock"), "--watch", *args)
    assert r.returncode == 2 and "error:" in r.stderr
    r = cli("stats", "--socket", str(tmp_path / "none.sock"), "--count", "2")
    assert r.returncode == 2 and "only apply with --watch" in r.stderr


# --- costs and metrics ----------------------------------------------------------------

def test_costs_text_and_json(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        traffic(c)
    sock = str(d.path)
    r = cli("costs", "--socket", sock)
    assert r.returncode == 0, r.stderr
    got = sections(r.stdout)
    assert list(got) == ["totals", "top models", "per day"]
    totals = got["totals"]
    for label, value in (("requests", "3"), ("hits exact", "1"), ("hit rate", "25.0%"),
                         ("tokens in", "4,000"), ("tokens out", "2,500"),
                         ("USD", r"\$0\.007650"), ("saved USD", r"\$0\.006000"),
                         ("cost per request", r"\$0\.002550")):
        assert re.search(rf"^  {label} +{value}$", totals, re.M), label
    models = got["top models"]
    assert re.search(r"^  m-a +1 +1 +1,000 +500 +\$0\.006000 +78\.4% +\$0\.006000$", models,
                     re.M)
    assert re.search(r"^  m-b +2 +0 +3,000 +2,000 +\$0\.001650 +21\.6% +\$0\.000825$",
                     models, re.M)
    assert "more" not in models
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    assert re.search(rf"^  {today} +3 +1 +\$0\.007650$", got["per day"], re.M)

    r = cli("costs", "--socket", sock, "--by", "user", "--top", "1", "--per", "hour")
    assert r.returncode == 0, r.stderr
    got = sections(r.stdout)
    assert re.search(r"^  alice +2 +1 +2,000 +1,500 +\$0\.006750 +88\.2% +\$0\.003375$",
                     got["top users"], re.M)
    assert "bob" not in got["top users"] and "  ... and 1 more" in got["top users"]
    assert re.search(r"^  \d{4}-\d\d-\d\d \d\d:\d\d +3 +1 +\$0\.007650$", got["per hour"],
                     re.M)

    r = cli("costs", "--socket", sock, "--by", "user", "--json")
    reply = json.loads(r.stdout)
    assert reply["by"] == "user" and reply["other_groups"] == 0
    assert {g["key"]: g["totals"]["usd"] for g in reply["groups"]} == {
        "alice": 0.00675, "bob": 0.0009}
    assert reply["totals"]["usd"] == pytest.approx(0.00765, abs=1e-12)


def test_costs_since_forms(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        traffic(c)
    sock = str(d.path)
    for since in ("2026-01-01", "7d", "today", "yesterday", "30m"):
        r = cli("costs", "--socket", sock, "--since", since, "--json")
        assert r.returncode == 0, (since, r.stderr)
        assert json.loads(r.stdout)["totals"]["requests"] == 3, since
    r = cli("costs", "--socket", sock, "--since", "2020-01-01", "--until", "2020-01-02",
            "--json")
    assert json.loads(r.stdout)["totals"]["requests"] == 0
    r = cli("costs", "--socket", sock, "--since", "last tuesday")
    assert r.returncode == 2
    assert "30m, 6h, 7d" in r.stderr and "epoch seconds" in r.stderr
    r = cli("costs", "--socket", sock, "--top", "20000")  # the daemon's bound is 10,000
    assert r.returncode == 2 and "top" in r.stderr
    r = cli("costs", "--socket", sock, "--since", "1d", "--until", "2d")
    assert r.returncode == 2 and "before since" in r.stderr


def test_costs_without_a_daemon_exits_1(tmp_path):
    assert cli("costs", "--socket", str(tmp_path / "none.sock")).returncode == 1


def test_limits_table(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        c.begin(model="m-a", user="alice", text="hello")
    r = cli("limits", "--socket", str(d.path), "--user", "alice")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^  per-user +user +alice +requests +60s +1 +2 +50%$", r.stdout, re.M)
    assert r.stdout.splitlines()[-1] == "open leases: 1"


def test_metrics_prints_the_prometheus_text(start_daemon):
    d = start_daemon(CONFIG)
    with Client(d.path) as c:
        traffic(c)
    r = cli("metrics", "--socket", str(d.path))
    assert r.returncode == 0, r.stderr
    families = {f.name: f for f in text_string_to_metric_families(r.stdout)}
    assert {"llm_sidecar_op_duration_seconds", "llm_sidecar_cost_usd"} <= families.keys()
    assert sum(s.value for s in families["llm_sidecar_cost_usd"].samples
               if s.name.endswith("_total")) == pytest.approx(0.00765)


# --- pure pieces ----------------------------------------------------------------------

NOW = dt.datetime(2026, 11, 23, 15, 30, 45, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize(("text", "expected"), [
    ("today", None),
    (" Today ", None),
    ("yesterday", dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc).timestamp()),
    ("30m", NOW - 1800),
    ("6h", NOW - 6 * 3600),
    ("7d", NOW - 7 * 86400),
    ("1.5h", NOW - 5400),
    ("90s", NOW - 90),
    ("0m", NOW),
    ("2026-11-20", dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-20T08:00", dt.datetime(2026, 11, 20, 8, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-20 08:00:30",
     dt.datetime(2026, 11, 20, 8, 0, 30, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-20T08:00Z", dt.datetime(2026, 11, 20, 8, tzinfo=dt.timezone.utc).timestamp()),
    ("2026-11-20T08:00+01:00",
     dt.datetime(2026, 11, 20, 7, tzinfo=dt.timezone.utc).timestamp()),
    ("1795000000", 1795000000.0),
    ("1795000000.5", 1795000000.5),
])
def test_parse_when(text, expected):
    assert parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", [
    "", "tomorrow", "7", "-7d", "7w", "d", "6 h", "2026-13-01", "2026-11-31", "2026-1120",
    "20261120T0800", "2026-W47", "2026-11-20T25:00", "2026-11-20x08:00", "nan", "inf",
])
def test_parse_when_refuses_with_the_accepted_forms(text):
    with pytest.raises(argparse.ArgumentTypeError, match="30m, 6h, 7d"):
        parse_when(text, NOW)


def test_table_sizes_columns_and_right_aligns_numbers():
    text = _table([("alpha", 5, "$0.100000", "x"), ("b", 12345, "$12.000000", "longer")],
                  ("name", "n", "USD", "note"))
    assert text.splitlines() == [
        "  name        n         USD  note",
        "  alpha       5   $0.100000  x",
        "  b      12,345  $12.000000  longer",
    ]
    assert _table([], ("a", "b")) == "  none"
