"""The embedded demo: builds a synthetic dataset and training run, then evaluates it."""
