"""Batches of molecules: Haar-uniform random rotations, padding into :class:`MoleculeBatch` and back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from reed.errors import DataError
from reed.molecule.chem import (
    ATOMIC_NUMBERS,
    CHARGES,
    ELEMENTS,
    SPECIAL_TOKENS,
    Molecule,
    charge_index,
    element_symbol,
)


def uniform_rotation(
    n: int,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``(n, 3, 3)`` rotation matrices drawn from the Haar (uniform) measure on SO(3).

    A unit quaternion from four i.i.d. standard Gaussians, normalised, is uniform on S³ and maps to a uniform
    rotation. (The reference's three independent ``U(0, 2π)`` Euler angles are *not* uniform.) Sampling runs on the
    generator's device (CPU by default), in float64, then moves to ``device``/``dtype``.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    q = torch.randn(int(n), 4, generator=generator, device=gen_device, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    r = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(int(n), 3, 3)  # fmt: skip
    return r.to(device=device if device is not None else gen_device, dtype=dtype)


@dataclass
class MoleculeBatch:
    """Padded batch of molecules.

    Attributes:
        x: ``(B, N, 3)`` float32 coordinates in Å, centred per molecule over its real atoms (padding 0).
        atom_types: ``(B, N)`` int64 indices into the type vocabulary ``elements`` given to :func:`collate`
            (padding 0).
        bonds: ``(B, N, N)`` int64 bond classes (padding 0).
        charges: ``(B, N)`` int64 charge class indices into :data:`CHARGES` (padding 0 = neutral).
        mask: ``(B, N)`` bool, True for real atoms.
    """

    x: Tensor
    atom_types: Tensor
    bonds: Tensor
    charges: Tensor
    mask: Tensor

    def to(self, device) -> MoleculeBatch:
        """A copy on ``device`` (non-blocking: from pinned memory the copy overlaps compute)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> MoleculeBatch:
        """A copy in page-locked memory (what a DataLoader with ``pin_memory=True`` calls)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> MoleculeBatch:
        return MoleculeBatch(fn(self.x), fn(self.atom_types), fn(self.bonds), fn(self.charges), fn(self.mask))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def num_atoms(self) -> Tensor:
        """``(B,)`` int64 number of real atoms per molecule."""
        return self.mask.sum(dim=1)

    @property
    def device(self) -> torch.device:
        return self.x.device


def collate(
    molecules: Sequence[Molecule],
    elements: Sequence[str],
    *,
    rotate: bool = False,
    generator: torch.Generator | None = None,
    device=None,
) -> MoleculeBatch:
    """Pad molecules into a :class:`MoleculeBatch` (padded to the largest molecule).

    Coordinates are centred per molecule (uniform weights, real atoms only) and, with ``rotate=True``, rotated by
    an independent Haar-uniform rotation per molecule drawn with ``generator`` (rotation about the centroid, so
    centring is kept). An element outside ``elements`` or an unsupported charge raises DataError naming the molecule
    (its position in ``molecules`` and its SMILES if known). ``elements`` is the type vocabulary: it may hold the
    special tokens :data:`~reed.molecule.chem.SPECIAL_TOKENS` (the reference's 18-token vocabulary), which no atom
    maps to, so e.g. H is type 2 and C type 3 under :data:`~reed.molecule.chem.REFERENCE_TYPES`.
    """
    elements = tuple(elements)
    lookup = np.full(128, -1, dtype=np.int64)
    for i, s in enumerate(elements):
        if s in SPECIAL_TOKENS:
            continue
        if s not in ATOMIC_NUMBERS:
            raise DataError(f"collate: element {s!r} is not one of the supported elements {ELEMENTS}")
        lookup[ATOMIC_NUMBERS[s]] = i
    b = len(molecules)
    sizes = [m.num_atoms for m in molecules]
    n_max = max(sizes, default=0)
    x = np.zeros((b, n_max, 3), dtype=np.float32)
    types = np.zeros((b, n_max), dtype=np.int64)
    bonds = np.zeros((b, n_max, n_max), dtype=np.int64)
    charges = np.zeros((b, n_max), dtype=np.int64)
    mask = np.zeros((b, n_max), dtype=bool)
    for k, m in enumerate(molecules):
        n = sizes[k]
        label = f"molecule {k}" + (f" ({m.smiles})" if m.smiles else "")
        z = m.atoms
        bad = (z < 0) | (z >= lookup.shape[0])
        t = np.where(bad, -1, lookup[np.clip(z, 0, lookup.shape[0] - 1)])
        if np.any(t < 0):
            missing = sorted({element_symbol(v) for v in z[t < 0]})
            raise DataError(f"collate: {label} has element(s) {missing} not in the vocabulary {elements}")
        c = m.coords.astype(np.float64)
        x[k, :n] = c - c.mean(axis=0) if n else c
        types[k, :n] = t
        bonds[k, :n, :n] = m.bonds
        charges[k, :n] = charge_index(m.charges, name=f"collate: {label}")
        mask[k, :n] = True
    xt = torch.from_numpy(x)
    if rotate and b:
        rot = uniform_rotation(b, generator, dtype=torch.float32, device="cpu")
        xt = torch.einsum("bij,bnj->bni", rot, xt) * torch.from_numpy(mask)[..., None]
    batch = MoleculeBatch(
        xt, torch.from_numpy(types), torch.from_numpy(bonds), torch.from_numpy(charges), torch.from_numpy(mask)
    )
    return batch.to(device) if device is not None else batch


def uncollate(
    x: Tensor,
    atom_types: Tensor,
    bonds: Tensor,
    charges: Tensor,
    mask: Tensor,
    elements: Sequence[str],
) -> list[Molecule]:
    """Inverse of :func:`collate` for (generated) class indices -> list of :class:`Molecule`.

    Args:
        x: ``(B, N, 3)`` coordinates in Å.
        atom_types: ``(B, N)`` indices into ``elements`` (the type vocabulary); a special token (PAD/MASK) becomes
            atomic number 0, which the metrics count as unstable and invalid.
        bonds: ``(B, N, N)`` bond classes; the strict lower triangle is read and mirrored (the reference builds the
            molecule from the lower triangle).
        charges: ``(B, N)`` charge class indices into :data:`CHARGES`.
        mask: ``(B, N)`` bool real atoms.
    """
    z_of = np.array([0 if s in SPECIAL_TOKENS else ATOMIC_NUMBERS[s] for s in elements], dtype=np.int64)
    ch_of = np.array(CHARGES, dtype=np.int64)
    xs = x.detach().cpu().numpy()
    ts = atom_types.detach().cpu().numpy()
    bs = bonds.detach().cpu().numpy()
    cs = charges.detach().cpu().numpy()
    ms = mask.detach().cpu().numpy().astype(bool)
    out = []
    for k in range(xs.shape[0]):
        idx = np.flatnonzero(ms[k])
        lower = np.tril(bs[k][np.ix_(idx, idx)], k=-1).astype(np.int64)
        out.append(Molecule(z_of[ts[k, idx]], xs[k, idx], lower + lower.T, ch_of[cs[k, idx]]))
    return out
