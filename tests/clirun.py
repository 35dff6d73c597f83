"""Run the command line as an operator does: ``python -m sidecar ...`` in a subprocess,
with no LLM_SIDECAR_* variables inherited from the test run's environment."""
from __future__ import annotations

import os
import subprocess
import sys


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a CLI subprocess gets: ours minus LLM_SIDECAR_*, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("LLM_SIDECAR_")}
    full.update(env or {})
    return full


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``llm-sidecar ARGS`` to completion; cwd "/" so the source tree never shadows
    the package under test (PYTHONPATH chooses it)."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, env=cli_env(env),
                          timeout=timeout, cwd="/")
