"""Preprocess, sliding window, restore to the native grid, decode, post-process."""
