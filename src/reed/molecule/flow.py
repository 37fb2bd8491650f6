"""Equivariant flow matching for 3D molecules (SemlaFlow-style): coordinates, atom types and bonds, jointly.

Time convention
---------------
The library's convention is used throughout: **t = 0 is data, t = 1 is noise** (as for the image flows in
:mod:`reed.processes.flow`). The reference (SemlaFlow) uses t_ref = 1 - t (t_ref = 1 is data). Every formula in this
module is written in library time; the reference's training-time law t_ref ~ Beta(2, 1) (density 2 t_ref, mean 2/3,
skewed toward data) becomes t = 1 - t_ref, so E[t] = 1/3.

Batch layout (padded to N = the largest molecule in the batch)
--------------------------------------------------------------
* ``x`` (B,N,3) float coordinates in *normalised units* (Å / σ; the caller scales);
* ``types`` (B,N) int64 in [0, K_atom) - the type vocabulary: the data set's elements, or the reference's 18 tokens
  (PAD, MASK, 16 elements), whose PAD/MASK classes no data atom takes but the prior does;
* ``bonds`` (B,N,N) int64 in [0, 5) (0 = no bond), symmetric, zero diagonal;
* ``charges`` (B,N) int64 in [0, 7) (predicted only: never interpolated or fed back);
* ``mask`` (B,N) bool, True for real atoms. Padding entries of every integer tensor are 0.

Process
-------
* Prior: coordinates N(0, I) drawn per molecule over its real atoms and re-centred; atom types uniform over the
  K_atom element classes; bonds uniform over the 5 classes per unordered pair (symmetric, zero diagonal).
* Equivariant OT (default): per molecule, a Hungarian assignment on squared distances permutes the *noise* atoms,
  then a Kabsch rotation aligns the permuted noise onto the data. The data's atom order is kept.
* Coordinates: x_t = (1 - t) x0 + t x1 + coord_noise * eps, eps ~ N(0, I) centred over real atoms.
* Categoricals ("unmask" interpolation): each atom keeps its data type with probability 1 - t and otherwise takes its
  prior type; each unordered atom pair does the same for its bond.
* Network: x̂0-parameterisation (predicts the clean coordinates and logits of the clean categoricals).
* Loss per molecule: coordinate SSE / (3 n) (or / (3 N) with ``coord_loss_norm="padded"``), type CE / n, bond CE
  over all n^2 real pairs including the diagonal (target "none") / n^2, charge CE / n; weights 1 / 0.2 / 1 / 1.

Differences from the reference (spec molecule.md §1.3, §1.4, §7.10, §7.11)
-------------------------------------------------------------------------
* The reference drew the type prior uniformly over its 18-token vocabulary including PAD and MASK; here the prior
  covers the K_atom type classes of the vocabulary it is given: the data's elements (``molecule.type_vocab: data``)
  or the reference's 18 tokens (``type_vocab: reference``, :data:`reed.molecule.chem.REFERENCE_TYPES`), which also
  sets the K of the sampler's CTMC jump rates.
* The reference drew the coordinate noise at the batch's largest size, centred it, then truncated it to each
  molecule without re-centring; here each molecule's prior is centred over its own real atoms.
* The reference drew (i, j) and (j, i) of the bond interpolant independently (asymmetric x_t bonds); here the upper
  triangle is drawn and mirrored.
* The reference normalised the coordinate loss by 3 N_max (padding-dependent); the default here is 3 n_atoms
  (``coord_loss_norm="padded"`` restores the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from reed import geometry

OT_MODES = ("equivariant", "none")
COORD_LOSS_NORMS = ("atoms", "padded")
DEFAULT_LOSS_WEIGHTS = {"coords": 1.0, "types": 0.2, "bonds": 1.0, "charges": 1.0}


# ----------------------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------------------
def pair_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B,N) bool atom mask -> (B,N,N) bool mask of real atom pairs (diagonal included)."""
    m = mask.bool()
    return m[:, :, None] & m[:, None, :]


def _upper_mirror(a: torch.Tensor) -> torch.Tensor:
    """(B,N,N) -> (B,N,N) symmetric tensor built from the strict upper triangle of ``a``; diagonal 0."""
    up = torch.triu(a, diagonal=1)
    return up + up.transpose(1, 2)


def center(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Remove the mean over real atoms.

    x (B,N,3), mask (B,N) bool -> (B,N,3) with zero mean over each molecule's real atoms; padding rows are 0
    (:func:`reed.geometry.center`).
    """
    return geometry.center(x, mask)


def kabsch_rotation(P: torch.Tensor, Q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Best proper rotation mapping the point cloud P onto Q (least squares over real atoms).

    P, Q (B,N,3) centred coordinates (rows i correspond), mask (B,N) bool -> R (B,3,3) with det R = +1 minimising
    sum_i |R p_i - q_i|^2, i.e. ``P @ R.transpose(-1, -2) ≈ Q``. Computed in float64; returned in P's dtype.
    Molecules with no real atoms get the identity. (:func:`reed.geometry.kabsch` without re-centring.)
    """
    return geometry.kabsch(P, Q, mask.bool(), center=False)[0]


def equivariant_ot(x0_data: torch.Tensor, x1_noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-molecule equivariant OT: permute the noise atoms (Hungarian), then rotate them onto the data (Kabsch).

    x0_data (B,N,3) data coordinates, x1_noise (B,N,3) noise coordinates, mask (B,N) bool -> (B,N,3) aligned noise.
    Both clouds are centred over real atoms first. Row i of the output is the noise atom assigned to data atom i
    (the assignment minimises sum_i |x0_i - x1_perm(i)|^2 by ``scipy.optimize.linear_sum_assignment``), rotated by the
    Kabsch rotation of the permuted noise onto the data. Only the noise is permuted, so the data's types and bonds
    stay aligned. Padding rows are 0. Equivariant: rotating both inputs by R rotates the output by R.
    """
    m = mask.bool()
    x0 = center(x0_data, m)
    x1 = center(x1_noise, m)
    a = x0.detach().double().cpu().numpy()
    b = x1.detach().double().cpu().numpy()
    perm_noise = torch.zeros_like(x1)
    mask_np = m.cpu().numpy()
    for i in range(x0.shape[0]):
        idx = np.nonzero(mask_np[i])[0]
        if idx.size == 0:
            continue
        ai, bi = a[i][idx], b[i][idx]  # (n,3) each
        cost = ((ai[:, None, :] - bi[None, :, :]) ** 2).sum(-1)  # (n,n): data atom r vs noise atom c
        rows, cols = linear_sum_assignment(cost)
        src = torch.as_tensor(idx[cols[np.argsort(rows)]], device=x1.device)
        dst = torch.as_tensor(idx, device=x1.device)
        perm_noise[i, dst] = x1[i, src]
    R = kabsch_rotation(perm_noise, x0, m)
    out = perm_noise @ R.transpose(1, 2)
    return torch.where(m[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))


# ----------------------------------------------------------------------------------------------------------------------
# self-conditioning helpers (the caller decides when to use them)
# ----------------------------------------------------------------------------------------------------------------------
def self_condition_inputs(pred: dict, mask: torch.Tensor) -> dict:
    """Self-conditioning inputs from a prediction: detached, masked.

    pred {"coords" (B,N,3), "types" (B,N,K) logits, "bonds" (B,N,N,5) logits, ...}, mask (B,N) bool ->
    {"coords" (B,N,3), "types" (B,N,K) softmax probabilities, "bonds" (B,N,N,5) softmax probabilities}; padding
    atoms / pairs are 0.
    """
    m = mask.bool()
    pm = pair_mask(m)
    coords = pred["coords"].detach() * m[..., None].to(pred["coords"].dtype)
    types = pred["types"].detach().float().softmax(dim=-1) * m[..., None]
    bonds = pred["bonds"].detach().float().softmax(dim=-1) * pm[..., None]
    return {"coords": coords, "types": types, "bonds": bonds}


def empty_self_condition(B: int, N: int, K_atom: int, device: torch.device | str = "cpu", *,
                         num_bond_types: int = 5, dtype: torch.dtype = torch.float32) -> dict:
    """All-zero self-conditioning inputs: {"coords" (B,N,3), "types" (B,N,K_atom), "bonds" (B,N,N,num_bond_types)}."""
    return {"coords": torch.zeros(B, N, 3, device=device, dtype=dtype),
            "types": torch.zeros(B, N, K_atom, device=device, dtype=dtype),
            "bonds": torch.zeros(B, N, N, num_bond_types, device=device, dtype=dtype)}


# ----------------------------------------------------------------------------------------------------------------------
# the process
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MolCorrupted:
    """One corrupted molecule batch (library time: t = 0 data, t = 1 noise)."""

    x_t: torch.Tensor  # (B,N,3) noisy coordinates (centred, padding 0)
    types_t: torch.Tensor  # (B,N) int64 noisy atom types (padding 0)
    bonds_t: torch.Tensor  # (B,N,N) int64 noisy bonds, symmetric, zero diagonal (padding 0)
    t: torch.Tensor  # (B,) times in [0, 1]
    noise: torch.Tensor  # (B,N,3) the (OT-aligned) prior coordinates x1 used in x_t


class MoleculeFlow:
    """SemlaFlow-style flow over (coordinates, atom types, bonds) with x̂0 prediction; see the module docstring.

    Args:
        num_atom_types: K_atom, size of the element vocabulary (no PAD/MASK tokens).
        num_bond_types: bond classes (5: none, single, double, triple, aromatic).
        num_charges: charge classes (7).
        coord_noise: std of the extra Gaussian noise on x_t (normalised units; reference 0.2).
        ot: "equivariant" (Hungarian + Kabsch per molecule) or "none".
        time_alpha, time_beta: t_ref = 1 - t ~ Beta(alpha, beta) (reference Beta(2, 1)).
        loss_weights: overrides of {"coords": 1.0, "types": 0.2, "bonds": 1.0, "charges": 1.0}.
        coord_loss_norm: "atoms" (SSE / (3 n_atoms), the fix) or "padded" (SSE / (3 N_max), the reference).
    """

    def __init__(self, num_atom_types: int, num_bond_types: int = 5, num_charges: int = 7, *,
                 coord_noise: float = 0.2, ot: str = "equivariant", time_alpha: float = 2.0, time_beta: float = 1.0,
                 loss_weights: dict | None = None, coord_loss_norm: str = "atoms"):
        if num_atom_types < 1 or num_bond_types < 1 or num_charges < 1:
            raise ValueError("num_atom_types, num_bond_types and num_charges must be >= 1")
        if ot not in OT_MODES:
            raise ValueError(f"unknown ot '{ot}', expected one of {OT_MODES}")
        if coord_loss_norm not in COORD_LOSS_NORMS:
            raise ValueError(f"unknown coord_loss_norm '{coord_loss_norm}', expected one of {COORD_LOSS_NORMS}")
        if time_alpha <= 0 or time_beta <= 0:
            raise ValueError("time_alpha and time_beta must be > 0")
        if coord_noise < 0:
            raise ValueError("coord_noise must be >= 0")
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for k, v in (loss_weights or {}).items():
            if k not in weights:
                raise ValueError(f"unknown loss weight '{k}', expected keys {tuple(weights)}")
            weights[k] = float(v)
        self.num_atom_types = int(num_atom_types)
        self.num_bond_types = int(num_bond_types)
        self.num_charges = int(num_charges)
        self.coord_noise = float(coord_noise)
        self.ot = ot
        self.time_alpha = float(time_alpha)
        self.time_beta = float(time_beta)
        self.loss_weights = weights
        self.coord_loss_norm = coord_loss_norm

    # -- time ------------------------------------------------------------------------------------------------------
    def sample_time(self, B: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """(B,) float32 training times t = 1 - t_ref with t_ref ~ Beta(alpha, beta) (inverse-CDF sampling)."""
        device = device if device is not None else (generator.device if generator is not None else "cpu")
        a, b = self.time_alpha, self.time_beta
        u = torch.rand(B, generator=generator, device=device, dtype=torch.float64)
        if b == 1.0:  # CDF u = t_ref^a
            t_ref = u.pow(1.0 / a)
        elif a == 1.0:  # CDF u = 1 - (1 - t_ref)^b
            t_ref = 1.0 - (1.0 - u).pow(1.0 / b)
        else:
            from scipy.special import betaincinv

            t_ref = torch.as_tensor(betaincinv(a, b, u.cpu().numpy()), device=device)
        return (1.0 - t_ref).float().clamp(0.0, 1.0)

    # -- prior -----------------------------------------------------------------------------------------------------
    def prior(self, mask: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw the prior for a batch with atom mask (B,N) bool.

        Returns x1 (B,N,3) float32 N(0, I) re-centred over each molecule's real atoms, types (B,N) int64 uniform over
        K_atom, bonds (B,N,N) int64 uniform over the bond classes, symmetric with zero diagonal. Padding is 0.
        """
        m = mask.bool()
        B, N = m.shape
        dev = m.device
        x1 = center(torch.randn(B, N, 3, generator=generator, device=dev), m)
        types = torch.randint(0, self.num_atom_types, (B, N), generator=generator, device=dev) * m
        bonds = torch.randint(0, self.num_bond_types, (B, N, N), generator=generator, device=dev)
        bonds = _upper_mirror(bonds) * pair_mask(m)
        return x1, types, bonds

    # -- corruption ------------------------------------------------------------------------------------------------
    def corrupt(self, x0: torch.Tensor, types0: torch.Tensor, bonds0: torch.Tensor, mask: torch.Tensor,
                generator: torch.Generator | None = None, *, t: torch.Tensor | None = None) -> MolCorrupted:
        """Corrupt a clean batch.

        x0 (B,N,3) clean coordinates (centred here over real atoms), types0 (B,N), bonds0 (B,N,N) symmetric,
        mask (B,N) bool; ``t`` (B,) optional fixed times (default: :meth:`sample_time`).
        x_t = (1 - t) x0 + t x1_aligned + coord_noise * eps; atom types / bond pairs keep their data value with
        probability 1 - t, else take the prior value (bond pairs drawn once per unordered pair and mirrored).
        """
        m = mask.bool()
        B, N = m.shape
        dev = x0.device
        if t is None:
            t = self.sample_time(B, generator=generator, device=dev)
        t = t.to(device=dev, dtype=torch.float32).reshape(B)
        x0c = center(x0.float(), m)
        x1, types1, bonds1 = self.prior(m, generator=generator)
        if self.ot == "equivariant":
            x1 = equivariant_ot(x0c, x1, m)
        eps = center(torch.randn(B, N, 3, generator=generator, device=dev), m)
        tt = t[:, None, None]
        x_t = (1 - tt) * x0c + tt * x1 + self.coord_noise * eps
        x_t = torch.where(m[..., None], x_t, torch.zeros((), device=dev))

        keep_atom = torch.rand(B, N, generator=generator, device=dev) < (1 - t)[:, None]
        types_t = torch.where(keep_atom, types0.long(), types1) * m
        u = _upper_mirror(torch.rand(B, N, N, generator=generator, device=dev))
        keep_bond = u < (1 - t)[:, None, None]
        pm = pair_mask(m) & ~torch.eye(N, dtype=torch.bool, device=dev)[None]
        bonds_t = torch.where(keep_bond, bonds0.long(), bonds1) * pm
        return MolCorrupted(x_t=x_t, types_t=types_t, bonds_t=bonds_t, t=t, noise=x1)

    # -- loss ------------------------------------------------------------------------------------------------------
    def loss(self, pred: dict, x0: torch.Tensor, types0: torch.Tensor, bonds0: torch.Tensor, charges0: torch.Tensor,
             mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-molecule losses (no time weighting), each (B,).

        pred: {"coords" (B,N,3) predicted clean coordinates, "types" (B,N,K_atom) logits, "bonds" (B,N,N,5) logits,
        "charges" (B,N,7) logits}; targets x0 (B,N,3) (centred here), types0 (B,N), bonds0 (B,N,N), charges0 (B,N);
        mask (B,N) bool. Returns {"coords", "types", "bonds", "charges", "total"}; "total" is the weighted sum.
        Padded atoms (and pairs touching them) never contribute, whatever their predictions or targets hold.
        """
        m = mask.bool()
        B, N = m.shape
        pm = pair_mask(m)
        n = m.sum(dim=1).float()
        n_safe = n.clamp(min=1)
        zero = torch.zeros((), device=x0.device)

        diff = pred["coords"].float() - center(x0.float(), m)
        sse = torch.where(m[..., None], diff.pow(2), zero).sum(dim=(1, 2))
        denom = 3 * n_safe if self.coord_loss_norm == "atoms" else torch.full_like(n_safe, 3.0 * max(N, 1))
        coords = sse / denom

        def ce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
            k = logits.shape[-1]
            tgt = torch.where(valid, target.long(), torch.zeros((), dtype=torch.long, device=target.device))
            lg = torch.where(valid[..., None], logits.float(), zero)
            out = F.cross_entropy(lg.reshape(-1, k), tgt.reshape(-1), reduction="none").reshape(valid.shape)
            return torch.where(valid, out, zero)

        types = ce(pred["types"], types0, m).sum(dim=1) / n_safe
        bonds = ce(pred["bonds"], bonds0, pm).sum(dim=(1, 2)) / n_safe.pow(2)
        charges = ce(pred["charges"], charges0, m).sum(dim=1) / n_safe
        out = {"coords": coords, "types": types, "bonds": bonds, "charges": charges}
        out["total"] = sum(self.loss_weights[k] * out[k] for k in DEFAULT_LOSS_WEIGHTS)
        return out
