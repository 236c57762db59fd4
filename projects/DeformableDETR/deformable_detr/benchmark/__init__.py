"""Benchmarks: ``python -m deformable_detr.benchmark.<name>``."""
