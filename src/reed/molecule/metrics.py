"""Metrics for generated 3D molecules (SemlaFlow/REED, spec §5): stability, validity, uniqueness, novelty, energies.

Molecules are :class:`reed.molecule.chem.Molecule` objects or tuples ``(atoms, coords, bonds, charges)`` with atomic
numbers ``(n,)``, coordinates ``(n, 3)`` in Å, bond classes ``(n, n)`` (0 none, 1 single, 2 double, 3 triple,
4 aromatic) and formal charges ``(n,)``. Generated class indices are turned into this form by
:func:`reed.molecule.batch.uncollate`.

All molecules count in every denominator unless noted: uniqueness and novelty count over valid molecules; energy
and strain averages over the molecules where they could be computed (their fractions are the ``*_validity`` keys).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from reed import geometry
from reed.errors import DataError
from reed.io import progress_bar
from reed.molecule.chem import BOND_ORDERS, BOND_TYPES, CHARGES, Molecule, as_molecule, element_symbol, to_rdkit
from reed.molecule.config import AROMATIC_RULES

__all__ = [
    "ALLOWED_VALENCES",
    "AROMATIC_RULES",
    "atom_stability",
    "depiction_grid",
    "kabsch_rmsd",
    "mmff_energy",
    "molecule_metrics",
    "write_sdf",
]


def _every_charge(valences: list[int]) -> dict[int, list[int]]:
    return {c: list(valences) for c in CHARGES}


# The reference table (SemlaFlow ``ALLOWED_VALENCIES``, taken from MiDi). Elements whose reference entry is a plain
# number or list (no charge dict) accept those valences at *every* charge, as the reference does; for elements with
# a charge dict, a charge that is not listed makes the atom unstable.
ALLOWED_VALENCES: dict[str, dict[int, list[int]]] = {
    "H": {0: [1], 1: [0], -1: [0]},
    "C": {0: [3, 4], 1: [3], -1: [3]},
    "N": {0: [2, 3], 1: [2, 3, 4], -1: [2]},
    "O": {0: [2], 1: [3], -1: [1]},
    "F": {0: [1], -1: [0]},
    "P": {0: [3, 5], 1: [4]},
    "S": {0: [2, 6], 1: [2, 3], 2: [4], 3: [5], -1: [3]},
    "Cl": _every_charge([1]),
    "Br": {0: [1], 1: [2]},
    "B": _every_charge([3]),
    "Al": _every_charge([3]),
    "Si": _every_charge([4]),
    "As": _every_charge([3]),
    "I": _every_charge([1]),
    "Hg": _every_charge([1, 2]),
    "Bi": _every_charge([3, 5]),
}

_ORDERS = np.asarray(BOND_ORDERS, dtype=np.float64)

# How an aromatic bond (class 4) counts toward an atom's valence in the stability metrics:
#   "intended":  1.5, and the valence sum floored to an int - the formula the reference's code writes
#                (``adj[adj == 4] = 1.5`` then an int cast of the sum);
#   "reference": 1 - what the reference's code computes, and so what the paper's numbers used: its adjacency tensor
#                is int64, so the assignment of 1.5 stores 1 (spec molecule.md section 5).
# The two agree on every molecule without aromatic bonds (e.g. the kekulé bonds reed infers for EDM data).
_AROMATIC_ORDER = {"intended": 1.5, "reference": 1.0}


def _symbols(atoms) -> list[str]:
    atoms = np.asarray(atoms).reshape(-1)
    if atoms.dtype.kind in "US":
        return [str(s) for s in atoms]
    return [element_symbol(int(z)) for z in atoms]


def _check_aromatic(aromatic: str) -> None:
    if aromatic not in AROMATIC_RULES:
        raise DataError(f"aromatic rule must be one of {AROMATIC_RULES}, got {aromatic!r}")


def atom_stability(atoms, bonds, charges, *, aromatic: str = "intended") -> np.ndarray:
    """Per-atom stability ``(n,)`` bool.

    The valence of atom i is the sum of its bond orders floored to an int and must be in
    ``ALLOWED_VALENCES[element][charge]``. An aromatic bond counts 1.5 with ``aromatic="intended"`` (the formula
    the reference's code writes) and 1 with ``aromatic="reference"`` (what that code computes, because its adjacency
    is an integer tensor: the rule behind the paper's numbers); see :data:`AROMATIC_RULES`. E.g. pyrrole's N-H
    (two aromatic bonds and one single) is 4 (unstable) under "intended" and 3 (stable) under "reference"; benzene's
    carbons are 4 and 3, both stable. Only the strict lower triangle of ``bonds`` is read and mirrored (the reference
    builds molecules from it), so an asymmetric prediction is judged like its RDKit molecule.

    Args:
        atoms: ``(n,)`` atomic numbers (or element symbols); 0 (a generated PAD/MASK token) is never stable.
        bonds: ``(n, n)`` bond classes 0..4.
        charges: ``(n,)`` formal charges.
        aromatic: ``"intended"`` or ``"reference"``.
    """
    _check_aromatic(aromatic)
    symbols = _symbols(atoms)
    n = len(symbols)
    bonds = np.asarray(bonds, dtype=np.int64).reshape(n, n)
    charges = np.asarray(charges, dtype=np.int64).reshape(n)
    if np.any((bonds < 0) | (bonds >= len(_ORDERS))):
        raise DataError(f"atom_stability: bond classes must be in 0..{len(_ORDERS) - 1}")
    orders = _ORDERS.copy()
    orders[BOND_TYPES.index("aromatic")] = _AROMATIC_ORDER[aromatic]
    lower = np.tril(orders[bonds], k=-1)
    valence = np.floor(lower.sum(axis=0) + lower.sum(axis=1)).astype(np.int64)
    out = np.zeros(n, dtype=bool)
    for i, (s, c, v) in enumerate(zip(symbols, charges.tolist(), valence.tolist())):
        allowed = ALLOWED_VALENCES.get(s, {}).get(int(c))
        out[i] = allowed is not None and v in allowed
    return out


def _mmff(mol):
    """``(copy of mol, MMFF94 force field on it)`` for the first conformer; None if MMFF cannot be set up.

    The copy must outlive the force field (RDKit's force field keeps a raw reference to it): callers hold both.
    """
    from rdkit import Chem
    from rdkit.Chem import AllChem

    m = Chem.Mol(mol)
    props = AllChem.MMFFGetMoleculeProperties(m, mmffVariant="MMFF94")
    if props is None:
        return None
    ff = AllChem.MMFFGetMoleculeForceField(m, props, confId=0)
    return None if ff is None else (m, ff)


def _mmff_run(mol, max_iters: int | None) -> tuple[float, np.ndarray] | None:
    """``(energy kcal/mol, coords (n, 3))`` of the first conformer of a copy of ``mol`` (MMFF94-optimised when
    ``max_iters`` is given, and then only if it converged); None if MMFF cannot be set up or the energy is not
    finite. RDKit's log is silenced."""
    from rdkit import rdBase

    with rdBase.BlockLogs():
        try:
            got = _mmff(mol)
            if got is None:
                return None
            _m, ff = got  # the copy _m must outlive ff
            if max_iters is not None and ff.Minimize(maxIts=int(max_iters)) != 0:
                return None
            e = float(ff.CalcEnergy())
            pos = np.asarray(ff.Positions(), dtype=np.float64).reshape(-1, 3)
        except Exception:
            return None
    return (e, pos) if math.isfinite(e) else None


def mmff_energy(mol) -> float | None:
    """MMFF94 energy (kcal/mol) of the first conformer of an RDKit molecule; None if MMFF cannot be set up."""
    got = _mmff_run(mol, None)
    return None if got is None else got[0]


def _mmff_optimise(mol, max_iters: int = 1000) -> tuple[float, np.ndarray] | None:
    """MMFF94-optimise a copy; ``(energy, coords (n, 3))`` if it converged within ``max_iters``, else None."""
    return _mmff_run(mol, max_iters)


def kabsch_rmsd(a: np.ndarray, b: np.ndarray) -> float:
    """RMSD between ``(n, 3)`` point sets after removing each centroid and the optimal (proper) rotation of ``b``."""
    return float(geometry.rmsd(np.asarray(b, dtype=np.float64), np.asarray(a, dtype=np.float64)))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def molecule_metrics(
    molecules: Sequence[Molecule | tuple],
    train_smiles: set[str] | None = None,
    *,
    energy: bool = False,
    progress: bool = False,
    allow_implicit_hs: bool = True,
    max_iters: int = 1000,
    aromatic: str = "intended",
) -> dict[str, float | str]:
    """Spec §5 metrics over a list of molecules (at least one; an empty list raises DataError).

    Returns a dict with
        - ``atom_stability`` (stable atoms / all atoms), ``molecule_stability`` (all atoms stable / molecules),
          with aromatic bonds counted by the rule ``aromatic`` (:func:`atom_stability`), which ``aromatic_rule``
          names;
        - ``validity`` (RDKit sanitises the molecule built by :func:`~reed.molecule.chem.to_rdkit`),
          ``connected_validity`` (valid and a single fragment);
        - ``uniqueness`` (distinct canonical SMILES / valid), ``novelty`` (valid whose SMILES is not in
          ``train_smiles`` / valid; only when ``train_smiles`` is given). SMILES keep hydrogens as graph atoms, the
          same form as :meth:`~reed.molecule.dataset.MoleculeDataset.smiles_set`;
        - with ``energy=True``: ``energy``/``energy_per_atom`` (MMFF94 of the pose, mean over molecules where MMFF sets
          up), ``energy_validity``; ``strain``/``strain_per_atom`` (E - E_opt after at most ``max_iters`` MMFF steps,
          converged optimisations only), ``opt_energy_validity`` (converged / molecules), ``opt_rmsd`` (Kabsch RMSD
          pose vs optimised pose, converged only);
        - counts ``n_molecules``, ``n_atoms``, ``n_stable_atoms``, ``n_stable_molecules``, ``n_valid``,
          ``n_connected_valid``, ``n_unique`` (and ``n_novel``, ``n_energy``, ``n_opt``).

    Ratios with an empty denominator are NaN. ``allow_implicit_hs=False`` forbids RDKit from adding hydrogens during
    sanitisation (stricter than the reference).
    """
    from rdkit import Chem

    _check_aromatic(aromatic)
    mols = [as_molecule(m) for m in molecules]
    if not mols:
        raise DataError("molecule_metrics: no molecules to score")
    n_atoms = n_stable_atoms = n_stable_mols = n_valid = n_connected = 0
    smiles: list[str] = []
    energies, energies_pa, strains, strains_pa, rmsds = [], [], [], [], []
    n_energy = n_opt = 0
    for m in progress_bar(mols, progress, "molecule metrics"):
        stable = atom_stability(m.atoms, m.bonds, m.charges, aromatic=aromatic)
        n_atoms += len(stable)
        n_stable_atoms += int(stable.sum())
        n_stable_mols += int(len(stable) > 0 and bool(stable.all()))
        mol = to_rdkit(m.atoms, m.coords, m.bonds, m.charges, allow_implicit_hs=allow_implicit_hs)
        if mol is None:
            continue
        n_valid += 1
        n_connected += int(len(Chem.GetMolFrags(mol)) == 1)
        try:
            smiles.append(Chem.MolToSmiles(mol, canonical=True))
        except Exception:
            smiles.append(f"<unwritable {len(smiles)}>")
        if not energy:
            continue
        n = mol.GetNumAtoms()
        e = mmff_energy(mol)
        if e is not None:
            n_energy += 1
            energies.append(e)
            energies_pa.append(e / n)
        opt = _mmff_optimise(mol, max_iters)
        if e is not None and opt is not None:
            e_opt, pos = opt
            n_opt += 1
            strains.append(e - e_opt)
            strains_pa.append((e - e_opt) / n)
            rmsds.append(kabsch_rmsd(np.asarray(mol.GetConformer().GetPositions()), pos))
    total = len(mols)
    out: dict[str, float | str] = {
        "aromatic_rule": aromatic,
        "atom_stability": _ratio(n_stable_atoms, n_atoms),
        "molecule_stability": _ratio(n_stable_mols, total),
        "validity": _ratio(n_valid, total),
        "connected_validity": _ratio(n_connected, total),
        "uniqueness": _ratio(len(set(smiles)), len(smiles)),
        "n_molecules": total,
        "n_atoms": n_atoms,
        "n_stable_atoms": n_stable_atoms,
        "n_stable_molecules": n_stable_mols,
        "n_valid": n_valid,
        "n_connected_valid": n_connected,
        "n_unique": len(set(smiles)),
    }
    if train_smiles is not None:
        n_novel = sum(s not in train_smiles for s in smiles)
        out["novelty"] = _ratio(n_novel, len(smiles))
        out["n_novel"] = n_novel
    if energy:
        out.update(
            energy=_mean(energies),
            energy_per_atom=_mean(energies_pa),
            energy_validity=_ratio(n_energy, total),
            strain=_mean(strains),
            strain_per_atom=_mean(strains_pa),
            opt_energy_validity=_ratio(n_opt, total),
            opt_rmsd=_mean(rmsds),
            n_energy=n_energy,
            n_opt=n_opt,
        )
    return out


def depiction_grid(
    molecules: Sequence[Molecule | tuple],
    path,
    *,
    mols_per_row: int = 6,
    size: int = 200,
    legends: Sequence[str] | None = None,
    remove_hs: bool = True,
) -> Path:
    """Save a PNG grid of 2D depictions (RDKit ``Draw.MolsToGridImage``, 2D coordinates computed).

    Valid molecules are drawn (hydrogens removed unless ``remove_hs=False``); invalid ones are an empty cell with
    the legend ``"invalid"`` (appended to the given legend). The image is
    ``mols_per_row * size`` wide (also for fewer molecules) and ``ceil(len / mols_per_row) * size`` high.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem, Draw

    mols = [as_molecule(m) for m in molecules]
    if not mols:
        raise DataError("depiction_grid: no molecules to draw")
    if legends is not None and len(legends) != len(mols):
        raise DataError(f"depiction_grid: {len(legends)} legends for {len(mols)} molecules")
    drawn, labels = [], []
    with rdBase.BlockLogs():
        for i, m in enumerate(mols):
            label = str(legends[i]) if legends is not None else str(i)
            mol = to_rdkit(m.atoms, m.coords, m.bonds, m.charges)
            if mol is None:
                drawn.append(Chem.Mol())
                labels.append("invalid" if legends is None else f"{label} (invalid)")
                continue
            if remove_hs:
                try:
                    mol = Chem.RemoveHs(mol)
                except Exception:
                    pass
            mol = Chem.Mol(mol)
            AllChem.Compute2DCoords(mol)
            drawn.append(mol)
            labels.append(label)
        img = Draw.MolsToGridImage(
            drawn, molsPerRow=int(mols_per_row), subImgSize=(int(size), int(size)), legends=labels, returnPNG=False
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(img, "save"):
        img.save(path, format="PNG")
    else:  # IPython Image object
        path.write_bytes(img.data)
    return path


def write_sdf(molecules: Sequence[Molecule | tuple], path) -> int:
    """Write the valid molecules (with their 3D conformer, hydrogens kept) to an SDF; returns how many were written.

    Invalid molecules (RDKit cannot sanitise them) are skipped. Records are named ``mol_<index in the input>``.
    """
    from rdkit import Chem

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    writer = Chem.SDWriter(str(path))
    try:
        for i, m in enumerate(molecules):
            m = as_molecule(m)
            mol = to_rdkit(m.atoms, m.coords, m.bonds, m.charges)
            if mol is None:
                continue
            mol.SetProp("_Name", f"mol_{i}")
            try:
                writer.write(mol)
            except Exception:
                continue
            written += 1
    finally:
        writer.close()
    return written
