"""Generative processes: how clean data is corrupted, what the network predicts, and the per-sample loss."""

from reed.processes.flow import FlowProcess

__all__ = ["FlowProcess"]
