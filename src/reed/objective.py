"""The REED objective: generative loss + curriculum-weighted sum of alignment terms, with a logged breakdown.

    loss = w_gen(step) * mean_b L_gen(b) + proj_coeff * w_align(step) * sum_k mean_b[c_k s_k(t_b) l_k(b)]

``l_k(b)`` is the per-sample negative cosine between ``projector_k(h_{d_k})`` and the target ``z_k``; with a
token mask the mean over the batch counts every valid token once (samples weighted by their token count, the
protein reference's pooled mean; identical to the plain mean when every sample has the same number of tokens).
Methods (the three compared in the paper):
  * ``sit``  — generative loss only (``baseline`` is the same, a domain-neutral name).
  * ``repa`` — image targets only, *averaged* over targets, constant weights, no time weighting.
  * ``reed`` — all targets *summed* with coefficients c_k, per-sample time weights s_k(t), curriculum weights.
This module never imports a domain: the denoiser only has to return ``(prediction, {tap: hidden})``.
Kinds of term: ``tokens`` (B,T,D) against (B,T,Dz); ``pooled`` masked token mean against (B,Dz); ``edges``
pair features (B,L,K,D) on a kNN graph against dense pair targets (B,L,L,Dz) gathered on that graph.
Images go through :meth:`Objective.__call__` (flow process); other domains run their own forward and hand a
:class:`DenoiserOutput` to :meth:`Objective.combine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from reed.align import (
    Projector,
    gather_edges,
    masked_mean,
    masked_standardize,
    negative_cosine,
    resample_tokens,
)
from reed.curriculum import alignment_weight, generative_weight, time_weight

METHODS = ("sit", "baseline", "repa", "reed")


@dataclass
class AlignTerm:
    """One alignment term: target ``name`` of width ``dim``, aligned at tap ``depth``."""

    name: str
    dim: int
    depth: int | str  # block index (SiT) or a named tap of the denoiser (e.g. "decoder.1.edges")
    kind: str = "tokens"  # "tokens" (B,T,D) | "pooled" (B,D) | "edges" (B,L,K,D)
    coeff: float = 1.0
    time_weight: str = "constant"
    cutoffs: tuple[float, float] = (0.0, 1.0)
    modality: str = "image"
    projector_dim: int = 2048
    projector_layers: int = 3
    standardize: bool = False  # per-channel standardisation of z with masked batch statistics


def active_terms(terms: Sequence[AlignTerm], method: str) -> list[AlignTerm]:
    """The terms a method uses: none for ``sit``, image targets for ``repa``, all for ``reed``."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}', expected one of {METHODS}")
    if method in ("sit", "baseline"):
        return []
    if method == "repa":
        return [t for t in terms if t.modality == "image"]
    return list(terms)


class ReedModule(nn.Module):
    """What the optimizer trains: the denoiser plus one projector per alignment term (``projectors[name]``).

    A projector's input width is ``denoiser.tap_dim(depth)`` when the denoiser has named taps of different
    widths, else ``hidden_size``.
    """

    def __init__(self, denoiser: nn.Module, terms: Sequence[AlignTerm], hidden_size: int):
        super().__init__()
        self.denoiser = denoiser
        tap_dim = getattr(denoiser, "tap_dim", None)
        self.projectors = nn.ModuleDict(
            {t.name: Projector(tap_dim(t.depth) if tap_dim else hidden_size, t.dim, t.projector_dim,
                               t.projector_layers) for t in terms}
        )

    def forward(self, *args, **kwargs):
        return self.denoiser(*args, **kwargs)


@dataclass
class Curriculum:
    """Curriculum settings; see :mod:`reed.curriculum`. ``align_steps`` <= 0 falls back to ``total``.

    All counts are in units of ``steps_per_unit`` optimizer steps: 1 for step-based recipes, the number of
    steps per epoch for epoch-based ones (the weights then change once per epoch, as in the protein reference).
    """

    gen_start: int = 0
    gen_warmup: int = 0
    gen_decay: str = "constant"
    align_decay: str = "constant"
    align_steps: int = 0
    total: int = 1
    steps_per_unit: int = 1


@dataclass
class DenoiserOutput:
    """What a domain's forward hands to :meth:`Objective.combine`.

    loss_gen: scalar generative loss of the batch; t: (B,) noise levels (0 = data); hidden: {tap: (B,T,D) or
    (B,L,K,D)}; token_mask: (B,T) valid tokens (None = all); edge_index/edge_mask: (B,L,K) kNN graph and its
    valid edges, needed by ``edges`` terms.
    """

    loss_gen: torch.Tensor
    t: torch.Tensor
    hidden: dict
    token_mask: torch.Tensor | None = None
    edge_index: torch.Tensor | None = None
    edge_mask: torch.Tensor | None = None


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
    def taps(self) -> list:
        return sorted({t.depth for t in self.terms})

    def weights(self, step: int) -> tuple[float, float]:
        """(w_gen, w_align) at ``step``; constant (1, 1) for ``sit``/``repa``."""
        if self.method != "reed":
            return 1.0, (1.0 if self.terms else 0.0)
        c = self.curriculum
        step = step // max(c.steps_per_unit, 1)
        w_gen = generative_weight(step, start=c.gen_start, warmup=c.gen_warmup, decay=c.gen_decay, total=c.total)
        steps = c.align_steps if c.align_steps > 0 else c.total
        w_align = alignment_weight(step, decay=c.align_decay, steps=steps) if self.terms else 0.0
        return w_gen, w_align

    def __call__(self, module: ReedModule, x0: torch.Tensor, cond: torch.Tensor, targets: dict[str, torch.Tensor],
                 step: int, *, generator: torch.Generator | None = None,
                 token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss for one (micro-)batch of a continuous process (images).

        x0 (B,...) clean data, cond (B,) conditioning, targets {name: (B,T,Dz) or (B,Dz)},
        token_mask optional (B,T) of real tokens for pooling/token losses. See :meth:`combine` for the outputs.
        """
        c = self.process.corrupt(x0, generator=generator)
        pred, hidden = module(c.x_t, c.t, cond, taps=self.taps)
        loss_gen = self.process.loss(pred, c.target).mean()
        return self.combine(module, DenoiserOutput(loss_gen, c.t, hidden, token_mask), targets, step)

    def combine(self, module: ReedModule, out: DenoiserOutput, targets: dict[str, torch.Tensor], step: int
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weight the generative loss and the alignment terms at ``step``.

        Returns the scalar loss and a breakdown of detached scalars: ``loss``, ``loss_gen``, ``loss_align``
        (the weighted sum over terms, before ``proj_coeff * w_align``), ``w_gen``, ``w_align`` and
        ``align/<name>`` (unweighted mean negative cosine per term).
        """
        w_gen, w_align = self.weights(step)
        # the forward goes through ``module`` (a DDP wrapper under multi-process training keeps gradient sync);
        # the projectors are reached on the wrapped module
        projectors = module.projectors if hasattr(module, "projectors") else module.module.projectors
        parts: dict[str, torch.Tensor] = {}
        align = out.loss_gen.new_zeros((), dtype=torch.float32)
        for term in self.terms:
            if term.name not in targets:
                raise KeyError(f"batch has no target '{term.name}' (has: {sorted(targets)})")
            h = out.hidden[term.depth]
            z = targets[term.name]
            mask = out.token_mask
            if term.kind == "pooled":
                h, mask = masked_mean(h, mask), None
            elif term.kind == "edges":
                if out.edge_index is None:
                    raise ValueError(f"target '{term.name}' is an edge target but the denoiser gave no edge_index")
                z = gather_edges(z, out.edge_index)
                mask = out.edge_mask
                h, z = h.flatten(1, 2), z.flatten(1, 2)  # (B,L*K,D): edges are tokens from here on
                mask = mask.flatten(1, 2) if mask is not None else None
            if term.standardize:
                z = masked_standardize(z, mask)
            zhat = projectors[term.name](h)
            if term.kind == "tokens" and z.shape[1] != zhat.shape[1]:
                z = resample_tokens(z, zhat.shape[1])
            per_sample = negative_cosine(zhat, z, mask)  # (B,)
            # samples weighted by their number of valid tokens: the mean counts every valid token once
            count = mask.float().flatten(1).sum(1) if mask is not None else torch.ones_like(per_sample)
            count = count / count.sum().clamp_min(1.0)
            parts[f"align/{term.name}"] = (per_sample * count).sum().detach()
            if self.method == "reed":
                w = term.coeff * time_weight(out.t, term.time_weight, tuple(term.cutoffs))
                align = align + (per_sample * w * count).sum()
            else:
                align = align + (per_sample * count).sum() / len(self.terms)
        loss = w_gen * out.loss_gen + self.proj_coeff * w_align * align
        parts_out = {"loss": loss.detach(), "loss_gen": out.loss_gen.detach(), "loss_align": align.detach(),
                     "w_gen": torch.tensor(w_gen), "w_align": torch.tensor(w_align)}
        parts_out.update(parts)
        return loss, parts_out
