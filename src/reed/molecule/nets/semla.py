"""The Semla network of SemlaFlow (spec ``molecule.md`` §1.5): multiple coordinate sets, NodeFeedForward with
invariant and equivariant branches, EdgeMessages, NodeAttention, CoordAttention, BondRefine and heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from reed.activation_checkpoint import ActivationCheckpointing
from reed.molecule.nets.common import N_BOND_TYPES, N_CHARGES, InputEmbed, PairMLP, masked_softmax, mlp, zero_com


class CoordNorm(nn.Module):
    """Coordinate-set normalisation: remove the CoM per set, optionally divide by the mean atom-vector length of the set
    (``"length"``), multiply by a learnable per-set weight (init 1), zero the padding.

    Shapes: ``X (B, S, N, 3)``, ``maskf (B, N)`` -> ``(B, S, N, 3)``.
    """

    def __init__(self, n_sets: int, norm: str = "length", eps: float = 1e-6):
        super().__init__()
        if norm not in ("length", "none"):
            raise ValueError(f"unknown coordinate norm {norm!r} (valid: 'length', 'none')")
        self.norm = norm
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, n_sets, 1, 1))

    def forward(self, X: Tensor, maskf: Tensor) -> Tensor:
        m = maskf.unsqueeze(1)  # (B, 1, N)
        X = zero_com(X, m)
        if self.norm == "length":
            n = m.sum(dim=-1, keepdim=True).clamp(min=1.0).unsqueeze(-1)  # (B, 1, 1, 1)
            mean_len = torch.linalg.vector_norm(X, dim=-1, keepdim=True).sum(dim=2, keepdim=True) / n
            X = X / (mean_len + self.eps)
        return X * self.weight * m.unsqueeze(-1)


def _mix_sets(X: Tensor, linear: nn.Linear) -> Tensor:
    """Bias-free linear map over the set axis: ``(B, S, N, 3) -> (B, S', N, 3)`` (equivariant)."""
    return torch.einsum("bsnc,ts->btnc", X, linear.weight)


class NodeFeedForward(nn.Module):
    """Semla NodeFeedForward: returns residual updates ``(dX, dh)``.

    * invariant branch: ``[LN(h), ||X̃_s|| for each length-normalised set s] -> d_ff -> d_model`` (SiLU);
    * equivariant branch (as in the reference): gate ``g = MLP(LN(h))`` ``d_model -> P -> P``; the length-normalised
      sets are projected bias-free ``S -> P`` and *summed over the projected sets* into one vector per atom ``v``;
      channel ``p`` is ``g_p * v``; projected back bias-free ``P -> S``.

    Shapes: ``X (B, S, N, 3)``, ``h (B, N, D)``, ``maskf (B, N)`` -> ``dX (B, S, N, 3)``, ``dh (B, N, D)``.
    """

    def __init__(self, d_model: int, n_sets: int, d_ff: int, proj_sets: int, coord_norm: str = "length"):
        super().__init__()
        self.node_norm = nn.LayerNorm(d_model)
        self.coord_norm = CoordNorm(n_sets, coord_norm)
        self.invariant = mlp(d_model + n_sets, d_ff, d_model)
        self.gate = mlp(d_model, proj_sets, proj_sets)
        self.coord_in = nn.Linear(n_sets, proj_sets, bias=False)
        self.coord_out = nn.Linear(proj_sets, n_sets, bias=False)

    def forward(self, X: Tensor, h: Tensor, maskf: Tensor) -> tuple[Tensor, Tensor]:
        hn = self.node_norm(h)
        Xn = self.coord_norm(X, maskf)
        lengths = torch.linalg.vector_norm(Xn, dim=-1).transpose(1, 2)  # (B, N, S)
        dh = self.invariant(torch.cat([hn, lengths], dim=-1))
        v = _mix_sets(Xn, self.coord_in).sum(dim=1)  # (B, N, 3)
        g = self.gate(hn)  # (B, N, P)
        dX = torch.einsum("bnp,bnc,sp->bsnc", g, v, self.coord_out.weight)
        return dX, dh


class EdgeMessages(nn.Module):
    """Semla EdgeMessages: ``[h'_i, h'_j, x_i^s . x_j^s for each set s, (LN(e_ij))] -> d_ff -> d_out`` with
    ``h' = Linear(LN(h))`` (``d_model -> d_message``) and the sets only CoM-removed and weighted (norm ``"none"``).

    Shapes: ``X (B, S, N, 3)``, ``h (B, N, D)``, ``maskf (B, N)``, ``e (B, N, N, d_edge) | None`` ->
    ``(B, N, N, d_out)``.
    """

    def __init__(
        self, d_model: int, d_message: int, d_out: int, n_sets: int, d_ff: int, d_edge: int | None = None
    ):
        super().__init__()
        self.node_norm = nn.LayerNorm(d_model)
        self.coord_norm = CoordNorm(n_sets, "none")
        self.node_proj = nn.Linear(d_model, d_message)
        self.edge_norm = nn.LayerNorm(d_edge) if d_edge is not None else None
        self.mlp = PairMLP(d_message, n_sets + (d_edge or 0), d_ff, d_out)

    def forward(self, X: Tensor, h: Tensor, maskf: Tensor, e: Tensor | None = None) -> Tensor:
        if (e is None) != (self.edge_norm is None):
            raise ValueError("edge features must be given exactly when the layer was built with d_edge")
        hp = self.node_proj(self.node_norm(h))
        Xc = self.coord_norm(X, maskf)
        pair = torch.einsum("bsic,bsjc->bijs", Xc, Xc)
        if e is not None:
            pair = torch.cat([pair, self.edge_norm(e)], dim=-1)
        return self.mlp(hp, pair)


class NodeAttention(nn.Module):
    """Semla NodeAttention: logits are message channels (one per head), softmaxed over real neighbours ``j``; values
    ``Linear(LN(h))`` split into heads; the aggregate is multiplied by ``sqrt(sum_j a_ij^2)`` (GNN-VPA scaling as in the
    reference) and projected ``d_model -> d_model``.

    Shapes: ``h (B, N, D)``, ``logits (B, N, N, H)``, ``adj (B, N, N)`` bool -> ``(B, N, D)``.
    """

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"n_attn_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, h: Tensor, logits: Tensor, adj: Tensor) -> Tensor:
        B, N, D = h.shape
        a = masked_softmax(logits, adj.unsqueeze(-1), dim=2)  # (B, N, N, H)
        v = self.in_proj(self.norm(h)).view(B, N, self.n_heads, D // self.n_heads)
        out = torch.einsum("bijh,bjhd->bihd", a, v)
        out = out * torch.sqrt((a * a).sum(dim=2)).unsqueeze(-1)
        return self.out_proj(out.reshape(B, N, D))


class CoordAttention(nn.Module):
    """Semla CoordAttention: length-normalise the sets, project bias-free ``S -> S``, aggregate unit vectors
    ``(x_i - x_j) / (||x_i - x_j|| + eps)`` per set with softmax-over-``j`` weights from the coordinate message
    channels, multiply by ``sqrt(sum_j a_ij^2)``, project bias-free ``S -> S``.

    Shapes: ``X (B, S, N, 3)``, ``logits (B, N, N, S)``, ``adj (B, N, N)``, ``maskf (B, N)`` -> ``(B, S, N, 3)``.
    """

    def __init__(self, n_sets: int, coord_norm: str = "length", eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.coord_norm = CoordNorm(n_sets, coord_norm)
        self.coord_proj = nn.Linear(n_sets, n_sets, bias=False)
        self.out_proj = nn.Linear(n_sets, n_sets, bias=False)

    def forward(self, X: Tensor, logits: Tensor, adj: Tensor, maskf: Tensor) -> Tensor:
        Xp = _mix_sets(self.coord_norm(X, maskf), self.coord_proj)  # (B, S, N, 3)
        a = masked_softmax(logits, adj.unsqueeze(-1), dim=2).permute(0, 3, 1, 2)  # (B, S, N, N)
        diff = Xp.unsqueeze(3) - Xp.unsqueeze(2)  # (B, S, N, N, 3), x_i - x_j
        w = a / (torch.linalg.vector_norm(diff, dim=-1) + self.eps)
        upd = torch.einsum("bsij,bsijc->bsic", w, diff)
        upd = upd * torch.sqrt((a * a).sum(dim=-1)).unsqueeze(-1)
        return _mix_sets(upd, self.out_proj)


class SemlaLayer(nn.Module):
    """One Semla message-passing layer (NodeFeedForward -> EdgeMessages -> NodeAttention -> CoordAttention).

    The *in* layer consumes edge features (``d_edge_in``); the *out* layer emits them (``d_edge_out``). Both use
    ``d_ff = d_out`` for the message MLP, as in the reference. Node features and sets are re-masked after each update.

    Shapes: ``X (B, S, N, 3)``, ``h (B, N, D)``, ``maskf (B, N)``, ``adj (B, N, N)``, ``e (B, N, N, d_edge_in)`` ->
    ``(X, h, e_out)`` with ``e_out (B, N, N, d_edge_out)`` or ``None``.
    """

    def __init__(
        self, d_model: int, d_message: int, n_sets: int, n_heads: int, d_message_hidden: int, *,
        d_edge_in: int | None = None, d_edge_out: int | None = None, coord_norm: str = "length", eps: float = 1e-6,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.n_sets = n_sets
        d_out = n_heads + n_sets + (d_edge_out or 0)
        d_ff = d_out if (d_edge_in is not None or d_edge_out is not None) else d_message_hidden
        self.node_ff = NodeFeedForward(d_model, n_sets, 4 * d_model, d_message, coord_norm)
        self.messages = EdgeMessages(d_model, d_message, d_out, n_sets, d_ff, d_edge_in)
        self.node_attn = NodeAttention(d_model, n_heads)
        self.coord_attn = CoordAttention(n_sets, coord_norm, eps)
        self.emits_edges = d_edge_out is not None

    def forward(
        self, X: Tensor, h: Tensor, maskf: Tensor, adj: Tensor, e: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        m = maskf.unsqueeze(-1)
        dX, dh = self.node_ff(X, h, maskf)
        X = (X + dX) * m.unsqueeze(1)
        h = (h + dh) * m
        msg = self.messages(X, h, maskf, e)
        h = (h + self.node_attn(h, msg[..., : self.n_heads], adj)) * m
        coord_logits = msg[..., self.n_heads : self.n_heads + self.n_sets]
        X = (X + self.coord_attn(X, coord_logits, adj, maskf)) * m.unsqueeze(1)
        e_out = msg[..., self.n_heads + self.n_sets :] if self.emits_edges else None
        return X, h, e_out


class BondRefine(nn.Module):
    """Semla BondRefine: ``[h'_i, h'_j, ||x_i - x_j||^2, x_i . x_j, LN(e_ij)] -> d_message -> d_edge`` with
    ``h' = Linear(LN(h))`` and the predicted coordinates CoM-removed and weighted. Replaces the edge features.

    Shapes: ``x (B, N, 3)``, ``h (B, N, D)``, ``maskf (B, N)``, ``e (B, N, N, d_edge)`` -> ``(B, N, N, d_edge)``.
    """

    def __init__(self, d_model: int, d_message: int, d_edge: int):
        super().__init__()
        self.coord_norm = CoordNorm(1, "none")
        self.node_norm = nn.LayerNorm(d_model)
        self.edge_norm = nn.LayerNorm(d_edge)
        self.node_proj = nn.Linear(d_model, d_message)
        self.mlp = PairMLP(d_message, 2 + d_edge, d_message, d_edge)

    def forward(self, x: Tensor, h: Tensor, maskf: Tensor, e: Tensor) -> Tensor:
        xc = self.coord_norm(x.unsqueeze(1), maskf).squeeze(1)
        diff = xc.unsqueeze(2) - xc.unsqueeze(1)
        sq = (diff * diff).sum(dim=-1, keepdim=True)
        dots = torch.einsum("bic,bjc->bij", xc, xc).unsqueeze(-1)
        pair = torch.cat([sq, dots, self.edge_norm(e)], dim=-1)
        return self.mlp(self.node_proj(self.node_norm(h)), pair)


class SemlaNet(ActivationCheckpointing, nn.Module):
    """Semla denoiser (spec §1.5), with the padding leaks of the reference fixed.

    Layout: input embedding -> ``n_layers`` :class:`SemlaLayer` (layer 1 = *in* layer with edge features, layers
    2..n-1 = core, layer n = *out* layer emitting ``d_edge`` edge features) -> final :class:`NodeFeedForward`
    (``d_ff = 4 d_model``, ``proj = n_coord_sets``; its outputs *replace* h and the sets) -> coordinate head
    (length CoordNorm, bias-free ``Linear(S -> 1)``, CoM removal) -> :class:`BondRefine` -> ``LN(h)``, ``LN(e)`` ->
    heads (atom / charge MLPs ``D -> D -> K / 7``; bond MLP ``d_edge -> d_edge -> 5`` applied to ``e + eᵀ``).

    Coordinates enter as the stack ``[x_t, self-cond coords]`` mapped to ``n_coord_sets`` sets by a bias-free
    ``Linear(2 -> S)``. The attention graph is fully connected over real atoms, without self-loops.

    Differences from the reference (all deliberate and small):

    * padding is masked everywhere (see module docstring); a real atom without neighbours gets a zero attention update
      instead of attending uniformly to every position;
    * inputs are CoM-centred over real atoms on entry, so the network is translation invariant even for off-centre
      inputs (the reference assumed centred inputs);
    * Xavier-uniform init is applied to ``nn.Linear`` / ``nn.Embedding`` weights only; CoordNorm set weights stay at 1;
    * the unused ``LayerNorm`` on the in-layer edge input and the unused time embedder (§7.9) are not built;
    * optional sinusoidal time features (``sinusoidal_time=True``) next to the raw ``t``.

    Every coordinate operation is a bias-free linear map over sets, a product with invariant scalars, or built from
    relative vectors on CoM-free sets, so the network is E(3)-equivariant (reflections included).
    """

    def __init__(
        self, num_atom_types: int, *, d_model: int = 384, n_layers: int = 12, d_message: int = 128,
        d_edge: int = 128, n_coord_sets: int = 64, n_attn_heads: int = 32, d_message_hidden: int = 128,
        size_emb: int = 64, max_atoms: int = 256, coord_norm: str = "length", bond_refine: bool = True,
        self_condition: bool = True, sinusoidal_time: bool = False, time_dim: int = 32,
        n_bond_types: int = N_BOND_TYPES, n_charges: int = N_CHARGES, eps: float = 1e-6,
    ):
        super().__init__()
        if n_layers < 2:
            raise ValueError(f"SemlaNet needs n_layers >= 2 (an in and an out layer), got {n_layers}")
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_coord_sets = n_coord_sets
        self.self_condition = self_condition
        self.embed = InputEmbed(
            num_atom_types, d_model, d_edge, size_emb=size_emb, max_atoms=max_atoms, self_condition=self_condition,
            time_dim=time_dim if sinusoidal_time else 0, n_bond_types=n_bond_types,
        )
        self.coord_in = nn.Linear(2 if self_condition else 1, n_coord_sets, bias=False)
        layer_kw = dict(coord_norm=coord_norm, eps=eps)
        args = (d_model, d_message, n_coord_sets, n_attn_heads, d_message_hidden)
        layers = [SemlaLayer(*args, d_edge_in=d_edge, **layer_kw)]
        layers += [SemlaLayer(*args, **layer_kw) for _ in range(n_layers - 2)]
        layers += [SemlaLayer(*args, d_edge_out=d_edge, **layer_kw)]
        self.layers = nn.ModuleList(layers)
        self.final_ff = NodeFeedForward(d_model, n_coord_sets, 4 * d_model, n_coord_sets, coord_norm)
        self.coord_out_norm = CoordNorm(n_coord_sets, coord_norm, eps)
        self.coord_head = nn.Linear(n_coord_sets, 1, bias=False)
        self.bond_refine = BondRefine(d_model, d_message, d_edge) if bond_refine else None
        self.feat_norm = nn.LayerNorm(d_model)
        self.edge_norm = nn.LayerNorm(d_edge)
        self.type_head = mlp(d_model, d_model, num_atom_types)
        self.charge_head = mlp(d_model, d_model, n_charges)
        self.bond_head = mlp(d_edge, d_edge, n_bond_types)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform on Linear/Embedding weights (reference init), zero Linear biases, CoordNorm weights 1."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.xavier_uniform_(mod.weight)

    def forward(
        self, x: Tensor, sc_coords: Tensor | None, node_raw: Tensor, edge_raw: Tensor, t: Tensor, n_atoms: Tensor,
        maskf: Tensor, adj: Tensor, pairf: Tensor, taps: set[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[int, Tensor]]:
        """Prepared inputs (see :meth:`reed.molecule.nets.denoiser.MoleculeDenoiser.forward`) -> coords, type, bond,
        charge logits, taps.

        Shapes: ``x, sc_coords (B, N, 3)`` centred and masked; ``node_raw (B, N, F)``; ``edge_raw (B, N, N, E)``;
        ``t (B,)``; ``n_atoms (B,)``; ``maskf (B, N)``; ``adj, pairf (B, N, N)``.
        """
        h, e = self.embed(node_raw, edge_raw, t, n_atoms, maskf, pairf)
        sets = [x, sc_coords] if self.self_condition else [x]
        X = self.coord_in(torch.stack(sets, dim=-1)).permute(0, 3, 1, 2) * maskf[:, None, :, None]  # (B, S, N, 3)
        hidden: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers, start=1):
            X, h, e_out = self.run_block(layer, X, h, maskf, adj, e if i == 1 else None)
            if e_out is not None:
                e = e_out
            if i in taps:
                hidden[i] = h
        m = maskf.unsqueeze(-1)
        X, h = self.final_ff(X, h, maskf)
        X = X * m.unsqueeze(1)
        h = h * m
        coords = self.coord_head(self.coord_out_norm(X, maskf).permute(0, 2, 3, 1)).squeeze(-1)  # (B, N, 3)
        coords = zero_com(coords, maskf)
        if self.bond_refine is not None:
            e = self.bond_refine(coords, h, maskf, e)
        h = self.feat_norm(h)
        e = self.edge_norm(e)
        types = self.type_head(h) * m
        charges = self.charge_head(h) * m
        bonds = self.bond_head(e + e.transpose(1, 2)) * pairf.unsqueeze(-1)
        return coords, types, bonds, charges, hidden
