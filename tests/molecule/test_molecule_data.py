"""Molecule data: EDM/QM9 loading with RDKit bond inference, SDF/SMILES loaders, rotations, batching, caching."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from reed.errors import DataError
from reed.molecule.batch import collate, uncollate, uniform_rotation
from reed.molecule.chem import BOND_TYPES, CHARGES, ELEMENTS, Molecule, bonds_from_rdkit, molecule_from_rdkit, to_rdkit
from reed.molecule.dataset import MoleculeDataset
from reed.molecule.metrics import write_sdf

N_QM9 = 300


@pytest.fixture(scope="module")
def qm9_path(shared_data):
    return shared_data / "qm9_test.npz"


@pytest.fixture(scope="module")
def qm9(qm9_path) -> MoleculeDataset:
    return MoleculeDataset.from_edm_npz(qm9_path, limit=N_QM9)


@pytest.fixture(scope="module")
def raw(qm9_path):
    with np.load(qm9_path) as z:
        return {k: z[k][:N_QM9] for k in ("charges", "positions", "num_atoms")}


def _embedded(smiles: str):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    params = AllChem.ETKDGv3()
    params.randomSeed = 0
    assert AllChem.EmbedMolecule(mol, params) == 0
    AllChem.MMFFOptimizeMolecule(mol)
    return mol


def _same(a: Molecule, b: Molecule, atol: float = 1e-4) -> bool:
    return (
        np.array_equal(a.atoms, b.atoms)
        and np.array_equal(a.bonds, b.bonds)
        and np.array_equal(a.charges, b.charges)
        and np.allclose(a.coords, b.coords, atol=atol)
    )


# ------------------------------------------------------------------------------------------------ constants


def test_vocabularies():
    assert len(ELEMENTS) == 16 and ELEMENTS[:5] == ("H", "C", "N", "O", "F")
    assert BOND_TYPES == ("none", "single", "double", "triple", "aromatic")
    assert CHARGES == (0, 1, 2, 3, -1, -2, -3)


# ------------------------------------------------------------------------------------------------ QM9 (EDM npz)


def test_qm9_matches_raw_arrays(qm9, raw):
    assert len(qm9) == N_QM9 and qm9.name == "qm9_test"
    assert not qm9.skipped and not qm9.fallbacks
    np.testing.assert_array_equal(qm9.num_atoms, raw["num_atoms"])
    present = set(np.unique(raw["charges"]).tolist()) - {0}
    z_of = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
    assert set(qm9.elements) <= set(z_of) and {z_of[s] for s in qm9.elements} == present
    assert qm9.elements == tuple(s for s in ELEMENTS if s in qm9.elements)  # ELEMENTS order
    for i, m in enumerate(qm9):
        n = int(raw["num_atoms"][i])
        np.testing.assert_array_equal(m.atoms, raw["charges"][i, :n])
        np.testing.assert_allclose(m.coords, raw["positions"][i, :n])
        assert m.bonds.shape == (n, n) and m.bonds.dtype == np.int64
        np.testing.assert_array_equal(m.bonds, m.bonds.T)
        assert np.all(np.diag(m.bonds) == 0)
        assert m.bonds.max() <= 3  # kekulé form: no aromatic class
        assert m.charges.dtype == np.int64
    # every hydrogen has exactly one single bond in the inferred graphs
    for m in qm9:
        h = m.atoms == 1
        assert np.all((m.bonds[h] > 0).sum(axis=1) == 1) and np.all(m.bonds[h].max(axis=1) == 1)


def test_collate_centres_and_round_trips(qm9):
    mols = qm9.molecules[:64]
    batch = collate(mols, qm9.elements)
    b, n_max = len(mols), max(m.num_atoms for m in mols)
    assert batch.x.shape == (b, n_max, 3) and batch.x.dtype == torch.float32
    assert batch.atom_types.shape == (b, n_max) and batch.atom_types.dtype == torch.int64
    assert batch.bonds.shape == (b, n_max, n_max) and batch.charges.shape == (b, n_max)
    assert batch.mask.dtype == torch.bool
    np.testing.assert_array_equal(batch.num_atoms.numpy(), [m.num_atoms for m in mols])
    mask = batch.mask[..., None].float()
    mean = (batch.x * mask).sum(1) / mask.sum(1)
    assert mean.abs().max() < 1e-5
    assert torch.all(batch.x[~batch.mask] == 0) and torch.all(batch.atom_types[~batch.mask] == 0)
    back = uncollate(batch.x, batch.atom_types, batch.bonds, batch.charges, batch.mask, qm9.elements)
    for m, r in zip(mols, back):
        centred = Molecule(m.atoms, m.coords - m.coords.mean(0), m.bonds, m.charges)
        assert _same(centred, r)
    assert batch.to("cpu").x.device.type == "cpu"


def test_rotation_keeps_distances(qm9):
    mols = qm9.molecules[:32]
    plain = collate(mols, qm9.elements)
    g = torch.Generator().manual_seed(0)
    rot = collate(mols, qm9.elements, rotate=True, generator=g)
    assert not torch.allclose(plain.x, rot.x, atol=1e-2)
    for k, m in enumerate(mols):
        n = m.num_atoms
        torch.testing.assert_close(torch.cdist(plain.x[k, :n], plain.x[k, :n]), torch.cdist(rot.x[k, :n], rot.x[k, :n]),
                                   atol=1e-4, rtol=0)  # fmt: skip
        assert rot.x[k, :n].mean(0).abs().max() < 1e-5
    again = collate(mols, qm9.elements, rotate=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rot.x, again.x)


def test_uniform_rotation_is_haar():
    n = 20_000
    r = uniform_rotation(n, torch.Generator().manual_seed(123)).double()
    assert r.shape == (n, 3, 3) and uniform_rotation(2).dtype == torch.float32
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(n, dtype=torch.float64), atol=1e-5, rtol=0)
    eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, atol=1e-5, rtol=0)
    # Haar measure: E[R] = 0 (each entry has variance 1/3, so the mean of 20k draws has std ~0.004)
    assert r.mean(0).abs().max() < 0.02
    # the rotated z-axis R e_z is uniform on the sphere: cos(theta) ~ U(-1, 1), E[cos] = 0, E[cos^2] = 1/3
    cos = r[:, 2, 2]
    assert abs(cos.mean().item()) < 0.02
    assert abs((cos**2).mean().item() - 1 / 3) < 0.01
    # and its azimuth is uniform: E[cos(phi)] = E[sin(phi)] = 0
    phi = torch.atan2(r[:, 1, 2], r[:, 0, 2])
    assert abs(torch.cos(phi).mean().item()) < 0.02 and abs(torch.sin(phi).mean().item()) < 0.02
    # Contrast: the reference's Euler draw (x, y, z angles ~ U(0, 2pi), extrinsic "xyz", R = Rz Ry Rx) sends e_z to a
    # vector with z-component cos(a) cos(b), so E[cos^2] = 1/4, not 1/3: it is not uniform on SO(3).
    g = torch.Generator().manual_seed(7)
    a, b = (torch.rand(n, generator=g, dtype=torch.float64) * 2 * math.pi for _ in range(2))
    euler_cos = torch.cos(a) * torch.cos(b)
    assert abs((euler_cos**2).mean().item() - 0.25) < 0.01


# ------------------------------------------------------------------------------------------------ bonds / RDKit


def test_bond_inference_methane_ethene():
    d = 1.09 / math.sqrt(3)
    methane = np.array([[0, 0, 0], [d, d, d], [d, -d, -d], [-d, d, -d], [-d, -d, d]])
    info: dict = {}
    bonds, charges = bonds_from_rdkit(np.array([6, 1, 1, 1, 1]), methane, info=info)
    assert info["method"] == "xyz2mol"
    expected = np.zeros((5, 5), dtype=np.int64)
    expected[0, 1:] = expected[1:, 0] = 1
    np.testing.assert_array_equal(bonds, expected)
    np.testing.assert_array_equal(charges, 0)

    ethene = np.array([[0.0, 0.0, 0.667], [0.0, 0.0, -0.667], [0.0, 0.923, 1.238], [0.0, -0.923, 1.238],
                       [0.0, 0.923, -1.238], [0.0, -0.923, -1.238]])  # fmt: skip
    bonds, _ = bonds_from_rdkit(np.array([6, 6, 1, 1, 1, 1]), ethene)
    assert bonds[0, 1] == bonds[1, 0] == 2
    assert bonds[0, 2] == bonds[0, 3] == bonds[1, 4] == bonds[1, 5] == 1
    assert (bonds > 0).sum() == 2 * 5


def test_bond_inference_benzene_kekule_or_aromatic():
    mol = _embedded("c1ccccc1")
    atoms = np.array([a.GetAtomicNum() for a in mol.GetAtoms()])
    coords = mol.GetConformer().GetPositions()
    carbons = np.flatnonzero(atoms == 6)
    ring = np.ix_(carbons, carbons)
    bonds, _ = bonds_from_rdkit(atoms, coords)  # kekulé (default)
    cc = bonds[ring]
    assert (cc == 2).sum() == 2 * 3 and (cc == 1).sum() == 2 * 3 and (cc == 4).sum() == 0
    assert np.all((cc == 2).sum(axis=1) == 1)  # every carbon has exactly one double bond in the ring
    arom, _ = bonds_from_rdkit(atoms, coords, kekulize=False)
    assert (arom[ring] == 4).sum() == 2 * 6
    assert np.all(arom[np.ix_(carbons, np.flatnonzero(atoms == 1))].sum(axis=1) == 1)


def test_bond_inference_never_crashes():
    info: dict = {}
    bonds, charges = bonds_from_rdkit(np.array([6, 6]), np.array([[0.0, 0, 0], [5.0, 0, 0]]), info=info)
    assert info["method"] == "connectivity" and info["error"]
    np.testing.assert_array_equal(bonds, 0)
    np.testing.assert_array_equal(charges, 0)


def test_molecule_from_rdkit_forms_and_charges():
    from rdkit import Chem
    from rdkit.Chem import AllChem

    benzene = _embedded("c1ccccc1")
    aromatic = molecule_from_rdkit(benzene)
    assert (aromatic.bonds == 4).sum() == 12 and aromatic.num_atoms == 12
    kekule = molecule_from_rdkit(benzene, kekulize=True)
    assert (kekule.bonds == 4).sum() == 0 and (kekule.bonds == 2).sum() == 6
    ammonium = molecule_from_rdkit(_embedded("[NH4+]"))
    assert ammonium.charges.tolist() == [1, 0, 0, 0, 0]
    # implicit hydrogens are made explicit (with coordinates)
    ethanol = Chem.MolFromSmiles("CCO")
    AllChem.EmbedMolecule(ethanol, randomSeed=0)
    m = molecule_from_rdkit(ethanol)
    assert m.num_atoms == 9 and (m.atoms == 1).sum() == 6 and np.isfinite(m.coords).all()
    with pytest.raises(DataError, match="conformer"):
        molecule_from_rdkit(Chem.MolFromSmiles("CCO"))


def test_to_rdkit_round_trip_and_invalid(qm9):
    for m in qm9.molecules[:20]:
        mol = to_rdkit(m.atoms, m.coords, m.bonds, m.charges)
        assert mol is not None
        assert _same(molecule_from_rdkit(mol, kekulize=True), m)
    atoms = np.array([6, 1, 1, 1, 1, 1])
    bonds = np.zeros((6, 6), dtype=np.int64)
    bonds[0, 1:] = bonds[1:, 0] = 1
    assert to_rdkit(atoms, np.random.default_rng(0).normal(size=(6, 3)), bonds, np.zeros(6)) is None


# ------------------------------------------------------------------------------------------------ SDF / SMILES


def test_sdf_round_trip(qm9, tmp_path):
    path = tmp_path / "qm9.sdf"
    assert write_sdf(qm9.molecules[:50], path) == 50
    back = MoleculeDataset.from_sdf(path, kekulize=True)
    assert len(back) == 50 and not back.skipped and back.name == "qm9"
    for a, b in zip(qm9.molecules[:50], back):
        assert _same(a, b)
    # aromatic form (as RDKit gives) survives the round trip too
    smiles = MoleculeDataset.from_smiles(["c1ccccc1O", "C[NH3+]", "CC(=O)[O-]", "c1cc[nH]c1"])
    assert write_sdf(smiles.molecules, tmp_path / "s.sdf") == 4
    again = MoleculeDataset.from_sdf(tmp_path / "s.sdf")
    for a, b in zip(smiles, again):
        assert _same(a, b)
    assert (smiles[0].bonds == 4).any() and smiles[1].charges.sum() == 1 and smiles[2].charges.sum() == -1


def test_sdf_bad_record_is_skipped(qm9, tmp_path):
    path = tmp_path / "mixed.sdf"
    write_sdf(qm9.molecules[:3], path)
    text = path.read_text().split("$$$$\n")
    bad = "bad\n     RDKit          3D\n\n  1  0  0  0  0  0  0  0  0  0999 V2000\n" \
          "    0.0000    0.0000    0.0000 Xx  0  0  0  0  0  0  0  0  0  0  0  0\nM  END\n"  # fmt: skip
    path.write_text("$$$$\n".join([text[0], bad, text[1], text[2]]) + "$$$$\n")
    with pytest.warns(UserWarning, match="record 1"):
        ds = MoleculeDataset.from_sdf(path, kekulize=True)
    assert len(ds) == 3 and ds.skipped[0][0] == "mixed.sdf record 1"
    with pytest.raises(DataError, match="not found"):
        MoleculeDataset.from_sdf(tmp_path / "missing.sdf")


def test_from_smiles_skips_invalid(tmp_path):
    with pytest.warns(UserWarning, match="C1CC"):
        ds = MoleculeDataset.from_smiles(["CCO", "C1CC", "c1ccncc1", "O=C=O"], seed=3)
    assert len(ds) == 3 and ds.skipped[0][0] == "SMILES 1 'C1CC'"
    assert [m.smiles for m in ds] == ["CCO", "c1ccncc1", "O=C=O"]
    assert ds.elements == ("H", "C", "N", "O")
    assert [m.num_atoms for m in ds] == [9, 11, 3]
    again = MoleculeDataset.from_smiles(["CCO"], seed=3)
    np.testing.assert_allclose(again[0].coords, ds[0].coords)  # fixed seed: same conformer
    f = tmp_path / "s.smi"
    f.write_text("smiles\nCCO ethanol\n\nC#N\n")
    assert [m.smiles for m in MoleculeDataset.from_smiles(f)] == ["CCO", "C#N"]


# ------------------------------------------------------------------------------------------------ data set


def test_batches_cover_and_respect_budget(qm9):
    budget = 256
    for seed in (None, 0, 1):
        batches = qm9.batches(budget, shuffle_seed=seed)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(qm9)))
        for b in batches:
            assert max(qm9.num_atoms[b]) * len(b) <= budget
    assert qm9.batches(budget, shuffle_seed=0) == qm9.batches(budget, shuffle_seed=0)
    assert qm9.batches(budget, shuffle_seed=0) != qm9.batches(budget, shuffle_seed=1)
    # a molecule larger than the budget is not dropped: it gets a batch of its own
    big = qm9.batches(10)
    assert sorted(i for b in big for i in b) == list(range(len(qm9)))
    with pytest.raises(DataError):
        qm9.batches(0)


def test_split_subset_distribution(qm9):
    parts = qm9.split((0.8, 0.1, 0.1), seed=0)
    assert [len(p) for p in parts] == [240, 30, 30]
    assert all(p.elements == qm9.elements for p in parts)
    ids = [id(m) for p in parts for m in p]
    assert len(set(ids)) == len(qm9)
    assert [len(p) for p in qm9.split(seed=0)] == [len(p) for p in parts]
    dist = qm9.atom_count_distribution()
    assert dist.shape == (qm9.num_atoms.max() + 1,) and abs(dist.sum() - 1) < 1e-12
    assert dist[qm9.num_atoms[0]] == pytest.approx(np.mean(qm9.num_atoms == qm9.num_atoms[0]))
    sub = qm9.subset([3, 1])
    assert sub[0] is qm9[3] and sub[1] is qm9[1]
    assert len(qm9.smiles_set()) == len(qm9)  # QM9 molecules are distinct


def test_save_load_round_trip(qm9, tmp_path):
    path = qm9.save(tmp_path / "cache.npz")
    back = MoleculeDataset.load(path)
    assert back.elements == qm9.elements and back.name == qm9.name and len(back) == len(qm9)
    assert back.skipped == qm9.skipped and back.fallbacks == qm9.fallbacks
    for a, b in zip(qm9, back):
        assert _same(a, b, atol=0)
    smiles = MoleculeDataset.from_smiles(["c1ccccc1"])
    back = MoleculeDataset.load(smiles.save(tmp_path / "s.npz"))
    assert back[0].smiles == "c1ccccc1" and _same(back[0], smiles[0], atol=0)


def test_corrupt_files_raise(qm9_path, tmp_path):
    with np.load(qm9_path) as z:
        np.savez(tmp_path / "bad.npz", positions=z["positions"][:5], num_atoms=z["num_atoms"][:5])
    with pytest.raises(DataError, match="'charges'"):
        MoleculeDataset.from_edm_npz(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="not found"):
        MoleculeDataset.from_edm_npz(tmp_path / "nothing.npz")
    with pytest.raises(DataError, match="missing key"):
        MoleculeDataset.load(tmp_path / "bad.npz")


def test_unknown_element_in_collate_names_molecule(qm9):
    hydrocarbon = next(m for m in qm9 if set(m.atoms.tolist()) == {1, 6})
    with_oxygen = next(m for m in qm9 if set(m.atoms.tolist()) == {1, 6, 8})
    collate([hydrocarbon], ("H", "C"))
    mols = [hydrocarbon, with_oxygen]
    with pytest.raises(DataError, match=r"molecule 1 .*\['O'\]"):
        collate(mols, ("H", "C"))


def test_geom_npy_layout_and_skips(tmp_path):
    d = 1.09 / math.sqrt(3)
    methane = np.array([[6, 0, 0, 0], [1, d, d, d], [1, d, -d, -d], [1, -d, d, -d], [1, -d, -d, d]], dtype=float)
    copper = np.array([[29, 0.0, 0.0, 0.0]])
    rows = [np.c_[np.full(5, 0), methane], np.c_[np.full(1, 1), copper], np.c_[np.full(5, 2), methane + [0, 1, 1, 1]]]
    np.save(tmp_path / "geom.npy", np.concatenate(rows))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = MoleculeDataset.from_edm_npz(tmp_path / "geom.npy")
    assert len(ds) == 2 and ds.elements == ("H", "C")
    assert ds.skipped[0][0] == "geom.npy conformer 1" and "Cu" in ds.skipped[0][1]
    assert any("Cu" in str(w.message) for w in caught)
    assert (ds[0].bonds > 0).sum() == 8
