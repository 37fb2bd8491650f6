"""Shared pieces of the molecule denoisers: bond / charge class counts, masked pooling, centre-of-mass removal,
masked softmax, time embeddings, pair layers and the input embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Bond classes: 0 none, 1 single, 2 double, 3 triple, 4 aromatic.
N_BOND_TYPES: int = 5
#: Formal-charge classes: index -> charge {0: 0, 1: +1, 2: +2, 3: +3, 4: -1, 5: -2, 6: -3}.
N_CHARGES: int = 7


def masked_sum_pool(h: Tensor, mask: Tensor) -> Tensor:
    """Sum of per-atom features over real atoms only.

    Args:
        h: ``(B, N, D)`` per-atom features.
        mask: ``(B, N)`` bool (or 0/1) mask, True for real atoms.

    Returns:
        ``(B, D)`` ``sum_i mask_i * h_i``.
    """
    return (h * mask.to(h.dtype).unsqueeze(-1)).sum(dim=1)


def masked_mean_pool(h: Tensor, mask: Tensor) -> Tensor:
    """Mean of per-atom features over real atoms only (0 for a molecule without atoms).

    Args:
        h: ``(B, N, D)`` per-atom features.
        mask: ``(B, N)`` bool (or 0/1) mask, True for real atoms.

    Returns:
        ``(B, D)`` ``sum_i mask_i * h_i / max(1, sum_i mask_i)``.
    """
    count = mask.to(h.dtype).sum(dim=1, keepdim=True).clamp(min=1.0)
    return masked_sum_pool(h, mask) / count


def zero_com(x: Tensor, maskf: Tensor) -> Tensor:
    """Remove the centre of mass (uniform weights) over real atoms and zero the padding.

    Args:
        x: ``(..., N, 3)`` coordinates.
        maskf: ``(..., N)`` float mask broadcastable to ``x[..., 0]``.

    Returns:
        ``(..., N, 3)`` centred coordinates, 0 at padded atoms.
    """
    m = maskf.unsqueeze(-1)
    n = maskf.sum(dim=-1, keepdim=True).clamp(min=1.0).unsqueeze(-1)
    com = (x * m).sum(dim=-2, keepdim=True) / n
    return (x - com) * m


def masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
    """Softmax over ``dim`` restricted to ``mask``; rows without any valid entry are all 0 (never NaN)."""
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    return torch.softmax(logits, dim=dim) * mask.to(logits.dtype)


def _sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """``(B,)`` times in [0, 1] -> ``(B, dim)`` ``[cos, sin]`` features of ``1000 t`` (DiT frequencies)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class PairLinear(nn.Module):
    """``Linear([a_i, a_j, p_ij] -> d_out)`` without materialising the concatenation.

    Parameter count equals one ``Linear(2 * d_node + d_pair, d_out)`` (a single bias).

    Shapes: ``a (B, N, d_node)``, ``p (B, N, N, d_pair)`` -> ``(B, N, N, d_out)``.
    """

    def __init__(self, d_node: int, d_pair: int, d_out: int):
        super().__init__()
        self.src = nn.Linear(d_node, d_out)
        self.dst = nn.Linear(d_node, d_out, bias=False)
        self.pair = nn.Linear(d_pair, d_out, bias=False) if d_pair > 0 else None

    def forward(self, a: Tensor, p: Tensor | None) -> Tensor:
        z = self.src(a).unsqueeze(2) + self.dst(a).unsqueeze(1)
        if self.pair is not None:
            z = z + self.pair(p)
        return z


class PairMLP(nn.Module):
    """``Linear([a_i, a_j, p_ij]) -> SiLU -> Linear``; ``(B, N, d_node), (B, N, N, d_pair) -> (B, N, N, d_out)``."""

    def __init__(self, d_node: int, d_pair: int, d_hidden: int, d_out: int):
        super().__init__()
        self.inp = PairLinear(d_node, d_pair, d_hidden)
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, a: Tensor, p: Tensor | None) -> Tensor:
        return self.out(F.silu(self.inp(a, p)))


class InputEmbed(nn.Module):
    """Atom and edge input embeddings shared by both architectures (spec §1.5 "Input embedding").

    Atom features ``[t, (sinusoidal t), one-hot type (K), size embedding, (self-cond type probs (K))]`` go through
    ``Linear -> SiLU -> Linear`` to ``d_model``; edge features ``[one-hot bond (5), (self-cond bond probs (5)),
    extra pair features]`` through ``Linear -> SiLU -> Linear`` to ``d_edge``. Both are masked (padding = 0).
    """

    def __init__(
        self, num_atom_types: int, d_model: int, d_edge: int, *, size_emb: int, max_atoms: int, self_condition: bool,
        time_dim: int, n_bond_types: int, d_pair_extra: int = 0,
    ):
        super().__init__()
        self.max_atoms = max_atoms
        self.time_dim = time_dim
        n_sc = 2 if self_condition else 1
        self.size_emb = nn.Embedding(max_atoms, size_emb)
        self.node = mlp(1 + time_dim + n_sc * num_atom_types + size_emb, d_model, d_model)
        self.edge = mlp(n_sc * n_bond_types + d_pair_extra, d_edge, d_edge)

    def forward(
        self, node_raw: Tensor, edge_raw: Tensor, t: Tensor, n_atoms: Tensor, maskf: Tensor, pairf: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``node_raw (B, N, F)`` (types [+ sc types]), ``edge_raw (B, N, N, E)``, ``t (B,)``, ``n_atoms (B,)`` long,
        ``maskf (B, N)``, ``pairf (B, N, N)`` -> ``h (B, N, d_model)``, ``e (B, N, N, d_edge)``."""
        B, N, _ = node_raw.shape
        feats = [t[:, None, None].expand(B, N, 1)]
        if self.time_dim > 0:
            feats.append(_sinusoidal(t, self.time_dim)[:, None].expand(B, N, self.time_dim))
        feats.append(node_raw)
        feats.append(self.size_emb(n_atoms)[:, None].expand(B, N, -1).to(node_raw.dtype))
        h = self.node(torch.cat(feats, dim=-1)) * maskf.unsqueeze(-1)
        e = self.edge(edge_raw) * pairf.unsqueeze(-1)
        return h, e
