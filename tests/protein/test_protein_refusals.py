"""Bad protein input at the ``reed`` command: one error line naming the file (and chain, or config key), exit
code 2, never a traceback and never an all-``X`` design. One case per class of bad input."""

from __future__ import annotations

import datetime
import pickle
from pathlib import Path

import pytest
import yaml

from reed.cli import main


def _without_atoms(src: Path, dst: Path, atoms: set[str], chains: set[str] | None = None) -> Path:
    """``src`` with the ATOM/HETATM records of the named atoms (in ``chains``, default all) removed."""
    keep = [
        ln for ln in src.read_text().splitlines()
        if not (ln.startswith(("ATOM  ", "HETATM")) and ln[12:16].strip() in atoms
                and (chains is None or ln[21] in chains))
    ]
    dst.write_text("\n".join(keep) + "\n")
    return dst


def _index(root: Path, name: str = "list.csv") -> None:
    """A pdb_2021aug02 root with a three-row index and its split files (no chain files needed for refusals)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text("CHAINID,DEPOSITION,RESOLUTION,HASH,CLUSTER,SEQUENCE\n"
                             "1abc_A,2010-01-01,2.0,h,1,ACDEF\n1abc_B,2010-01-01,2.0,h,2,ACDEF\n"
                             "1abc_C,2010-01-01,2.0,h,3,ACDEF\n")
    (root / "valid_clusters.txt").write_text("2\n")
    (root / "test_clusters.txt").write_text("3\n")


@pytest.fixture(scope="module")
def bad(tmp_path_factory, pdb_dir):
    """A trained one-step protein run plus one file of every class of bad input, built once."""
    d = tmp_path_factory.mktemp("protein_bad")
    good = d / "good"
    good.mkdir()
    (good / "5L33.pdb").symlink_to(pdb_dir / "5L33.pdb")
    base = {
        "seed": 0, "domain": "protein",
        "protein": {"data": {"format": "directory", "path": str(good), "split": [1.0, 0.0, 0.0],
                             "token_budget": 400},
                    "model": {"preset": "mpnn-small"}, "sample": {"steps": 2}, "eval_every": 0},
        "objective": {"method": "baseline"},
        "train": {"epochs": 1, "log_every": 1, "checkpoint_every": 0, "progress": False},
    }

    def config(name: str, **data) -> Path:
        cfg = yaml.safe_load(yaml.safe_dump(base))
        cfg["protein"]["data"].update(data)
        path = d / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    assert main(["train", str(config("good")), "--out", str(d / "run")]) == 0

    _without_atoms(pdb_dir / "5L33.pdb", d / "noca.pdb", {"CA"})
    _without_atoms(pdb_dir / "5L33.pdb", d / "no_o.pdb", {"O"})  # CA present, no residue with all four atoms
    _without_atoms(pdb_dir / "4GYT.pdb", d / "4GYT_noB.pdb", {"CA"}, {"B"})  # chain A fine, chain B without CA
    (d / "garbage.pdb").write_bytes(bytes(range(256)) * 2)
    (d / "garbage.cif").write_text("data_x\nloop_\n_foo.bar\n1\n")
    (d / "empty_dir").mkdir()
    (d / "garbage.fasta").write_bytes(b"\xff\xfe>\x00\x81")
    src = (pdb_dir / "5L33.pdb").resolve()
    (d / "noca.fasta").write_text(f">noca_A sample=0 source={d / 'noca.pdb'}\n{'A' * 106}\n")
    (d / "short.fasta").write_text(f">5L33_A sample=0 source={src}\nACDE\n")
    (d / "otherchain.fasta").write_text(f">5L33_B sample=0 source={src}\n{'A' * 106}\n")

    allbad = d / "allbad"
    allbad.mkdir()
    (allbad / "noca.pdb").write_text((d / "noca.pdb").read_text())
    (allbad / "garbage.pdb").write_bytes((d / "garbage.pdb").read_bytes())

    mpnn = d / "pdb_2021aug02"
    _index(mpnn)
    (mpnn / "list_filtered.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    (mpnn / "object.pkl").write_bytes(pickle.dumps({datetime.date(2021, 8, 2): "ACDEF"}))
    (mpnn / "other_clusters.pkl").write_bytes(pickle.dumps({7: "ACDEF", 8: "GHIKL"}))
    cfgs = {
        "allbad": config("allbad", path=str(allbad)),
        "empty_dir": config("empty_dir", path=str(d / "empty_dir")),
        "chain_list_dir": config("chain_list_dir", chain_list="list_filtered.csv"),
        "no_chain_list": config("no_chain_list", format="pdb_2021aug02", path=str(mpnn), chain_list="absent.csv"),
        "binary_chain_list": config("binary_chain_list", format="pdb_2021aug02", path=str(mpnn),
                                    chain_list="list_filtered.csv"),
        "no_cluster_list": config("no_cluster_list", format="pdb_2021aug02", path=str(mpnn),
                                  cluster_list="cluster_seq_dict_removeX.pkl"),
        "object_pickle": config("object_pickle", format="pdb_2021aug02", path=str(mpnn), cluster_list="object.pkl"),
        "disjoint_clusters": config("disjoint_clusters", format="pdb_2021aug02", path=str(mpnn),
                                    cluster_list="other_clusters.pkl"),
    }
    return d, cfgs


def _sample(d, cfgs, *structures, chains=()):
    argv = ["sample", d / "run", "--structures", *[d / s for s in structures], "--out", d / "designs.fasta"]
    return argv + (["--chains", *chains] if chains else [])


CASES = [
    # reed sample: backbones that cannot be designed
    pytest.param(lambda d, c: (_sample(d, c, "noca.pdb"), ["noca.pdb", "chain A", "no CA atoms"]),
                 id="sample-structure-without-CA-atoms"),
    pytest.param(lambda d, c: (_sample(d, c, "no_o.pdb"), ["no_o.pdb", "chain A", "complete N/CA/C/O backbone"]),
                 id="sample-no-complete-backbone-residue"),
    pytest.param(lambda d, c: (_sample(d, c, "4GYT_noB.pdb"), ["4GYT_noB.pdb", "chain B", "--chains"]),
                 id="sample-one-chain-without-CA"),
    pytest.param(lambda d, c: (_sample(d, c, "garbage.pdb"), ["garbage.pdb"]), id="sample-binary-pdb"),
    pytest.param(lambda d, c: (_sample(d, c, "garbage.cif"), ["garbage.cif", "atom_site"]), id="sample-garbage-cif"),
    pytest.param(lambda d, c: (_sample(d, c, "empty_dir"), ["empty_dir"]), id="sample-empty-directory"),
    pytest.param(lambda d, c: (_sample(d, c, "absent.pdb"), ["absent.pdb"]), id="sample-missing-file"),
    pytest.param(lambda d, c: (_sample(d, c, "4GYT_noB.pdb", chains=["Z"]), ["4GYT_noB.pdb", "'Z'"]),
                 id="sample-absent-chain"),
    # reed evaluate FASTA: designs that do not match their native structure
    pytest.param(lambda d, c: (["evaluate", d / "noca.fasta"], ["noca.pdb", "chain A", "no CA atoms"]),
                 id="evaluate-native-without-CA-atoms"),
    pytest.param(lambda d, c: (["evaluate", d / "garbage.fasta"], ["garbage.fasta"]), id="evaluate-binary-fasta"),
    pytest.param(lambda d, c: (["evaluate", d / "short.fasta"], ["short.fasta", "5L33_A", "106"]),
                 id="evaluate-design-length-differs"),
    pytest.param(lambda d, c: (["evaluate", d / "otherchain.fasta"], ["otherchain.fasta", "5L33_B"]),
                 id="evaluate-chain-not-in-source"),
    pytest.param(lambda d, c: (["show-config", c["allbad"], "objective.method=sra"],
                               ["objective.self_align", "protein runs", "EMA model"]),
                 id="config-self-alignment-not-for-proteins"),
    # reed train: data sets that leave nothing to train on, and the pdb_2021aug02 chain/cluster lists
    pytest.param(lambda d, c: (["train", c["allbad"], "--out", d / "r_allbad"],
                               ["allbad", "noca.pdb: chain A: no CA atoms", "garbage.pdb"]),
                 id="train-every-structure-invalid"),
    pytest.param(lambda d, c: (["train", c["empty_dir"], "--out", d / "r_empty"], ["empty_dir", "no structure files"]),
                 id="train-empty-directory"),
    pytest.param(lambda d, c: (["train", c["chain_list_dir"], "--out", d / "r_cl"],
                               ["protein.data.chain_list", "pdb_2021aug02"]), id="train-chain-list-on-directory"),
    pytest.param(lambda d, c: (["train", c["no_chain_list"], "--out", d / "r_ncl"],
                               ["absent.csv", "protein.data.chain_list"]), id="train-chain-list-missing"),
    pytest.param(lambda d, c: (["train", c["binary_chain_list"], "--out", d / "r_bcl"], ["list_filtered.csv"]),
                 id="train-chain-list-not-csv"),
    pytest.param(lambda d, c: (["train", c["no_cluster_list"], "--out", d / "r_nkl"],
                               ["cluster_seq_dict_removeX.pkl", "protein.data.cluster_list"]),
                 id="train-cluster-list-missing"),
    pytest.param(lambda d, c: (["train", c["object_pickle"], "--out", d / "r_obj"], ["object.pkl", "datetime"]),
                 id="train-cluster-list-pickle-with-objects"),
    pytest.param(lambda d, c: (["train", c["disjoint_clusters"], "--out", d / "r_dis"],
                               ["list.csv", "cluster list"]), id="train-cluster-list-disjoint-from-split"),
]


@pytest.mark.parametrize("case", CASES)
def test_refuses(case, bad, refuses):
    d, cfgs = bad
    argv, names = case(d, cfgs)
    (d / "designs.fasta").unlink(missing_ok=True)
    refuses(argv, *names)
    assert not (d / "designs.fasta").exists()  # no design of an unusable backbone is ever written
    if argv[0] == "train":
        assert not (Path(argv[-1]) / "checkpoints").exists()  # refused before step 0
