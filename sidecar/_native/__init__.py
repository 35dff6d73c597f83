"""Compiled hot paths (Cython, built from native/). Private: each module here is imported
by exactly one public module of ``sidecar``, which owns its names and validation.

There is no pure-Python fallback: a missing build is an error that says how to fix it.
"""
import importlib
from pathlib import Path
from types import ModuleType

#: Every compiled module the build produces (kept in step with setup.py).
MODULES = ("normalize", "tokens", "window", "lexical", "vectors", "shm")


def load(name: str) -> ModuleType:
    """Import ``sidecar._native.<name>`` or fail with the fix."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as exc:
        here = Path(__file__).resolve().parent.parent.parent
        shadow = ""
        if (here / "setup.py").exists() and Path.cwd().resolve() == here:
            shadow = (f" Python imported the source folder {here / 'sidecar'} because the "
                      "current directory is the checkout: it shadows an installed copy, so "
                      "run from another directory, or build in place with `pip install -e .`.")
        raise ImportError(
            f"llm-sidecar's compiled module {__name__}.{name} could not be loaded ({exc}). "
            "Build it with `pip install .` (or `pip install -e .` in a checkout); running from "
            "a source tree that was never built imports the uncompiled package." + shadow
        ) from exc
