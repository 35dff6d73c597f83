"""Where the daemon keeps its files: the socket it listens on (or the one systemd passed),
the state directory, and the journal, request log and cache snapshot in it."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError
from ..wire.address import default_socket_candidates
from .root import Config

SOCKET_HINT = "an absolute path such as /run/llm.sock; empty picks the default"


def server_socket_path(config: Config, explicit: str | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """Where the daemon listens: ``--socket``, config/env, else the first default it may
    create (``/run/llm.sock``, ``$XDG_RUNTIME_DIR/llm.sock``, ``/tmp/llm-sidecar-<uid>``)."""
    if explicit:
        require_absolute(explicit, "--socket")
        return Path(explicit)
    if config.server.socket:
        return Path(config.server.socket)
    for path in default_socket_candidates(env):
        parent = path.parent
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return path
        if not parent.exists() and os.access(parent.parent, os.W_OK | os.X_OK):
            return path
    raise ConfigError("no writable directory for the socket",
                      hint="pass --socket PATH or set LLM_SIDECAR_SOCKET")


def require_absolute(socket: str, source: str) -> None:
    """The daemon's socket path must not depend on the directory it was started in."""
    if not os.path.isabs(socket):
        key = "server.socket"
        raise ConfigError(f"socket path {socket!r} is not absolute", source=source, key=key,
                          hint=SOCKET_HINT)


def inherited_listen_fd(env: Mapping[str, str] | None = None) -> int | None:
    """The listening socket systemd passed by socket activation (fd 3), if it passed
    exactly one to this process (``LISTEN_PID`` is ours, ``LISTEN_FDS=1``)."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") != str(os.getpid()):
        return None
    if env.get("LISTEN_FDS") != "1":
        raise ConfigError(f"socket activation passed {env.get('LISTEN_FDS')!r} sockets",
                          source="environment", key="LISTEN_FDS",
                          hint="the .socket unit must have exactly one ListenStream=")
    return 3


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where durable state lives: systemd's STATE_DIRECTORY, else
    ``$XDG_STATE_HOME/llm-sidecar``, else ``~/.local/state/llm-sidecar``."""
    env = os.environ if env is None else env
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "llm-sidecar"


def journal_path(config: Config, socket_path: Path) -> Path | None:
    """The limits journal of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.limits.journal, socket_path, "limits-{}.journal")


def request_log_path(config: Config, socket_path: Path) -> Path | None:
    """The request log of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.ledger.request_log, socket_path, "requests-{}.jsonl")


def cache_snapshot_path(config: Config, socket_path: Path) -> Path | None:
    """The cache snapshot of the daemon serving ``socket_path`` (None when off)."""
    return _state_file(config.cache.snapshot, socket_path, "cache-{}.snapshot")


def _state_file(setting: str, socket_path: Path, pattern: str) -> Path | None:
    """``setting`` as a path: "off" is None, "" a file of the state directory named by
    ``pattern`` after the socket path (so two daemons never share one)."""
    if setting == "off":
        return None
    if setting:
        return Path(setting)
    digest = hashlib.sha1(str(socket_path).encode()).hexdigest()[:12]
    return state_dir() / pattern.format(digest)


def notify_socket(env: Mapping[str, str] | None = None) -> str | None:
    """systemd's notification socket (``NOTIFY_SOCKET``), if started with Type=notify."""
    env = os.environ if env is None else env
    return env.get("NOTIFY_SOCKET") or None
