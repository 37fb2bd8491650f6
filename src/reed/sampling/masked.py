"""Reverse sampler for masking diffusion (see :mod:`reed.processes.masked`; t = mask probability, 1 -> 0).

Step s1 -> s2 (s2 < s1) of the exact reverse of the linear masking schedule: a still-masked position is
unmasked with probability (s1 - s2) / s1, and its token is drawn from the tempered model distribution over the
non-MASK tokens, p_c ∝ exp(log p_c / temperature). Unmasked positions are frozen. At s2 = 0 everything is
unmasked. The grid is ``linspace(1 - min_t, 0, steps)`` (the reference's ``linspace(0.01, 1, 500)`` in its
t_ref = 1 - t convention).

Fixes against the reference (spec protein.md section 9.6): the *final sampled state* is returned, not the argmax
of the last model call (which could overwrite committed tokens).

``order="confidence"`` is the purity variant: the number of positions to unmask is drawn from the same
Binomial(n_masked, (s1-s2)/s1), but the positions are those with the highest tempered max-probability.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reed.io import progress_bar
from reed.processes.masked import NEG_INF

ORDERS = ("random", "confidence")


def _gumbel(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-10, 1.0 - 1e-10)
    return -torch.log(-torch.log(u))


def tempered_log_probs(log_probs: torch.Tensor, mask_id: int, temperature: float) -> torch.Tensor:
    """(B,L,V) -> (B,L,V) log-probs over non-MASK tokens, sharpened by ``temperature`` (1 = unchanged)."""
    lp = log_probs.float().clone()
    lp[..., mask_id] = NEG_INF
    lp = lp.log_softmax(dim=-1)
    if temperature != 1.0:
        lp = (lp / temperature).log_softmax(dim=-1)
        lp[..., mask_id] = NEG_INF
    return lp


@torch.no_grad()
def masked_reverse_step(S: torch.Tensor, log_probs: torch.Tensor, valid: torch.Tensor, s1: float, s2: float, *,
                        mask_id: int, temperature: float = 1.0, order: str = "random",
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """One reverse step from noise level ``s1`` to ``s2``.

    S (B,L) current tokens (MASK where still masked), log_probs (B,L,V) the model's output on S, valid (B,L)
    positions to design. Returns the new (B,L) tokens.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order '{order}', expected one of {ORDERS}")
    device = S.device
    masked = (S == mask_id) & valid.bool()
    lp = tempered_log_probs(log_probs, mask_id, temperature)
    tokens = (lp + _gumbel(lp.shape, generator, device)).argmax(dim=-1)  # a draw from the tempered distribution
    p_unmask = 1.0 if s2 <= 0 else (s1 - s2) / s1
    if order == "random":
        u = torch.rand(S.shape, generator=generator, device=device)
        unmask = masked & (u < p_unmask)
    else:
        n_masked = masked.sum(dim=1).float()
        count = torch.binomial(n_masked, torch.full_like(n_masked, p_unmask), generator=generator).long()
        conf = lp.max(dim=-1).values.masked_fill(~masked, -float("inf"))
        rank = conf.argsort(dim=1, descending=True).argsort(dim=1)
        unmask = masked & (rank < count[:, None])
    return torch.where(unmask, tokens, S)


@torch.no_grad()
def sample_masked(denoise: Callable[[torch.Tensor], torch.Tensor], valid: torch.Tensor, *, mask_id: int = 21,
                  unknown_id: int = 20, steps: int = 500, temperature: float = 0.1, order: str = "random",
                  min_t: float = 0.01, generator: torch.Generator | None = None,
                  init: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Design sequences by running the reverse masking process from all-MASK.

    denoise: S_t (B,L) -> log-probs (B,L,V) (the model with its structure inputs bound).
    valid: (B,L) positions to design; other positions stay MASK for the model and are returned as ``unknown_id``.
    init: optional (B,L) tokens to keep fixed (MASK = design it), e.g. for partial redesign.
    Returns (B,L) int64 tokens, the final sampled state.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    valid = valid.bool()
    S = torch.full(valid.shape, mask_id, dtype=torch.long, device=valid.device)
    if init is not None:
        S = torch.where(valid & (init != mask_id), init.long(), S)
    grid = torch.linspace(1.0 - min_t, 0.0, steps).tolist()
    for i in progress_bar(range(steps - 1), progress, "design", leave=False):
        if not ((S == mask_id) & valid).any():
            break
        lp = denoise(S)
        S = masked_reverse_step(S, lp, valid, grid[i], grid[i + 1], mask_id=mask_id, temperature=temperature,
                                order=order, generator=generator)
    return torch.where(valid, S, torch.full_like(S, unknown_id))
