"""Errors that reach users: each names the file, field or shape that is wrong."""

from __future__ import annotations


class ReedError(Exception):
    """Base class for every error reed raises on bad input; the CLI prints its message without a traceback."""


class ConfigError(ReedError, ValueError):
    """A config key is unknown, has the wrong type, or values contradict each other."""


class DataError(ReedError, ValueError):
    """A data set or target store is missing, corrupt, or does not match the config."""


class CheckpointError(ReedError, ValueError):
    """A checkpoint is missing, corrupt or incompatible with the model it is loaded into."""


class NonFiniteLossError(ReedError, RuntimeError):
    """The training loss became NaN or infinite; training stops and keeps the last good checkpoint."""
