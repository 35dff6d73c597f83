"""Where the daemon's socket is: ``LLM_SIDECAR_SOCKET``, else the first of the default
paths (``/run/llm.sock``, ``$XDG_RUNTIME_DIR/llm.sock``, ``/tmp/llm-sidecar-<uid>/llm.sock``).
Both ends resolve it here, so a client finds the daemon without loading its config."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

ENV_SOCKET = "LLM_SIDECAR_SOCKET"
SYSTEM_SOCKET = Path("/run/llm.sock")
SOCKET_NAME = "llm.sock"


def default_socket_candidates(env: Mapping[str, str] | None = None) -> list[Path]:
    """Default socket paths, most preferred first."""
    env = os.environ if env is None else env
    paths = [SYSTEM_SOCKET]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        paths.append(Path(runtime) / SOCKET_NAME)
    paths.append(Path(f"/tmp/llm-sidecar-{os.getuid()}") / SOCKET_NAME)
    return paths


def client_socket_path(explicit: str | os.PathLike[str] | None = None,
                       env: Mapping[str, str] | None = None) -> Path:
    """Where a client connects: explicit, ``LLM_SIDECAR_SOCKET``, else the first default
    path that exists (else the last one, so the error names where a daemon would be)."""
    env = os.environ if env is None else env
    if explicit:
        return Path(explicit)
    if env.get(ENV_SOCKET):
        return Path(env[ENV_SOCKET])
    candidates = default_socket_candidates(env)
    for path in candidates:
        if path.exists():
            return path
    return candidates[-1]
