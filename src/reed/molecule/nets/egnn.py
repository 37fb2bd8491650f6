"""A smaller E(n)-GNN (Satorras et al. 2021) with edge features, tanh-bounded coordinate updates on normalised
differences, and a symmetrised pair MLP for bonds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.activation_checkpoint import ActivationCheckpointing
from reed.molecule.nets.common import N_BOND_TYPES, N_CHARGES, InputEmbed, PairLinear, PairMLP, mlp, zero_com


class EGNNLayer(nn.Module):
    """E(n)-GNN layer with edge features.

    ``m_ij = phi_e([LN(h)_i, LN(h)_j, ||x_i - x_j||^2, e_ij])`` (masked to real pairs, no self-loops);
    ``x_i += sum_j (x_i - x_j) / (||x_i - x_j|| + 1) * tanh(phi_x(m_ij)) / (n - 1)``;
    ``h_i += phi_h([LN(h)_i, sum_j m_ij / (n - 1)])``. Node features and coordinates are re-masked (and the
    coordinates re-centred) after the update.

    Shapes: ``x (B, N, 3)``, ``h (B, N, D)``, ``e (B, N, N, d_edge)``, ``maskf (B, N)``, ``adjf (B, N, N)`` float,
    ``inv_deg (B, 1, 1)`` -> ``(x, h)``.
    """

    def __init__(self, d_model: int, d_edge: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.edge_in = PairLinear(d_model, 1 + d_edge, d_model)
        self.edge_out = nn.Linear(d_model, d_model)
        self.coord_mlp = mlp(d_model, d_model, 1)
        self.node_mlp = mlp(2 * d_model, d_model, d_model)
        nn.init.xavier_uniform_(self.coord_mlp[-1].weight, gain=1e-3)
        nn.init.zeros_(self.coord_mlp[-1].bias)

    def forward(
        self, x: Tensor, h: Tensor, e: Tensor, maskf: Tensor, adjf: Tensor, inv_deg: Tensor
    ) -> tuple[Tensor, Tensor]:
        hn = self.norm(h)
        diff = x.unsqueeze(2) - x.unsqueeze(1)  # (B, N, N, 3)
        sq = (diff * diff).sum(dim=-1, keepdim=True)
        msg = F.silu(self.edge_out(F.silu(self.edge_in(hn, torch.cat([sq, e], dim=-1)))))
        msg = msg * adjf.unsqueeze(-1)
        w = torch.tanh(self.coord_mlp(msg)) * adjf.unsqueeze(-1) / (torch.sqrt(sq + 1e-8) + 1.0)
        x = x + (diff * w).sum(dim=2) * inv_deg
        agg = msg.sum(dim=2) * inv_deg
        h = (h + self.node_mlp(torch.cat([hn, agg], dim=-1))) * maskf.unsqueeze(-1)
        return zero_com(x, maskf), h


class EGNN(ActivationCheckpointing, nn.Module):
    """E(n)-equivariant GNN denoiser (Satorras et al. 2021) with joint type / bond / charge heads.

    Layout: shared input embedding (atoms as in Semla; edges ``[one-hot bond, self-cond bond probs,
    ||sc_i - sc_j||^2]`` -> ``d_edge``) -> ``n_layers`` :class:`EGNNLayer` on the single coordinate set ``x_t`` ->
    ``LN(h)`` -> atom / charge MLP heads; bond logits from a pair MLP ``[h_i, h_j, ||x_i - x_j||^2, e_ij] ->
    d_model -> 5`` symmetrised as ``(L + Lᵀ) / 2``. The predicted coordinates are the final ``x`` (centred).
    Self-conditioning coordinates enter only through invariant pair distances.
    """

    def __init__(
        self, num_atom_types: int, *, d_model: int = 256, n_layers: int = 9, d_edge: int = 64, size_emb: int = 64,
        max_atoms: int = 256, self_condition: bool = True, sinusoidal_time: bool = False, time_dim: int = 32,
        n_bond_types: int = N_BOND_TYPES, n_charges: int = N_CHARGES,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"EGNN needs n_layers >= 1, got {n_layers}")
        self.d_model = d_model
        self.n_layers = n_layers
        self.self_condition = self_condition
        self.embed = InputEmbed(
            num_atom_types, d_model, d_edge, size_emb=size_emb, max_atoms=max_atoms, self_condition=self_condition,
            time_dim=time_dim if sinusoidal_time else 0, n_bond_types=n_bond_types,
            d_pair_extra=1 if self_condition else 0,
        )
        self.layers = nn.ModuleList([EGNNLayer(d_model, d_edge) for _ in range(n_layers)])
        self.feat_norm = nn.LayerNorm(d_model)
        self.type_head = mlp(d_model, d_model, num_atom_types)
        self.charge_head = mlp(d_model, d_model, n_charges)
        self.bond_head = PairMLP(d_model, 1 + d_edge, d_model, n_bond_types)

    def forward(
        self, x: Tensor, sc_coords: Tensor | None, node_raw: Tensor, edge_raw: Tensor, t: Tensor, n_atoms: Tensor,
        maskf: Tensor, adj: Tensor, pairf: Tensor, taps: set[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[int, Tensor]]:
        """Same contract as :meth:`reed.molecule.nets.semla.SemlaNet.forward`."""
        if self.self_condition:
            sc_diff = sc_coords.unsqueeze(2) - sc_coords.unsqueeze(1)
            edge_raw = torch.cat([edge_raw, (sc_diff * sc_diff).sum(dim=-1, keepdim=True) * pairf.unsqueeze(-1)], -1)
        h, e = self.embed(node_raw, edge_raw, t, n_atoms, maskf, pairf)
        adjf = adj.to(x.dtype)
        inv_deg = 1.0 / (maskf.sum(dim=1) - 1.0).clamp(min=1.0)[:, None, None]
        hidden: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers, start=1):
            x, h = self.run_block(layer, x, h, e, maskf, adjf, inv_deg)
            if i in taps:
                hidden[i] = h
        m = maskf.unsqueeze(-1)
        hn = self.feat_norm(h)
        types = self.type_head(hn) * m
        charges = self.charge_head(hn) * m
        diff = x.unsqueeze(2) - x.unsqueeze(1)
        logits = self.bond_head(hn, torch.cat([(diff * diff).sum(dim=-1, keepdim=True), e], dim=-1))
        bonds = 0.5 * (logits + logits.transpose(1, 2)) * pairf.unsqueeze(-1)
        return x, types, bonds, charges, hidden
