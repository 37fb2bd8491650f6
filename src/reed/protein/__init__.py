"""reed.protein."""
