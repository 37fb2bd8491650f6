"""Molecule data sets: EDM ``.npz`` (QM9, GEOM), SDF and SMILES (+ ETKDG conformer), bonds inferred with RDKit
once, splits, atom-budget batches and an ``.npz`` cache."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from reed.errors import DataError
from reed.io import progress_bar, read_npz
from reed.molecule.batch import MoleculeBatch, collate
from reed.molecule.chem import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    SYMBOLS,
    Molecule,
    bare_mol,
    bonds_from_rdkit,
    canonical_smiles,
    charge_index,
    element_symbol,
    molecule_from_rdkit,
)

_CACHE_VERSION = 1
CONFORMER_MODES = ("all", "first")


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or f.size == 0 or np.any(~np.isfinite(f)) or np.any(f < 0) or f.sum() <= 0:
        raise DataError(f"split: fractions must be non-negative with a positive sum, got {tuple(fractions)}")
    raw = f / f.sum() * n
    counts = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[k] += 1
    return counts.tolist()


def _vocabulary(molecules: Iterable[Molecule]) -> tuple[str, ...]:
    present: set[int] = set()
    for m in molecules:
        present.update(np.unique(m.atoms).tolist())
    return tuple(s for s in ELEMENTS if ATOMIC_NUMBERS[s] in present)


def _unsupported(atoms: np.ndarray) -> list[str]:
    return sorted({element_symbol(z) for z in np.unique(atoms).tolist() if int(z) not in SYMBOLS})


class _Skips:
    """Collects skipped records; warns for the first few and once with the total."""

    def __init__(self, source: str, limit: int = 20):
        self.source, self.limit, self.items = source, limit, []

    def add(self, name: str, reason: str) -> None:
        self.items.append((name, reason))
        if len(self.items) <= self.limit:
            warnings.warn(f"skipping {name}: {reason}", stacklevel=3)

    def finish(self) -> list[tuple[str, str]]:
        if len(self.items) > self.limit:
            warnings.warn(f"{self.source}: skipped {len(self.items)} records in all (see .skipped)", stacklevel=3)
        return self.items


def _infer_one(args) -> tuple[np.ndarray, np.ndarray, dict]:
    atoms, coords, mode, kekulize = args
    info: dict = {}
    if mode == "connectivity":
        from rdkit import rdBase
        from rdkit.Chem import rdDetermineBonds

        n = len(atoms)
        bonds = np.zeros((n, n), dtype=np.int64)
        with rdBase.BlockLogs():
            mol = bare_mol(atoms, coords)
            try:
                rdDetermineBonds.DetermineConnectivity(mol)
                for b in mol.GetBonds():
                    bonds[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] = bonds[b.GetEndAtomIdx(), b.GetBeginAtomIdx()] = 1
                info["method"] = "connectivity"
            except Exception as exc:
                info.update(method="none", error=str(exc))
        return bonds, np.zeros(n, dtype=np.int64), info
    bonds, charges = bonds_from_rdkit(atoms, coords, 0, kekulize=kekulize, info=info)
    return bonds, charges, info


class MoleculeDataset:
    """A list of :class:`Molecule` with an element vocabulary.

    Attributes:
        molecules: the molecules.
        elements: the vocabulary (subset of :data:`ELEMENTS`, in that order); atom type ``i`` is ``elements[i]``.
        name: a label (the file stem for loaded sets).
        skipped: ``(record, reason)`` for records that could not be read.
        fallbacks: ``(record, reason)`` for molecules whose bond orders could not be inferred (single bonds only
            or no bonds, see :func:`bonds_from_rdkit`); they are kept.

    Atomic number 0 is accepted besides ``elements``: it is what a generated PAD/MASK token becomes
    (:func:`~reed.molecule.batch.uncollate`), so generated sets can be saved whole; such molecules are invalid.
    """

    def __init__(
        self,
        molecules: Iterable[Molecule],
        elements: Sequence[str] | None = None,
        name: str = "molecules",
        skipped: Iterable[tuple[str, str]] | None = None,
        fallbacks: Iterable[tuple[str, str]] | None = None,
    ):
        self.molecules: list[Molecule] = list(molecules)
        self.name = str(name)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.fallbacks: list[tuple[str, str]] = list(fallbacks or [])
        if elements is None:
            elements = _vocabulary(self.molecules)
        elements = tuple(elements)
        unknown = [s for s in elements if s not in ATOMIC_NUMBERS]
        if unknown:
            raise DataError(f"{self.name}: elements {unknown} are not among the supported elements {ELEMENTS}")
        self.elements: tuple[str, ...] = tuple(s for s in ELEMENTS if s in elements)
        allowed = {ATOMIC_NUMBERS[s] for s in self.elements} | {0}
        for i, m in enumerate(self.molecules):
            extra = set(np.unique(m.atoms).tolist()) - allowed
            if extra:
                raise DataError(
                    f"{self.name}: molecule {i} has element(s) {sorted(element_symbol(z) for z in extra)} "
                    f"outside the vocabulary {self.elements}"
                )

    def __len__(self) -> int:
        return len(self.molecules)

    def __getitem__(self, i: int) -> Molecule:
        return self.molecules[i]

    def __iter__(self) -> Iterator[Molecule]:
        return iter(self.molecules)

    def __repr__(self) -> str:
        return (
            f"MoleculeDataset({self.name!r}, {len(self)} molecules, elements={self.elements}, "
            f"{len(self.skipped)} skipped, {len(self.fallbacks)} bond fallbacks)"
        )

    @property
    def num_atoms(self) -> np.ndarray:
        """``(M,)`` int64 atom counts."""
        return np.array([m.num_atoms for m in self.molecules], dtype=np.int64)

    def subset(self, idx) -> MoleculeDataset:
        """Molecules at ``idx`` (in that order), same vocabulary; ``skipped``/``fallbacks`` carried over."""
        return MoleculeDataset(
            [self.molecules[int(i)] for i in np.asarray(idx, dtype=np.int64).reshape(-1)],
            self.elements,
            self.name,
            self.skipped,
            self.fallbacks,
        )

    def split(self, fractions=(0.8, 0.1, 0.1), seed: int = 0) -> tuple[MoleculeDataset, ...]:
        """Deterministic random split by molecule; each part keeps the original order and the full vocabulary."""
        counts = _split_counts(len(self), fractions)
        perm = np.random.default_rng(seed).permutation(len(self))
        parts, start = [], 0
        for c in counts:
            part = self.subset(np.sort(perm[start : start + c]))
            parts.append(part)
            start += c
        return tuple(parts)

    def atom_count_distribution(self) -> np.ndarray:
        """``(max_n + 1,)`` float64 histogram: entry ``n`` is the fraction of molecules with ``n`` atoms."""
        counts = np.bincount(self.num_atoms, minlength=1).astype(np.float64)
        return counts / max(counts.sum(), 1.0)

    def smiles_set(self, *, progress: bool = False) -> set[str]:
        """Canonical SMILES of the valid molecules (explicit H, rebuilt via :func:`~reed.molecule.chem.to_rdkit`),
        for novelty."""
        out = set()
        for m in progress_bar(self.molecules, progress, f"{self.name}: SMILES"):
            s = canonical_smiles(m)
            if s is not None:
                out.add(s)
        return out

    def batches(self, atom_budget: int, *, shuffle_seed: int | None = None) -> list[list[int]]:
        """Size-sorted batches with ``max(n in batch) * len(batch) <= atom_budget``; every molecule in one batch.

        A molecule larger than ``atom_budget`` gets a batch of its own (the only case exceeding the budget). With
        ``shuffle_seed``, molecules of equal size are ordered randomly and the batch order is shuffled.
        """
        atom_budget = int(atom_budget)
        if atom_budget < 1:
            raise DataError(f"batches: atom_budget must be positive, got {atom_budget}")
        sizes = self.num_atoms
        if shuffle_seed is None:
            order = np.argsort(sizes, kind="stable")
        else:
            rng = np.random.default_rng(shuffle_seed)
            order = np.lexsort((rng.random(len(sizes)), sizes))
        out: list[list[int]] = []
        current: list[int] = []
        for i in order.tolist():
            if current and max(int(sizes[i]), 1) * (len(current) + 1) > atom_budget:
                out.append(current)
                current = []
            current.append(i)
        if current:
            out.append(current)
        if shuffle_seed is not None:
            perm = np.random.default_rng(shuffle_seed + 1).permutation(len(out))
            out = [out[k] for k in perm]
        return out

    def collate(self, idx: Sequence[int], **kwargs) -> MoleculeBatch:
        """:func:`collate` of the molecules at ``idx`` with this data set's vocabulary."""
        return collate([self.molecules[int(i)] for i in idx], self.elements, **kwargs)

    # ------------------------------------------------------------------ cache

    def save(self, path) -> Path:
        """Write a ``.npz`` cache: concatenated atoms/coords/charges with atom offsets, bonds as an edge list."""
        path = Path(path)
        sizes = self.num_atoms
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        edges, etypes, eoff = [], [], [0]
        for m in self.molecules:
            ii, jj = np.nonzero(np.triu(m.bonds, k=1))
            edges.append(np.stack([ii, jj], axis=1).astype(np.int32))
            etypes.append(m.bonds[ii, jj].astype(np.int8))
            eoff.append(eoff[-1] + len(ii))

        def cat(arrs, shape, dtype):
            return np.concatenate(arrs).astype(dtype) if arrs else np.zeros(shape, dtype=dtype)

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            np.savez(
                fh,
                version=np.int64(_CACHE_VERSION),
                name=np.str_(self.name),
                elements=np.array(self.elements, dtype=np.str_),
                atom_offsets=offsets,
                atoms=cat([m.atoms for m in self.molecules], (0,), np.int16),
                coords=cat([m.coords for m in self.molecules], (0, 3), np.float32),
                charges=cat([m.charges for m in self.molecules], (0,), np.int8),
                bond_offsets=np.asarray(eoff, dtype=np.int64),
                bond_index=cat(edges, (0, 2), np.int32),
                bond_type=cat(etypes, (0,), np.int8),
                smiles=np.array([m.smiles or "" for m in self.molecules], dtype=np.str_),
                skipped=np.array(self.skipped, dtype=np.str_).reshape(-1, 2),
                fallbacks=np.array(self.fallbacks, dtype=np.str_).reshape(-1, 2),
            )
        return path

    @classmethod
    def load(cls, path) -> MoleculeDataset:
        """Read a cache written by :meth:`save`; a missing file or key raises DataError naming it."""
        path = Path(path)
        keys = ("version", "name", "elements", "atom_offsets", "atoms", "coords", "charges", "bond_offsets",
                "bond_index", "bond_type", "smiles", "skipped", "fallbacks")  # fmt: skip
        d = read_npz(path, "molecule cache", required=keys, keys=keys)
        if int(d["version"]) != _CACHE_VERSION:
            raise DataError(f"{path}: cache version {int(d['version'])}, expected {_CACHE_VERSION}")
        ao, bo = d["atom_offsets"], d["bond_offsets"]
        m_count = len(ao) - 1
        if len(bo) != m_count + 1 or len(d["smiles"]) != m_count or ao[-1] != len(d["atoms"]):
            raise DataError(f"{path}: inconsistent offsets (atom_offsets/bond_offsets/smiles lengths disagree)")
        atoms = d["atoms"].astype(np.int64)
        charges = d["charges"].astype(np.int64)
        bidx, btype = d["bond_index"].astype(np.int64), d["bond_type"].astype(np.int64)
        mols = []
        for k in range(m_count):
            a, b = int(ao[k]), int(ao[k + 1])
            n = b - a
            bonds = np.zeros((n, n), dtype=np.int64)
            e0, e1 = int(bo[k]), int(bo[k + 1])
            ij = bidx[e0:e1]
            bonds[ij[:, 0], ij[:, 1]] = btype[e0:e1]
            bonds[ij[:, 1], ij[:, 0]] = btype[e0:e1]
            smi = str(d["smiles"][k])
            mols.append(Molecule(atoms[a:b], d["coords"][a:b], bonds, charges[a:b], smiles=smi or None))
        return cls(
            mols,
            [str(s) for s in d["elements"]],
            str(d["name"]),
            [tuple(map(str, r)) for r in d["skipped"]],
            [tuple(map(str, r)) for r in d["fallbacks"]],
        )

    # ------------------------------------------------------------------ loaders

    @classmethod
    def from_edm_npz(
        cls,
        path,
        *,
        bonds: str = "rdkit",
        limit: int | None = None,
        progress: bool = False,
        elements: Sequence[str] | None = None,
        kekulize: bool = True,
        workers: int = 1,
        conformers: str = "all",
    ) -> MoleculeDataset:
        """Read EDM-layout molecules and infer bonds.

        Layouts:
            - ``.npz`` (EDM QM9): ``charges`` ``(M, A)`` atomic numbers with 0 padding, ``positions`` ``(M, A, 3)``
              Å, ``num_atoms`` ``(M,)``; other keys (properties) are ignored.
            - ``.npy`` (EDM GEOM ``geom_drugs_30.npy``): ``(T, 5)`` rows ``[conformer id, atomic number, x, y, z]``,
              conformers contiguous. EDM writes each molecule's (up to 30) lowest-energy conformers one after the
              other, lowest first, with a new id per *conformer*. ``conformers="all"`` makes every conformer one
              record (EDM's protocol, so a split is by conformer and the same molecule can sit in train and test);
              ``conformers="first"`` keeps the first conformer of each molecule (the reference's SemlaFlow
              protocol, so a split is by molecule). The file stores no molecule id: a molecule is a run of
              consecutive conformers with the same atomic-number sequence (two stereoisomers written next to each
              other with the same atom order would merge, keeping one); ``limit`` then counts molecules.

        Args:
            bonds: ``"rdkit"`` (xyz2mol, :func:`bonds_from_rdkit`; total charge 0), ``"connectivity"`` (single bonds
                from distances) or ``"none"`` (no bonds).
            limit: read only the first ``limit`` molecules.
            elements: vocabulary; default the elements present.
            kekulize: passed to :func:`bonds_from_rdkit`.
            workers: processes for bond inference (``1``: in this process).
            conformers: ``"all"`` or ``"first"`` (GEOM ``.npy`` only; a ``.npz`` holds one conformer per molecule).

        Molecules with elements outside :data:`ELEMENTS` are skipped (``skipped``); molecules whose bond orders could
        not be inferred are kept with single bonds and listed in ``fallbacks``. Bond inference dominates the cost
        (about 0.5 ms per QM9 molecule, far more for drug-like ones): :meth:`save` the result and :meth:`load` it.
        """
        path = Path(path)
        if bonds not in ("rdkit", "connectivity", "none"):
            raise DataError(f"from_edm_npz: bonds must be 'rdkit', 'connectivity' or 'none', got {bonds!r}")
        if conformers not in CONFORMER_MODES:
            raise DataError(f"from_edm_npz: conformers must be one of {CONFORMER_MODES}, got {conformers!r}")
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        records = cls._read_edm(path, limit, first_conformer=conformers == "first")
        skips = _Skips(str(path))
        kept: list[tuple[str, np.ndarray, np.ndarray]] = []
        for name, z, x in records:
            bad = _unsupported(z)
            if bad:
                skips.add(name, f"element(s) {bad} not among the supported elements")
            elif not np.all(np.isfinite(x)):
                skips.add(name, "non-finite coordinates")
            elif len(z) == 0:
                skips.add(name, "no atoms")
            else:
                kept.append((name, z, x))
        jobs = [(z, x, bonds, kekulize) for _, z, x in kept]
        if bonds == "none":
            results = ((np.zeros((len(z), len(z)), np.int64), np.zeros(len(z), np.int64), {}) for z, *_ in jobs)
        elif workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(int(workers))
            results = pool.imap(_infer_one, jobs, chunksize=64)
        else:
            pool = None
            results = map(_infer_one, jobs)
        mols, fallbacks = [], []
        try:
            bar = progress_bar(zip(kept, results), progress, f"{path.name}: bonds", len(kept))
            for (name, z, x), (b, c, info) in bar:
                if bonds == "rdkit" and info.get("method") not in ("xyz2mol", "xyz2mol-hueckel"):
                    fallbacks.append((name, f"{info.get('method')} bonds: {info.get('error', '')}"))
                mols.append(Molecule(z, x, b, c))
        finally:
            if bonds != "none" and workers > 1 and len(jobs) > 1:
                pool.close()
                pool.join()
        if fallbacks:
            warnings.warn(
                f"{path}: bond orders could not be inferred for {len(fallbacks)} molecule(s), kept with single bonds "
                f"(first: {fallbacks[0][0]}: {fallbacks[0][1]}); see .fallbacks",
                stacklevel=2,
            )
        return cls(mols, elements, path.stem, skips.finish(), fallbacks)

    @staticmethod
    def _read_edm(path: Path, limit: int | None, first_conformer: bool = False
                  ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        try:
            # a GEOM .npy is many GB: map it rather than read it (mmap_mode is ignored for .npz)
            data = np.load(path, allow_pickle=False, mmap_mode="r")
        except Exception as exc:
            raise DataError(f"{path}: cannot read ({exc})") from exc
        if isinstance(data, np.ndarray):  # GEOM: (T, 5) [conformer id, atomic number, x, y, z]
            if data.ndim != 2 or data.shape[1] != 5:
                raise DataError(f"{path}: expected a (T, 5) array [id, atomic number, x, y, z], got {data.shape}")
            ids = data[:, 0].astype(np.int64)
            starts = np.concatenate([[0], np.flatnonzero(np.diff(ids) != 0) + 1, [len(ids)]])
            out = []
            previous: np.ndarray | None = None
            for k in range(len(starts) - 1):
                if limit is not None and len(out) >= int(limit):
                    break
                rows = data[starts[k] : starts[k + 1]]
                z = rows[:, 1].astype(np.int64)
                if first_conformer:
                    same = previous is not None and previous.shape == z.shape and bool(np.all(previous == z))
                    previous = z
                    if same:  # a further conformer of the molecule just kept
                        continue
                out.append((f"{path.name} conformer {int(ids[starts[k]])}", z, rows[:, 2:5].astype(np.float32)))
            return out
        with data:
            for key in ("charges", "positions", "num_atoms"):
                if key not in data.files:
                    raise DataError(f"{path}: missing key {key!r} (EDM layout needs charges, positions, num_atoms)")
            z_all, x_all, n_all = data["charges"], data["positions"], data["num_atoms"]
            index = data["index"] if "index" in data.files else None
        m = len(n_all)
        if z_all.ndim != 2 or z_all.shape[0] != m or x_all.shape != (*z_all.shape, 3):
            raise DataError(
                f"{path}: shapes disagree: charges {z_all.shape}, positions {x_all.shape}, num_atoms {n_all.shape}"
            )
        count = m if limit is None else min(int(limit), m)
        out = []
        for i in range(count):
            n = int(n_all[i])
            if not 0 <= n <= z_all.shape[1]:
                raise DataError(f"{path}: num_atoms[{i}] = {n} outside 0..{z_all.shape[1]}")
            name = f"{path.name} row {i}" + (f" (index {int(index[i])})" if index is not None else "")
            z = z_all[i, :n].astype(np.int64)
            if np.any(z <= 0):
                raise DataError(f"{path}: {name} has padding (charge 0) among its first num_atoms={n} atoms")
            out.append((name, z, x_all[i, :n].astype(np.float32)))
        return out

    @classmethod
    def from_sdf(
        cls,
        path,
        *,
        progress: bool = False,
        elements: Sequence[str] | None = None,
        kekulize: bool = False,
    ) -> MoleculeDataset:
        """Read SDF file(s) (``.sdf`` or ``.sdf.gz``; a path or a list of paths) with hydrogens kept, sanitised.

        Records RDKit cannot parse/sanitise, without 3D coordinates or with unsupported elements/bonds/charges are
        warned about and skipped (``skipped`` names the file and record index). Bond form: see
        :func:`molecule_from_rdkit`.
        """
        import gzip

        from rdkit import Chem, rdBase

        paths = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
        skips = _Skips(", ".join(map(str, paths)))
        mols: list[Molecule] = []
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: SDF file not found")
            fh = gzip.open(p, "rb") if p.suffix == ".gz" else open(p, "rb")
            with fh, rdBase.BlockLogs():
                supplier = Chem.ForwardSDMolSupplier(fh, removeHs=False, sanitize=True)
                for k, mol in enumerate(progress_bar(supplier, progress, p.name)):
                    name = f"{p.name} record {k}"
                    if mol is None:
                        skips.add(name, "RDKit could not parse or sanitise it")
                        continue
                    try:
                        m = molecule_from_rdkit(mol, kekulize=kekulize)
                        bad = _unsupported(m.atoms)
                        if bad:
                            raise DataError(f"element(s) {bad} not among the supported elements")
                        charge_index(m.charges, name)
                        m.smiles = Chem.MolToSmiles(Chem.RemoveHs(mol))
                    except Exception as exc:
                        skips.add(name, str(exc))
                        continue
                    mols.append(m)
        return cls(mols, elements, paths[0].name.split(".")[0] if len(paths) == 1 else "sdf", skips.finish())

    @classmethod
    def from_smiles(
        cls,
        path_or_list,
        *,
        seed: int = 0,
        progress: bool = False,
        elements: Sequence[str] | None = None,
        kekulize: bool = False,
        optimize: bool = True,
    ) -> MoleculeDataset:
        """Molecules from SMILES: add hydrogens, embed one ETKDGv3 conformer (``randomSeed=seed``), MMFF94-optimise.

        ``path_or_list`` is a text file (first whitespace-separated token of each non-empty line; a header line
        ``smiles``/``SMILES`` is skipped) or a sequence of SMILES strings. SMILES that RDKit rejects, that cannot be
        embedded or contain unsupported elements are warned about (naming the SMILES) and skipped. MMFF is skipped
        (the ETKDG pose kept) where MMFF has no parameters.
        """
        from rdkit import Chem, rdBase
        from rdkit.Chem import AllChem

        if isinstance(path_or_list, (str, os.PathLike)):
            p = Path(path_or_list)
            if not p.is_file():
                raise DataError(f"{p}: SMILES file not found (pass a list to give SMILES strings directly)")
            lines = [ln.split()[0] for ln in p.read_text().splitlines() if ln.strip()]
            if lines and lines[0].lower() == "smiles":
                lines = lines[1:]
            name, smiles = p.stem, lines
        else:
            name, smiles = "smiles", [str(s) for s in path_or_list]
        skips = _Skips(name)
        mols: list[Molecule] = []
        params = AllChem.ETKDGv3()
        params.randomSeed = int(seed)
        for k, smi in enumerate(progress_bar(smiles, progress, f"{name}: conformers")):
            label = f"SMILES {k} {smi!r}"
            with rdBase.BlockLogs():
                mol = Chem.MolFromSmiles(smi)
                if mol is None:
                    skips.add(label, "RDKit cannot parse it")
                    continue
                mol = Chem.AddHs(mol)
                try:
                    ok = AllChem.EmbedMolecule(mol, params)
                except Exception as exc:
                    ok, err = -1, str(exc)
                else:
                    err = "ETKDG embedding failed"
                if ok != 0:
                    skips.add(label, err)
                    continue
                if optimize and AllChem.MMFFHasAllMoleculeParams(mol):
                    try:
                        AllChem.MMFFOptimizeMolecule(mol, maxIters=1000)
                    except Exception:
                        pass
                try:
                    m = molecule_from_rdkit(mol, kekulize=kekulize, smiles=Chem.MolToSmiles(Chem.RemoveHs(mol)))
                    bad = _unsupported(m.atoms)
                    if bad:
                        raise DataError(f"element(s) {bad} not among the supported elements")
                    charge_index(m.charges, label)
                except Exception as exc:
                    skips.add(label, str(exc))
                    continue
            mols.append(m)
        return cls(mols, elements, name, skips.finish())
