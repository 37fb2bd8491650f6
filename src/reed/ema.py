"""Exponential moving average of a model's parameters (kept in eval mode, never trained)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copy of ``model``: ``ema <- decay * ema + (1 - decay) * param`` on every update; buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for _, p in self.model.named_parameters()]
        src_p = [p.detach() for _, p in model.named_parameters()]
        torch._foreach_lerp_(ema_p, [p.to(e.dtype) for p, e in zip(src_p, ema_p)], 1.0 - self.decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
