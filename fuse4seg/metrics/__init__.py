"""Metrics: segmentation (``fuse4seg.metrics.segmentation``, chapter 3) and fusion quality
(``fuse4seg.metrics.fusion``). Import the submodule you need; this package imports nothing."""
