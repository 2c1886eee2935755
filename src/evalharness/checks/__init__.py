"""Preprocessing checks: config-level mismatches, data probes, the mismatch record."""
