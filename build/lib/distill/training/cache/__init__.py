"""The teacher-output cache: `store` (fingerprint, lookup by sample key, `fit`'s resolution)
and `build` (`distill cache`: per-rank parts, one merge)."""
