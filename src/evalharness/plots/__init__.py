"""Figures (matplotlib Agg backend, seaborn)."""
