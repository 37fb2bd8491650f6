"""Fidelity to the molecule reference (spec molecule.md): the two named aromatic rules of the stability metrics,
the reference's 18-token atom vocabulary and its CTMC jump rates, buckets reshuffled every epoch, the per-step
generative warm-up, GEOM's first-conformer protocol, aromatic RDKit bonds, and the recipes' values."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from reed.align import Projector
from reed.config import config_from_yaml_text, load_config
from reed.errors import DataError
from reed.molecule.batch import uncollate
from reed.molecule.chem import ATOMIC_NUMBERS, ELEMENTS, REFERENCE_TYPES, Molecule, real_elements, type_vocabulary
from reed.molecule.dataset import MoleculeDataset
from reed.molecule.metrics import atom_stability, molecule_metrics
from reed.molecule.sampling import ctmc_step
from reed.molecule.task import MoleculeTask, load_molecules

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def aromatic(smiles: str) -> Molecule:
    """One molecule from SMILES with RDKit's aromatic bonds kept as class 4."""
    (m,) = MoleculeDataset.from_smiles([smiles]).molecules
    assert (m.bonds == 4).any()
    return m


def pyrrole() -> Molecule:
    return aromatic("c1cc[nH]c1")


# ---------------------------------------------------------------------------------------------- aromatic rules


def test_aromatic_rules_hand_checked():
    """Valence = floor(sum of bond orders), aromatic 1.5 ("intended") or 1 ("reference", the reference's int
    adjacency). Benzene C: 1.5+1.5+1 = 4 | 1+1+1 = 3, both allowed; pyridine N: 3 | 2, both allowed; pyrrole N-H:
    1.5+1.5+1 = 4 (not in N's [2, 3]) | 3; furan O: 1.5+1.5 = 3 (not in O's [2]) | 2."""
    benzene, pyridine, pyr, furan = (aromatic(s) for s in ("c1ccccc1", "c1ccncc1", "c1cc[nH]c1", "c1ccoc1"))
    for m in (benzene, pyridine):
        for rule in ("intended", "reference"):
            assert atom_stability(m.atoms, m.bonds, m.charges, aromatic=rule).all(), rule
    for m, z in ((pyr, 7), (furan, 8)):
        st = atom_stability(m.atoms, m.bonds, m.charges, aromatic="intended")
        assert [int(a) for a in m.atoms[~st]] == [z]  # only the heteroatom, valence 4 resp. 3
        assert atom_stability(m.atoms, m.bonds, m.charges, aromatic="reference").all()
    # the default is reed's 1.5 rule
    assert not atom_stability(pyr.atoms, pyr.bonds, pyr.charges).all()
    # counting aromatic bonds as 1 hides errors: a carbon with three aromatic bonds and an H is 1.5*3+1 = 5.5 -> 5
    # (unstable) by the intended rule, 1*3+1 = 4 (stable) by the reference's
    over = np.zeros((5, 5), dtype=np.int64)
    over[0, 1:4] = over[1:4, 0] = 4
    over[0, 4] = over[4, 0] = 1
    args = (np.array([6, 6, 6, 6, 1]), over, np.zeros(5))
    assert not atom_stability(*args, aromatic="intended")[0] and atom_stability(*args, aromatic="reference")[0]

    mols = [benzene, pyridine, pyr, furan]
    n_atoms = sum(m.num_atoms for m in mols)
    assert n_atoms == 12 + 11 + 10 + 9
    ref = molecule_metrics(mols, aromatic="reference")
    new = molecule_metrics(mols)
    assert ref["aromatic_rule"] == "reference" and new["aromatic_rule"] == "intended"
    assert ref["molecule_stability"] == 1.0 and new["molecule_stability"] == 0.5
    assert ref["atom_stability"] == 1.0 and new["atom_stability"] == pytest.approx((n_atoms - 2) / n_atoms)
    assert ref["validity"] == new["validity"] == 1.0
    with pytest.raises(DataError, match="aromatic rule"):
        molecule_metrics(mols, aromatic="floor")
    with pytest.raises(DataError, match="no molecules"):
        molecule_metrics([])


def test_aromatic_rules_on_qm9(shared_data):
    """The first 102 QM9 rows of the shared file hold 35 molecules with RDKit aromatic bonds (mostly 5-ring
    heteroaromatics): all stable under the reference's rule, 3 under the 1.5 rule. In kekulé form the rules agree."""
    path = shared_data / "qm9_test.npz"
    ds = MoleculeDataset.from_edm_npz(path, limit=102, kekulize=False)
    arom = [m for m in ds if (m.bonds == 4).any()]
    assert len(arom) == 35
    ref, new = molecule_metrics(arom, aromatic="reference"), molecule_metrics(arom, aromatic="intended")
    assert ref["n_stable_molecules"] == 35 and new["n_stable_molecules"] == 3
    kek = MoleculeDataset.from_edm_npz(path, limit=102)
    a, b = molecule_metrics(kek.molecules, aromatic="reference"), molecule_metrics(kek.molecules)
    assert {k: v for k, v in a.items() if k != "aromatic_rule"} == {k: v for k, v in b.items() if k != "aromatic_rule"}


def test_evaluate_names_the_rule(tmp_path, capsys):
    import json

    from reed.cli import main
    from reed.molecule.metrics import write_sdf

    write_sdf([pyrrole(), aromatic("c1ccccc1")], tmp_path / "m.sdf")
    got = {}
    for flag in ([], ["--aromatic", "reference"], ["--aromatic", "intended"]):
        assert main(["evaluate", str(tmp_path / "m.sdf"), *flag]) == 0
        res = json.loads(capsys.readouterr().out)
        got[res["aromatic_rule"]] = res["molecule_stability"]
    assert got == {"intended": 0.5, "reference": 1.0}


# ---------------------------------------------------------------------------------------------- task set-up


def _task(shared_data, limit: int = 60, **molecule) -> MoleculeTask:
    """The QM9 REED recipe on a few molecules (no targets, small model) through the task's real set-up."""
    tree = yaml.safe_load((CONFIGS / "molecule_qm9_reed.yaml").read_text())
    sec = tree["molecule"]
    sec["data"].update(path=str(shared_data / "qm9_test.npz"), limit=limit, atom_budget=120)
    sec["data"].update(molecule.pop("data", {}))
    sec["model"] = {"preset": "egnn-small"}
    sec.update(molecule)
    tree["targets"] = []
    tree["objective"]["curriculum"]["gen_warmup"] = 2
    cfg = config_from_yaml_text(yaml.safe_dump(tree), "test")
    task = MoleculeTask(cfg)
    task.setup(device=torch.device("cpu"), main_process_first=contextlib.nullcontext, progress=False)
    return task


def _epoch(task: MoleculeTask, epoch: int) -> list[list[int]]:
    spe = task.steps_per_epoch
    return [b for s in range(epoch * spe, (epoch + 1) * spe) for b in task.epochs.indices(s, 0)]


def test_buckets_reshuffled_every_epoch(shared_data):
    task = _task(shared_data)
    n, sizes = len(task.train_set), task.train_set.num_atoms
    e0, e1 = _epoch(task, 0), _epoch(task, 1)
    for ep in (e0, e1):
        assert sorted(i for b in ep for i in b) == list(range(n))  # every molecule once per epoch
        assert all(len(b) == 1 or max(sizes[b]) * len(b) <= 120 for b in ep)
    assert len(e0) == len(e1) == task.steps_per_epoch
    assert {frozenset(b) for b in e0} != {frozenset(b) for b in e1}  # contents change, not only their order
    assert _epoch(_task(shared_data), 3) == _epoch(task, 3)  # a pure function of (seed, epoch): resume is exact
    fixed = _task(shared_data, data={"reshuffle": False})
    assert {frozenset(b) for b in _epoch(fixed, 0)} == {frozenset(b) for b in _epoch(fixed, 1)}


def test_generative_warmup_moves_every_step(shared_data):
    """Reference: w_gen = min(step / (E * steps_per_epoch), 1) with E = 2 here; not floor(step / spe) / E."""
    task = _task(shared_data)
    spe = task.steps_per_epoch
    assert spe >= 4
    obj = task.build_objective()
    for step in (0, 1, spe // 2, spe, spe + 3, 2 * spe, 5 * spe):
        assert obj.weights(step)[0] == pytest.approx(min(step / (2 * spe), 1.0)), step
    per_epoch = _task(shared_data, curriculum_every="epoch").build_objective()
    assert per_epoch.weights(spe + 3)[0] == pytest.approx(0.5) and per_epoch.weights(spe - 1)[0] == 0.0


def test_reference_type_vocabulary(shared_data):
    """18 type classes (PAD, MASK, 16 elements) as in the reference: H is class 2, C 3, N 4, O 5, F 6; the uniform
    prior draws PAD/MASK with probability 2/18; the CTMC runs with K = 18, which changes its jump rate."""
    assert REFERENCE_TYPES[:2] == ("<PAD>", "<MASK>") and REFERENCE_TYPES[2:] == ELEMENTS
    assert [REFERENCE_TYPES.index(s) for s in ("H", "C", "N", "O", "F")] == [2, 3, 4, 5, 6]
    task = _task(shared_data, limit=30, type_vocab="reference")
    assert task.elements == REFERENCE_TYPES and task.cfg.molecule.elements == list(REFERENCE_TYPES)
    assert task.flow.num_atom_types == 18 and task.build_denoiser().num_atom_types == 18
    mb, _ = task.device_batch(task.host_batches(0, 0, 1)[0], torch.device("cpu"), torch.Generator())
    for k, i in enumerate(next(iter(task.epochs.indices(0, 0)))):
        m = task.train_set[i]
        types = mb.atom_types[k, : m.num_atoms].tolist()
        assert [ATOMIC_NUMBERS[REFERENCE_TYPES[t]] for t in types] == m.atoms.tolist()

    mask = torch.ones(200, 100, dtype=torch.bool)
    _, prior, _ = task.flow.prior(mask, generator=torch.Generator().manual_seed(0))
    assert (prior <= 1).float().mean().item() == pytest.approx(2 / 18, abs=0.01)
    data_vocab = _task(shared_data, limit=30, type_vocab="data")
    assert data_vocab.elements == data_vocab.train_set.elements == ("H", "C", "N", "O")
    assert data_vocab.flow.num_atom_types == 4

    # one CTMC step from C toward a certain N at library t = 0.5 (t_ref = 0.5), eta 1, dt 0.01: jump probability
    # dt (1 + 2 eta (K - 1) t_ref) / (1 - t_ref) = 0.36 for K = 18 (0.10 for K = 5)
    for K, want in ((18, 0.36), (5, 0.10)):
        cur = torch.full((40000,), 3)
        probs = torch.zeros(40000, K)
        probs[:, 4] = 1.0
        new = ctmc_step(cur, probs, 0.5, 0.01, 1.0, torch.Generator().manual_seed(1))
        assert (new == 4).float().mean().item() == pytest.approx(want, abs=0.01), K


def test_generated_special_tokens_are_invalid(tmp_path):
    """A generated PAD/MASK atom becomes atomic number 0: unstable and invalid, and the set still saves whole."""
    assert type_vocabulary(("H", "C"), "data") == ("H", "C") and real_elements(REFERENCE_TYPES) == ELEMENTS
    x = torch.tensor([[[0.0, 0, 0], [1.09, 0, 0]], [[0.0, 0, 0], [1.09, 0, 0]]])
    types = torch.tensor([[3, 2], [0, 2]])  # C-H and PAD-H
    bonds = torch.tensor([[[0, 1], [1, 0]], [[0, 1], [1, 0]]])
    mols = uncollate(x, types, bonds, torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2, dtype=torch.bool),
                     REFERENCE_TYPES)
    assert mols[0].atoms.tolist() == [6, 1] and mols[1].atoms.tolist() == [0, 1]
    r = molecule_metrics(mols)
    assert r["n_valid"] == 1 and not atom_stability(mols[1].atoms, mols[1].bonds, mols[1].charges)[0]
    back = MoleculeDataset.load(MoleculeDataset(mols, real_elements(REFERENCE_TYPES)).save(tmp_path / "s.npz"))
    assert back[1].atoms.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- data protocol


def test_geom_first_conformer_per_molecule(tmp_path):
    """EDM's GEOM .npy: one id per conformer, a molecule's conformers consecutive. ``first`` keeps one per molecule."""
    d = 1.09 / math.sqrt(3)
    methane = np.array([[6, 0, 0, 0], [1, d, d, d], [1, d, -d, -d], [1, -d, d, -d], [1, -d, -d, d]], dtype=float)
    water = np.array([[8, 0, 0, 0], [1, 0.96, 0, 0], [1, -0.24, 0.93, 0]])
    confs = [methane, methane * [1, 1.01, 1, 1], methane * [1, 0.99, 1, 1], water, water * [1, 1.02, 1, 1], methane]
    rows = np.concatenate([np.c_[np.full(len(c), k), c] for k, c in enumerate(confs)])
    np.save(tmp_path / "geom.npy", rows)
    every = MoleculeDataset.from_edm_npz(tmp_path / "geom.npy")
    first = MoleculeDataset.from_edm_npz(tmp_path / "geom.npy", conformers="first")
    assert len(every) == 6
    assert [m.num_atoms for m in first] == [5, 3, 5]
    assert np.allclose(first[0].coords, methane[:, 1:]) and np.allclose(first[1].coords, water[:, 1:])
    assert len(MoleculeDataset.from_edm_npz(tmp_path / "geom.npy", conformers="first", limit=2)) == 2
    cfg = load_config(CONFIGS / "molecule_geom_reed.yaml", [f"molecule.data.path={tmp_path / 'geom.npy'}"])
    assert len(load_molecules(cfg)) == 3


def test_recipe_bonds_keep_aromaticity(shared_data):
    cfg = load_config(CONFIGS / "molecule_qm9_reed.yaml",
                      [f"molecule.data.path={shared_data / 'qm9_test.npz'}", "molecule.data.limit=25"])
    assert cfg.molecule.data.kekulize is False
    assert (load_molecules(cfg)[20].bonds == 4).sum() == 10  # a pyrazole: 5 ring bonds, both directions
    kek = load_config(CONFIGS / "molecule_qm9_reed.yaml", [f"molecule.data.path={shared_data / 'qm9_test.npz'}",
                                                           "molecule.data.limit=25", "molecule.data.kekulize=true"])
    assert all((m.bonds != 4).all() for m in load_molecules(kek))


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["molecule_geom_reed.yaml", "molecule_qm9_reed.yaml", "molecule_qm9_baseline.yaml"])
def test_recipes_use_the_reference_settings(name):
    """spec molecule.md 1.8 / 2.2: Adam (amsgrad), lr 3e-4 warmed up from 0.01 lr over 10k steps, no weight decay;
    projector 384 -> 384 -> 384 -> 512 (492,800 parameters); the 18-token vocabulary; the reference's aromatic
    rule; buckets reshuffled; the warm-up per step; RDKit aromatic bonds."""
    cfg = load_config(CONFIGS / name)
    t = cfg.train
    assert (t.optimizer, t.amsgrad, t.lr, t.lr_warmup, t.warmup_from, t.weight_decay) == (
        "adam", True, 3e-4, 10000, 0.01, 0.0)
    m = cfg.molecule
    assert (m.type_vocab, m.aromatic_rule, m.curriculum_every) == ("reference", "reference", "step")
    assert m.data.reshuffle is True and m.data.kekulize is False
    for tg in cfg.targets:
        assert (tg.projector_dim, tg.projector_layers, tg.depth) == (384, 3, 5)
        assert sum(p.numel() for p in Projector(384, 512, tg.projector_dim, tg.projector_layers).parameters()) \
            == 492_800
    text = (CONFIGS / name).read_text()
    assert "the paper's encoder" not in text


def test_geom_recipe_protocol():
    cfg = load_config(CONFIGS / "molecule_geom_reed.yaml")
    d = cfg.molecule.data
    assert (d.conformers, d.split, d.coord_std) == ("first", [0.8, 0.1, 0.1], 2.407038688659668)
    text = (CONFIGS / "molecule_geom_reed.yaml").read_text()
    assert "unimol_global" in text and "not loadable by reed" in text
