"""Text: prompt normalisation and fingerprints, and exact token counting (the public faces
of the compiled ``normalize`` and ``tokens`` modules)."""
