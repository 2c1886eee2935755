"""Hydra config groups of the harness (a package so Hydra can find it inside an install)."""
