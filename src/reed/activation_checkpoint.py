"""Per-block activation checkpointing: a denoiser recomputes each block's activations in the backward pass
instead of storing them (peak memory of one block instead of all; about one extra forward of compute).

A denoiser opts in by mixing in :class:`ActivationCheckpointing` and calling its blocks through :meth:`run_block`;
``train.activation_checkpointing: true`` turns it on (:func:`reed.train.train`). Randomness inside a block (dropout)
is replayed exactly on recomputation (``preserve_rng_state``), so gradients equal those without checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["ActivationCheckpointing"]


class ActivationCheckpointing:
    """Mixin for an ``nn.Module``: ``set_activation_checkpointing(True)``, then ``self.run_block(block, *args)``."""

    activation_checkpointing: bool = False

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        self.activation_checkpointing = bool(enabled)

    def run_block(self, block: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``block(*args, **kwargs)``, checkpointed when enabled, training and recording gradients."""
        if self.activation_checkpointing and getattr(self, "training", False) and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)
