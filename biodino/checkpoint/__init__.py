"""Checkpoint formats: safe loading, distributed checkpoints, full weights, checksums, the run directory."""
