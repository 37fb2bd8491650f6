"""reed.image.targets."""
