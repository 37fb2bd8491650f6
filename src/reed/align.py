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
from torch import Tensor, nn


class Projector(nn.Module):
    """MLP ``Linear(D,h) -> SiLU -> Linear(h,h) -> SiLU -> Linear(h,z_dim)`` applied on the last dim.

    Input (..., D), output (..., z_dim). The image reference uses h = 2048 and 3 layers; the protein reference
    uses 2 layers (``Linear(D,h) -> SiLU -> Linear(h,z_dim)``, h = 2 z_dim).
    """

    def __init__(self, in_dim: int, z_dim: int, hidden: int = 2048, layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ValueError(f"projector needs >= 1 layer, got {layers}")
        dims = [in_dim] + [hidden] * (layers - 1) + [z_dim]
        mods: list[nn.Module] = []
        for i in range(layers):
            mods.append(nn.Linear(dims[i], dims[i + 1]))
            if i < layers - 1:
                mods.append(nn.SiLU())
        self.net = nn.Sequential(*mods)
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


def masked_standardize(z: Tensor, mask: Tensor | None, eps: float = 1e-6) -> Tensor:
    """Per-channel standardisation ``(z - mu) / (sigma + eps)`` with mu, sigma pooled over every valid position of
    the batch (``mask`` (B, L) for z (B, L, D), (B, L, K) for z (B, L, K, D); any z (..., D) with mask (...)).

    Padded positions contribute neither to mu nor to sigma (reference bug §9.4 added mu**2 per padded position to
    the variance), even if they hold inf/NaN, and are zero in the output. sigma is the population std (divide by
    the number of valid positions). Half-precision inputs are standardised and returned in float32.
    ``mask=None`` uses every position."""
    if mask is None:
        mask = torch.ones(z.shape[:-1], device=z.device)
    if mask.shape != z.shape[:-1]:
        raise ValueError(f"masked_standardize: mask shape {list(mask.shape)} must equal z shape without the channel "
                         f"dim {list(z.shape[:-1])}")
    x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    valid = (mask > 0).unsqueeze(-1)
    x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
    m = valid.to(x.dtype)
    dims = tuple(range(x.ndim - 1))
    n = m.sum(dims).clamp_min(1.0)
    mu = x.sum(dims) / n
    var = (((x - mu) * m) ** 2).sum(dims) / n
    return (x - mu) / (var.sqrt() + eps) * m


def gather_edges(z: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """Pair targets on a kNN graph: z (B,L,L,D) dense pairs, edge_index (B,L,K) -> (B,L,K,D) with
    ``out[b,i,k] = z[b,i,edge_index[b,i,k]]``."""
    if z.dim() != 4 or z.shape[1] != z.shape[2] or z.shape[:2] != edge_index.shape[:2]:
        raise ValueError(f"pair targets must be (B,L,L,D) matching the graph (B,L,K)={tuple(edge_index.shape)}, "
                         f"got shape {tuple(z.shape)}")
    idx = edge_index.long().unsqueeze(-1).expand(-1, -1, -1, z.shape[-1])
    return torch.gather(z, 2, idx)


class ConvProjector(nn.Module):
    """iREPA projector: one ``Conv2d(D, z_dim, kernel, padding=kernel // 2)`` over the square token grid.

    Input (B, T, D) with T = side**2 tokens in row-major order (token index = row * side + col), output
    (B, T, z_dim). No activation, no hidden layer; PyTorch's default Conv2d init (the SiT init touches only
    ``nn.Linear``). ``kernel=1`` is a per-token linear map (iREPA's LDM command-line default).
    """

    def __init__(self, in_dim: int, z_dim: int, kernel: int = 3):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"conv projector kernel must be odd and >= 1, got {kernel}")
        self.conv = nn.Conv2d(in_dim, z_dim, kernel, stride=1, padding=kernel // 2, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        side = _square_side(t, "conv projector input")
        grid = h.transpose(1, 2).reshape(b, d, side, side)  # (B, D, H, W), row-major tokens
        return self.conv(grid).flatten(2).transpose(1, 2)


def spatial_zscore(z: Tensor, gamma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """iREPA target normalisation: ``(z - gamma * mu) / (s + eps)`` per sample and channel, with mu and the
    *unbiased* std s taken over the token axis of z (B, T, D); returned in float32.

    gamma = 1 is a full z-score, gamma < 1 keeps part of the mean (iREPA: 0.6 on SiT latents, 0.8 on pixels).
    The std is shift-invariant, so s is the same before or after centring.
    """
    if z.dim() != 3 or z.shape[1] < 2:
        raise ValueError(f"spatial normalisation needs token targets (B, T>=2, D), got shape {tuple(z.shape)}")
    x = z.float()
    return (x - gamma * x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + eps)
