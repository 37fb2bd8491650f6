"""Alignment: projectors from denoiser hidden states to target spaces, and negative-cosine losses.

Kinds of alignment:
  * token-wise: prediction (B,T,Dz) against target (B,T,Dz); the loss averages cosine over tokens.
  * pooled: the hidden state is mean-pooled over (real) tokens first, giving (B,Dz) against (B,Dz).
Normalisation is always done in fp32 (bf16/fp16 normalisation NaNs are a known failure).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    """MLP ``Linear(D,h) -> SiLU -> Linear(h,h) -> SiLU -> Linear(h,z_dim)`` applied on the last dim.

    Input (..., D), output (..., z_dim). The reference uses h = 2048.
    """

    def __init__(self, in_dim: int, z_dim: int, hidden: int = 2048):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, z_dim)
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


def masked_mean(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 1 of ``h`` (B,T,D) counting only positions where ``mask`` (B,T) is true; returns (B,D)."""
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def negative_cosine(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample negative cosine similarity, computed in fp32.

    pred, target: (B,T,D) or (B,D) (a 2-D input is one token). mask: optional (B,T) of valid tokens.
    Returns (B,): ``-mean_n <pred_n/|pred_n|, target_n/|target_n|>`` over (valid) tokens.
    """
    if pred.shape != target.shape:
        raise ValueError(f"alignment prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p = F.normalize(pred.float(), dim=-1)
    z = F.normalize(target.float(), dim=-1)
    cos = (p * z).sum(dim=-1)
    if cos.dim() == 1:
        return -cos
    if mask is None:
        return -cos.mean(dim=1)
    m = mask.float()
    return -(cos * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def _square_side(n: int, what: str) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} has {n} tokens, which is not a square grid; cannot resample it")
    return side


def resample_tokens(z: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Resample a square token grid (B,T,D) to (B,num_tokens,D) (also square).

    Downsampling uses area pooling (the mean of the covered target tokens), upsampling bilinear interpolation.
    This lets, say, a 16x16 encoder grid guide a patch-4 SiT with 8x8 tokens (the reference needs patch 2).
    """
    b, t, d = z.shape
    if t == num_tokens:
        return z
    src, dst = _square_side(t, "target"), _square_side(num_tokens, "model token grid")
    grid = z.transpose(1, 2).reshape(b, d, src, src).float()
    if dst < src:
        out = F.interpolate(grid, size=(dst, dst), mode="area")
    else:
        out = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False)
    return out.reshape(b, d, dst * dst).transpose(1, 2).to(z.dtype)
