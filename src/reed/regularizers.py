"""Encoder-free regularisers of the denoiser's hidden states (no target, no parameters).

Dispersive Loss (Wang & He, arXiv 2506.09027; spec methods.md §5), the InfoNCE-L2 variant as its code computes it:

    L_disp = log( (1/B^2) * sum_{i,j} exp(-d_ij / tau) ),   d_ij = |z_i - z_j|^2 / M

over the B samples of the (local) batch, z_i the hidden state of sample i flattened to M numbers, the diagonal
(d_ii = 0) included and the double sum inside one log. Range ``-log B <= L <= 0``: 0 when every sample is the
same, -log B when they are infinitely far apart. The loss does not depend on the noise level.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dispersive_loss(h: Tensor, tau: float = 1.0) -> Tensor:
    """Dispersive loss of hidden states ``h`` (B, ...) -> scalar float32.

    Computed as ``logsumexp(-d / tau) - 2 log B`` in fp32 (the reference's ``exp`` underflows for far-apart
    samples, and it builds its diagonal with ``.cuda()``, so it fails on the CPU).
    """
    if not tau > 0:
        raise ValueError(f"dispersive loss temperature must be > 0, got tau={tau}")
    b = h.shape[0]
    if b < 1:
        raise ValueError("dispersive loss needs a non-empty batch")
    z = h.float().flatten(1)
    sq = z.pow(2).sum(1)
    # squared distances from the Gram matrix ((B, B), not (B, B, M)); the diagonal is exactly 0 and has a finite
    # gradient (a sqrt-based distance has none at 0)
    d = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_min(0.0)
    d = d.masked_fill(torch.eye(b, dtype=torch.bool, device=z.device), 0.0) / z.shape[1]
    return torch.logsumexp((-d / tau).flatten(), dim=0) - 2.0 * math.log(b)
