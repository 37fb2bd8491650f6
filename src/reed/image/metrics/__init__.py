"""reed.image.metrics."""
