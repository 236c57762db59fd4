"""Deformable DETR for Detectron2."""
