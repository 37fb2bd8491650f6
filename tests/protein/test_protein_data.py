"""Protein data: structure parsing against the raw PDB text, His-tag trimming, collation, batching, datasets."""

from __future__ import annotations

import csv
import gzip
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.errors import DataError
from reed.protein.data import (
    ALPHABET,
    BACKBONE,
    MASK_ID,
    VOCAB,
    X_ID,
    ProteinDataset,
    ProteinExample,
    backbone_problem,
    collate,
    decode_sequence,
    encode_sequence,
    his_tag_bounds,
    merge_chains,
    parse_structure,
    read_cluster_list,
    token_batches,
    trim_his_tag,
)

THREE = {
    "ALA": "A", "CYS": "C", "ASP": "D", "GLU": "E", "PHE": "F", "GLY": "G", "HIS": "H", "ILE": "I",
    "LYS": "K", "LEU": "L", "MET": "M", "ASN": "N", "PRO": "P", "GLN": "Q", "ARG": "R", "SER": "S",
    "THR": "T", "VAL": "V", "TRP": "W", "TYR": "Y", "MSE": "M",
}  # fmt: skip


def read_pdb_text(path: Path) -> dict[str, list[dict]]:
    """Independent plain-text reading: chain -> residues (name, first-altloc backbone atoms) in file order."""
    chains: dict[str, dict[tuple, dict]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("ENDMDL"):
            break
        if not line.startswith(("ATOM  ", "HETATM")):
            continue
        res_name, chain, key = line[17:20].strip(), line[21], line[22:27]
        atom = line[12:16].strip()
        if res_name not in THREE or atom not in BACKBONE:
            continue
        res = chains.setdefault(chain, {}).setdefault(key, {"name": res_name, "atoms": {}})
        res["atoms"].setdefault(atom, (float(line[30:38]), float(line[38:46]), float(line[46:54])))
    return {c: list(r.values()) for c, r in chains.items()}


def fake_example(name: str, seq: str, chain_index=None, seed: int = 0) -> ProteinExample:
    rng = np.random.default_rng(seed)
    n = len(seq)
    chain_index = np.zeros(n, dtype=np.int64) if chain_index is None else np.asarray(chain_index)
    n_chains = int(chain_index.max()) + 1 if n else 1
    return ProteinExample(
        name=name,
        sequence=seq,
        coords=rng.normal(size=(n, 4, 3)).astype(np.float32),
        chain_index=chain_index,
        chain_ids=[chr(ord("A") + i) for i in range(n_chains)],
    )


@pytest.fixture(scope="module")
def parsed(pdb_dir: Path) -> dict[str, list[ProteinExample]]:
    return {code: parse_structure(pdb_dir / f"{code}.pdb") for code in ("5L33", "3HTN", "4YOW", "4GYT", "6MRR")}


# ---------------------------------------------------------------------------------------------------------------


def test_encode_decode_roundtrip():
    assert len(ALPHABET) == 21 and ALPHABET[X_ID] == "X" and MASK_ID == 21 and VOCAB == 22
    tokens = encode_sequence("ACDYXBZ*a")
    assert tokens.dtype == np.int64
    assert tokens.tolist() == [0, 1, 2, 19, 20, 20, 20, 20, 0]
    assert decode_sequence(tokens) == "ACDYXXXXA"
    assert decode_sequence(torch.tensor([0, MASK_ID, 20])) == "A-X"
    assert decode_sequence([15, 16, 5]) == "STG"
    with pytest.raises(DataError):
        decode_sequence([22])


def test_parse_5l33_matches_file_text(pdb_dir, parsed):
    path = pdb_dir / "5L33.pdb"
    text = read_pdb_text(path)
    (ex,) = parsed["5L33"]
    assert ex.name == "5L33_A" and ex.chain_ids == ["A"]
    residues = text["A"]
    assert ex.length == len(residues) == 106
    assert ex.coords.shape == (106, 4, 3) and ex.coords.dtype == np.float32
    assert (ex.chain_index == 0).all()
    # first residue (HIS -1) CA from the file: 36.936 18.773 53.168
    np.testing.assert_allclose(ex.coords[0, 1], [36.936, 18.773, 53.168], atol=1e-3)
    np.testing.assert_allclose(ex.coords[0, 1], residues[0]["atoms"]["CA"], atol=1e-3)
    # sequence: ATOM records, and SEQRES (GLY SER | HIS MET PRO GLU ...: first two unobserved)
    assert ex.sequence == "".join(THREE[r["name"]] for r in residues)
    assert ex.sequence.startswith("HMPEEEKAARLF")
    seqres = [
        THREE[n] for line in path.read_text().splitlines() if line.startswith("SEQRES") for n in line[19:].split()
    ]
    assert "".join(seqres)[2:14] == ex.sequence[:12]
    # finite exactly where the file has the atom, and all coordinates equal
    for i, res in enumerate(residues):
        for k, atom in enumerate(BACKBONE):
            if atom in res["atoms"]:
                np.testing.assert_allclose(ex.coords[i, k], res["atoms"][atom], atol=1e-3)
            else:
                assert np.isnan(ex.coords[i, k]).all()
    assert ex.residue_mask.all()


def test_3htn_mse_as_met_and_chains(pdb_dir, parsed):
    text = read_pdb_text(pdb_dir / "3HTN.pdb")  # has altlocs A/B/C: first one counts
    exs = parsed["3HTN"]
    assert [e.name for e in exs] == ["3HTN_A", "3HTN_B", "3HTN_C"]
    n_mse = 0
    for ex, chain in zip(exs, "ABC", strict=True):
        residues = text[chain]
        assert ex.length == len(residues)
        assert ex.sequence == "".join(THREE[r["name"]] for r in residues)
        mse = [i for i, r in enumerate(residues) if r["name"] == "MSE"]
        assert all(ex.sequence[i] == "M" for i in mse)
        n_mse += len(mse)
        for i, res in enumerate(residues):
            np.testing.assert_allclose(ex.coords[i, 1], res["atoms"]["CA"], atol=1e-3)
    assert n_mse >= 3


def test_multichain_files(pdb_dir, parsed):
    # 4YOW: protein chains A, C, E (227 residues each); B, D, F are DNA and are ignored
    assert [(e.name, e.length) for e in parsed["4YOW"]] == [("4YOW_A", 227), ("4YOW_C", 227), ("4YOW_E", 227)]
    text = read_pdb_text(pdb_dir / "4GYT.pdb")
    assert [e.length for e in parsed["4GYT"]] == [len(text["A"]), len(text["B"])] == [177, 177]
    (only_c,) = parse_structure(pdb_dir / "4YOW.pdb", chains=["C"])
    assert only_c.name == "4YOW_C"
    np.testing.assert_array_equal(only_c.coords, parsed["4YOW"][1].coords)
    with pytest.raises(DataError, match="4YOW.pdb"):
        parse_structure(pdb_dir / "4YOW.pdb", chains=["B"])  # DNA chain: not a protein chain
    with pytest.raises(DataError, match="4YOW"):
        parse_structure(pdb_dir / "4YOW.pdb", min_length=300)


def test_mmcif_and_gzip_give_same_example(pdb_dir, parsed, tmp_path):
    import biotite.structure.io.pdb as pdb
    import biotite.structure.io.pdbx as pdbx

    src = pdb_dir / "5L33.pdb"
    atoms = pdb.PDBFile.read(src).get_structure(model=1, altloc="first")
    cif = pdbx.CIFFile()
    pdbx.set_structure(cif, atoms)
    cif.write(tmp_path / "5L33.cif")
    with open(src, "rb") as fin, gzip.open(tmp_path / "5L33.pdb.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    ref = parsed["5L33"][0]
    for name in ("5L33.cif", "5L33.pdb.gz"):
        (ex,) = parse_structure(tmp_path / name)
        assert ex.name == "5L33_A" and ex.sequence == ref.sequence
        np.testing.assert_allclose(ex.coords, ref.coords, atol=1e-3)


def test_missing_atoms_and_bad_files(pdb_dir, tmp_path):
    lines = (pdb_dir / "5L33.pdb").read_text().splitlines()
    res3 = [ln for ln in lines if ln.startswith("ATOM") and ln[22:26].strip() == "3"]
    drop_o = {ln for ln in res3 if ln[12:16].strip() == "O"}
    # residue 5 loses all backbone atoms -> it disappears; residue 3 loses O -> NaN, masked out
    kept = [
        ln
        for ln in lines
        if ln not in drop_o
        and not (ln.startswith("ATOM") and ln[22:26].strip() == "5" and ln[12:16].strip() in BACKBONE)
    ]
    (tmp_path / "mod.pdb").write_text("\n".join(kept) + "\n")
    (ex,) = parse_structure(tmp_path / "mod.pdb")
    assert ex.length == 105
    i3 = 4  # residues -1, 0, 1, 2, 3
    assert np.isnan(ex.coords[i3, 3]).all() and np.isfinite(ex.coords[i3, :3]).all()
    assert ex.residue_mask.sum() == 104 and not ex.residue_mask[i3]
    batch = collate([ex])
    assert batch.mask[0, i3] == 0 and batch.mask.sum() == 104
    assert batch.chain_M[0, i3] == 1
    assert torch.equal(batch.X[0, i3, 3], torch.zeros(3))
    assert torch.isfinite(batch.X).all()

    (tmp_path / "empty.pdb").write_text("")
    (tmp_path / "bad.pdb").write_text(
        "ATOM      1  N   HIS A  -1      37.0x0  18.222  51.819  1.00 65.70           N\n"
    )
    (tmp_path / "water.pdb").write_text(
        "HETATM    1  O   HOH A   1      1.000   2.000   3.000  1.00 10.00           O\nEND\n"
    )
    (tmp_path / "x.xyz").write_text("1\n")
    for name in ("empty.pdb", "bad.pdb", "water.pdb", "x.xyz", "absent.pdb"):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            parse_structure(tmp_path / name)


def test_his_tag_trimming(pdb_dir, tmp_path):
    core = "MKLVAEGSTRW"
    assert his_tag_bounds(core) == (0, len(core))
    assert his_tag_bounds("HHHHHH" + core) == (6, 17)  # N-terminal
    assert his_tag_bounds(core + "HHHHHH") == (0, 11)  # C-terminal
    assert his_tag_bounds("MG" + "HHHHHH" + core) == (8, 19)  # offset by 2 at the N-terminus
    assert his_tag_bounds(core + "HHHHHH" + "GS") == (0, 11)  # offset by 2 at the C-terminus
    assert his_tag_bounds("MGSSHHHHHH" + core + "LEHHHHHH") == (10, 23)  # both ends, offset 4
    assert his_tag_bounds("MGSSGHHHHHH" + core) == (0, 22)  # offset 5: not a tag
    assert his_tag_bounds("HHHHHHHH" + core) == (8, 19)  # a longer run goes whole
    assert his_tag_bounds("HHHHH" + core) == (0, 16)  # five H: not a tag

    seq = "MG" + "HHHHHH" + core + "HHHHHH"
    ex = fake_example("t", seq)
    trimmed = trim_his_tag(ex)
    assert trimmed.sequence == core
    np.testing.assert_array_equal(trimmed.coords, ex.coords[8:19])
    # per chain in a complex: chain B (no tag) untouched
    cplx = merge_chains([ex, fake_example("u", "HHHHHHAC" + core, seed=1)], "cplx")
    cplx = merge_chains([cplx.select(cplx.chain_index == 0), fake_example("u", core + "HHHHHH", seed=1)], "cplx")
    t2 = trim_his_tag(cplx)
    assert t2.sequence == core + core and t2.chain_index.tolist() == [0] * 11 + [1] * 11

    # on a real file: rename residues 0..5 of 5L33 (MET PRO GLU GLU GLU LYS) to HIS -> "HHHHHHH..." is trimmed
    out = []
    for ln in (pdb_dir / "5L33.pdb").read_text().splitlines():
        if ln.startswith("ATOM") and ln[21] == "A" and 0 <= int(ln[22:26]) <= 5:
            ln = ln[:17] + "HIS" + ln[20:]
        out.append(ln)
    (tmp_path / "tag.pdb").write_text("\n".join(out) + "\n")
    (full,) = parse_structure(tmp_path / "tag.pdb", trim_his_tag=False)
    (cut,) = parse_structure(tmp_path / "tag.pdb")
    assert full.sequence.startswith("HHHHHHHAAR") and full.length == 106
    assert cut.length == 99 and cut.sequence == full.sequence[7:]
    np.testing.assert_array_equal(cut.coords, full.coords[7:])


def test_collate_padding_and_indices(parsed):
    a = parsed["5L33"][0]
    b = parsed["6MRR"][0]
    c = merge_chains(parsed["4GYT"], "4GYT")
    assert c.chain_ids == ["A", "B"] and c.length == 354
    batch = collate([a, b, c])
    B, L = 3, 354
    assert batch.X.shape == (B, L, 4, 3) and batch.X.dtype == torch.float32
    for t in (batch.S, batch.residue_idx, batch.chain_encoding, batch.lengths):
        assert t.dtype == torch.int64
    assert batch.mask.dtype == batch.chain_M.dtype == torch.float32
    assert batch.lengths.tolist() == [106, 68, 354]
    assert batch.names == ["5L33_A", "6MRR_A", "4GYT"]
    assert batch.sequences[1] == b.sequence
    assert decode_sequence(batch.S[1, :68]) == b.sequence
    # padding
    assert (batch.S[1, 68:] == X_ID).all() and (batch.residue_idx[1, 68:] == -100).all()
    assert (batch.chain_encoding[1, 68:] == 0).all() and (batch.X[1, 68:] == 0).all()
    assert (batch.mask[1, 68:] == 0).all() and (batch.chain_M[1, 68:] == 0).all()
    assert batch.chain_M[1, :68].sum() == 68 and batch.mask[0, :106].sum() == 106
    # indices: single chain 0..L-1 / chain 1; complex: 100*chain + position running over the example
    assert batch.residue_idx[0, :106].tolist() == list(range(106))
    assert (batch.chain_encoding[0, :106] == 1).all()
    assert batch.residue_idx[2, :177].tolist() == list(range(177))
    assert batch.residue_idx[2, 177:].tolist() == [100 + i for i in range(177, 354)]
    assert batch.chain_encoding[2].tolist() == [1] * 177 + [2] * 177
    torch.testing.assert_close(batch.X[2, 180, 1], torch.from_numpy(parsed["4GYT"][1].coords[3, 1]))
    moved = batch.to("cpu")
    assert torch.equal(moved.residue_mask, batch.mask * batch.chain_M)


def test_token_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=200).tolist() + [500]
    budget = 400
    batches = token_batches(lengths, budget)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))  # nobody lost or repeated
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= budget or len(b) == 1
    assert [200] in batches  # longer than the budget: alone
    assert token_batches(lengths, budget) == batches
    # the overflowing example starts the next batch (the reference would drop index 2)
    assert token_batches([10, 10, 20], 30) == [[0, 1], [2]]
    assert token_batches([25, 10, 10, 10], 30) == [[1, 2, 3], [0]]
    assert token_batches([], 10) == []
    with pytest.raises(DataError, match="budget"):
        token_batches([1], 0)


def test_from_directory(pdb_dir, tmp_path):
    d = tmp_path / "structs"
    d.mkdir()
    (d / "5L33.pdb").symlink_to(pdb_dir / "5L33.pdb")
    shutil.copy(pdb_dir / "4GYT.pdb", d / "4GYT.pdb")
    (d / "corrupt.pdb").write_text("ATOM      1  CA  GLY A   1      1.0zz   2.000   3.000  1.00 10.00           C\n")
    (d / "empty.cif").write_text("")
    (d / "notes.txt").write_text("not a structure")
    with pytest.warns(UserWarning) as record:
        ds = ProteinDataset.from_directory(d)
    messages = " ".join(str(w.message) for w in record)
    assert "corrupt.pdb" in messages and "empty.cif" in messages
    assert len(ds.skipped) == 2
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["corrupt.pdb", "empty.cif"]
    assert ds.names == ["4GYT_A", "4GYT_B", "5L33_A"] and ds.lengths == [177, 177, 106]
    assert len(ds) == 3 and ds[2].sequence.startswith("HMPEEE")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cplx = ProteinDataset.from_directory(d, mode="complex", max_length=400)
        short = ProteinDataset.from_directory(d, max_length=150)
    assert cplx.names == ["4GYT", "5L33"] and cplx[0].chain_ids == ["A", "B"] and cplx.lengths == [354, 106]
    assert short.names == ["5L33_A"] and len(short.skipped) == 4
    assert any("max_length" in reason for _, reason in short.skipped)
    assert ds.batches(400) == [[2, 0], [1]] and ds.batches(300) == [[2], [0], [1]]

    empty = tmp_path / "none"
    empty.mkdir()
    with pytest.raises(DataError, match="none"):
        ProteinDataset.from_directory(empty)
    with pytest.raises(DataError, match="missing"):
        ProteinDataset.from_directory(tmp_path / "missing")


def test_split_and_subset():
    ds = ProteinDataset([fake_example(f"e{i}", "ACDEF"[: 1 + i % 5], seed=i) for i in range(20)])
    train, valid, test = ds.split((0.8, 0.1, 0.1), seed=0)
    assert (len(train), len(valid), len(test)) == (16, 2, 2)
    names = train.names + valid.names + test.names
    assert sorted(names) == sorted(ds.names) and len(set(names)) == 20
    again = ds.split((0.8, 0.1, 0.1), seed=0)
    assert [p.names for p in again] == [train.names, valid.names, test.names]
    assert ds.split(seed=1)[1].names != valid.names or ds.split(seed=1)[2].names != test.names
    tiny = ProteinDataset(ds.examples[:3]).split((0.8, 0.1, 0.1))
    assert [len(p) for p in tiny] == [1, 1, 1]
    assert [len(p) for p in ds.split((1.0, 0.0))] == [20, 0]
    assert ds.subset([3, 1]).names == ["e3", "e1"]
    with pytest.raises(DataError):
        ds.split((-1.0, 2.0))


def _write_chain_pt(root: Path, chain_name: str, ex: ProteinExample, prefix_his: int = 0):
    n = ex.length + prefix_his
    xyz = torch.full((n, 14, 3), float("nan"))
    xyz[prefix_his:, :4] = torch.from_numpy(ex.coords)
    pdb_id = chain_name.split("_")[0]
    out = root / "pdb" / pdb_id[1:3]
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "seq": "H" * prefix_his + ex.sequence,
            "xyz": xyz,
            "mask": torch.isfinite(xyz).all(-1),
            "bfac": torch.zeros(n, 14),
            "occ": torch.ones(n, 14),
        },
        out / f"{chain_name}.pt",
    )


def test_pdb_2021aug02_layout(parsed, tmp_path):
    root = tmp_path / "pdb_2021aug02"
    root.mkdir()
    l33, mrr, gyt_a, gyt_b = parsed["5L33"][0], parsed["6MRR"][0], *parsed["4GYT"]
    rows = [  # CHAINID, RESOLUTION, CLUSTER, SEQUENCE
        ("1abc_A", 2.0, 1, l33.sequence),  # cluster 1 (train): two members
        ("1abc_B", 2.5, 1, mrr.sequence),
        ("2xyz_A", 4.0, 2, gyt_b.sequence),  # too low resolution for the default 3.5
        ("2xyz_B", 3.0, 2, "HHHHHH" + gyt_a.sequence),  # His-tag with no coordinates: trimmed
        ("3val_A", 1.5, 3, "A" * 300),  # too long for max_length 256
        ("3val_B", 1.5, 3, gyt_b.sequence),
        ("4tst_A", 1.8, 4, mrr.sequence),
        ("5mis_A", 2.0, 5, l33.sequence),  # no .pt file
    ]
    with open(root / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["CHAINID", "DEPOSITION", "RESOLUTION", "HASH", "CLUSTER", "SEQUENCE"])
        for cid, res, cl, seq in rows:
            w.writerow([cid, "2010-01-01", res, "abc", cl, seq])
    (root / "valid_clusters.txt").write_text("3\n")
    (root / "test_clusters.txt").write_text("4\n")
    _write_chain_pt(root, "1abc_A", l33)
    _write_chain_pt(root, "1abc_B", mrr)
    _write_chain_pt(root, "2xyz_A", gyt_b)
    _write_chain_pt(root, "2xyz_B", gyt_a, prefix_his=6)
    _write_chain_pt(root, "3val_B", gyt_b)
    _write_chain_pt(root, "4tst_A", mrr)

    with pytest.warns(UserWarning, match="5mis_A"):
        train = ProteinDataset.from_pdb_2021aug02(root, "train")
    assert train.names == ["1abc_A", "2xyz_B"]
    assert len(train.skipped) == 1 and "5mis_A" in train.skipped[0][0]
    assert train[1].sequence == gyt_a.sequence and train[1].chain_ids == ["B"]
    np.testing.assert_array_equal(train[1].coords, gyt_a.coords)
    np.testing.assert_array_equal(train[0].coords, l33.coords)
    assert collate([train[0]]).mask.sum() == l33.length

    valid = ProteinDataset.from_pdb_2021aug02(root, "valid")
    test = ProteinDataset.from_pdb_2021aug02(root, "test")
    assert valid.names == ["3val_B"] and test.names == ["4tst_A"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ProteinDataset.from_pdb_2021aug02(root, max_resolution=4.5).names == ["1abc_A", "2xyz_A"]
        assert ProteinDataset.from_pdb_2021aug02(root, max_length=100).names == ["1abc_B"]
        picks = {ProteinDataset.from_pdb_2021aug02(root, member="random", seed=s).names[0] for s in range(12)}
        assert picks == {"1abc_A", "1abc_B"}
        r1 = ProteinDataset.from_pdb_2021aug02(root, member="random", seed=3).names
        assert ProteinDataset.from_pdb_2021aug02(root, member="random", seed=3).names == r1
        assert ProteinDataset.from_pdb_2021aug02(root, clusters=[2]).names == ["2xyz_B"]
    with pytest.raises(DataError, match="split"):
        ProteinDataset.from_pdb_2021aug02(root, "dev")
    with pytest.raises(DataError, match="list.csv"):
        ProteinDataset.from_pdb_2021aug02(tmp_path)


def _drop_atoms(src: Path, dst: Path, atom: str, chain: str | None = None) -> None:
    keep = [ln for ln in src.read_text().splitlines()
            if not (ln.startswith(("ATOM  ", "HETATM")) and ln[12:16].strip() == atom
                    and (chain is None or ln[21] == chain))]
    dst.write_text("\n".join(keep) + "\n")


def test_chains_without_backbone_are_skipped_with_one_warning(pdb_dir, tmp_path):
    """Issue 11 item 7: a chain with no CA atoms (or no residue with all four backbone atoms) would be trained on
    and designed as all X; it is skipped, and every skip is named in one warning."""
    d = tmp_path / "structs"
    d.mkdir()
    (d / "5L33.pdb").symlink_to(pdb_dir / "5L33.pdb")
    _drop_atoms(pdb_dir / "5L33.pdb", d / "noca.pdb", "CA")
    _drop_atoms(pdb_dir / "4GYT.pdb", d / "4GYT_noB.pdb", "CA", chain="B")
    _drop_atoms(pdb_dir / "6MRR.pdb", d / "no_o.pdb", "O")
    (ex,) = parse_structure(d / "noca.pdb")
    assert ex.length == 106 and ex.residue_mask.sum() == 0 and backbone_problem(ex).startswith("no CA atoms")
    assert backbone_problem(parse_structure(d / "no_o.pdb")[0]) == "no residue with a complete N/CA/C/O backbone"
    assert backbone_problem(parse_structure(pdb_dir / "5L33.pdb")[0]) is None

    with pytest.warns(UserWarning) as record:
        ds = ProteinDataset.from_directory(d)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 3 of 5" in msg and "noca.pdb: chain A: no CA atoms" in msg
    assert "4GYT_noB.pdb: chain B: no CA atoms" in msg and "no_o.pdb: chain A: no residue with a complete" in msg
    assert ds.names == ["4GYT_noB_A", "5L33_A"] and ds.lengths == [177, 106]
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["4GYT_noB.pdb", "no_o.pdb", "noca.pdb"]
    assert all(collate([e]).mask.sum() == e.length for e in ds)

    with pytest.warns(UserWarning, match="chain B"):
        cplx = ProteinDataset.from_directory(d, mode="complex")
    assert cplx.names == ["4GYT_noB", "5L33"] and cplx[0].chain_ids == ["A"] and cplx.lengths == [177, 106]

    (d / "5L33.pdb").unlink()
    (d / "4GYT_noB.pdb").unlink()
    with pytest.raises(DataError, match=r"no usable .*noca\.pdb: chain A: no CA atoms.*"):
        ProteinDataset.from_directory(d)


def _mpnn_root(root: Path, parsed) -> Path:
    """A tiny pdb_2021aug02 root over the shared PDB chains: ProteinMPNN's list.csv, REED's list_filtered.csv (a
    subset), the split files and REED's cluster_seq_dict_removeX.pkl (clusters with AF3 embeddings)."""
    import pickle

    root.mkdir()
    l33, mrr, gyt = parsed["5L33"][0], parsed["6MRR"][0], parsed["4GYT"][1]
    filtered = [  # CHAINID, CLUSTER, SEQUENCE; valid clusters 3, 5; test cluster 4
        ("1abc_A", "1", l33.sequence),  # train, in the pkl: first member
        ("1abc_B", "1", mrr.sequence),
        ("2xyz_A", "2", gyt.sequence),  # train, no AF3 embedding -> dropped by the intersection
        ("3val_A", "3", gyt.sequence),  # valid, in the pkl
        ("5val_A", "5", mrr.sequence),  # valid, not in the pkl
        ("4tst_A", "4", mrr.sequence),  # test (listed as "04" in test_clusters.txt: ids compare as integers)
        ("6nan_A", "6", l33.sequence),  # train, in the pkl, but its chain file has no coordinates
    ]
    full = [*filtered, ("7all_A", "7", l33.sequence)]  # only in ProteinMPNN's list.csv
    for name, rows in (("list.csv", full), ("list_filtered.csv", filtered)):
        with open(root / name, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["CHAINID", "DEPOSITION", "RESOLUTION", "HASH", "CLUSTER", "SEQUENCE"])
            w.writerows([cid, "2015-01-01", 2.0, "h", cl, seq] for cid, cl, seq in rows)
    (root / "valid_clusters.txt").write_text("3\n5\n")
    (root / "test_clusters.txt").write_text("04\n")
    seqs = {1: l33.sequence, 3: gyt.sequence, 4: mrr.sequence, 6: l33.sequence, 7: l33.sequence}
    (root / "cluster_seq_dict_removeX.pkl").write_bytes(pickle.dumps(seqs))
    (root / "af3_clusters.txt").write_text("".join(f"{k}\n" for k in seqs))
    for cid, ex in (("1abc_A", l33), ("1abc_B", mrr), ("2xyz_A", gyt), ("3val_A", gyt), ("5val_A", mrr),
                    ("4tst_A", mrr), ("7all_A", l33)):
        _write_chain_pt(root, cid, ex)
    nan = ProteinExample("6nan_A", l33.sequence, np.full((l33.length, 4, 3), np.nan), np.zeros(l33.length), ["A"])
    _write_chain_pt(root, "6nan_A", nan)
    return root


def test_reed_chain_list_and_cluster_intersection(parsed, tmp_path):
    """Issue 11 item 15: protein.data.chain_list (REED's list_filtered.csv) and protein.data.cluster_list (the keys
    of cluster_seq_dict_removeX.pkl) select the reference's training set: rows of the chosen index, split by the
    valid/test cluster files, then only clusters in the list, one first member each (spec protein.md section 5)."""
    from reed.config import load_config
    from reed.protein.cli import read_chain_clusters
    from reed.protein.task import load_splits

    root = _mpnn_root(tmp_path / "pdb_2021aug02", parsed)
    base = [f"protein.data.path={root}", "protein.data.format=pdb_2021aug02"]

    def names(*overrides):
        cfg = load_config("configs/protein_baseline.yaml", [*base, *overrides])
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            splits = load_splits(cfg)
        return {k: v.names for k, v in splits.items()}, [str(w.message) for w in record], cfg

    # the recipe: list_filtered.csv intersected with the AF3 clusters
    got, warned, cfg = names()
    assert got == {"train": ["1abc_A"], "valid": ["3val_A"], "test": ["4tst_A"]}
    assert len(warned) == 1 and "6nan_A: no CA atoms" in warned[0]  # the one train cluster dropped, by name
    assert read_chain_clusters(cfg.protein.data.index_file())["3val_A"] == "3"  # embed-protein's AF3 job names
    # the same ids as a text file
    assert names("protein.data.cluster_list=af3_clusters.txt")[0] == got
    # no intersection: list_filtered.csv's clusters of each split
    got, _, _ = names("protein.data.cluster_list=null")
    assert got == {"train": ["1abc_A", "2xyz_A"], "valid": ["3val_A", "5val_A"], "test": ["4tst_A"]}
    # ProteinMPNN's list.csv (the default index) has a cluster list_filtered.csv lacks
    got, _, _ = names("protein.data.chain_list=null", "protein.data.cluster_list=null")
    assert got["train"] == ["1abc_A", "2xyz_A", "7all_A"]
    # an absolute path is used as is
    assert names(f"protein.data.chain_list={root / 'list.csv'}")[0]["train"] == ["1abc_A", "7all_A"]
    assert read_cluster_list(root / "cluster_seq_dict_removeX.pkl") == {"1", "3", "4", "6", "7"}


def test_reed_recipes_use_the_reference_chain_list():
    from reed.config import load_config

    for name in ("protein_reed.yaml", "protein_baseline.yaml"):
        d = load_config(Path("configs") / name).protein.data
        assert (d.format, d.chain_list, d.cluster_list) == (
            "pdb_2021aug02", "list_filtered.csv", "cluster_seq_dict_removeX.pkl"), name
