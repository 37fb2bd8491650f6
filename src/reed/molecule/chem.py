"""3D molecules with explicit hydrogens for SemlaFlow/REED: the :class:`Molecule` record, element and charge
tables, bond inference and RDKit conversion (batching: :mod:`reed.molecule.batch`; data sets:
:mod:`reed.molecule.dataset`).

Conventions (spec §1.1-1.2, §4):

- :data:`ELEMENTS` are the reference's 16 elements. A data set has its own vocabulary ``elements`` (a subset of
  :data:`ELEMENTS` in that order); atom type index ``i`` means ``elements[i]``. The model's atom-type vocabulary is
  either those elements (``molecule.type_vocab: data``) or the reference's 18 tokens :data:`REFERENCE_TYPES`
  (``<PAD>``, ``<MASK>`` and all 16 elements; :func:`type_vocabulary`). A generated PAD/MASK atom becomes atomic
  number 0: never stable, never valid.
- Bond classes index :data:`BOND_TYPES` (``0`` none, ``1`` single, ``2`` double, ``3`` triple, ``4`` aromatic) with the
  bond orders :data:`BOND_ORDERS` (aromatic = 1.5; how the stability metrics count it is a named choice,
  :data:`reed.molecule.metrics.AROMATIC_RULES`).
- Charge class index ``k`` means the formal charge ``CHARGES[k]``.

A :class:`Molecule` holds atomic numbers, coordinates (Å), a dense symmetric bond-class matrix and formal charges.
Bond form: molecules read through RDKit (:func:`molecule_from_rdkit`, SDF, SMILES) keep the bond types RDKit gives
after sanitisation, i.e. aromatic bonds as class 4 (as the reference's ``GeometricMol.from_rdkit``), unless
``kekulize=True``. Bonds inferred from coordinates (:func:`bonds_from_rdkit`, EDM ``.npz``) are kekulé by default.

:func:`~reed.molecule.batch.collate` centres each molecule (uniform weights over real atoms) and optionally applies a
Haar-uniform random rotation (:func:`~reed.molecule.batch.uniform_rotation`). The reference instead draws three
Euler angles ``U(0, 2π)`` (extrinsic ``xyz``), which is not uniform on SO(3); we deliberately do not reproduce that.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from reed.domains import require_extra
from reed.errors import DataError

require_extra("molecule", "molecule", "rdkit")

__all__ = [
    "BOND_ORDERS",
    "BOND_TYPES",
    "CHARGES",
    "ELEMENTS",
    "REFERENCE_TYPES",
    "SPECIAL_TOKENS",
    "TYPE_VOCABS",
    "Molecule",
    "bonds_from_rdkit",
    "canonical_smiles",
    "charge_index",
    "element_symbol",
    "molecule_from_rdkit",
    "real_elements",
    "to_rdkit",
    "type_vocabulary",
]

ELEMENTS: tuple[str, ...] = ("H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "B", "Al", "Si", "As", "I", "Hg", "Bi")
BOND_TYPES: tuple[str, ...] = ("none", "single", "double", "triple", "aromatic")
BOND_ORDERS: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 1.5)
CHARGES: tuple[int, ...] = (0, 1, 2, 3, -1, -2, -3)

ATOMIC_NUMBERS = {
    "H": 1, "B": 5, "C": 6, "N": 7, "O": 8, "F": 9, "Al": 13, "Si": 14, "P": 15, "S": 16, "Cl": 17,
    "As": 33, "Br": 35, "I": 53, "Hg": 80, "Bi": 83,
}  # fmt: skip
SYMBOLS = {z: s for s, z in ATOMIC_NUMBERS.items()}
_CHARGE_TO_INDEX = {c: i for i, c in enumerate(CHARGES)}

# The reference's atom-type vocabulary (spec molecule.md section 1.1): 0 <PAD>, 1 <MASK>, then the 16 elements.
# Its two special tokens take part in the uniform type prior and the softmax, so they change the CTMC's K.
SPECIAL_TOKENS: tuple[str, ...] = ("<PAD>", "<MASK>")
REFERENCE_TYPES: tuple[str, ...] = SPECIAL_TOKENS + ELEMENTS
TYPE_VOCABS: tuple[str, ...] = ("data", "reference")


def type_vocabulary(elements, kind: str = "data") -> tuple[str, ...]:
    """The model's atom-type classes: ``"data"`` -> the data set's ``elements`` (K = their number, e.g. 5 for QM9);
    ``"reference"`` -> :data:`REFERENCE_TYPES` (K = 18, whatever the data hold, as the reference)."""
    if kind == "data":
        return tuple(elements)
    if kind == "reference":
        return REFERENCE_TYPES
    raise DataError(f"atom-type vocabulary must be one of {TYPE_VOCABS}, got {kind!r}")


def real_elements(types) -> tuple[str, ...]:
    """The element symbols of a type vocabulary (its special tokens removed)."""
    return tuple(s for s in types if s not in SPECIAL_TOKENS)


def element_symbol(z: int) -> str:
    """Element symbol of atomic number ``z`` (any element RDKit knows, not only :data:`ELEMENTS`)."""
    z = int(z)
    if z in SYMBOLS:
        return SYMBOLS[z]
    from rdkit import Chem

    try:
        return Chem.GetPeriodicTable().GetElementSymbol(z)
    except Exception:  # RDKit raises RuntimeError for out-of-range numbers
        return f"Z={z}"


def charge_index(charges: np.ndarray, name: str = "molecule") -> np.ndarray:
    """Formal charges ``(n,)`` -> charge class indices ``(n,)`` into :data:`CHARGES`; unknown charge -> DataError."""
    charges = np.asarray(charges, dtype=np.int64)
    out = np.zeros(charges.shape, dtype=np.int64)
    for c in np.unique(charges):
        if int(c) not in _CHARGE_TO_INDEX:
            raise DataError(f"{name}: formal charge {int(c)} is not one of the supported charges {CHARGES}")
        out[charges == c] = _CHARGE_TO_INDEX[int(c)]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Molecule
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Molecule:
    """One molecule with all hydrogens explicit.

    Attributes:
        atoms: ``(n,)`` int64 atomic numbers.
        coords: ``(n, 3)`` float32 coordinates in Å.
        bonds: ``(n, n)`` int64 bond classes (:data:`BOND_TYPES`), symmetric with a zero diagonal.
        charges: ``(n,)`` int64 formal charges.
        smiles: optional SMILES (for loaders that know it); not used by the metrics.
    """

    atoms: np.ndarray
    coords: np.ndarray
    bonds: np.ndarray
    charges: np.ndarray
    smiles: str | None = None

    def __post_init__(self) -> None:
        self.atoms = np.asarray(self.atoms, dtype=np.int64).reshape(-1)
        n = self.atoms.shape[0]
        self.coords = np.asarray(self.coords, dtype=np.float32)
        self.bonds = np.asarray(self.bonds, dtype=np.int64)
        self.charges = np.asarray(self.charges, dtype=np.int64).reshape(-1)
        if self.coords.shape != (n, 3):
            raise DataError(f"Molecule: coords must have shape ({n}, 3) for {n} atoms, got {self.coords.shape}")
        if self.bonds.shape != (n, n):
            raise DataError(f"Molecule: bonds must have shape ({n}, {n}) for {n} atoms, got {self.bonds.shape}")
        if self.charges.shape != (n,):
            raise DataError(f"Molecule: charges must have shape ({n},) for {n} atoms, got {self.charges.shape}")

    @property
    def num_atoms(self) -> int:
        return int(self.atoms.shape[0])

    def __len__(self) -> int:
        return self.num_atoms

    @property
    def symbols(self) -> list[str]:
        return [element_symbol(z) for z in self.atoms]


def as_molecule(m) -> Molecule:
    """A :class:`Molecule`, or a tuple ``(atoms, coords, bonds, charges)`` in the same units."""
    if isinstance(m, Molecule):
        return m
    if isinstance(m, (tuple, list)) and len(m) == 4:
        return Molecule(*m)
    raise DataError(f"expected a Molecule or a tuple (atoms, coords, bonds, charges), got {type(m).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# RDKit conversion
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _silence_c_output() -> Iterator[None]:
    """Silence C-level stdout/stderr (YAeHMOP's Hückel code prints distance warnings there)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def bare_mol(atoms: np.ndarray, coords: np.ndarray):
    from rdkit import Chem

    rw = Chem.RWMol()
    for z in atoms:
        rw.AddAtom(Chem.Atom(int(z)))
    conf = Chem.Conformer(len(atoms))
    for i, p in enumerate(np.asarray(coords, dtype=np.float64)):
        conf.SetAtomPosition(i, p.tolist())
    rw.AddConformer(conf, assignId=True)
    return rw


def _bond_class(bond) -> int:
    from rdkit import Chem

    bt = bond.GetBondType()
    if bt == Chem.BondType.SINGLE:
        return 1
    if bt == Chem.BondType.DOUBLE:
        return 2
    if bt == Chem.BondType.TRIPLE:
        return 3
    if bt == Chem.BondType.AROMATIC:
        return 4
    raise DataError(f"unsupported RDKit bond type {bt} between atoms {bond.GetBeginAtomIdx()}-{bond.GetEndAtomIdx()}")


def _matrices(mol) -> tuple[np.ndarray, np.ndarray]:
    n = mol.GetNumAtoms()
    bonds = np.zeros((n, n), dtype=np.int64)
    for b in mol.GetBonds():
        i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
        if i != j:
            bonds[i, j] = bonds[j, i] = _bond_class(b)
    charges = np.array([a.GetFormalCharge() for a in mol.GetAtoms()], dtype=np.int64)
    return bonds, charges


def bonds_from_rdkit(
    atoms: np.ndarray,
    coords: np.ndarray,
    charge: int = 0,
    *,
    kekulize: bool = True,
    info: dict | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Infer bonds and formal charges from atomic numbers and coordinates with RDKit's xyz2mol.

    Tries ``rdDetermineBonds.DetermineBonds`` with van der Waals connectivity first, then with Hückel connectivity
    (fixes strained small rings such as bicyclobutanes, where the distance rule over-connects). If both fail, falls back
    to ``DetermineConnectivity`` (single bonds only, zero charges), and if that fails too, to no bonds. Never raises
    for a chemically bad molecule.

    Args:
        atoms: ``(n,)`` atomic numbers.
        coords: ``(n, 3)`` coordinates in Å.
        charge: total molecular charge.
        kekulize: return the kekulé form (no class 4); with False, bonds RDKit perceives as aromatic are class 4.
        info: optional dict that receives ``method`` (``"xyz2mol"``, ``"xyz2mol-hueckel"``, ``"connectivity"``
            or ``"none"``) and, on a fallback, ``error`` (the last RDKit message).

    Returns:
        ``bonds`` ``(n, n)`` int64 bond classes and ``charges`` ``(n,)`` int64 formal charges.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import rdDetermineBonds

    atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
    n = atoms.shape[0]
    info = {} if info is None else info
    error = ""
    attempts = (("xyz2mol", False), ("xyz2mol-hueckel", True))
    with rdBase.BlockLogs():
        for method, hueckel in attempts:
            mol = bare_mol(atoms, coords)
            try:
                if hueckel:
                    with _silence_c_output():
                        rdDetermineBonds.DetermineBonds(mol, charge=int(charge), useHueckel=True)
                else:
                    rdDetermineBonds.DetermineBonds(mol, charge=int(charge))
                if kekulize:
                    Chem.Kekulize(mol, clearAromaticFlags=True)
                bonds, charges = _matrices(mol)
                info["method"] = method
                return bonds, charges
            except Exception as exc:  # RDKit raises ValueError/RuntimeError subclasses here
                error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        mol = bare_mol(atoms, coords)
        try:
            rdDetermineBonds.DetermineConnectivity(mol)
            bonds = np.zeros((n, n), dtype=np.int64)
            for b in mol.GetBonds():
                i, j = b.GetBeginAtomIdx(), b.GetEndAtomIdx()
                if i != j:
                    bonds[i, j] = bonds[j, i] = 1
            info.update(method="connectivity", error=error)
        except Exception as exc:
            bonds = np.zeros((n, n), dtype=np.int64)
            info.update(method="none", error=f"{error}; connectivity: {exc}")
    return bonds, np.zeros(n, dtype=np.int64)


def molecule_from_rdkit(mol, *, kekulize: bool = False, smiles: str | None = None) -> Molecule:
    """RDKit molecule -> :class:`Molecule` (first conformer, all hydrogens explicit, formal charges).

    Bond types are taken as RDKit holds them: for a sanitised molecule aromatic bonds are class 4 (the reference's
    behaviour). With ``kekulize=True`` the molecule is kekulised first (aromatic flags cleared, so no class 4).
    Implicit hydrogens, if any, are added with coordinates. Raises DataError without a conformer or for
    unsupported bond types (dative, etc.).
    """
    from rdkit import Chem

    if mol is None:
        raise DataError("molecule_from_rdkit: got None (RDKit could not parse the molecule)")
    if mol.GetNumConformers() == 0:
        raise DataError("molecule_from_rdkit: the molecule has no conformer (3D coordinates are required)")
    mol = Chem.Mol(mol)
    if any(a.GetTotalNumHs() > 0 for a in mol.GetAtoms()):
        mol = Chem.AddHs(mol, addCoords=True)
    if kekulize:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    atoms = np.array([a.GetAtomicNum() for a in mol.GetAtoms()], dtype=np.int64)
    coords = np.asarray(mol.GetConformer().GetPositions(), dtype=np.float32).reshape(-1, 3)
    bonds, charges = _matrices(mol)
    return Molecule(atoms, coords, bonds, charges, smiles=smiles)


def to_rdkit(
    atoms: np.ndarray,
    coords: np.ndarray,
    bonds: np.ndarray,
    charges: np.ndarray,
    sanitize: bool = True,
    *,
    allow_implicit_hs: bool = True,
):
    """Build an RDKit molecule with a 3D conformer; ``None`` if sanitisation fails (or there are no atoms).

    As the reference, only the strict lower triangle of ``bonds`` is read (self-bonds ignored), and class 4 becomes an
    aromatic bond that sanitisation must kekulise. An atom with atomic number <= 0 (a generated PAD/MASK token) makes
    the molecule invalid, as the reference's RDKit conversion of those tokens fails. With ``allow_implicit_hs=True``
    (the reference), RDKit may add implicit hydrogens to under-bonded atoms during sanitisation; ``False`` forbids it
    (stricter validity).

    Args:
        atoms: ``(n,)`` atomic numbers.
        coords: ``(n, 3)`` coordinates in Å.
        bonds: ``(n, n)`` bond classes.
        charges: ``(n,)`` formal charges.
    """
    from rdkit import Chem, rdBase

    types = (None, Chem.BondType.SINGLE, Chem.BondType.DOUBLE, Chem.BondType.TRIPLE, Chem.BondType.AROMATIC)
    atoms = np.asarray(atoms, dtype=np.int64).reshape(-1)
    n = atoms.shape[0]
    if n == 0 or bool(np.any(atoms <= 0)):
        return None
    bonds = np.asarray(bonds, dtype=np.int64)
    charges = np.asarray(charges, dtype=np.int64).reshape(-1)
    with rdBase.BlockLogs():
        rw = Chem.RWMol()
        for z, c in zip(atoms.tolist(), charges.tolist()):
            a = Chem.Atom(int(z))
            a.SetFormalCharge(int(c))
            if not allow_implicit_hs:
                a.SetNoImplicit(True)
            rw.AddAtom(a)
        ii, jj = np.nonzero(np.tril(bonds, k=-1))
        for i, j in zip(ii.tolist(), jj.tolist()):
            k = int(bonds[i, j])
            if not 0 < k < len(types):
                return None
            rw.AddBond(i, j, types[k])
            if k == 4:
                rw.GetBondBetweenAtoms(i, j).SetIsAromatic(True)
                rw.GetAtomWithIdx(i).SetIsAromatic(True)
                rw.GetAtomWithIdx(j).SetIsAromatic(True)
        conf = Chem.Conformer(n)
        for i, p in enumerate(np.asarray(coords, dtype=np.float64).reshape(n, 3)):
            conf.SetAtomPosition(i, p.tolist())
        mol = rw.GetMol()
        mol.AddConformer(conf, assignId=True)
        if sanitize:
            try:
                Chem.SanitizeMol(mol)
            except Exception:
                return None
        else:
            for a in mol.GetAtoms():
                a.UpdatePropertyCache(strict=False)
    return mol


def canonical_smiles(molecule, *, allow_implicit_hs: bool = True) -> str | None:
    """Canonical SMILES (explicit hydrogens as graph atoms, rebuilt via :func:`to_rdkit`); None if invalid."""
    m = as_molecule(molecule)
    mol = to_rdkit(m.atoms, m.coords, m.bonds, m.charges, allow_implicit_hs=allow_implicit_hs)
    if mol is None:
        return None
    try:
        from rdkit import Chem

        return Chem.MolToSmiles(mol, canonical=True)
    except Exception:
        return None
