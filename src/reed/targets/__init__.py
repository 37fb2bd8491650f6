"""Alignment target sources."""
