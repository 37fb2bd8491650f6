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
inputs contain. Use :func:`~reed.molecule.nets.common.masked_sum_pool` /
:func:`~reed.molecule.nets.common.masked_mean_pool` to pool the taps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from reed.molecule.nets.common import N_BOND_TYPES, N_CHARGES, zero_com
from reed.molecule.nets.egnn import EGNN
from reed.molecule.nets.semla import SemlaNet

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


    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer of the network in the backward pass (:mod:`reed.activation_checkpoint`)."""
        self.net.set_activation_checkpointing(enabled)
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

        x = zero_com(x, maskf)
        type_oh = F.one_hot(types.masked_fill(~mask, 0), K).to(x.dtype) * maskf.unsqueeze(-1)
        bond_oh = F.one_hot(bonds.masked_fill(~pair, 0), nb).to(x.dtype) * pairf.unsqueeze(-1)
        sc_coords = None
        node_raw, edge_raw = type_oh, bond_oh
        if self.self_condition:
            sc = dict(self_cond or {})
            sc_coords = sc.get("coords")
            sc_coords = torch.zeros_like(x) if sc_coords is None else zero_com(sc_coords.to(x.dtype), maskf)
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
