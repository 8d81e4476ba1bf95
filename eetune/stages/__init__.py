"""Stages: each `run(cfg)` does one CLI command's work."""
