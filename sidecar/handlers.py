"""Requests to replies: each op calls its component and builds the typed reply.

No sockets and no framing here, so every op can be exercised without a server. The
dispatch table maps a request type to a handler; ``Handlers.reload`` swaps in the parts
of a new config that can change while running.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import os
import platform
import time
from typing import Callable

from . import __version__
from ._native import MODULES as NATIVE_MODULES, load as load_native
from .config import Config
from .metrics import Metrics
from .normalize import Normalizer
from .protocol import (
    OPS, PROTOCOL_VERSION, BuildInfo, Count, CountReply, Fingerprint, FingerprintReply, Hello,
    HelloReply, Ping, Pong, Reply, Request, Stats, StatsReply,
)
from .tokens import ESTIMATE_ENCODING, Tokenizer, get_encoding


class Deferred:
    """A reply still being computed off the event loop (a worker thread)."""

    __slots__ = ("future", "request_id")

    def __init__(self, future: asyncio.Future[Reply], request_id: int) -> None:
        self.future = future
        self.request_id = request_id


Handler = Callable[[Request], "Reply | Deferred"]


def build_info() -> BuildInfo:
    """Versions and the compiled modules actually loaded (their files prove it)."""
    libraries = {}
    for dist in ("msgspec", "uvloop"):
        try:
            libraries[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            libraries[dist] = "unknown"
    return BuildInfo(
        version=__version__,
        protocol=PROTOCOL_VERSION,
        python=f"{platform.python_implementation()} {platform.python_version()}",
        native={name: load_native(name).__file__ or "" for name in NATIVE_MODULES},
        libraries=libraries,
    )


class Handlers:
    def __init__(self, config: Config, metrics: Metrics, socket_path: str) -> None:
        self.metrics = metrics
        self.socket_path = socket_path
        self.started = time.monotonic()
        self.epoch = 0
        self.build = build_info()
        self.config = config
        self.normalizer = Normalizer(config.normalize.filler_words)
        self.tokenizer = self._tokenizer(config)
        self.table: dict[type[Request], Handler] = {
            Hello: self.hello,
            Ping: self.ping,
            Fingerprint: self.fingerprint,
            Stats: self.stats,
            Count: self.count,
        }
        assert tuple(t.__struct_config__.tag for t in self.table) == OPS

    @staticmethod
    def _tokenizer(config: Config) -> Tokenizer:
        # Map every encoding the config can reach now, so no request pays for loading.
        for name in {*config.tokens.models.values(), ESTIMATE_ENCODING}:
            get_encoding(name)
        return Tokenizer(config.tokens.models, config.tokens.estimate_ratios)

    def reload(self, config: Config) -> None:
        normalizer = Normalizer(config.normalize.filler_words)
        tokenizer = self._tokenizer(config)
        self.config = config
        self.normalizer = normalizer
        self.tokenizer = tokenizer
        self.epoch += 1

    def hello(self, req: Hello) -> HelloReply:
        return HelloReply(
            id=req.id, protocol=PROTOCOL_VERSION, server=f"llm-sidecar/{__version__}",
            features=list(OPS), max_frame=self.config.server.max_frame_bytes, pid=os.getpid(),
        )

    def ping(self, req: Ping) -> Pong:
        return Pong(id=req.id)

    def fingerprint(self, req: Fingerprint) -> FingerprintReply:
        normalized, key, spec = self.normalizer.fingerprint(req.text)
        return FingerprintReply(id=req.id, normalized=normalized, key=key, spec=spec)

    def count(self, req: Count) -> CountReply | Deferred:
        size = len(req.text) if req.text is not None else sum(
            len(m.content) if isinstance(m.content, str) else 64 for m in req.messages or ())
        if size >= self.config.tokens.offload_chars:
            # Counting releases the GIL: a worker thread keeps the loop serving others.
            loop = asyncio.get_running_loop()
            return Deferred(loop.run_in_executor(None, self._count, req, self.tokenizer), req.id)
        return self._count(req, self.tokenizer)

    @staticmethod
    def _count(req: Count, tokenizer: Tokenizer) -> CountReply:
        n = tokenizer.count(req.text, messages=req.messages, tools=req.tools, model=req.model,
                            encoding=req.encoding, max_tokens=req.max_tokens,
                            special=req.special)
        return CountReply(id=req.id, input_tokens=n.input_tokens, output_tokens=n.output_tokens,
                          total_tokens=n.total_tokens, exact=n.exact, encoding=n.encoding,
                          model=n.model, estimate_ratio=n.estimate_ratio)

    def stats(self, req: Stats) -> StatsReply:
        requests, errors = self.metrics.totals()
        return StatsReply(
            id=req.id,
            uptime_s=round(time.monotonic() - self.started, 3),
            pid=os.getpid(),
            socket=self.socket_path,
            config_epoch=self.epoch,
            connections_now=self.metrics.connections_now,
            connections_total=self.metrics.connections_total,
            requests_total=requests,
            errors_total=errors,
            ops=self.metrics.snapshot(),
            build=self.build,
        )


