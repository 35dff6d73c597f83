"""Compiled hot paths (Cython, built from native/). Private: each module here is imported
by exactly one public module of ``sidecar``, which owns its names and validation."""
