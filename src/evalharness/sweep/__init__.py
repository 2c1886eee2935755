"""Hydra multirun: the parent run, reuse across jobs, the end-of-sweep comparison."""
