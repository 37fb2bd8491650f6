"""Absorbing-state (masking) discrete diffusion over token sequences, as used for protein inverse folding.

Convention (the library's, shared with the flow process): ``t`` is the *noise level*, the probability that a
token is replaced by MASK — t=0 is clean data, t=1 is all-MASK. The reference code (spec protein.md section 2)
uses the opposite convention, t_ref = 1 - t; this module is the one place that conversion happens.

Forward process: every valid position is independently masked with probability t, t ~ U(min_t, 1-min_t).
Positions that are not valid (padding, residues with missing backbone atoms) are always MASK.

Two output parameterisations (``parameterization``):
  * ``reference`` — the network's log_softmax over all V tokens; the loss is label-smoothed cross-entropy on
    *every* valid position (masked and visible), summed and divided by a constant ``loss_norm`` (2000 in the
    reference, a ProteinMPNN convention), or averaged over valid positions when ``loss_norm`` is 0.
  * ``mdlm`` — the MASK logit is removed and visible positions carry their token over (log-prob 0); the loss is
    the MDLM bound: cross-entropy on masked positions only, weighted by 1/t (= -alpha'/(1-alpha) for the linear
    schedule alpha = 1-t). Label smoothing here spreads mass over the non-MASK classes only: the reference
    smoothed onto the forced MASK logit and got a huge constant loss that overflows fp16 (spec section 2.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

PARAMETERIZATIONS = ("reference", "mdlm")
NEG_INF = -1e6  # finite "minus infinity" for log-probs (keeps fp16/bf16 arithmetic finite)


@dataclass
class MaskedCorrupted:
    """One corrupted batch."""

    S_t: torch.Tensor  # (B,L) int64 tokens with MASK where corrupted
    t: torch.Tensor  # (B,) noise levels (mask probabilities) in [min_t, 1-min_t]
    is_masked: torch.Tensor  # (B,L) bool: valid position that was masked


class MaskedDiffusion:
    """Masking diffusion with ``vocab`` tokens of which ``mask_id`` is the absorbing MASK token."""

    def __init__(self, vocab: int = 22, mask_id: int = 21, *, parameterization: str = "reference",
                 label_smoothing: float = 0.1, min_t: float = 0.01, loss_norm: float = 2000.0):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization '{parameterization}', expected one of {PARAMETERIZATIONS}")
        if not 0.0 <= min_t < 0.5:
            raise ValueError(f"min_t must be in [0, 0.5), got {min_t}")
        self.vocab, self.mask_id = vocab, mask_id
        self.parameterization = parameterization
        self.label_smoothing = label_smoothing
        self.min_t = min_t
        self.loss_norm = loss_norm

    def sample_time(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) noise levels uniform on [min_t, 1-min_t]."""
        u = torch.rand(n, generator=generator, device=device)
        return self.min_t + (1.0 - 2.0 * self.min_t) * u

    def corrupt(self, S: torch.Tensor, valid: torch.Tensor, *, generator: torch.Generator | None = None,
                t: torch.Tensor | None = None) -> MaskedCorrupted:
        """Mask clean tokens ``S`` (B,L) at valid positions ``valid`` (B,L) with probability t (B,)."""
        B = S.shape[0]
        if t is None:
            t = self.sample_time(B, generator=generator, device=S.device)
        valid = valid.bool()
        u = torch.rand(S.shape, generator=generator, device=S.device)
        is_masked = (u < t[:, None]) & valid
        S_t = torch.where(is_masked | ~valid, torch.full_like(S, self.mask_id), S)
        return MaskedCorrupted(S_t=S_t, t=t, is_masked=is_masked)

    def log_probs(self, log_probs: torch.Tensor, S_t: torch.Tensor) -> torch.Tensor:
        """Apply the parameterisation to the network output (B,L,V) log-probs; returns (B,L,V) float32.

        ``reference``: unchanged. ``mdlm``: MASK removed and renormalised; visible positions forced to a one-hot
        of their token (carry-over unmasking).
        """
        lp = log_probs.float()
        if self.parameterization == "reference":
            return lp
        lp = lp.clone()
        lp[..., self.mask_id] = NEG_INF
        lp = lp.log_softmax(dim=-1)
        visible = S_t != self.mask_id
        carry = torch.full_like(lp, NEG_INF).scatter(-1, S_t.clamp_max(self.vocab - 1).unsqueeze(-1), 0.0)
        return torch.where(visible.unsqueeze(-1), carry, lp)

    def token_loss(self, log_probs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """Label-smoothed cross-entropy per position (B,L) (log_probs already parameterised).

        reference: target = (onehot + eps/V) / (1 + eps) over all V classes (spec 2.2);
        mdlm: the same over the V-1 non-MASK classes.
        """
        eps = self.label_smoothing
        onehot = F.one_hot(S, self.vocab).float()
        if self.parameterization == "reference":
            target = (onehot + eps / self.vocab) / (1.0 + eps)
        else:
            spread = torch.ones(self.vocab, device=S.device)
            spread[self.mask_id] = 0.0
            target = (onehot + eps * spread / (self.vocab - 1)) / (1.0 + eps)
        lp = log_probs.float().clamp_min(NEG_INF)
        return -(target * lp).sum(dim=-1)

    def loss(self, log_probs: torch.Tensor, S: torch.Tensor, valid: torch.Tensor, c: MaskedCorrupted
             ) -> torch.Tensor:
        """Scalar generative loss for one batch.

        log_probs (B,L,V) raw network output, S (B,L) clean tokens, valid (B,L) positions that count.
        """
        lp = self.log_probs(log_probs, c.S_t)
        ell = self.token_loss(lp, S)  # (B,L)
        if self.parameterization == "reference":
            w = valid.float()
        else:
            w = c.is_masked.float() / c.t[:, None]
        total = (ell * w).sum()
        if self.loss_norm > 0:
            return total / self.loss_norm
        return total / valid.float().sum().clamp_min(1.0)
