"""evalharness: experiment-tracked evaluation of patch-based 3D segmentation models."""

__version__ = "0.1.0"
