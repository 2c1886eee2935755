"""The cases of a split and NIfTI reading and writing."""
