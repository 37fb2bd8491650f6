"""The REED objective: generative loss + curriculum-weighted sum of alignment terms, with a logged breakdown.

    loss = w_gen(step) * mean_b L_gen(b) + proj_coeff * w_align(step) * sum_k mean_b[c_k s_k(t_b) l_k(b)]

``l_k(b)`` is the per-sample negative cosine between ``projector_k(h_{d_k})`` and the target ``z_k``.
Methods (the three compared in the paper):
  * ``sit``  — generative loss only.
  * ``repa`` — image targets only, *averaged* over targets, constant weights, no time weighting.
  * ``reed`` — all targets *summed* with coefficients c_k, per-sample time weights s_k(t), curriculum weights.
This module never imports a domain: the denoiser only has to return ``(prediction, {depth: (B,T,D)})``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reed.align import Projector, masked_mean, negative_cosine, resample_tokens
from reed.curriculum import alignment_weight, generative_weight, time_weight

METHODS = ("sit", "repa", "reed")


@dataclass
class AlignTerm:
    """One alignment term: target ``name`` of width ``dim``, aligned at tap ``depth``."""

    name: str
    dim: int
    depth: int
    kind: str = "tokens"  # "tokens" (B,T,D) | "pooled" (B,D)
    coeff: float = 1.0
    time_weight: str = "constant"
    cutoffs: tuple[float, float] = (0.0, 1.0)
    modality: str = "image"
    projector_dim: int = 2048


def active_terms(terms: Sequence[AlignTerm], method: str) -> list[AlignTerm]:
    """The terms a method uses: none for ``sit``, image targets for ``repa``, all for ``reed``."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}', expected one of {METHODS}")
    if method == "sit":
        return []
    if method == "repa":
        return [t for t in terms if t.modality == "image"]
    return list(terms)


class ReedModule(nn.Module):
    """What the optimizer trains: the denoiser plus one projector per alignment term (``projectors[name]``)."""

    def __init__(self, denoiser: nn.Module, terms: Sequence[AlignTerm], hidden_size: int):
        super().__init__()
        self.denoiser = denoiser
        self.projectors = nn.ModuleDict(
            {t.name: Projector(hidden_size, t.dim, t.projector_dim) for t in terms}
        )

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)


@dataclass
class Curriculum:
    """Curriculum settings; see :mod:`reed.curriculum`. ``total``/``align_steps`` <= 0 fall back to ``total``."""

    gen_start: int = 0
    gen_warmup: int = 0
    gen_decay: str = "constant"
    align_decay: str = "constant"
    align_steps: int = 0
    total: int = 1


class Objective:
    """Combines a generative process, alignment terms and the curriculum into one scalar loss.

    ``process`` must provide ``corrupt(x0, generator=) -> Corrupted(x_t, t, target, noise)`` and
    ``loss(pred, target) -> (B,)``.
    """

    def __init__(self, process, terms: Sequence[AlignTerm], *, method: str = "reed", proj_coeff: float = 0.5,
                 curriculum: Curriculum | None = None):
        self.process = process
        self.method = method
        self.terms = active_terms(terms, method)
        self.proj_coeff = proj_coeff
        self.curriculum = curriculum or Curriculum()

    @property
    def taps(self) -> list[int]:
        return sorted({t.depth for t in self.terms})

    def weights(self, step: int) -> tuple[float, float]:
        """(w_gen, w_align) at ``step``; constant (1, 1) for ``sit``/``repa``."""
        if self.method != "reed":
            return 1.0, (1.0 if self.terms else 0.0)
        c = self.curriculum
        w_gen = generative_weight(step, start=c.gen_start, warmup=c.gen_warmup, decay=c.gen_decay, total=c.total)
        steps = c.align_steps if c.align_steps > 0 else c.total
        w_align = alignment_weight(step, decay=c.align_decay, steps=steps) if self.terms else 0.0
        return w_gen, w_align

    def __call__(self, module: ReedModule, x0: torch.Tensor, cond: torch.Tensor, targets: dict[str, torch.Tensor],
                 step: int, *, generator: torch.Generator | None = None,
                 token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one (micro-)batch.

        x0 (B,...) clean data, cond (B,) conditioning, targets {name: (B,T,Dz) or (B,Dz)},
        token_mask optional (B,T) of real tokens for pooling/token losses.
        Returns the scalar loss and a breakdown of detached scalars: ``loss``, ``loss_gen``, ``loss_align``
        (the weighted sum over terms, before ``proj_coeff * w_align``), ``w_gen``, ``w_align`` and
        ``align/<name>`` (unweighted mean negative cosine per term).
        """
        w_gen, w_align = self.weights(step)
        # the forward goes through ``module`` (a DDP wrapper under multi-process training keeps gradient sync);
        # the projectors are reached on the wrapped module
        projectors = module.projectors if hasattr(module, "projectors") else module.module.projectors
        c = self.process.corrupt(x0, generator=generator)
        pred, hidden = module(c.x_t, c.t, cond, taps=self.taps)
        loss_gen = self.process.loss(pred, c.target).mean()
        parts: dict[str, torch.Tensor] = {}
        align = pred.new_zeros((), dtype=torch.float32)
        for term in self.terms:
            if term.name not in targets:
                raise KeyError(f"batch has no target '{term.name}' (has: {sorted(targets)})")
            h = hidden[term.depth]
            z = targets[term.name]
            if term.kind == "pooled":
                h = masked_mean(h, token_mask)
            zhat = projectors[term.name](h)
            if term.kind == "tokens" and z.shape[1] != zhat.shape[1]:
                z = resample_tokens(z, zhat.shape[1])
            per_sample = negative_cosine(zhat, z, token_mask if term.kind == "tokens" else None)  # (B,)
            parts[f"align/{term.name}"] = per_sample.detach().mean()
            if self.method == "reed":
                w = term.coeff * time_weight(c.t, term.time_weight, tuple(term.cutoffs))
                align = align + (per_sample * w).mean()
            else:
                align = align + per_sample.mean() / len(self.terms)
        loss = w_gen * loss_gen + self.proj_coeff * w_align * align
        out = {"loss": loss.detach(), "loss_gen": loss_gen.detach(), "loss_align": align.detach(),
               "w_gen": torch.tensor(w_gen), "w_align": torch.tensor(w_align)}
        out.update(parts)
        return loss, out
