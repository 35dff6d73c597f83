"""The daemon's periodic tasks: they survive their own failures visibly (counted, logged
at most once a minute each), and housekeeping under the shipped default config keeps the
retry-loop guard's memory bounded."""
import logging
import re
import time

import msgspec
import psutil

from sidecar import Client
from sidecar.cli.render import render_stats
from sidecar.ledger.metrics import Exposition, Gauges, Metrics
from sidecar.failures import TaskFailures
from sidecar.wire import OPS, Admit


def test_a_failing_task_is_counted_and_logged_once_a_minute(caplog):
    failures = TaskFailures(log_every=60.0)
    with caplog.at_level(logging.ERROR, logger="sidecar.periodic"):
        for now in (0.0, 1.0, 59.9, 60.0, 61.0):
            failures.record("housekeeping.limits", IndexError("boom"), now)
        failures.record("cluster.sync", OSError("down"), 61.0)  # its own minute
    assert failures.counts == {"housekeeping.limits": 5, "cluster.sync": 1}
    logged = [(r.getMessage(), r.exc_info[0]) for r in caplog.records]
    assert [m.split(" failed")[0] for m, _ in logged] == [
        "periodic task housekeeping.limits", "periodic task housekeeping.limits",
        "periodic task cluster.sync"]
    assert "2 more since the last report" in logged[1][0]
    assert [exc for _, exc in logged] == [IndexError, IndexError, OSError]


def test_guard_swallows_a_failure_and_the_next_step_runs():
    failures = TaskFailures()
    ran = []
    for step in ("a", "b"):
        with failures.guard(step):
            if step == "a":
                raise RuntimeError("a bug in step a")
            ran.append(step)
    assert ran == ["b"] and failures.counts == {"a": 1}


def test_task_failures_in_the_dashboard_and_prometheus(daemon):
    with Client(daemon.path) as c:
        stats = c.stats()
    assert re.search(r"task failures +none\n", render_stats(stats))
    shown = render_stats(msgspec.structs.replace(
        stats, task_failures={"housekeeping.limits": 3, "cluster.sync": 1}))
    daemon_section = shown.split("== ops ==")[0]
    assert re.search(r"task failures +cluster.sync=1, housekeeping.limits=3\n",
                     daemon_section)
    metrics = Metrics(OPS)
    metrics.task_failures.record("server.sweep", ValueError(), 0.0)
    text = Exposition(metrics).render(Gauges(
        uptime_s=1.0, open_leases=0, cache_entries={}, cache_bytes={}, cache_hits={},
        cache_misses={}, semantic_pending=0, circuits={}, transitions={}, log_written=0,
        log_dropped=0, log_failed=0, notify_dropped=0, limit_alerts={}, alert_counts={},
        cluster=None)).decode()
    assert 'llm_sidecar_task_failures_total{task="server.sweep"} 1.0' in text


def test_housekeeping_with_the_default_config_and_retry_loop_data(daemon):
    """The shipped default (retry_loop_max = 5) holds admits in the retry-loop map; the
    housekeeping that prunes it once raised IndexError every other second."""
    with Client(daemon.path) as c:
        replies = c.batch([Admit(user="u", text=f"prompt {i % 7}", max_tokens=5)
                           for i in range(50)])
        assert any(r.reason == "retry_loop" for r in replies)  # the guard is on
        time.sleep(2.5)  # housekeeping runs every second: at least two ticks
        stats = c.stats()
    assert "Traceback" not in daemon.log(), daemon.log()
    assert stats.task_failures == {}
    assert stats.retry_loop_keys == 7  # still in their 60 s window: nothing pruned early
    assert "retry-loop guard: 7 of 10,000 (user, prompt) keys tracked, 0 forgotten" in \
        render_stats(stats)


def test_rss_flat_after_200k_distinct_prompts_from_one_user(daemon):
    """Default config: every admit (denied after the first few by the per-user rate, as
    a loop's retries would be) adds a retry-loop key; the map stops at its cap."""
    proc = psutil.Process(daemon.pid)
    daemon.wait_semantic_ready()  # its model loads in the background after start

    def admit(start: int, stop: int) -> None:
        for lo in range(start, stop, 2000):
            c.batch([Admit(user="u", text=f"distinct prompt number {i}", max_tokens=1)
                     for i in range(lo, min(lo + 2000, stop))])

    with Client(daemon.path, timeout=60) as c:
        admit(0, 2000)  # warm up the tokenizer's cache, buffers and allocator pools
        before = proc.memory_info().rss
        admit(2000, 202_000)
        after = proc.memory_info().rss
        stats = c.stats()
    assert after - before < 10 * 2**20, f"RSS grew {(after - before) / 2**20:.1f} MiB"
    assert stats.retry_loop_keys == stats.retry_loop_max_keys == 10_000
    assert stats.retry_loop_forgotten == 192_000
