"""Model price registry and the cost of a usage record.

A ``PricingRegistry`` answers "what does this model cost per million tokens" and "what did
this usage cost", exactly, in integer micro-dollars. Prices come, highest priority first,
from configured overrides (exact names, then ``prefix*`` entries, longest prefix winning),
an optional LiteLLM-format ``model_prices_and_context_window.json``, and the price data
that ships inside the ``genai-prices`` wheel (read offline from the bundled snapshot only:
its opt-in ``UpdatePrices`` downloader is never started, and prices it fetched for other
libraries in the process are never used). A model none of them knows is priced at a
configured default and flagged ``known=False``, never silently free. Lookups are cached per
model name, so the per-request cost is a dict hit and a few integer multiplications.

Usage conventions (OpenAI's): ``input_tokens`` includes ``cached_input_tokens`` and
``output_tokens`` includes ``reasoning_tokens``. Adapters for APIs that report them apart
(Anthropic's ``cache_read_input_tokens``, Gemini's ``thoughtsTokenCount``) add them in.
"""
from __future__ import annotations

import enum
import json
import logging
import math
import re
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Mapping, NamedTuple

from ..errors import ConfigError, InvalidValue

log = logging.getLogger("sidecar.pricing")

#: Internal rates are integers in picodollars per token (= 1e-6 USD per million tokens),
#: so a price with up to six decimals in USD per million tokens is held exactly and the
#: cost of a usage is an exact integer before the single round-up to micro-dollars.
_PICO_PER_USD_PER_MTOK = 10**6
_PICO_PER_MICRO = 10**6
_STEP = Decimal(1).scaleb(-6)

#: LiteLLM modes that are priced per token like a chat call; other modes are skipped.
LITELLM_MODES = frozenset({"chat", "completion", "responses"})
_LITELLM_FIELDS = {  # LiteLLM field (USD per token) -> Price field
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "output_cost_per_reasoning_token": "reasoning",
}
_LITELLM_TIER = re.compile(r"(?P<field>[a-z_]+)_above_(?P<k>\d+)k_tokens")

#: Lookup-cache bound: model names come from clients, so memory must not grow with them.
CACHE_SIZE = 4096


class Price(NamedTuple):
    """USD per million tokens. ``cached_input=None`` bills cached input tokens at
    ``input``; ``reasoning=None`` bills reasoning tokens at ``output``. ``tiers`` are
    long-context prices: ``(threshold, price)`` pairs in ascending order, the last whose
    threshold the request's ``input_tokens`` exceeds replacing this price for the whole
    request (the providers' "cliff" model, as genai-prices and LiteLLM apply it)."""

    input: float
    output: float
    cached_input: float | None = None
    reasoning: float | None = None
    tiers: tuple[tuple[int, Price], ...] = ()


class Usage(NamedTuple):
    """Tokens of one call. ``input_tokens`` includes ``cached_input_tokens`` (as OpenAI's
    ``prompt_tokens`` does) and ``output_tokens`` includes ``reasoning_tokens`` (as
    OpenAI's ``completion_tokens`` and Anthropic's ``output_tokens`` do)."""

    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0


class Cost(NamedTuple):
    micro_usd: int  # the exact cost, rounded up to a whole micro-dollar per request
    priced_as: str  # the key of the price used, "default" when the model is unknown
    known: bool  # False when the default price was used


class Source(enum.Enum):
    """Where a model's price came from."""

    OVERRIDE = "override"
    LITELLM = "litellm"
    GENAI_PRICES = "genai-prices"
    DEFAULT = "default"


class PriceLookup(NamedTuple):
    price: Price
    priced_as: str  # override key, LiteLLM key, genai-prices "provider/model id", "default"
    known: bool
    source: Source


#: Unknown models are priced at the dearest mainstream list price (Claude Opus 4.x,
#: $15/$75), so an unpriced model is over- rather than under-counted against budgets.
DEFAULT_PRICE = Price(input=15.0, output=75.0)


class _Rates(NamedTuple):
    input: int  # picodollars per token
    output: int
    cached_input: int
    reasoning: int
    tiers: tuple[tuple[int, _Rates], ...]


class _Entry(NamedTuple):
    lookup: PriceLookup
    rates: _Rates


def format_usd(micro_usd: int) -> str:
    """``1234567`` -> ``"$1.234567"``: micro-dollars as an exact dollar string."""
    sign = "-" if micro_usd < 0 else ""
    whole, frac = divmod(abs(micro_usd), 10**6)
    return f"{sign}${whole}.{frac:06d}"


def usd(micro_usd: int) -> Decimal:
    """Micro-dollars as an exact ``Decimal`` of dollars."""
    return Decimal(micro_usd).scaleb(-6)


# --- prices -> exact integer rates ----------------------------------------------------


def _rate(value: Any, what: str, source: str) -> int:
    """A price in USD per million tokens as picodollars per token, by its shortest
    decimal spelling (0.075 is exactly 0.075); finer digits round to the nearest step."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise ConfigError(f"a price must be a number of USD per million tokens, not {value!r}",
                          source=source, key=what)
    try:
        exact = value if isinstance(value, Decimal) else Decimal(repr(value))
        if not exact.is_finite() or exact < 0:
            raise InvalidOperation
        return int(exact.quantize(_STEP, rounding=ROUND_HALF_EVEN) * _PICO_PER_USD_PER_MTOK)
    except InvalidOperation:
        raise ConfigError(f"a price must be a finite, non-negative number, not {value!r}",
                          source=source, key=what) from None


def _rates(price: Price, where: str, source: str, *, nested: bool = False) -> _Rates:
    if not isinstance(price, Price):
        raise ConfigError(f"expected a Price, not {type(price).__name__}", source=source,
                          key=where)
    input_ = _rate(price.input, f"{where}.input", source)
    output = _rate(price.output, f"{where}.output", source)
    cached = input_ if price.cached_input is None else _rate(
        price.cached_input, f"{where}.cached_input", source)
    reasoning = output if price.reasoning is None else _rate(
        price.reasoning, f"{where}.reasoning", source)
    tiers: list[tuple[int, _Rates]] = []
    if price.tiers and nested:
        raise ConfigError("a tier's price cannot have tiers of its own", source=source,
                          key=f"{where}.tiers")
    for threshold, tier in price.tiers:
        if (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0
                or (tiers and threshold <= tiers[-1][0])):
            raise ConfigError(
                f"tier thresholds must be non-negative integers in ascending order, "
                f"not {threshold!r}", source=source, key=f"{where}.tiers")
        tiers.append((threshold, _rates(tier, f"{where}.tiers[{threshold}]", source,
                                        nested=True)))
    return _Rates(input_, output, cached, reasoning, tuple(tiers))


def _apply_tier(rates: _Rates, input_tokens: int) -> _Rates:
    for threshold, tier in reversed(rates.tiers):
        if input_tokens > threshold:
            return tier
    return rates


# --- sources ---------------------------------------------------------------------------


def load_litellm(path: str | Path) -> dict[str, Price]:
    """Read a LiteLLM ``model_prices_and_context_window.json``: model -> ``Price``.

    Entries of a mode other than chat, completion or responses, entries without both an
    input and an output cost, and the ``sample_spec`` documentation entry are skipped;
    ``*_above_<N>k_tokens`` costs become tiers. Unreadable or malformed files and
    non-numeric or negative costs raise ``ConfigError`` naming the file and the key."""
    source = str(path)
    try:
        raw = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read the LiteLLM price file ({exc.strerror or exc})",
                          source=source, hint="check litellm_json's path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"not valid JSON ({exc})", source=source,
                          hint="give LiteLLM's model_prices_and_context_window.json") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object of model -> prices, not "
                          f"{type(raw).__name__}", source=source)
    prices: dict[str, Price] = {}
    for model, entry in raw.items():
        if model == "sample_spec":
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"expected an object, not {type(entry).__name__}",
                              source=source, key=model)
        mode = entry.get("mode")
        if mode is not None and mode not in LITELLM_MODES:
            continue
        base: dict[str, Any] = {}
        above: dict[int, dict[str, Any]] = {}
        for key, value in entry.items():
            if key in _LITELLM_FIELDS:
                base[_LITELLM_FIELDS[key]] = _per_million(value, source, f"{model}.{key}")
            elif (m := _LITELLM_TIER.fullmatch(key)) and m["field"] in _LITELLM_FIELDS:
                above.setdefault(int(m["k"]) * 1000, {})[_LITELLM_FIELDS[m["field"]]] = (
                    _per_million(value, source, f"{model}.{key}"))
        if "input" not in base or "output" not in base:
            continue
        price = Price(**base)
        tiers = tuple((threshold, price._replace(**above[threshold]))
                      for threshold in sorted(above))
        prices[model] = price._replace(tiers=tiers)
    return prices


def _per_million(value: Any, source: str, key: str) -> float:
    """A LiteLLM cost per token as a cost per million tokens, scaled in decimal (a float
    product would turn 7e-08 into 0.07000000000000001)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value >= 0):
        raise ConfigError(f"a cost must be a finite, non-negative number of USD per token, "
                          f"not {value!r}", source=source, key=key)
    return float(Decimal(repr(value)).scaleb(6))


class _GenaiPrices:
    """The price data bundled in the genai-prices wheel, resolved at one instant.

    Only the bundled providers are read, through a private ``DataSnapshot``; nothing here
    touches ``UpdatePrices`` or the package's process-global (possibly auto-updated)
    snapshot, so lookups never reach the network and never change under us."""

    def __init__(self, at: datetime) -> None:
        try:
            from genai_prices import types as gp_types
            from genai_prices.data import providers
            from genai_prices.data_snapshot import DataSnapshot
        except ImportError as exc:
            raise ConfigError(
                f"genai-prices is not importable ({exc})", key="use_genai_prices",
                hint="`pip install genai-prices` (llm-sidecar depends on it), or turn "
                     "use_genai_prices off and configure prices") from None
        self._types = gp_types
        self._snapshot = DataSnapshot(providers=providers, from_auto_update=False)
        self._at = at

    def find(self, model: str) -> tuple[str, Price] | None:
        """``(provider/model id, price)`` for ``model``, or None when genai-prices does
        not know it or does not price it by tokens."""
        try:
            # provider_id "litellm" makes "anthropic/claude-..." resolve through its
            # provider prefix; names without a slash are matched as usual.
            provider, info = self._snapshot.find_provider_model(model, None, "litellm", None)
        except LookupError:
            return None
        keys = ("input_mtok", "output_mtok", "cache_read_mtok", "output_reasoning_mtok")
        candidates = self._prices_of_the_day(info)
        values = [max((getattr(c, k, None) for c in candidates), key=_base_rate) for k in keys]
        if values[0] is None:
            log.info("genai-prices has no token price for %s (%s/%s)", model, provider.id,
                     info.id)
            return None
        if values[1] is None:  # embeddings and other input-only models
            values[1] = Decimal(0)
        thresholds = sorted({tier.start for v in values
                             if isinstance(v, self._types.TieredPrices) for tier in v.tiers})
        price = self._price(values, None)
        tiers = tuple((t, self._price(values, t)) for t in thresholds)
        return f"{provider.id}/{info.id}", price._replace(tiers=tiers)

    def _prices_of_the_day(self, info: Any) -> list[Any]:
        """Every standard price that can apply on the date of ``at``: the latest one whose
        start date has come, and the time-of-day prices listed after it (which win during
        their hours, as in ``ModelInfo.get_prices``). The caller takes the dearest per
        key: a cached price must not depend on the hour the cache was filled, and for
        budgets the peak rate is the safe side of an off-peak discount."""
        if not isinstance(info.prices, list):
            return [info.prices]
        daily: list[Any] = []
        for conditional in reversed(info.prices):
            constraint = conditional.constraint
            if isinstance(constraint, self._types.TimeOfDateConstraint):
                daily.append(conditional.prices)
            elif constraint is None or constraint.active(self._at):
                return [conditional.prices, *daily]
        return [info.prices[0].prices, *daily]

    def _price(self, values: list[Any], above: int | None) -> Price:
        def at(value: Any) -> float | None:
            if value is None:
                return None
            if isinstance(value, self._types.TieredPrices):
                chosen = value.base
                for tier in value.tiers:
                    if above is not None and tier.start <= above:
                        chosen = tier.price
                value = chosen
            return float(value)  # shortest spelling round-trips the data's decimals

        input_, output, cached, reasoning = (at(v) for v in values)
        assert input_ is not None and output is not None
        return Price(input_, output, cached, reasoning)


def _base_rate(value: Any) -> Decimal:
    """Orders genai-prices values (None, Decimal, TieredPrices) by their base rate."""
    if value is None:
        return Decimal(-1)
    return value if isinstance(value, Decimal) else value.base


# --- the registry ----------------------------------------------------------------------


class PricingRegistry:
    """Prices by model name, from overrides, LiteLLM JSON, genai-prices, then ``default``.

    Sources are read once, at construction; dated price changes in genai-prices are
    resolved as of ``at`` (default: construction time), so a daemon that runs across a
    provider's price change picks it up when its registry is rebuilt (config reload)."""

    def __init__(self, *, overrides: Mapping[str, Price] | None = None,
                 litellm_json: str | Path | None = None, default: Price = DEFAULT_PRICE,
                 use_genai_prices: bool = True, at: datetime | None = None,
                 cache_size: int = CACHE_SIZE) -> None:
        self._exact: dict[str, Price] = {}
        self._prefixes: list[tuple[str, Price]] = []  # longest first
        for key, price in (overrides or {}).items():
            _rates(price, key, "pricing.overrides")  # validate now, not at first use
            if key.endswith("*"):
                self._prefixes.append((key[:-1], price))
            else:
                self._exact[key] = price
        self._prefixes.sort(key=lambda item: len(item[0]), reverse=True)
        self._litellm = {} if litellm_json is None else load_litellm(litellm_json)
        self._litellm_source = str(litellm_json)
        self._default = _Entry(PriceLookup(default, "default", False, Source.DEFAULT),
                               _rates(default, "default", "pricing.default"))
        self._genai = _GenaiPrices(at or datetime.now(UTC)) if use_genai_prices else None
        self._cache: dict[str, _Entry] = {}
        self._cache_size = cache_size

    def price(self, model: str) -> PriceLookup:
        """``(price, priced_as, known, source)`` for ``model``; cached per name."""
        return self._entry(model).lookup

    def cost(self, model: str, usage: Usage) -> Cost:
        """The exact cost of ``usage`` (see ``Usage`` for what includes what), rounded up
        to a whole micro-dollar. Cached input is billed at the cached rate and reasoning
        at the reasoning rate, each falling back to the input and output rate."""
        inp, out, cached, reasoning = usage
        for name, n in zip(Usage._fields, usage):
            if not isinstance(n, int) or n < 0:
                raise InvalidValue(f"usage.{name} must be a non-negative integer, not {n!r}")
        if cached > inp or reasoning > out:
            raise InvalidValue("usage counts cached_input_tokens within input_tokens and "
                               "reasoning_tokens within output_tokens; got "
                               f"{cached} cached of {inp} input, {reasoning} reasoning of "
                               f"{out} output")
        entry = self._entry(model)
        r = _apply_tier(entry.rates, inp)
        pico = ((inp - cached) * r.input + cached * r.cached_input
                + (out - reasoning) * r.output + reasoning * r.reasoning)
        return Cost(-(-pico // _PICO_PER_MICRO), entry.lookup.priced_as, entry.lookup.known)

    def estimate(self, model: str, input_tokens: int, max_output_tokens: int) -> Cost:
        """An upper bound for admission: no cache hits, every output token at the dearer
        of the output and reasoning rates, tiers chosen by ``input_tokens``."""
        for name, n in (("input_tokens", input_tokens), ("max_output_tokens",
                                                         max_output_tokens)):
            if not isinstance(n, int) or n < 0:
                raise InvalidValue(f"{name} must be a non-negative integer, not {n!r}")
        entry = self._entry(model)
        r = _apply_tier(entry.rates, input_tokens)
        pico = input_tokens * r.input + max_output_tokens * max(r.output, r.reasoning)
        return Cost(-(-pico // _PICO_PER_MICRO), entry.lookup.priced_as, entry.lookup.known)

    def _entry(self, model: str) -> _Entry:
        entry = self._cache.get(model)
        if entry is None:
            entry = self._resolve(model)
            if len(self._cache) >= self._cache_size:
                del self._cache[next(iter(self._cache))]  # oldest first
            self._cache[model] = entry
        return entry

    def _resolve(self, model: str) -> _Entry:
        found = self._lookup(model)
        if found is None:
            log.warning("no price for model %r: priced at the default %s", model,
                        self._default.lookup.price)
            return self._default
        key, price, source = found
        where = self._litellm_source if source is Source.LITELLM else source.value
        return _Entry(PriceLookup(price, key, True, source), _rates(price, key, where))

    def _lookup(self, model: str) -> tuple[str, Price, Source] | None:
        """The uncached resolution; subclasses may wrap it (tests count calls here)."""
        if model in self._exact:
            return model, self._exact[model], Source.OVERRIDE
        for prefix, price in self._prefixes:
            if model.startswith(prefix):
                return prefix + "*", price, Source.OVERRIDE
        if self._litellm:
            for key in (model, model.partition("/")[2]):
                if key and key in self._litellm:
                    return key, self._litellm[key], Source.LITELLM
        if self._genai is not None and model:
            found = self._genai.find(model)
            if found is not None:
                return found[0], found[1], Source.GENAI_PRICES
        return None
