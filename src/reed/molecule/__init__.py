"""reed.molecule."""
