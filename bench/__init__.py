"""Benchmarks for llm-sidecar, run as ``python -m bench SUBCOMMAND`` from the repository root.

``roundtrip`` (``bench.roundtrip``) measures ping round trips against the real daemon and
against a bare "floor" server (``bench.floor``) that speaks the same framing with nothing
else, under explicit CPU placements, so the daemon's own overhead can be read off as a
ratio. The package is not installed with the project; it only needs ``sidecar`` importable.
"""
