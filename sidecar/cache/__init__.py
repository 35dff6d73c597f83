"""The response cache: request keys, the exact and semantic tiers, snapshots, the
embedders, the vector index (the public face of the compiled ``vectors`` module) and the
pair verifier."""
