"""reed.image."""
