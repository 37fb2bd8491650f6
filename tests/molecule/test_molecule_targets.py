"""Molecule alignment targets: fitted denoising encoder, UniMol wrapper (stand-in), target files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.errors import CheckpointError, ConfigError, DataError, ReedError
from reed.molecule.batch import collate, uniform_rotation
from reed.molecule.chem import Molecule
from reed.molecule.dataset import MoleculeDataset
from reed.molecule.targets import (
    FittedMoleculeEncoder,
    MoleculeEncoderConfig,
    UniMolEncoder,
    dataset_fingerprint,
    embed_molecules,
    fit_molecule_encoder,
    load_molecule_targets,
)

TINY = dict(hidden=32, layers=2, d_edge=16, batch_atoms=512, lr=3e-3)


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Tiny networks on a shared CPU: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def qm9(shared_data: Path) -> MoleculeDataset:
    return MoleculeDataset.from_edm_npz(shared_data / "qm9_test.npz", limit=200)


@pytest.fixture(scope="module")
def fitted(qm9, tmp_path_factory):
    out = tmp_path_factory.mktemp("mol_encoder")
    report = fit_molecule_encoder(qm9, out, MoleculeEncoderConfig(steps=60, log_every=10, **TINY), progress=False)
    return out, report


@pytest.fixture(scope="module")
def encoder(fitted) -> FittedMoleculeEncoder:
    return FittedMoleculeEncoder.load(fitted[0])


def _permuted(m: Molecule, perm: np.ndarray) -> Molecule:
    return Molecule(m.atoms[perm], m.coords[perm], m.bonds[np.ix_(perm, perm)], m.charges[perm])


# ----------------------------------------------------------------------------------------------------- fitted encoder


def test_fit_writes_files_and_losses_fall(fitted, qm9):
    out, report = fitted
    assert (out / "encoder.safetensors").is_file() and (out / "encoder.json").is_file()
    saved = json.loads((out / "encoder.json").read_text())
    assert saved["data_fingerprint"] == dataset_fingerprint(qm9) == report["data_fingerprint"]
    assert saved["elements"] == ["H", "C", "N", "O"]
    assert saved["config"]["steps"] == 60 and len(saved["history"]) == 6
    first, final = report["first"], report["final"]
    assert final["loss"] < first["loss"]
    assert final["type_ce"] < first["type_ce"]
    # the coordinate denoiser beats returning the noisy input, more so at the end than at the start
    assert final["denoise_ratio"] < first["denoise_ratio"] < 1.0
    assert 0.05 < first["identity_mse"] < 0.1  # ≈ noise² (0.3 Å)² less the removed centroid shift
    probe = report["probe"]
    assert probe["molecules"] == 200
    assert probe["atoms_r2"] > 0.5 and probe["radius_of_gyration_r2"] > 0.5


def test_load_reproduces_embeddings(fitted, qm9, encoder):
    _, report = fitted
    assert encoder.dim == 32 and encoder.elements == ("H", "C", "N", "O")
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    pooled, _, _ = encoder.encode(qm9.molecules)
    # the report's statistics were computed with the in-memory model right after training
    stats = report["embedding_stats"]
    assert np.linalg.norm(pooled.numpy(), axis=1).mean() == pytest.approx(stats["mean_norm"], rel=1e-5)
    assert float(pooled[0].double().sum()) == pytest.approx(stats["first_molecule_sum"], abs=1e-4)
    again = FittedMoleculeEncoder.load(fitted[0])
    torch.testing.assert_close(again.encode(qm9.molecules[:10])[0], pooled[:10], rtol=0, atol=1e-6)


def test_fit_is_deterministic_given_seed(qm9, tmp_path):
    small = qm9.subset(np.arange(40))
    reports = [
        fit_molecule_encoder(small, tmp_path / name, MoleculeEncoderConfig(steps=3, seed=seed, probe_max=0, **TINY),
                             progress=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]  # fmt: skip
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    assert reports[0]["history"] == reports[1]["history"]
    assert reports[0]["weights_sha256"] != reports[2]["weights_sha256"]


def test_embeddings_are_rotation_translation_and_permutation_invariant(qm9, encoder):
    mols = qm9.molecules[:8]
    pooled, h, mask = encoder.encode(mols)
    rot = uniform_rotation(len(mols), torch.Generator().manual_seed(3)).numpy()
    moved = [Molecule(m.atoms, m.coords @ rot[k].T + np.array([5.0, -2.0, 1.0], np.float32), m.bonds, m.charges)
             for k, m in enumerate(mols)]  # fmt: skip
    pooled_r, h_r, _ = encoder.encode(moved)
    torch.testing.assert_close(pooled_r, pooled, rtol=0, atol=1e-4)
    torch.testing.assert_close(h_r, h, rtol=0, atol=1e-4)

    rng = np.random.default_rng(0)
    perms = [rng.permutation(m.num_atoms) for m in mols]
    pooled_p, h_p, _ = encoder.encode([_permuted(m, p) for m, p in zip(mols, perms)])
    torch.testing.assert_close(pooled_p, pooled, rtol=0, atol=1e-4)
    for k, p in enumerate(perms):
        n = mols[k].num_atoms
        torch.testing.assert_close(h_p[k, :n], h[k, :n][torch.from_numpy(p)], rtol=0, atol=1e-4)
    assert float(h[~mask].abs().max()) == 0.0  # padding rows are exactly zero


def test_embeddings_do_not_depend_on_padding(qm9, encoder):
    sizes = qm9.num_atoms
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    assert sizes[big] > sizes[small]
    alone, h_alone, _ = encoder.encode([qm9[small]])
    both, h_both, _ = encoder.encode([qm9[small], qm9[big]])
    n = int(sizes[small])
    torch.testing.assert_close(both[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(h_both[0, :n], h_alone[0, :n], rtol=0, atol=1e-5)


def test_forward_rejects_types_outside_the_vocabulary(qm9, encoder):
    batch = collate(qm9.molecules[:2], encoder.elements)
    batch.atom_types[0, 0] = len(encoder.elements)
    with pytest.raises(DataError, match="vocabulary"):
        encoder(batch)


def test_bad_config_and_bad_encoder_dir(qm9, tmp_path):
    with pytest.raises(ConfigError, match="noise"):
        fit_molecule_encoder(qm9, tmp_path / "x", MoleculeEncoderConfig(noise=-1.0), progress=False)
    with pytest.raises(CheckpointError, match="encoder.json"):
        FittedMoleculeEncoder.load(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------------- target files


def test_embed_and_load_round_trip(qm9, encoder, fitted, tmp_path):
    ds = qm9.subset(np.arange(50))
    path = embed_molecules(ds, encoder, tmp_path / "t.npz", batch_atoms=256, per_atom=True, progress=False)
    assert path == tmp_path / "t.npz" and path.is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed
    got = load_molecule_targets(path, ds)
    pooled, h, mask = encoder.encode(ds.molecules)
    assert got["pooled"].shape == (50, 32) and got["pooled"].dtype == torch.float32
    torch.testing.assert_close(got["pooled"], pooled, rtol=0, atol=1e-5)
    counts = torch.from_numpy(ds.num_atoms)
    assert torch.equal(got["offsets"], torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert got["atoms"].shape == (int(counts.sum()), 32)
    torch.testing.assert_close(got["atoms"], h[mask], rtol=2e-3, atol=2e-3)  # stored as float16
    k = 17
    torch.testing.assert_close(got["atoms"][got["offsets"][k] : got["offsets"][k + 1]], h[k, : ds[k].num_atoms],
                               rtol=2e-3, atol=2e-3)  # fmt: skip
    assert "fitted molecule encoder" in got["encoder"]
    with np.load(path) as z:
        assert z["atoms"].dtype == np.float16 and z["pooled"].dtype == np.float32

    # pooled only, encoder given as its directory
    path2 = embed_molecules(ds, fitted[0], tmp_path / "p.npz", per_atom=False, progress=False)
    got2 = load_molecule_targets(path2, ds)
    assert "atoms" not in got2 and "offsets" not in got2
    torch.testing.assert_close(got2["pooled"], got["pooled"], rtol=0, atol=1e-6)


def test_pooled_targets_in_the_generic_store(qm9, encoder, tmp_path):
    """Training reads pooled targets from a reed.store target store: the same rows as the .npz, written once,
    refused for other data."""
    from reed.molecule.targets import store_molecule_targets
    from reed.store import TargetStore

    ds = qm9.subset(np.arange(40))
    store = store_molecule_targets(ds, encoder, tmp_path / "s", batch_atoms=256, progress=False)
    assert isinstance(store, TargetStore) and len(store) == 40 and store.dim == 32
    pooled, _, _ = encoder.encode(ds.molecules)
    torch.testing.assert_close(store.get(np.arange(40)), pooled, rtol=0, atol=1e-5)
    torch.testing.assert_close(store.get([7, 3]), pooled[[7, 3]], rtol=0, atol=1e-5)
    again = store_molecule_targets(ds, None, tmp_path / "s", progress=False)  # cached: no encoder needed
    assert torch.equal(again.get(np.arange(40)), store.get(np.arange(40)))
    with pytest.raises(DataError, match="different data set"):
        store_molecule_targets(qm9.subset(np.arange(1, 41)), None, tmp_path / "s", progress=False)


def test_load_rejects_targets_of_other_data(qm9, encoder, tmp_path):
    path = embed_molecules(qm9.subset(np.arange(100)), encoder, tmp_path / "t.npz", progress=False)
    with pytest.raises(DataError, match="different data"):
        load_molecule_targets(path, qm9.subset(np.arange(1, 101)))  # same count, other molecules
    with pytest.raises(DataError, match="different data"):
        load_molecule_targets(path, qm9)  # other count
    assert dataset_fingerprint(qm9.subset(np.arange(100))) == dataset_fingerprint(qm9.molecules[:100])


def test_load_names_the_first_non_finite_molecule(qm9, encoder, tmp_path):
    ds = qm9.subset(np.arange(30))
    path = embed_molecules(ds, encoder, tmp_path / "t.npz", per_atom=True, progress=False)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    bad = dict(arrays, pooled=arrays["pooled"].copy())
    bad["pooled"][[7, 12], 3] = np.nan
    np.savez(tmp_path / "nan.npz", **bad)
    with pytest.raises(DataError, match="molecule index 7"):
        load_molecule_targets(tmp_path / "nan.npz", ds)
    bad = dict(arrays, atoms=arrays["atoms"].copy())
    bad["atoms"][int(arrays["offsets"][5]) + 1, 0] = np.inf
    np.savez(tmp_path / "inf.npz", **bad)
    with pytest.raises(DataError, match="molecule index 5"):
        load_molecule_targets(tmp_path / "inf.npz", ds)
    np.savez(tmp_path / "zero.npz", **dict(arrays, pooled=np.zeros_like(arrays["pooled"])))
    with pytest.raises(DataError, match=r"zero.npz: pooled target: all 30 target vectors have zero"):
        load_molecule_targets(tmp_path / "zero.npz", ds)
    np.savez(tmp_path / "nokey.npz", pooled=arrays["pooled"])
    with pytest.raises(DataError, match="fingerprint"):
        load_molecule_targets(tmp_path / "nokey.npz", ds)


def test_load_missing_file_names_the_path(qm9, tmp_path):
    missing = tmp_path / "nowhere" / "targets.npz"
    with pytest.raises(DataError, match="nowhere/targets.npz"):
        load_molecule_targets(missing, qm9)


# ----------------------------------------------------------------------------------------------------- UniMol


class FakeUniMolRepr:
    """Stand-in for ``unimol_tools.UniMolRepr`` (0.1.6): same constructor keywords and ``get_repr`` output layout
    (``cls_repr`` list of (512,), ``atomic_reprs`` list of (n_i, 512), ``atomic_symbol``, ``atomic_coords``)."""

    instances: list[FakeUniMolRepr] = []

    def __init__(self, data_type="molecule", batch_size=32, remove_hs=False, model_name="unimolv1", use_cuda=True,
                 use_ddp=False, pretrained_model_path=None, pretrained_dict_path=None, max_atoms=256, **kwargs):
        self.kwargs = dict(data_type=data_type, batch_size=batch_size, remove_hs=remove_hs, model_name=model_name,
                           use_cuda=use_cuda, pretrained_model_path=pretrained_model_path,
                           pretrained_dict_path=pretrained_dict_path, max_atoms=max_atoms)  # fmt: skip
        self.calls: list[dict] = []
        FakeUniMolRepr.instances.append(self)

    def _atom_vec(self, symbol: str, radius: float) -> np.ndarray:
        seed = sum(ord(c) for c in symbol)
        base = np.random.default_rng(seed).standard_normal(512).astype(np.float32)
        return np.tanh(base + 0.1 * radius)

    def get_repr(self, data=None, return_atomic_reprs=False, return_tensor=False):
        assert isinstance(data, dict) and set(data) >= {"atoms", "coordinates"}
        self.calls.append(data)
        out = {"cls_repr": [], "atomic_symbol": [], "atomic_coords": [], "atomic_reprs": []}
        for atoms, coords in zip(data["atoms"], data["coordinates"]):
            assert all(isinstance(a, str) for a in atoms) and np.asarray(coords).shape == (len(atoms), 3)
            keep = [i for i, a in enumerate(atoms) if not (self.kwargs["remove_hs"] and a == "H")]
            c = np.asarray(coords, np.float32)[keep]
            c = c - c.mean(0)
            reprs = np.stack([self._atom_vec(atoms[i], float(np.linalg.norm(c[k]))) for k, i in enumerate(keep)])
            out["cls_repr"].append(reprs.max(0))
            out["atomic_symbol"].append([atoms[i] for i in keep])
            out["atomic_coords"].append(c)
            out["atomic_reprs"].append(reprs)
        return out if return_atomic_reprs else out["cls_repr"]


class DropsHydrogens(FakeUniMolRepr):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kwargs["remove_hs"] = True  # a misconfigured backend: H atoms have no per-atom output


@pytest.fixture()
def unimol_weights(tmp_path) -> Path:
    d = tmp_path / "unimol"
    d.mkdir()
    (d / "mol_pre_all_h_220816.pt").write_bytes(b"stand-in")
    tokens = "[PAD] [CLS] [SEP] [UNK] C N O S H Cl F Br I Si P B Na K Al Ca Sn As Hg Fe Zn Cr Se Gd Au Li".split()
    (d / "mol.dict.txt").write_text("".join(f"{t}\n" for t in tokens))
    return d


def test_unimol_stand_in_pooling_and_inputs(qm9, unimol_weights):
    mols = qm9.molecules[:5]
    enc = UniMolEncoder(unimol_weights, repr_factory=FakeUniMolRepr, batch_size=4)
    kw = FakeUniMolRepr.instances[-1].kwargs
    assert kw["pretrained_model_path"] == str(unimol_weights / "mol_pre_all_h_220816.pt")
    assert kw["pretrained_dict_path"] == str(unimol_weights / "mol.dict.txt")
    assert kw["remove_hs"] is False and kw["data_type"] == "molecule" and kw["model_name"] == "unimolv1"
    assert kw["use_cuda"] is False and kw["batch_size"] == 4 and kw["max_atoms"] >= 256
    pooled, per_atom = enc(mols)
    sent = enc.model.calls[-1]
    assert sent["atoms"][0] == mols[0].symbols and "H" in sent["atoms"][0]  # hydrogens are kept
    assert pooled.shape == (5, 512) and pooled.dtype == np.float32
    assert [a.shape for a in per_atom] == [(m.num_atoms, 512) for m in mols]
    np.testing.assert_allclose(pooled[2], per_atom[2].mean(0), rtol=1e-5, atol=1e-6)  # real atoms only

    cls_pooled, _ = UniMolEncoder(unimol_weights, repr_factory=FakeUniMolRepr, pooling="cls")(mols)
    np.testing.assert_allclose(cls_pooled[1], per_atom[1].max(0), rtol=1e-6)
    std_pooled, _ = UniMolEncoder(unimol_weights, repr_factory=FakeUniMolRepr, pooling="sum_std")(mols)
    assert np.allclose(std_pooled.mean(1), 0, atol=1e-5) and np.allclose(std_pooled.std(1), 1, atol=1e-4)


def test_unimol_stand_in_through_embed_and_load(qm9, unimol_weights, tmp_path):
    ds = qm9.subset(np.arange(25))
    enc = UniMolEncoder(unimol_weights, repr_factory=FakeUniMolRepr)
    path = embed_molecules(ds, enc, tmp_path / "unimol.npz", batch_atoms=100, per_atom=True, progress=False)
    got = load_molecule_targets(path, ds)
    assert got["pooled"].shape == (25, 512) and "unimol" in got["encoder"]
    direct, per_atom = enc(ds.molecules)
    np.testing.assert_allclose(got["pooled"].numpy(), direct, rtol=1e-6)
    np.testing.assert_allclose(got["atoms"].numpy(), np.concatenate(per_atom), rtol=1e-3, atol=1e-3)


def test_unimol_output_that_drops_atoms_is_rejected(qm9, unimol_weights):
    enc = UniMolEncoder(unimol_weights, repr_factory=DropsHydrogens)
    with pytest.raises(DataError, match="molecule 0: expected atomic representations"):
        enc(qm9.molecules[:2])


def test_unimol_missing_weights_say_where_to_put_them(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReedError, match="mol_pre_all_h_220816.pt") as info:
        UniMolEncoder(empty, repr_factory=FakeUniMolRepr)
    assert str(empty) in str(info.value) and "huggingface" in str(info.value) and "mol.dict.txt" in str(info.value)
    monkeypatch.delenv("UNIMOL_WEIGHT_DIR", raising=False)
    with pytest.raises(ReedError, match="UNIMOL_WEIGHT_DIR"):
        UniMolEncoder(None, repr_factory=FakeUniMolRepr)


def test_unimol_env_var_locates_weights(unimol_weights, monkeypatch):
    monkeypatch.setenv("UNIMOL_WEIGHT_DIR", str(unimol_weights))
    enc = UniMolEncoder(repr_factory=FakeUniMolRepr)
    assert enc.checkpoint == unimol_weights / "mol_pre_all_h_220816.pt"


@pytest.mark.skipif(importlib.util.find_spec("unimol_tools") is not None, reason="unimol_tools is installed")
def test_unimol_missing_package_says_what_to_install(unimol_weights):
    with pytest.raises(ReedError, match="pip install unimol_tools"):
        UniMolEncoder(unimol_weights)
