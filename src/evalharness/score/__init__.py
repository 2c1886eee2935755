"""Metrics, the per-case table, summaries and comparison statistics."""
