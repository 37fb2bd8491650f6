"""E(3)-equivariant denoisers for joint molecule generation (spec ``molecule.md`` §1.5, §2.2, §7.1, §7.9).

The network predicts the *clean* molecule (x̂₁ parameterisation) from a noisy one: coordinates, atom-type logits,
symmetric bond logits and formal-charge logits. It also exposes the per-atom hidden states after each message-passing
layer ("taps") for representation alignment. Two architectures sit behind one interface, :class:`MoleculeDenoiser`:

* :class:`SemlaNet` (``arch="semla"``): the Semla network of SemlaFlow (multiple coordinate sets, NodeFeedForward with
  invariant and equivariant branches, EdgeMessages with per-set dot products, NodeAttention with message-channel logits
  and GNN-VPA scaling, CoordAttention, a final non-residual feed-forward block, BondRefine, heads);
* :class:`EGNN` (``arch="egnn"``): a smaller E(n)-GNN (Satorras et al. 2021) with edge features, tanh-bounded
  coordinate updates on normalised differences, and a symmetrised pair MLP for bonds.

Inputs (padded to ``N`` atoms per molecule):

* ``x`` ``(B, N, 3)`` float coordinates (normalised units); the CoM over real atoms is removed on entry;
* ``types`` ``(B, N)`` int64 atom-type indices in ``[0, K)``;
* ``bonds`` ``(B, N, N)`` int64 bond classes in ``[0, 5)`` (0 none, 1 single, 2 double, 3 triple, 4 aromatic);
* ``t`` ``(B,)`` float noise level (library convention: 0 = data, 1 = noise). Like the reference it enters only as a
  raw scalar per atom, optionally together with a sinusoidal embedding (``sinusoidal_time=True``);
* ``mask`` ``(B, N)`` bool, True for real atoms;
* ``self_cond``: ``None`` (zeros) or a dict with ``"coords"`` ``(B, N, 3)``, ``"types"`` ``(B, N, K)`` probabilities and
  ``"bonds"`` ``(B, N, N, 5)`` probabilities (a missing key means zeros).

Outputs: ``(pred, hidden)`` with ``pred = {"coords": (B, N, 3), "types": (B, N, K), "bonds": (B, N, N, 5),
"charges": (B, N, 7)}`` and ``hidden = {layer: (B, N, D)}`` for the requested 1-based layers (1 = after the first
message-passing layer; the reference's 0-based ``align_depth = 4`` is tap 5).

Padding never leaks (unlike the reference, spec §7.1): inputs at padded positions are zeroed on entry, attention and
messages are masked on both sides (softmax over real neighbours only, no self-loops), node features and coordinate sets
are multiplied by the mask after every update, so hidden states at padded positions are exactly 0 and padded entries of
every output are 0. A molecule's outputs therefore do not depend on how much padding it has or on what the padded
inputs contain. Use :func:`masked_sum_pool` / :func:`masked_mean_pool` to pool the taps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EGNN",
    "MOLECULE_PRESETS",
    "N_BOND_TYPES",
    "N_CHARGES",
    "CoordNorm",
    "EGNNLayer",
    "MoleculeDenoiser",
    "SemlaLayer",
    "SemlaNet",
    "build_molecule_model",
    "masked_mean_pool",
    "masked_sum_pool",
]

#: Bond classes: 0 none, 1 single, 2 double, 3 triple, 4 aromatic.
N_BOND_TYPES: int = 5
#: Formal-charge classes: index -> charge {0: 0, 1: +1, 2: +2, 3: +3, 4: -1, 5: -2, 6: -3}.
N_CHARGES: int = 7

#: Presets for :func:`build_molecule_model`. ``"semla"`` holds the reference defaults (spec §1.5).
MOLECULE_PRESETS: dict[str, dict] = {
    "semla": dict(
        arch="semla", hidden=384, layers=12, d_message=128, d_edge=128, n_coord_sets=64, n_attn_heads=32,
        d_message_hidden=128, size_emb=64, max_atoms=256,
    ),
    "semla-small": dict(
        arch="semla", hidden=128, layers=6, d_message=64, d_edge=64, n_coord_sets=16, n_attn_heads=16,
        d_message_hidden=64, size_emb=32, max_atoms=256,
    ),
    "egnn": dict(arch="egnn", hidden=256, layers=9, d_edge=64, size_emb=64, max_atoms=256),
    "egnn-small": dict(arch="egnn", hidden=64, layers=4, d_edge=32, size_emb=16, max_atoms=256),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------
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


def _zero_com(x: Tensor, maskf: Tensor) -> Tensor:
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


def _masked_softmax(logits: Tensor, mask: Tensor, dim: int) -> Tensor:
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


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Linear(d_hidden, d_out))


class _PairLinear(nn.Module):
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


class _PairMLP(nn.Module):
    """``Linear([a_i, a_j, p_ij]) -> SiLU -> Linear``; ``(B, N, d_node), (B, N, N, d_pair) -> (B, N, N, d_out)``."""

    def __init__(self, d_node: int, d_pair: int, d_hidden: int, d_out: int):
        super().__init__()
        self.inp = _PairLinear(d_node, d_pair, d_hidden)
        self.out = nn.Linear(d_hidden, d_out)

    def forward(self, a: Tensor, p: Tensor | None) -> Tensor:
        return self.out(F.silu(self.inp(a, p)))


class _InputEmbed(nn.Module):
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
        self.node = _mlp(1 + time_dim + n_sc * num_atom_types + size_emb, d_model, d_model)
        self.edge = _mlp(n_sc * n_bond_types + d_pair_extra, d_edge, d_edge)

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


# ----------------------------------------------------------------------------------------------------------------------
# Semla
# ----------------------------------------------------------------------------------------------------------------------
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
        X = _zero_com(X, m)
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
        self.invariant = _mlp(d_model + n_sets, d_ff, d_model)
        self.gate = _mlp(d_model, proj_sets, proj_sets)
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
        self.mlp = _PairMLP(d_message, n_sets + (d_edge or 0), d_ff, d_out)

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
        a = _masked_softmax(logits, adj.unsqueeze(-1), dim=2)  # (B, N, N, H)
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
        a = _masked_softmax(logits, adj.unsqueeze(-1), dim=2).permute(0, 3, 1, 2)  # (B, S, N, N)
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
        self.mlp = _PairMLP(d_message, 2 + d_edge, d_message, d_edge)

    def forward(self, x: Tensor, h: Tensor, maskf: Tensor, e: Tensor) -> Tensor:
        xc = self.coord_norm(x.unsqueeze(1), maskf).squeeze(1)
        diff = xc.unsqueeze(2) - xc.unsqueeze(1)
        sq = (diff * diff).sum(dim=-1, keepdim=True)
        dots = torch.einsum("bic,bjc->bij", xc, xc).unsqueeze(-1)
        pair = torch.cat([sq, dots, self.edge_norm(e)], dim=-1)
        return self.mlp(self.node_proj(self.node_norm(h)), pair)


class SemlaNet(nn.Module):
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
        self.embed = _InputEmbed(
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
        self.type_head = _mlp(d_model, d_model, num_atom_types)
        self.charge_head = _mlp(d_model, d_model, n_charges)
        self.bond_head = _mlp(d_edge, d_edge, n_bond_types)
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
        """Prepared inputs (see :meth:`MoleculeDenoiser.forward`) -> coords, type, bond, charge logits, taps.

        Shapes: ``x, sc_coords (B, N, 3)`` centred and masked; ``node_raw (B, N, F)``; ``edge_raw (B, N, N, E)``;
        ``t (B,)``; ``n_atoms (B,)``; ``maskf (B, N)``; ``adj, pairf (B, N, N)``.
        """
        h, e = self.embed(node_raw, edge_raw, t, n_atoms, maskf, pairf)
        sets = [x, sc_coords] if self.self_condition else [x]
        X = self.coord_in(torch.stack(sets, dim=-1)).permute(0, 3, 1, 2) * maskf[:, None, :, None]  # (B, S, N, 3)
        hidden: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers, start=1):
            X, h, e_out = layer(X, h, maskf, adj, e if i == 1 else None)
            if e_out is not None:
                e = e_out
            if i in taps:
                hidden[i] = h
        m = maskf.unsqueeze(-1)
        X, h = self.final_ff(X, h, maskf)
        X = X * m.unsqueeze(1)
        h = h * m
        coords = self.coord_head(self.coord_out_norm(X, maskf).permute(0, 2, 3, 1)).squeeze(-1)  # (B, N, 3)
        coords = _zero_com(coords, maskf)
        if self.bond_refine is not None:
            e = self.bond_refine(coords, h, maskf, e)
        h = self.feat_norm(h)
        e = self.edge_norm(e)
        types = self.type_head(h) * m
        charges = self.charge_head(h) * m
        bonds = self.bond_head(e + e.transpose(1, 2)) * pairf.unsqueeze(-1)
        return coords, types, bonds, charges, hidden


# ----------------------------------------------------------------------------------------------------------------------
# EGNN
# ----------------------------------------------------------------------------------------------------------------------
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
        self.edge_in = _PairLinear(d_model, 1 + d_edge, d_model)
        self.edge_out = nn.Linear(d_model, d_model)
        self.coord_mlp = _mlp(d_model, d_model, 1)
        self.node_mlp = _mlp(2 * d_model, d_model, d_model)
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
        return _zero_com(x, maskf), h


class EGNN(nn.Module):
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
        self.embed = _InputEmbed(
            num_atom_types, d_model, d_edge, size_emb=size_emb, max_atoms=max_atoms, self_condition=self_condition,
            time_dim=time_dim if sinusoidal_time else 0, n_bond_types=n_bond_types,
            d_pair_extra=1 if self_condition else 0,
        )
        self.layers = nn.ModuleList([EGNNLayer(d_model, d_edge) for _ in range(n_layers)])
        self.feat_norm = nn.LayerNorm(d_model)
        self.type_head = _mlp(d_model, d_model, num_atom_types)
        self.charge_head = _mlp(d_model, d_model, n_charges)
        self.bond_head = _PairMLP(d_model, 1 + d_edge, d_model, n_bond_types)

    def forward(
        self, x: Tensor, sc_coords: Tensor | None, node_raw: Tensor, edge_raw: Tensor, t: Tensor, n_atoms: Tensor,
        maskf: Tensor, adj: Tensor, pairf: Tensor, taps: set[int],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[int, Tensor]]:
        """Same contract as :meth:`SemlaNet.forward`."""
        if self.self_condition:
            sc_diff = sc_coords.unsqueeze(2) - sc_coords.unsqueeze(1)
            edge_raw = torch.cat([edge_raw, (sc_diff * sc_diff).sum(dim=-1, keepdim=True) * pairf.unsqueeze(-1)], -1)
        h, e = self.embed(node_raw, edge_raw, t, n_atoms, maskf, pairf)
        adjf = adj.to(x.dtype)
        inv_deg = 1.0 / (maskf.sum(dim=1) - 1.0).clamp(min=1.0)[:, None, None]
        hidden: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers, start=1):
            x, h = layer(x, h, e, maskf, adjf, inv_deg)
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


# ----------------------------------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------------------------------
class MoleculeDenoiser(nn.Module):
    """Joint molecule denoiser (coordinates, atom types, bonds, charges) with per-layer hidden-state taps.

    Args:
        num_atom_types: K, size of the atom-type vocabulary (18 in the reference, special tokens included).
        arch: ``"semla"`` (:class:`SemlaNet`) or ``"egnn"`` (:class:`EGNN`).
        hidden: node width D (``d_model``).
        layers: number of message-passing layers (= :attr:`depth`, the valid taps are ``1..depth``).
        **arch_kwargs: passed to the architecture (e.g. ``d_message, d_edge, n_coord_sets, n_attn_heads,
            d_message_hidden, size_emb, max_atoms, coord_norm, bond_refine, self_condition, sinusoidal_time,
            time_dim``).
    """

    def __init__(self, num_atom_types: int, *, arch: str = "semla", hidden: int = 384, layers: int = 12, **arch_kwargs):
        super().__init__()
        if arch == "semla":
            self.net: nn.Module = SemlaNet(num_atom_types, d_model=hidden, n_layers=layers, **arch_kwargs)
        elif arch == "egnn":
            self.net = EGNN(num_atom_types, d_model=hidden, n_layers=layers, **arch_kwargs)
        else:
            raise ValueError(f"unknown molecule architecture {arch!r} (valid: 'semla', 'egnn')")
        self.arch = arch
        self.num_atom_types = num_atom_types
        self.hidden_size = hidden
        self.depth = layers
        self.n_bond_types = arch_kwargs.get("n_bond_types", N_BOND_TYPES)
        self.n_charges = arch_kwargs.get("n_charges", N_CHARGES)
        self.max_atoms = self.net.embed.max_atoms
        self.self_condition = self.net.self_condition

    def tap_dim(self, tap: int) -> int:
        """Width of the hidden state at ``tap`` (always :attr:`hidden_size`)."""
        self._check_taps([tap])
        return self.hidden_size

    def _check_taps(self, taps: Sequence[int]) -> set[int]:
        out = set()
        for d in taps:
            d = int(d)
            if not 1 <= d <= self.depth:
                raise ValueError(f"tap {d} is out of range 1..{self.depth} (model depth={self.depth})")
            out.add(d)
        return out

    def _check_inputs(self, x: Tensor, types: Tensor, bonds: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != 3 or not x.dtype.is_floating_point:
            raise ValueError(f"x must be a float tensor of shape (B, N, 3), got {tuple(x.shape)} {x.dtype}")
        B, N, _ = x.shape
        if types.shape != (B, N) or types.dtype.is_floating_point:
            raise ValueError(f"types must be an integer tensor of shape ({B}, {N}), got {tuple(types.shape)}")
        if bonds.shape != (B, N, N) or bonds.dtype.is_floating_point:
            raise ValueError(f"bonds must be an integer tensor of shape ({B}, {N}, {N}), got {tuple(bonds.shape)}")
        if mask.shape != (B, N):
            raise ValueError(f"mask must have shape ({B}, {N}), got {tuple(mask.shape)}")
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        return t

    def forward(
        self, x: Tensor, types: Tensor, bonds: Tensor, t: Tensor, mask: Tensor,
        self_cond: Mapping[str, Tensor] | None = None, *, taps: Sequence[int] = (),
    ) -> tuple[dict[str, Tensor], dict[int, Tensor]]:
        """Predict the clean molecule.

        Args:
            x: ``(B, N, 3)`` noisy coordinates (normalised units; re-centred over real atoms here).
            types: ``(B, N)`` long atom types in ``[0, K)`` (ignored at padded atoms).
            bonds: ``(B, N, N)`` long bond classes in ``[0, 5)`` (ignored at padded pairs).
            t: ``(B,)`` noise level, 0 = data, 1 = noise (a 0-dim tensor is broadcast).
            mask: ``(B, N)`` bool, True for real atoms.
            self_cond: ``None`` or ``{"coords": (B, N, 3), "types": (B, N, K) probs, "bonds": (B, N, N, 5) probs}``;
                missing entries are zeros. Must be ``None`` for a model built with ``self_condition=False``.
            taps: 1-based layer indices whose node features to return.

        Returns:
            ``(pred, hidden)``: ``pred["coords"] (B, N, 3)`` centred over real atoms (0 at padding),
            ``pred["types"] (B, N, K)``, ``pred["bonds"] (B, N, N, 5)`` (symmetric), ``pred["charges"] (B, N, 7)``
            logits (0 at padding); ``hidden = {tap: (B, N, D)}``, exactly 0 at padded atoms.
        """
        tap_set = self._check_taps(taps)
        t = self._check_inputs(x, types, bonds, t, mask)
        B, N, _ = x.shape
        K, nb = self.num_atom_types, self.n_bond_types
        mask = mask.bool()
        maskf = mask.to(x.dtype)
        pair = mask.unsqueeze(2) & mask.unsqueeze(1)
        pairf = pair.to(x.dtype)
        adj = pair & ~torch.eye(N, dtype=torch.bool, device=x.device)
        n_atoms = mask.sum(dim=1)
        if N > 0 and int(n_atoms.max()) >= self.max_atoms:
            raise ValueError(f"a molecule has {int(n_atoms.max())} atoms; the size embedding allows < {self.max_atoms}")

        x = _zero_com(x, maskf)
        type_oh = F.one_hot(types.masked_fill(~mask, 0), K).to(x.dtype) * maskf.unsqueeze(-1)
        bond_oh = F.one_hot(bonds.masked_fill(~pair, 0), nb).to(x.dtype) * pairf.unsqueeze(-1)
        sc_coords = None
        node_raw, edge_raw = type_oh, bond_oh
        if self.self_condition:
            sc = dict(self_cond or {})
            sc_coords = sc.get("coords")
            sc_coords = torch.zeros_like(x) if sc_coords is None else _zero_com(sc_coords.to(x.dtype), maskf)
            sc_types = sc.get("types")
            sc_types = x.new_zeros(B, N, K) if sc_types is None else sc_types.to(x.dtype) * maskf.unsqueeze(-1)
            sc_bonds = sc.get("bonds")
            sc_bonds = x.new_zeros(B, N, N, nb) if sc_bonds is None else sc_bonds.to(x.dtype) * pairf.unsqueeze(-1)
            node_raw = torch.cat([type_oh, sc_types], dim=-1)
            edge_raw = torch.cat([bond_oh, sc_bonds], dim=-1)
        elif self_cond is not None:
            raise ValueError("self_cond was given but the model was built with self_condition=False")

        coords, type_logits, bond_logits, charge_logits, hidden = self.net(
            x, sc_coords, node_raw, edge_raw, t, n_atoms, maskf, adj, pairf, tap_set
        )
        pred = {"coords": coords, "types": type_logits, "bonds": bond_logits, "charges": charge_logits}
        return pred, hidden


def build_molecule_model(preset: str, num_atom_types: int, **overrides) -> MoleculeDenoiser:
    """Build a :class:`MoleculeDenoiser` from :data:`MOLECULE_PRESETS` (``arch``, ``hidden``, ``layers`` and any
    architecture keyword can be overridden)."""
    if preset not in MOLECULE_PRESETS:
        raise ValueError(f"unknown molecule preset {preset!r}; valid names: {', '.join(MOLECULE_PRESETS)}")
    cfg = {**MOLECULE_PRESETS[preset], **overrides}
    arch = cfg.pop("arch")
    return MoleculeDenoiser(num_atom_types, arch=arch, **cfg)
