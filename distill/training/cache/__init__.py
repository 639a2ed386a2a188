"""The teacher-output cache: `fingerprint` (what an entry depends on: teacher weights,
preprocessing, dataset args and the training files' signatures), `store` (lookup by sample
key, the checks of an entry, `fit`'s resolution, `--verify`) and `build` (`distill cache`:
per-rank parts, one merge, checksums)."""
