"""Configuration: the schema Hydra composes, its validation, the effective settings."""
