"""Evaluation: per-exit quality on held-out text."""
