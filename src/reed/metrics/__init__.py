"""Metrics: Fréchet distances, image metrics (FID, sFID, IS, precision/recall, FD_DINOv2), in-domain evaluators."""
