"""Protein evaluation metrics (reed.protein.metrics): sequence recovery and perplexity on hand-built tensors,
Kabsch / RMSD / TM-score on real CA traces (5L33, 6MRR, 3HTN, 4GYT), refolding metrics with stand-in refolders and
ESMFoldRefolder end to end with a tiny random-weight ESMFold saved locally. CPU only, no downloads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.spatial.transform import Rotation

from reed.errors import DataError, ReedError
from reed.protein import metrics as pm

# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny networks on a shared CPU: one intra-op thread (see conftest)."""


def _read_ca(path, chain: str) -> np.ndarray:
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb

    atoms = pdb.PDBFile.read(str(path)).get_structure(model=1)
    atoms = atoms[(atoms.atom_name == "CA") & struc.filter_amino_acids(atoms) & (atoms.chain_id == chain)]
    return atoms.coord.astype(np.float64)


@pytest.fixture(scope="module")
def ca_5l33(pdb_dir) -> np.ndarray:
    ca = _read_ca(pdb_dir / "5L33.pdb", "A")
    assert ca.shape == (106, 3)
    return ca


@pytest.fixture(scope="module")
def ca_6mrr(pdb_dir) -> np.ndarray:
    ca = _read_ca(pdb_dir / "6MRR.pdb", "A")
    assert ca.shape == (68, 3)
    return ca


def _rigid_free_displacement(x: np.ndarray, target_rmsd: float, seed: int) -> np.ndarray:
    """A random per-atom displacement with no rigid-body component (zero net translation and zero net torque about
    the centroid), scaled to the given RMS length. Adding it to x leaves the optimal superposition at identity
    (H = Σ x xᵀ + Σ x dᵀ stays symmetric positive definite), so the aligned RMSD is exactly its RMS length."""
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    c = x - x.mean(0)
    basis = []
    for k in range(3):  # translations
        e = np.zeros((n, 3))
        e[:, k] = 1.0
        basis.append(e.reshape(-1))
    for k in range(3):  # infinitesimal rotations ω × x
        w = np.zeros(3)
        w[k] = 1.0
        basis.append(np.cross(w, c).reshape(-1))
    B, _ = np.linalg.qr(np.stack(basis, 1))
    d = rng.normal(size=3 * n)
    d -= B @ (B.T @ d)
    d = d.reshape(n, 3)
    return d * (target_rmsd / math.sqrt((d**2).sum(1).mean()))


def _transform(x: np.ndarray, seed: int) -> np.ndarray:
    R = Rotation.random(random_state=seed).as_matrix()
    return x @ R.T + np.array([12.0, -7.5, 3.25])


def _brute_force_tm(p: np.ndarray, q: np.ndarray, starts: list[np.ndarray]) -> float:
    """Max over rigid motions of the TM objective by direct local optimisation from the given superpositions."""
    d0 = pm.tm_d0(len(q))

    def neg_tm(x):
        y = p @ Rotation.from_rotvec(x[:3]).as_matrix().T + x[3:]
        return -(1.0 / (1.0 + ((y - q) ** 2).sum(1) / d0**2)).sum() / len(q)

    best = 0.0
    for x0 in starts:
        r = minimize(neg_tm, x0, method="Powell", options={"xtol": 1e-6, "ftol": 1e-10, "maxfev": 20000})
        best = max(best, -r.fun)
    return best


def _start_from(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.concatenate([Rotation.from_matrix(R).as_rotvec(), t])


# ------------------------------------------------------------------------------------------------ recovery


def _recovery_case():
    native = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 0, 0], [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 9, 3, 9], [5, 0, 7, 9, 9], [2, 2, 2, 2, 1], [2, 2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    return pred, native, mask


def test_sequence_recovery_hand_values():
    pred, native, mask = _recovery_case()
    out = pm.sequence_recovery(pred, native, mask)
    # per protein over valid residues: 3/5, 2/3, 0/2; the all-padding 4th protein is skipped; the masked match
    # at row 3 position 4 does not count.
    assert out["recovery"] == pytest.approx(5 / 10)
    assert out["recovery_median"] == pytest.approx(0.6)  # padded-length averaging (the reference bug) gives 0.4
    assert out["recovery_mean"] == pytest.approx((0.6 + 2 / 3 + 0.0) / 3)
    assert out["num_residues"] == 10
    assert out["num_proteins"] == 3
    # bool and float masks are the same thing
    assert pm.sequence_recovery(pred, native, mask.bool()) == out
    assert pm.sequence_recovery(pred, native, mask.float()) == out


def test_recovery_accumulator_matches_single_call_and_rejects_bad_input():
    pred, native, mask = _recovery_case()
    acc = pm.RecoveryAccumulator()
    acc.update(pred[:1], native[:1], mask[:1])
    acc.update(pred[1:3, :3], native[1:3, :3], mask[1:3, :3])  # shorter padded length in another batch
    acc.update(pred[3:], native[3:], mask[3:])
    assert acc.compute() == pm.sequence_recovery(pred, native, mask)
    other = pm.RecoveryAccumulator()
    other.update(pred[:1], native[:1], mask[:1])
    acc.merge(other)
    assert acc.compute()["num_proteins"] == 4
    acc.reset()
    with pytest.raises(DataError, match="no valid residues"):
        acc.compute()
    with pytest.raises(DataError, match="mask shape"):
        pm.sequence_recovery(pred, native, mask[:, :3])
    with pytest.raises(DataError, match="pred shape"):
        pm.sequence_recovery(pred[:2], native, mask)


# ------------------------------------------------------------------------------------------------ perplexity


def test_perplexity_uniform_is_vocab_size():
    B, L, V = 2, 7, 22
    native = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    out = pm.perplexity(torch.full((B, L, V), -math.log(V)), native, mask)
    assert out["perplexity"] == pytest.approx(22.0, rel=1e-12)
    assert out["nll"] == pytest.approx(math.log(22.0), rel=1e-12)
    assert out["num_residues"] == 11
    # unnormalised logits (a constant) give the same numbers
    assert pm.perplexity(torch.full((B, L, V), 3.0), native, mask)["perplexity"] == pytest.approx(22.0)


def test_perplexity_confident_predictions():
    B, L, V = 2, 6, 22
    native = torch.randint(0, 20, (B, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 5] = False
    logits = 10.0 * torch.nn.functional.one_hot(native, V).float()
    logits[0, 5] = 0.0
    logits[0, 5, (native[0, 5] + 1) % V] = 10.0  # wrong, but masked out
    lp = torch.log_softmax(logits, -1)
    out = pm.perplexity(lp, native, mask)
    assert out["accuracy"] == 1.0
    p_true = math.exp(10) / (math.exp(10) + 21)
    assert out["perplexity"] == pytest.approx(1 / p_true, rel=1e-6)
    # half right: accuracy over valid residues only
    mask2 = torch.ones(B, L)
    out2 = pm.perplexity(lp, native, mask2)
    assert out2["accuracy"] == pytest.approx(11 / 12)
    with pytest.raises(DataError, match="no valid residues"):
        pm.perplexity(lp, native, torch.zeros(B, L))
    with pytest.raises(DataError, match="log_probs shape"):
        pm.perplexity(lp[:, :3], native, mask)


# ------------------------------------------------------------------------------------------------ kabsch / rmsd


def test_kabsch_recovers_rigid_motion(ca_5l33):
    Q = ca_5l33
    R0 = Rotation.random(random_state=3).as_matrix()
    P = (Q - 4.0) @ R0.T  # P is Q moved; the fit must map P back onto Q
    R, t = pm.kabsch(P, Q)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(P @ R.T + t, Q, atol=1e-8)
    np.testing.assert_allclose(R, R0.T, atol=1e-10)
    assert pm.rmsd(P, Q) < 1e-8
    assert pm.rmsd(P, Q, align=False) > 10.0
    # torch in -> torch out, same answer
    Rt, tt = pm.kabsch(torch.tensor(P), torch.tensor(Q))
    assert isinstance(Rt, torch.Tensor) and Rt.dtype == torch.float64
    np.testing.assert_allclose(Rt.numpy(), R, atol=1e-10)
    assert pm.rmsd(torch.tensor(P, dtype=torch.float32), torch.tensor(Q, dtype=torch.float32)) < 1e-3


def test_rmsd_known_displacements(ca_5l33):
    Q = ca_5l33
    n = len(Q)
    # one atom moved by 3 Å, no alignment: sqrt(9 / N)
    P = Q.copy()
    P[17] += np.array([0.0, 3.0, 0.0])
    assert pm.rmsd(P, Q, align=False) == pytest.approx(math.sqrt(9.0 / n), rel=1e-12)
    # a displacement without rigid-body component, then a rigid motion: aligned RMSD is its RMS length
    for target in (0.5, 1.5, 3.0):
        d = _rigid_free_displacement(Q, target, seed=int(target * 10))
        P = _transform(Q + d, seed=5)
        assert pm.rmsd(P, Q) == pytest.approx(target, abs=1e-9)
    # pure translation: aligned 0, unaligned = its length
    assert pm.rmsd(Q + [1.0, 2.0, 2.0], Q, align=False) == pytest.approx(3.0)
    assert pm.rmsd(Q + [1.0, 2.0, 2.0], Q) == pytest.approx(0.0, abs=1e-9)


def test_kabsch_never_reflects(ca_5l33):
    Q = ca_5l33
    P = Q * np.array([-1.0, 1.0, 1.0])  # the mirror image
    R, t = pm.kabsch(P, Q)
    assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-12)
    # an improper fit (reflection allowed) would superpose the mirror image exactly; a rotation cannot
    mirror_rmsd = pm.rmsd(P * np.array([-1.0, 1.0, 1.0]), Q)
    assert mirror_rmsd < 1e-9
    assert pm.rmsd(P, Q) > 2.0
    assert pm.rmsd(P, Q) == pytest.approx(math.sqrt(((P @ R.T + t - Q) ** 2).sum(1).mean()), rel=1e-12)


def test_weighted_kabsch_ignores_zero_weight_atoms(ca_5l33):
    Q = ca_5l33
    P = _transform(Q, seed=9)
    P[:20] += 25.0  # garbage on the first 20 atoms
    w = np.ones(len(Q))
    w[:20] = 0.0
    R, t = pm.kabsch(P, Q, weights=w)
    np.testing.assert_allclose((P @ R.T + t)[20:], Q[20:], atol=1e-8)
    with pytest.raises(DataError, match="weights"):
        pm.kabsch(P, Q, weights=np.zeros(len(Q)))
    with pytest.raises(DataError, match="same number of atoms"):
        pm.rmsd(P[:-1], Q)
    with pytest.raises(DataError, match="non-finite"):
        pm.rmsd(np.full((3, 3), np.nan), Q[:3])
    with pytest.raises(DataError, match=r"\(N, 3\)"):
        pm.rmsd(Q[:, :2], Q[:, :2])


# ------------------------------------------------------------------------------------------------ TM-score


def test_tm_d0():
    assert pm.tm_d0(106) == pytest.approx(1.24 * 91 ** (1 / 3) - 1.8)
    assert pm.tm_d0(10) == 0.5
    assert pm.tm_d0(19) == 0.5  # 1.24·4^(1/3) − 1.8 < 0.5 is clamped


def test_tm_score_identical_and_rigid_copies(ca_5l33):
    Q = ca_5l33
    assert pm.tm_score(Q, Q) == pytest.approx(1.0, abs=1e-12)
    assert pm.tm_score(_transform(Q, seed=11), Q) == pytest.approx(1.0, abs=1e-9)
    assert pm.tm_score(torch.tensor(_transform(Q, seed=12)), torch.tensor(Q)) == pytest.approx(1.0, abs=1e-9)
    # normalising by a longer target length scales the score: N / L_target for a perfect match
    assert pm.tm_score(Q, Q, L_target=2 * len(Q)) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(DataError, match="same number of atoms"):
        pm.tm_score(Q[:-1], Q)


def test_tm_score_noise_matches_brute_force(ca_5l33):
    Q = ca_5l33
    rng = np.random.default_rng(0)
    P0 = Q + rng.normal(scale=1.0, size=Q.shape)
    tm = pm.tm_score(P0, Q)
    # brute force, independent of the search: local optimisation from the all-atom Kabsch fit and random poses
    starts = [_start_from(*pm.kabsch(P0, Q))]
    starts += [np.concatenate([Rotation.random(random_state=k).as_rotvec(), rng.normal(size=3)]) for k in range(2)]
    exact = _brute_force_tm(P0, Q, starts)
    assert 0.7 < exact < 0.95
    assert tm == pytest.approx(exact, abs=0.02)
    assert tm <= exact + 1e-6
    # invariant to moving P
    assert pm.tm_score(_transform(P0, seed=21), Q) == pytest.approx(tm, abs=1e-6)


def test_tm_score_hinge_motion_matches_brute_force(ca_5l33):
    """Second half rotated rigidly by 35° about its centroid: the best superposition is not the all-atom fit."""
    Q = ca_5l33
    P0 = Q.copy()
    c = P0[53:].mean(0)
    P0[53:] = (P0[53:] - c) @ Rotation.from_rotvec([0.0, 0.0, 0.6]).as_matrix().T + c
    P0 += np.random.default_rng(1).normal(scale=0.3, size=P0.shape)
    tm = pm.tm_score(_transform(P0, seed=2), Q)
    starts = [_start_from(*pm.kabsch(P0, Q)), _start_from(*pm.kabsch(P0[:53], Q[:53])),
              _start_from(*pm.kabsch(P0[53:], Q[53:]))]
    exact = _brute_force_tm(P0, Q, starts)
    assert tm == pytest.approx(exact, abs=0.02)
    assert tm <= exact + 1e-6


def test_tm_score_unrelated_structures_is_low(pdb_dir, ca_5l33, ca_6mrr):
    n = len(ca_6mrr)
    assert pm.tm_score(ca_6mrr, ca_5l33[:n]) < 0.4
    a = _read_ca(pdb_dir / "3HTN.pdb", "A")
    b = _read_ca(pdb_dir / "4GYT.pdb", "A")
    m = min(len(a), len(b))
    assert pm.tm_score(a[:m], b[:m]) < 0.4
    # two copies of the same protein in one crystal are the same fold
    a2 = _read_ca(pdb_dir / "4GYT.pdb", "B")
    assert pm.tm_score(a2, b) > 0.9


# ------------------------------------------------------------------------------------------------ refold_metrics


class _LookupRefolder:
    """Stand-in refolder: returns a structure per folded sequence from a table, and records what it was asked."""

    def __init__(self, table: dict[str, tuple[np.ndarray, float]]):
        self.table = table
        self.calls: list[list[str]] = []

    def fold(self, sequences):
        self.calls.append(list(sequences))
        return [{"ca": self.table[s][0], "plddt": self.table[s][1]} for s in sequences]


def _designs(ca_5l33, ca_6mrr):
    """Two full-length designs with unresolved residues (NaN native CA, mask False) and an X at a valid residue."""
    rng = np.random.default_rng(4)
    designs, natives, masks, valid_seqs, valid_ca = [], [], [], [], []
    for ca, gap in ((ca_5l33, slice(30, 36)), (ca_6mrr, slice(0, 3))):
        seq = list(rng.choice(list(pm.ALPHABET), size=len(ca)))
        seq[40 if len(ca) > 50 else 10] = "X"
        mask = np.ones(len(ca), dtype=bool)
        mask[gap] = False
        native = ca.copy()
        native[gap] = np.nan
        designs.append("".join(seq))
        natives.append(native)
        masks.append(mask)
        valid_seqs.append("".join(c for c, m in zip(seq, mask) if m).replace("X", "A"))
        valid_ca.append(ca[mask])
    return designs, natives, masks, valid_seqs, valid_ca


def test_refold_metrics_perfect_refolder(ca_5l33, ca_6mrr):
    designs, natives, masks, valid_seqs, valid_ca = _designs(ca_5l33, ca_6mrr)
    refolder = _LookupRefolder({valid_seqs[0]: (_transform(valid_ca[0], 1), 91.0),
                                valid_seqs[1]: (valid_ca[1], 70.0)})
    out = pm.refold_metrics(designs, natives, masks, refolder)
    assert refolder.calls == [valid_seqs]  # valid residues only, X -> A, one call
    assert out["num_residues"] == [100, 65]
    np.testing.assert_allclose(out["rmsd"], [0.0, 0.0], atol=1e-8)
    np.testing.assert_allclose(out["tm"], [1.0, 1.0], atol=1e-9)
    assert out["plddt"] == [91.0, 70.0]
    assert out["rmsd_mean"] == pytest.approx(0.0, abs=1e-8)
    assert out["frac_rmsd_below_2"] == 1.0
    assert out["tm_mean"] == pytest.approx(1.0)
    assert out["plddt_mean"] == pytest.approx(80.5)
    assert out["frac_plddt_above_80"] == 0.5
    assert out["num_proteins"] == 2


def test_refold_metrics_perturbed_refolder(ca_5l33, ca_6mrr):
    designs, natives, masks, valid_seqs, valid_ca = _designs(ca_5l33, ca_6mrr)
    pred0 = _transform(valid_ca[0] + _rigid_free_displacement(valid_ca[0], 3.0, seed=1), 7)
    pred1 = valid_ca[1] + _rigid_free_displacement(valid_ca[1], 1.0, seed=2)
    refolder = _LookupRefolder({valid_seqs[0]: (pred0, 55.0), valid_seqs[1]: (pred1, 85.0)})
    out = pm.refold_metrics(designs, natives, masks, refolder)
    np.testing.assert_allclose(out["rmsd"], [3.0, 1.0], atol=1e-8)
    assert out["rmsd_mean"] == pytest.approx(2.0)
    assert out["rmsd_median"] == pytest.approx(2.0)
    assert out["frac_rmsd_below_2"] == 0.5
    assert out["tm"] == pytest.approx([pm.tm_score(pred0, valid_ca[0]), pm.tm_score(pred1, valid_ca[1])])
    assert out["tm"][0] < out["tm"][1] < 1.0
    assert out["tm_mean"] == pytest.approx(np.mean(out["tm"]))
    assert out["frac_plddt_above_80"] == 0.5


def test_refold_metrics_rejects_mismatches(ca_5l33, ca_6mrr):
    designs, natives, masks, valid_seqs, valid_ca = _designs(ca_5l33, ca_6mrr)
    full_length = _LookupRefolder({valid_seqs[0]: (ca_5l33, 90.0), valid_seqs[1]: (ca_6mrr, 90.0)})
    with pytest.raises(DataError, match="protein 0: refolded CA has shape"):
        pm.refold_metrics(designs, natives, masks, full_length)
    good = _LookupRefolder({valid_seqs[0]: (valid_ca[0], 90.0), valid_seqs[1]: (valid_ca[1], 90.0)})
    with pytest.raises(DataError, match="protein 1: design has 67 residues"):
        pm.refold_metrics([designs[0], designs[1][:-1]], natives, masks, good)
    with pytest.raises(DataError, match="must match one to one"):
        pm.refold_metrics(designs, natives[:1], masks, good)
    bad_mask = [masks[0], np.ones(len(ca_6mrr), dtype=bool)]  # claims the NaN residues are valid
    with pytest.raises(DataError, match="protein 1: native CA coordinates are missing"):
        pm.refold_metrics(designs, natives, bad_mask, good)


def test_tokens_to_sequence():
    tokens = torch.tensor([0, 1, 19, 20, 21, 4])
    assert pm.tokens_to_sequence(tokens) == "ACYXXF"
    assert pm.tokens_to_sequence(tokens, mask=torch.tensor([1, 0, 1, 1, 0, 1])) == "AYXF"
    with pytest.raises(DataError, match="outside"):
        pm.tokens_to_sequence([22])


# ------------------------------------------------------------------------------------------------ ESMFold (tiny)

_ESMFOLD_VOCAB = list("ARNDCQEGHILKMFPSTWYV") + ["X", "<pad>", "<mask>", "<cls>", "<sep>", "<eos>"]


def _tiny_esmfold_config():
    from transformers import EsmConfig
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    trunk = {
        "num_blocks": 1, "sequence_state_dim": 32, "pairwise_state_dim": 16, "sequence_head_width": 8,
        "pairwise_head_width": 8, "max_recycles": 1, "chunk_size": None,
        "structure_module": {"sequence_dim": 32, "pairwise_dim": 16, "ipa_dim": 8, "resnet_dim": 16,
                             "num_heads_ipa": 2, "num_qk_points": 2, "num_v_points": 2, "num_blocks": 2},
    }
    return EsmConfig(
        vocab_size=33, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        pad_token_id=1, mask_token_id=32, position_embedding_type="rotary", token_dropout=True,
        emb_layer_norm_before=False, is_folding_model=True, vocab_list=get_default_vocab_list(),
        esmfold_config={"fp16_esm": False, "lddt_head_hid_dim": 16, "trunk": trunk},
    )


def _save_tokenizer(directory, vocab: list[str]) -> None:
    from transformers import EsmTokenizer

    vocab_file = directory / "vocab_src.txt"
    vocab_file.write_text("\n".join(vocab))
    EsmTokenizer(vocab_file=str(vocab_file)).save_pretrained(str(directory))
    vocab_file.unlink()


@pytest.fixture(scope="module")
def tiny_esmfold(tmp_path_factory):
    """A random-weight ESMFold (78k parameters) with ESMFold's tokenizer layout, saved with save_pretrained."""
    from transformers import EsmForProteinFolding

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny_esmfold")
    EsmForProteinFolding(_tiny_esmfold_config()).save_pretrained(str(directory))
    _save_tokenizer(directory, _ESMFOLD_VOCAB)
    return directory


def test_esmfold_refolder_end_to_end(tiny_esmfold):
    refolder = pm.ESMFoldRefolder(str(tiny_esmfold), device="cpu", batch_size=2)
    seqs = ["MKTVXRQERLKS", "ACDEFGHIKLMNPQRSTVWY", "GAV"]
    out = refolder.fold(seqs)
    assert len(out) == 3
    for s, r in zip(seqs, out):
        n = len(s)
        assert r["ca"].shape == (n, 3)
        assert r["backbone"].shape == (n, 4, 3)
        np.testing.assert_array_equal(r["backbone"][:, 1], r["ca"])
        assert np.isfinite(r["backbone"]).all()
        assert 0.0 <= r["plddt"] <= 100.0
        assert r["plddt_per_residue"].shape == (n,)
        assert r["sequence"] == s.replace("X", "A")
        assert 0.0 <= r["ptm"] <= 1.0
    # N–CA bonds come out of the structure module's ideal residue frames (~1.46 Å)
    bond = np.linalg.norm(out[1]["backbone"][:, 0] - out[1]["backbone"][:, 1], axis=-1)
    np.testing.assert_allclose(bond, 1.46, atol=0.05)
    # the same numbers as reading the model's raw output for that protein alone
    ids = torch.tensor([refolder.tokenizer(seqs[1], add_special_tokens=False)["input_ids"]])
    assert ids[0, :4].tolist() == [0, 4, 3, 6]  # ESMFold's own residue order: A R N D C Q E ...
    with torch.no_grad():
        raw = refolder.model(input_ids=ids, attention_mask=torch.ones_like(ids))
    np.testing.assert_allclose(out[1]["ca"], raw.positions[-1, 0, :, 1].double().numpy(), atol=1e-4)
    exists = raw.atom37_atom_exists[0]
    assert out[1]["plddt"] == pytest.approx(100 * float((raw.plddt[0] * exists).sum() / exists.sum()), abs=1e-3)
    assert out[1]["ptm"] == pytest.approx(float(raw.ptm), abs=1e-5)
    # padding in a batch does not change a protein's prediction
    single = pm.ESMFoldRefolder(str(tiny_esmfold), batch_size=1).fold([seqs[0]])[0]
    np.testing.assert_allclose(single["ca"], out[0]["ca"], atol=1e-4)
    assert single["plddt"] == pytest.approx(out[0]["plddt"], abs=1e-3)
    with pytest.raises(DataError, match="sequence 1 contains letters"):
        refolder.fold(["ACD", "AC1"])
    with pytest.raises(DataError, match="list of sequences"):
        refolder.fold("ACD")


def test_refold_metrics_with_tiny_esmfold(tiny_esmfold, ca_6mrr):
    refolder = pm.ESMFoldRefolder(str(tiny_esmfold))
    mask = np.ones(len(ca_6mrr), dtype=bool)
    mask[:5] = False
    out = pm.refold_metrics(["A" * len(ca_6mrr)], [ca_6mrr], [mask], refolder)
    assert out["num_residues"] == [63]
    assert np.isfinite(out["rmsd"][0]) and 0.0 < out["tm"][0] <= 1.0
    assert 0.0 <= out["plddt_mean"] <= 100.0


def test_parse_esmfold_output_layout():
    """The documented output structure: positions (blocks, B, L, 14, 3), plddt (B, L, 37) in 0–1."""
    B, L = 2, 5
    pos = torch.zeros(3, B, L, 14, 3)
    pos[-1, :, :, 1] = torch.arange(B * L * 3, dtype=torch.float32).reshape(B, L, 3)  # CA is atom14 slot 1
    plddt = torch.full((B, L, 37), 0.25)
    plddt[1] = 0.9
    exists = torch.zeros(B, L, 37)
    exists[..., :5] = 1.0
    exists[0, 3:] = 0.0  # protein 0 has 3 residues, padded to 5
    out = pm.parse_esmfold_output({"positions": pos, "plddt": plddt, "atom37_atom_exists": exists}, [3, 5])
    np.testing.assert_array_equal(out[0]["ca"], pos[-1, 0, :3, 1].numpy())
    assert out[0]["ca"].shape == (3, 3) and out[1]["backbone"].shape == (5, 4, 3)
    assert out[0]["plddt"] == pytest.approx(25.0)
    assert out[1]["plddt"] == pytest.approx(90.0)


def test_esmfold_refolder_missing_weights_and_wrong_tokenizer(tmp_path, tiny_esmfold):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ReedError, match="no_such_model") as info:
        pm.ESMFoldRefolder(str(missing))
    assert "huggingface-cli download facebook/esmfold_v1" in str(info.value)
    with pytest.raises(ReedError, match="reed-test/missing-esmfold"):
        pm.ESMFoldRefolder("reed-test/missing-esmfold")  # HF_HUB_OFFLINE: not in the cache
    # an ESM-2 language-model tokenizer (different residue order) must not be used silently
    from transformers import EsmForProteinFolding
    from transformers.models.esm.configuration_esm import get_default_vocab_list

    wrong = tmp_path / "wrong_tok"
    EsmForProteinFolding.from_pretrained(str(tiny_esmfold)).save_pretrained(str(wrong))
    _save_tokenizer(wrong, list(get_default_vocab_list()))
    with pytest.raises(ReedError, match="residue order"):
        pm.ESMFoldRefolder(str(wrong))
