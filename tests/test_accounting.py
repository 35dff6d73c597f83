"""Accounting through a real daemon: exact costs of hand-computed usage, the request log,
totals surviving restarts (graceful and SIGKILL), Prometheus output parsed back, the
loopback metrics listener, alerts reaching an operator's command, and stats."""
from __future__ import annotations

import json
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar import Client
from sidecar.wire import Attempt

pytestmark = pytest.mark.timeout(60)

CONFIG = """
[limits]
retry_loop_max = 0
[[limits.rules]]
name = "rpm"
scope = "user"
metric = "requests"
window = "60s"
amount = 2
[[limits.rules]]
name = "daily"
scope = "global"
metric = "usd"
window = "day"
amount = 1000

[pricing.overrides]
"acct-a" = {{ input = 2.0, output = 8.0, cached_input = 0.5, reasoning = 10.0 }}
"acct-b" = {{ input = 0.15, output = 0.6 }}
"free-model" = {{ input = 0.0, output = 0.0 }}

[routes.ra]
models = [{{model = "acct-a", provider = "openai"}}]
[routes.rb]
models = [{{model = "acct-b", provider = "anthropic"}}, {{model = "acct-a", provider = "openai"}}]

[ledger]
request_log = "{log}"
{extra}
"""


def config(tmp_path, extra: str = "") -> str:
    return CONFIG.format(log=tmp_path / "requests.jsonl", extra=extra)


def ok(model: str, latency: float = 0.25) -> Attempt:
    return Attempt(model=model, ok=True, latency=latency)


def traffic(c: Client) -> None:
    """Hand-computed usage (prices per million tokens, see CONFIG):
    alice: 1,000 input at $2 + 200 cached at $0.5 + 400 output at $8 + 100 reasoning at
    $10 = 2,000 + 100 + 3,200 + 1,000 micro-dollars = $0.0063;
    bob: 333 x 2 + 77 x 8 = 666 + 616 = $0.001282;
    dave: acct-b fails, acct-a answers 10 in, 1 out = 20 + 8 = $0.000028;
    erin: acct-b, 7 in x 0.15 + 3 out x 0.6 = 2.85, rounded up to $0.000003."""
    b = c.begin(route="ra", user="alice", text="q1", max_tokens=600, template="summary",
                template_version="3")
    e = c.end(b.lease, model="acct-a", input_tokens=1200, cached_input_tokens=200,
              output_tokens=500, reasoning_tokens=100, attempts=[ok("acct-a")],
              response={"text": "a1"})
    assert e.usd == 0.0063 and e.stored
    b = c.begin(route="ra", user="bob", text="q2")
    assert c.end(b.lease, model="acct-a", input_tokens=333, output_tokens=77,
                 attempts=[ok("acct-a", 0.05)]).usd == 0.001282
    b = c.begin(route="rb", user="dave", text="q3")
    assert c.end(b.lease, model="acct-a", input_tokens=10, output_tokens=1, attempts=[
        Attempt(model="acct-b", ok=False, status=500, error="InternalServerError",
                latency=0.01), ok("acct-a")]).usd == 0.000028
    b = c.begin(route="rb", user="erin", text="q4")
    assert c.end(b.lease, model="acct-b", input_tokens=7, output_tokens=3,
                 attempts=[ok("acct-b")]).usd == 0.000003
    hit = c.begin(route="ra", user="alice", text="q1", request_id="req-hit")
    assert hit.outcome == "hit"  # saves 1,200 x 2 + 500 x 8 = $0.0064 at acct-a
    leases = [c.begin(route="ra", user="carol", text=f"c{i}").lease for i in range(2)]
    denied = c.begin(route="ra", user="carol", text="c2")
    assert denied.outcome == "deny" and denied.limit == "rpm"
    c.end(leases[0], attempts=[Attempt(model="acct-a", ok=False, status=503,
                                       error="ServiceUnavailable")])
    c.release(leases[1])


def costs_of(c: Client, by: str) -> dict:
    return {g.key: g.totals for g in c.costs(by=by, top=100).groups}


def test_costs_are_exact_and_the_request_log_says_the_same(start_daemon, tmp_path):
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        traffic(c)
        total = c.costs().totals
        assert total.usd == pytest.approx(0.0063 + 0.001282 + 0.000028 + 0.000003, abs=1e-12)
        assert (total.requests, total.errors, total.hits_exact, total.denials) == (5, 1, 1, 1)
        assert (total.input_tokens, total.output_tokens, total.cached_tokens,
                total.reasoning_tokens) == (1550, 581, 200, 100)
        assert total.saved_usd == 0.0064
        assert total.hit_rate == pytest.approx(1 / 6)
        users = costs_of(c, "user")
        assert users["alice"].usd == 0.0063 and users["alice"].hits_exact == 1
        assert users["bob"].usd == 0.001282 and users["carol"].errors == 1
        assert users["carol"].denials == 1 and users["carol"].usd == 0
        models = costs_of(c, "model")
        assert models["acct-a"].usd == pytest.approx(0.0063 + 0.001282 + 0.000028)
        assert models["acct-b"].usd == 0.000003
        routes = costs_of(c, "route")
        assert routes["rb"].requests == 2 and routes["ra"].requests == 3
        top = c.costs(by="user", top=1)
        assert [g.key for g in top.groups] == ["alice"] and top.other_groups == 4
        assert len(top.days) == 1 and top.days[0].totals == top.totals
        stats = c.stats()
        assert stats.spend_today == total
        assert stats.request_log is not None and stats.request_log.dropped == 0
    assert d.stop() == 0
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text()
               .splitlines()]
    assert [r["outcome"] for r in records] == ["ok", "ok", "ok", "ok", "hit", "deny", "error"]
    first = records[0]
    assert first["user.id"] == "alice" and first["sidecar.route"] == "ra"
    assert first["gen_ai.prompt.name"] == "summary" and first["sidecar.prompt.version"] == "3"
    assert first["gen_ai.request.model"] == first["gen_ai.response.model"] == "acct-a"
    assert first["gen_ai.provider.name"] == "openai"
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.output_tokens"],
            first["gen_ai.usage.cache_read.input_tokens"],
            first["gen_ai.usage.reasoning.output_tokens"]) == (1200, 500, 200, 100)
    assert first["sidecar.cost_usd"] == 0.0063 and first["sidecar.cache.tier"] == "miss"
    assert first["sidecar.attempts"] == [{"model": "acct-a", "ok": True, "status": 0,
                                          "error": "", "retry_after": 0.0, "latency": 0.25}]
    assert first["sidecar.duration_s"] >= 0 and first["request_id"]
    fallback = records[2]
    assert fallback["gen_ai.request.model"] == "acct-b"
    assert fallback["gen_ai.response.model"] == "acct-a" and fallback["sidecar.fallback_depth"] == 1
    hit = records[4]
    assert hit["request_id"] == "req-hit" and hit["sidecar.cache.tier"] == "exact"
    assert hit["sidecar.cache.similarity"] == 1.0 and hit["sidecar.cost_usd"] == 0
    assert records[5]["sidecar.deny.limit"] == "rpm"
    assert records[6]["error.type"] == "ServiceUnavailable"
    assert sum(r["sidecar.cost_usd"] for r in records) == pytest.approx(
        total.usd, abs=1e-12)


def test_cost_totals_survive_restarts_and_kill(start_daemon, tmp_path):
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        traffic(c)
        before = c.costs(by="user", top=100)
    assert d.stop() == 0
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        again = c.costs(by="user", top=100, since=before.since)
        assert (again.totals, again.groups) == (before.totals, before.groups)
        b = c.begin(route="ra", user="zoe", text="last")
        c.end(b.lease, model="acct-a", input_tokens=1, output_tokens=1)  # $0.00001
        after = c.costs(since=before.since).totals
    d.proc.kill()  # no shutdown: only what end had made durable survives
    d.proc.wait()
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        restored = c.costs(since=before.since).totals
        assert restored == after and restored.usd == pytest.approx(before.totals.usd + 0.00001)
    assert d.stop() == 0


def test_prometheus_exposition_parses_back(start_daemon, tmp_path):
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        traffic(c)
        c.ping()
        text = c.metrics()
        total = c.costs().totals
    assert d.stop() == 0
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str, **labels: str) -> float:
        found = [s.value for s in families[family].samples
                 if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (sample, labels, families[family].samples)
        return found[0]

    assert families["llm_sidecar_requests"].type == "counter"
    assert value("llm_sidecar_requests", "llm_sidecar_requests_total", route="ra",
                 outcome="ok") == 2
    assert value("llm_sidecar_requests", "llm_sidecar_requests_total", route="ra",
                 outcome="hit") == 1
    assert value("llm_sidecar_requests", "llm_sidecar_requests_total", route="ra",
                 outcome="error") == 1
    assert value("llm_sidecar_denials", "llm_sidecar_denials_total", reason="limit",
                 limit="rpm") == 1
    assert value("llm_sidecar_fallbacks", "llm_sidecar_fallbacks_total", route="rb") == 1
    assert value("llm_sidecar_cache_hits", "llm_sidecar_cache_hits_total", tier="exact") == 1
    assert sum(s.value for s in families["llm_sidecar_cost_usd"].samples
               if s.name.endswith("_total")) == pytest.approx(total.usd)
    assert value("llm_sidecar_cache_saved_usd", "llm_sidecar_cache_saved_usd_total",
                 model="acct-a") == pytest.approx(0.0064)
    duration = families["gen_ai_client_operation_duration_seconds"]
    assert duration.type == "histogram"
    sample = "gen_ai_client_operation_duration_seconds_count"
    assert value(duration.name, sample, gen_ai_request_model="acct-a",
                 input_tokens="1K-10K") == 1  # alice, 1,200 input tokens
    assert value(duration.name, sample, gen_ai_request_model="acct-a",
                 input_tokens="0-1K") == 3  # bob, dave and carol's failure
    assert value(duration.name, sample, gen_ai_request_model="acct-b",
                 input_tokens="0-1K") == 2  # dave's failure and erin
    assert value(duration.name, "gen_ai_client_operation_duration_seconds_bucket",
                 gen_ai_request_model="acct-a", input_tokens="1K-10K", le="0.16") == 0
    assert value(duration.name, "gen_ai_client_operation_duration_seconds_bucket",
                 gen_ai_request_model="acct-a", input_tokens="1K-10K", le="0.32") == 1
    assert value(duration.name, "gen_ai_client_operation_duration_seconds_sum",
                 gen_ai_request_model="acct-a", input_tokens="1K-10K") == 0.25
    tokens = families["gen_ai_client_token_usage"]
    assert tokens.type == "histogram"
    assert value(tokens.name, "gen_ai_client_token_usage_sum", gen_ai_request_model="acct-a",
                 gen_ai_token_type="input") == 1200 + 333 + 10 + 0
    ops = families["llm_sidecar_op_duration_seconds"]
    assert ops.type == "histogram"
    # the exact hit came from the shared-memory segment: 7 begins, and one hits op told it
    assert value(ops.name, "llm_sidecar_op_duration_seconds_count", op="begin") == 7
    assert value(ops.name, "llm_sidecar_op_duration_seconds_count", op="hits") == 1
    assert value(ops.name, "llm_sidecar_op_duration_seconds_bucket", op="ping",
                 le="+Inf") == 1
    assert value("llm_sidecar_circuit_state", "llm_sidecar_circuit_state", model="acct-a",
                 state="closed") == 1
    assert families["llm_sidecar_leases_open"].type == "gauge"
    assert value("llm_sidecar_request_log_records", "llm_sidecar_request_log_records_total",
                 result="dropped") == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_listener_on_loopback(start_daemon, tmp_path):
    port = _free_port()
    d = start_daemon(config(tmp_path, f"[metrics]\nhttp_port = {port}\n"))
    with Client(d.path) as c:
        c.ping()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        names = {f.name for f in text_string_to_metric_families(r.read().decode())}
    assert {"llm_sidecar_op_duration_seconds", "llm_sidecar_uptime_seconds"} <= names
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=5)
    assert err.value.code == 404
    err.value.close()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # garbage
        s.sendall(b"\x00" * 9000)
        try:
            closed = s.recv(100) == b""  # closed without a reply
        except ConnectionResetError:  # closed with the garbage unread
            closed = True
        assert closed
    with Client(d.path) as c:
        assert c.ping() > 0  # still serving
    assert d.stop() == 0


def test_metrics_listener_refuses_other_addresses(start_daemon, tmp_path):
    d = start_daemon(config(tmp_path, '[metrics]\nhttp_port = 9\nhttp_address = "0.0.0.0"\n'),
                     wait=False)
    assert d.proc.wait(timeout=15) == 2
    assert "not a loopback address" in d.log()


def test_alerts_reach_stats_counter_and_command(start_daemon, tmp_path):
    out = tmp_path / "alerts.jsonl"
    script = "import sys; open(sys.argv[1], 'a').write(sys.stdin.read())"
    extra = (f"[alerts]\ncommand = [{json.dumps(sys.executable)}, \"-c\", "
             f"{json.dumps(script)}, {json.dumps(str(out))}]\n")
    d = start_daemon(config(tmp_path, extra))
    with Client(d.path) as c:
        b = c.begin(model="free-model", user="alice", text="hello")
        c.end(b.lease, model="free-model", input_tokens=10, output_tokens=5)
        stats = c.stats()
        assert stats.alert_counts == {"zero_price": 1}
        assert [a.kind for a in stats.alerts] == ["zero_price"]
        assert "free-model" in stats.alerts[0].message
        families = {f.name: f for f in text_string_to_metric_families(c.metrics())}
        assert [s.value for s in families["llm_sidecar_alerts"].samples
                if s.labels.get("kind") == "zero_price" and s.name.endswith("_total")] == [1]
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.stop() == 0  # the notifier is drained at shutdown
    payload = json.loads(out.read_text())
    assert payload["kind"] == "zero_price" and payload["subject"] == "free-model"


def test_stats_latency_by_model_and_size(start_daemon, tmp_path):
    d = start_daemon(config(tmp_path))
    with Client(d.path) as c:
        for i, latency in enumerate((0.1, 0.2, 0.3, 0.4)):
            b = c.begin(route="ra", user=f"u{i}", text=f"x{i}")
            c.end(b.lease, model="acct-a", input_tokens=20_000, output_tokens=1,
                  attempts=[ok("acct-a", latency)])
        rows = [r for r in c.stats().latency if r.model == "acct-a"]
        ops = c.stats().ops["begin"]
    assert len(rows) == 1 and rows[0].input_tokens == "10K-50K" and rows[0].calls == 4
    assert (rows[0].p50_ms, rows[0].p95_ms, rows[0].p99_ms) == (200.0, 400.0, 400.0)
    assert 0 < ops.p50_us <= ops.p95_us <= ops.p99_us
    assert d.stop() == 0
