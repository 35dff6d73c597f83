"""Model prices and costs: the real genai-prices data, LiteLLM files the tests write,
overrides, exact integer rounding, the lookup cache and offline operation."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from sidecar.errors import ConfigError, InvalidValue
from sidecar.limits.pricing import (
    DEFAULT_PRICE, Cost, Price, PricingRegistry, Source, Usage, format_usd, load_litellm, usd,
)

AT = datetime(2026, 11, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def registry() -> PricingRegistry:
    return PricingRegistry(at=AT)


# Published list prices (USD per million tokens: input, output, cached input) that have
# not changed since these models launched; genai-prices must agree with them.
SEED_PRICES = {
    "gpt-4o": (2.5, 10.0, 1.25),
    "gpt-4o-mini": (0.15, 0.6, 0.075),
    "claude-sonnet-4": (3.0, 15.0, 0.3),
    "claude-3-5-haiku": (0.8, 4.0, 0.08),
    "claude-haiku-4-5": (1.0, 5.0, 0.1),
}


@pytest.mark.parametrize("model", SEED_PRICES)
def test_seed_models_price_as_published(registry: PricingRegistry, model: str) -> None:
    price, priced_as, known, source = registry.price(model)
    assert known and source is Source.GENAI_PRICES
    assert (price.input, price.output, price.cached_input) == SEED_PRICES[model]
    assert price.reasoning is None  # reasoning is billed at the output rate


@pytest.mark.parametrize("model, canonical", [
    ("gpt-4o-2024-08-06", "gpt-4o"),
    ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
    ("claude-sonnet-4-20250514", "claude-sonnet-4"),
    ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
    ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
    ("anthropic/claude-3-5-haiku", "claude-3-5-haiku"),
    ("openai/gpt-4o", "gpt-4o"),
    ("GPT-4o", "gpt-4o"),
])
def test_dated_and_prefixed_names_resolve(registry: PricingRegistry, model: str,
                                          canonical: str) -> None:
    found = registry.price(model)
    assert found.known
    assert found.price == registry.price(canonical).price
    assert found.priced_as == registry.price(canonical).priced_as


@pytest.mark.parametrize("model", [
    "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini", "gpt-5-nano",
    "o1", "o3", "o3-mini", "o4-mini",
    "claude-3-opus", "claude-3-haiku-20240307", "claude-3-7-sonnet", "claude-opus-4",
    "claude-opus-4-1", "claude-sonnet-4-5",
    "gemini-2.0-flash", "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.5-flash-lite",
])
def test_current_families_are_known(registry: PricingRegistry, model: str) -> None:
    price, _, known, source = registry.price(model)
    assert known and source is Source.GENAI_PRICES
    assert 0 < price.input <= price.output


def test_relative_prices(registry: PricingRegistry) -> None:
    def inp(model: str) -> float:
        return registry.price(model).price.input
    assert inp("gpt-4o-mini") < inp("gpt-4o")
    assert inp("gpt-4.1-nano") < inp("gpt-4.1-mini") < inp("gpt-4.1")
    assert inp("gpt-5-nano") < inp("gpt-5-mini") < inp("gpt-5")
    assert inp("claude-3-5-haiku") < inp("claude-sonnet-4") < inp("claude-opus-4")


def test_cost_is_exact_integer_micro_usd(registry: PricingRegistry) -> None:
    # gpt-4o: 1000 * $2.50/M + 100 * $10/M = $0.0035
    assert registry.cost("gpt-4o", Usage(1000, 100)) == Cost(3500, "openai/gpt-4o", True)
    # 1 gpt-4o-mini input token is 0.15 micro-dollars: rounded up, never down to 0.
    assert registry.cost("gpt-4o-mini", Usage(1, 0)).micro_usd == 1
    assert registry.cost("gpt-4o-mini", Usage(0, 0)).micro_usd == 0
    # 7 * 0.15 + 3 * 0.6 = 2.85 -> 3
    assert registry.cost("gpt-4o-mini", Usage(7, 3)).micro_usd == 3
    # 20 * 0.15 = 3 exactly: no round-up
    assert registry.cost("gpt-4o-mini", Usage(20, 0)).micro_usd == 3
    assert format_usd(3500) == "$0.003500" and format_usd(12_345_678) == "$12.345678"
    assert usd(3500) == Decimal("0.0035")


def test_no_float_accumulation() -> None:
    # In floats 100 * 0.07 is 7.000000000000001, which a ceiling would bill as 8.
    reg = PricingRegistry(overrides={"m": Price(0.07, 0.0)}, use_genai_prices=False)
    assert reg.cost("m", Usage(100, 0)).micro_usd == 7
    many = Usage(10**9, 10**9)  # a billion tokens stays exact too
    reg = PricingRegistry(overrides={"m": Price(0.1, 0.2)}, use_genai_prices=False)
    assert reg.cost("m", many).micro_usd == 300_000_000


def test_cached_input_is_part_of_input(registry: PricingRegistry) -> None:
    # 1000 input of which 400 cached: 600 * 2.5 + 400 * 1.25 = 2000
    assert registry.cost("gpt-4o", Usage(1000, 0, cached_input_tokens=400)).micro_usd == 2000
    # Claude: 1000 * 3 would be 3000; 1000 cached reads at 0.3 = 300
    assert registry.cost("claude-sonnet-4",
                         Usage(1000, 0, cached_input_tokens=1000)).micro_usd == 300
    # no cached rate configured: cached tokens cost full input price
    reg = PricingRegistry(overrides={"m": Price(2.0, 8.0)}, use_genai_prices=False)
    assert reg.cost("m", Usage(1000, 0, 1000)) == reg.cost("m", Usage(1000, 0))


def test_reasoning_is_part_of_output(registry: PricingRegistry) -> None:
    # OpenAI bills reasoning tokens as output tokens: same cost either way.
    assert (registry.cost("o3", Usage(100, 1000, reasoning_tokens=800))
            == registry.cost("o3", Usage(100, 1000)))
    assert registry.cost("o3", Usage(0, 1000, reasoning_tokens=800)).micro_usd == 8000
    # a configured reasoning rate applies to the reasoning share only: 6 * 4 + 4 * 8
    reg = PricingRegistry(overrides={"r": Price(1.0, 4.0, reasoning=8.0)},
                          use_genai_prices=False)
    assert reg.cost("r", Usage(0, 10, reasoning_tokens=4)).micro_usd == 56


@pytest.mark.parametrize("usage", [
    Usage(10, 0, cached_input_tokens=11), Usage(0, 5, reasoning_tokens=6), Usage(-1, 0),
    Usage(1.5, 0),  # type: ignore[arg-type]
])
def test_inconsistent_usage_is_rejected(registry: PricingRegistry, usage: Usage) -> None:
    with pytest.raises(InvalidValue):
        registry.cost("gpt-4o", usage)


def test_long_context_tiers(registry: PricingRegistry) -> None:
    price = registry.price("gemini-2.5-pro").price
    assert price.tiers and price.tiers[0][0] == 200_000
    base, above = price, price.tiers[0][1]
    assert above.input > base.input and above.output > base.output
    # at the threshold the base rate applies; one token over, the whole request is dearer
    assert registry.cost("gemini-2.5-pro", Usage(200_000, 0)).micro_usd == 200_000 * 1.25
    assert registry.cost("gemini-2.5-pro", Usage(200_001, 0)).micro_usd == 500_003  # 2.5
    assert registry.cost("gemini-2.5-pro", Usage(200_001, 1000)).micro_usd == 500_003 + 15_000
    assert registry.estimate("gemini-2.5-pro", 300_000, 0).micro_usd == 750_000


def test_dated_prices_resolve_at_the_registry_date() -> None:
    # OpenAI cut o3 from $10/$40 to $2/$8 on 2025-06-10.
    before = PricingRegistry(at=datetime(2025, 6, 9, 12, tzinfo=UTC)).price("o3").price
    after = PricingRegistry(at=datetime(2025, 6, 10, 12, tzinfo=UTC)).price("o3").price
    assert (before.input, before.output) == (10.0, 40.0)
    assert (after.input, after.output) == (2.0, 8.0)


def test_time_of_day_prices_take_the_peak_rate() -> None:
    # DeepSeek's off-peak discount: the cached price must not depend on the hour the
    # registry was built, and must be the dearest rate of the day (genai-prices' own
    # calc_price, asked at each hour, is the oracle).
    import genai_prices

    hours = [datetime(2026, 11, 23, h, 45, tzinfo=UTC) for h in range(24)]
    quoted = {PricingRegistry(at=at).price("deepseek-chat").price for at in hours[::6]}
    assert len(quoted) == 1
    price = quoted.pop()
    for field, usage in (("input", genai_prices.Usage(input_tokens=10**6)),
                         ("output", genai_prices.Usage(output_tokens=10**6))):
        day = {genai_prices.calc_price(usage, "deepseek-chat", genai_request_timestamp=at)
               .total_price for at in hours}
        assert len(day) == 2  # the data does have an off-peak rate
        assert getattr(price, field) == float(max(day))


def test_estimate_is_an_upper_bound(registry: PricingRegistry) -> None:
    assert registry.estimate("gpt-4o", 1000, 500) == Cost(7500, "openai/gpt-4o", True)
    reg = PricingRegistry(overrides={"r": Price(1.0, 4.0, cached_input=0.5, reasoning=8.0)},
                          use_genai_prices=False)
    est = reg.estimate("r", 100, 10).micro_usd
    assert est == 100 + 80
    for usage in (Usage(100, 10), Usage(100, 10, 100, 10), Usage(100, 10, 0, 3)):
        assert reg.cost("r", usage).micro_usd <= est
    with pytest.raises(InvalidValue):
        reg.estimate("r", -1, 10)


def test_overrides_beat_genai_prices() -> None:
    reg = PricingRegistry(at=AT, overrides={
        "gpt-*": Price(9.0, 9.0),
        "gpt-4o": Price(1.0, 2.0),
        "gpt-4o-mini*": Price(0.5, 0.5),
        "gpt-4o-mini": Price(0.25, 0.25),
    })
    assert reg.price("gpt-4o") == (Price(1.0, 2.0), "gpt-4o", True, Source.OVERRIDE)
    assert reg.cost("gpt-4o", Usage(1000, 1000)).micro_usd == 3000
    # exact names first, then the longest prefix entry
    assert reg.price("gpt-4o-mini").priced_as == "gpt-4o-mini"
    assert reg.price("gpt-4o-mini-2024-07-18").priced_as == "gpt-4o-mini*"
    # an exact entry is not a prefix: "gpt-4o" does not capture its dated names
    assert reg.price("gpt-4o-2024-08-06").priced_as == "gpt-*"
    # names no override matches still come from genai-prices
    assert reg.price("claude-sonnet-4").source is Source.GENAI_PRICES


@pytest.mark.parametrize("bad", [
    Price(-1.0, 1.0), Price(1.0, float("nan")), Price(1.0, float("inf")),
    Price("1", 1.0),  # type: ignore[arg-type]
    Price(1.0, 1.0, tiers=((200, Price(2.0, 2.0)), (100, Price(3.0, 3.0)))),
    Price(1.0, 1.0, tiers=((-5, Price(2.0, 2.0)),)),
])
def test_bad_override_is_a_config_error(bad: Price) -> None:
    with pytest.raises(ConfigError, match="gpt-4o"):
        PricingRegistry(overrides={"gpt-4o": bad}, use_genai_prices=False)


def write_litellm(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


LITELLM = {
    "sample_spec": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                    "litellm_provider": "one of https://docs.litellm.ai/docs/providers"},
    "gpt-4o": {"input_cost_per_token": 5e-06, "output_cost_per_token": 2e-05,
               "cache_read_input_token_cost": 2.5e-06, "litellm_provider": "openai",
               "mode": "chat"},
    "house-model": {"input_cost_per_token": 7e-08, "output_cost_per_token": 2.8e-07,
                    "output_cost_per_reasoning_token": 5.6e-07, "litellm_provider": "x",
                    "mode": "chat"},
    "long-model": {"input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
                   "cache_read_input_token_cost": 3.1e-07,
                   "input_cost_per_token_above_200k_tokens": 2.5e-06,
                   "output_cost_per_token_above_200k_tokens": 1.5e-05,
                   "input_cost_per_token_flex_above_200k_tokens": 1e-06,
                   "mode": "chat"},
    "text-embedding-house": {"input_cost_per_token": 1e-08, "output_cost_per_token": 0.0,
                             "mode": "embedding"},
    "no-output-cost": {"input_cost_per_token": 1e-06, "mode": "chat"},
    "image-model": {"output_cost_per_image": 0.04, "mode": "image_generation"},
}


def test_litellm_json_loads(tmp_path: Path) -> None:
    prices = load_litellm(write_litellm(tmp_path / "prices.json", LITELLM))
    assert set(prices) == {"gpt-4o", "house-model", "long-model"}
    assert prices["gpt-4o"] == Price(5.0, 20.0, 2.5)
    assert prices["house-model"] == Price(0.07, 0.28, reasoning=0.56)
    long = prices["long-model"]
    assert long.tiers == ((200_000, Price(2.5, 15.0, 0.31)),)


def test_litellm_prices_in_the_registry(tmp_path: Path) -> None:
    path = write_litellm(tmp_path / "prices.json", LITELLM)
    reg = PricingRegistry(at=AT, litellm_json=path, overrides={"house-model": Price(1, 1)})
    # the operator's LiteLLM file beats genai-prices; overrides beat both
    assert reg.price("gpt-4o") == (Price(5.0, 20.0, 2.5), "gpt-4o", True, Source.LITELLM)
    assert reg.price("house-model").source is Source.OVERRIDE
    # a provider prefix falls back to the bare LiteLLM key
    assert reg.price("custom/long-model").priced_as == "long-model"
    assert reg.cost("long-model", Usage(200_001, 0)).micro_usd == 500_003
    # LiteLLM skipped the embedding entry; genai-prices does not know it either
    assert not reg.price("text-embedding-house").known
    assert reg.price("claude-haiku-4-5").source is Source.GENAI_PRICES


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"m": {"input_cost_per_token": "cheap", "output_cost_per_token": 1e-6}}',
     "m.input_cost_per_token"),
    ('{"m": {"input_cost_per_token": -1e-6, "output_cost_per_token": 1e-6}}',
     "m.input_cost_per_token"),
    ('{"m": 3}', "m: expected an object"),
])
def test_bad_litellm_json_names_the_file(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "broken-prices.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=match) as info:
        PricingRegistry(litellm_json=path, use_genai_prices=False)
    assert str(path) in str(info.value)


def test_missing_litellm_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.json"):
        PricingRegistry(litellm_json=tmp_path / "absent.json", use_genai_prices=False)


def test_unknown_model_uses_the_default_and_says_so(registry: PricingRegistry) -> None:
    price, priced_as, known, source = registry.price("no-such-model-xyz")
    assert (price, priced_as, known, source) == (DEFAULT_PRICE, "default", False,
                                                 Source.DEFAULT)
    cost = registry.cost("no-such-model-xyz", Usage(1000, 1000))
    assert cost == Cost(15_000 + 75_000, "default", False)
    assert cost.micro_usd > registry.cost("gpt-4o", Usage(1000, 1000)).micro_usd
    reg = PricingRegistry(default=Price(1.0, 2.0), use_genai_prices=False)
    assert reg.cost("gpt-4o", Usage(1000, 1000)) == Cost(3000, "default", False)
    assert not reg.price("").known


class CountingRegistry(PricingRegistry):
    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.resolved: list[str] = []

    def _lookup(self, model: str) -> object:  # type: ignore[override]
        self.resolved.append(model)
        return super()._lookup(model)


def test_lookup_is_cached() -> None:
    reg = CountingRegistry(at=AT)
    first = reg.cost("gpt-4o-2024-08-06", Usage(10, 10))
    for _ in range(3):
        assert reg.cost("gpt-4o-2024-08-06", Usage(10, 10)) == first
        assert reg.price("gpt-4o-2024-08-06").known
        reg.estimate("gpt-4o-2024-08-06", 10, 10)
    reg.price("unknown-model-abc")
    reg.price("unknown-model-abc")
    assert reg.resolved == ["gpt-4o-2024-08-06", "unknown-model-abc"]


def test_lookup_cache_is_bounded() -> None:
    reg = CountingRegistry(cache_size=2, use_genai_prices=False)
    for name in ("a", "b", "c", "a"):
        reg.price(name)
    assert reg.resolved == ["a", "b", "c", "a"]  # "a" was evicted by "c"
    assert len(reg._cache) == 2


OFFLINE = textwrap.dedent("""
    import json, sys, threading

    def refuse(event, args):
        if event.startswith(("socket.", "urllib.", "http.")) or event == "ssl.wrap_socket":
            raise RuntimeError(f"network use: {event} {args!r}")
    sys.addaudithook(refuse)

    from datetime import UTC, datetime
    from sidecar.limits.pricing import PricingRegistry, Usage
    reg = PricingRegistry(at=datetime(2026, 11, 23, tzinfo=UTC))
    out = {m: [reg.cost(m, Usage(1000, 1000)).micro_usd, reg.price(m).priced_as]
           for m in sys.argv[1:]}
    out["threads"] = [t.name for t in threading.enumerate()]
    out["modules"] = sorted(m for m in ("genai_prices.data", "httpx2") if m in sys.modules)
    import socket
    try:
        socket.create_connection(("127.0.0.1", 9))
    except RuntimeError:
        out["hook"] = "refused"
    print(json.dumps(out))
""")


def test_works_with_the_network_refused(registry: PricingRegistry, tmp_path: Path) -> None:
    models = ["gpt-4o", "claude-sonnet-4-20250514", "anthropic/claude-3-5-haiku",
              "gemini-2.5-pro", "no-such-model"]
    # The audit hook makes any socket creation, DNS lookup or URL open raise at once.
    proc = subprocess.run([sys.executable, "-c", OFFLINE, *models], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out.pop("hook") == "refused"  # the hook does stop network use
    assert out.pop("threads") == ["MainThread"]  # no genai-prices updater thread
    assert out.pop("modules") == ["genai_prices.data", "httpx2"]  # the data was really read
    expected = {m: [registry.cost(m, Usage(1000, 1000)).micro_usd, registry.price(m).priced_as]
                for m in models}
    assert out == expected
