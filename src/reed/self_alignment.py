"""Self-representation alignment (SRA, arXiv 2505.02831; spec methods.md §4): no external encoder.

A student block, seen at time t, is aligned through a small head to a later block of the EMA model (the
teacher) seen at a less noisy time t' <= t, the same image, noise and (post-dropout) label:

    t' = clamp(t - t_max * u, 0, 1),  u ~ U(0, 1) per sample          (t = 0 is data)
    L = mean_b l(head(h_student(x_t)), h_teacher(x_t'))

with l the smooth-L1 of the paper (beta 0.05, element mean) or one minus a cosine. The reference's current
``cos`` option calls ``F.cosine_similarity`` with its default ``dim=1``, which for (B, T, D) compares the token
profiles of each channel; the intended per-token cosine is ``dim=-1`` (``cos``); the coded one is ``cos_tokens``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

LOSSES = ("smooth_l1", "cos", "cos_tokens")


class SelfAlignHead(nn.Module):
    """SRA head ``Linear(D, 2D) -> SiLU -> Linear(2D, D)``, xavier weights and zero biases; (..., D) -> (..., D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def teacher_time(t: Tensor, u: Tensor, t_max: float) -> Tensor:
    """The teacher's less noisy time ``clamp(t - t_max * u, 0, 1)``; t, u (B,) -> (B,)."""
    return (t - t_max * u).clamp(0.0, 1.0)


def self_align_loss(pred: Tensor, target: Tensor, loss: str = "smooth_l1", beta: float = 0.05) -> Tensor:
    """Per-sample SRA loss (B,) in fp32 of the student's head output ``pred`` and the teacher's hidden state
    ``target``, both (B, T, D).

    ``smooth_l1``: per element 0.5 d^2 / beta if |d| < beta else |d| - beta / 2, mean over (T, D).
    ``cos``: mean over tokens of 1 - cos(pred_n, target_n) (the intended per-token cosine).
    ``cos_tokens``: the reference's ``F.cosine_similarity`` default ``dim=1``: mean over channels of one minus
    the cosine of the two (T,) token profiles.
    """
    if pred.shape != target.shape:
        raise ValueError(f"self-alignment prediction shape {tuple(pred.shape)} != teacher shape {tuple(target.shape)}")
    p, z = pred.float(), target.float()
    if loss == "smooth_l1":
        return F.smooth_l1_loss(p, z, reduction="none", beta=beta).flatten(1).mean(1)
    if loss == "cos":
        return (1.0 - F.cosine_similarity(p, z, dim=-1)).flatten(1).mean(1)
    if loss == "cos_tokens":
        return (1.0 - F.cosine_similarity(p, z, dim=1)).flatten(1).mean(1)
    raise ValueError(f"unknown self-alignment loss {loss!r}, expected one of {LOSSES}")


def legacy_epoch_weight(epoch: int, start: int = 149, span: int = 1000) -> float:
    """SRA's published weight schedule for ``smooth_l1`` (256 px: start 149, span 1000; 512 px: 99, 800),
    keyed on the epoch: 0.2 up to ``start``, then ``2 * 0.1 ** ((epoch - start) / span + 1)``. For
    reproducing the paper only; the step-keyed weight of reed's objective is the default."""
    return 0.2 if epoch <= start else 2.0 * 0.1 ** ((epoch - start) / span + 1.0)
