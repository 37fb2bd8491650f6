"""Protein inverse folding end to end through the CLI, on real PDB files: ESM-2-style targets into a store,
REED training whose loss falls, resume that reproduces, sequence design to FASTA and its evaluation."""

import json
from pathlib import Path

import pytest
import yaml

from reed.cli import main
from reed.protein.design import read_fasta
from reed.protein.targets import save_random_esm2

FILES = ("5L33.pdb", "6MRR.pdb", "3HTN.pdb")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pdb_dir):
    root = tmp_path_factory.mktemp("protein")
    data = root / "pdbs"
    data.mkdir()
    for f in FILES:
        (data / f).symlink_to(pdb_dir / f)
    esm = save_random_esm2(root / "esm", hidden=16, layers=2, heads=2)
    store = root / "store"
    cfg = yaml.safe_load(Path("configs/protein_esm2_reed.yaml").read_text())
    cfg["protein"]["data"].update(path=str(data), split=[0.6, 0.2, 0.2], token_budget=300)
    cfg["protein"]["model"] = {"preset": "mpnn-small", "learnable_node": True, "update_edge": True}
    cfg["protein"]["sample"] = {"steps": 20, "temperature": 0.1}
    cfg["protein"]["eval_every"] = 0
    for t in cfg["targets"]:
        t["path"] = str(store)
        t["projector_dim"] = 32
    cfg["objective"]["curriculum"] = {"unit": "epoch", "gen_warmup": 0, "align_decay": "cosine", "align_steps": 12}
    cfg["train"].update(epochs=12, log_every=1, checkpoint_every=0, progress=False, lr=2e-3)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["embed-protein", str(path), "--source", "esm2", "--model", str(esm), "--out", str(store)]) == 0
    return root, path, data


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_store_holds_every_chain(setup):
    root, _, _ = setup
    index = json.loads((root / "store" / "index.json").read_text())
    assert len(index["items"]) == 5  # 5L33_A, 6MRR_A, 3HTN_A/B/C
    assert index["targets"] == {"single": 16, "pair": 4}  # hidden 16; 2 layers x 2 heads


def test_train_loss_falls_and_resume_reproduces(setup):
    root, cfg, _ = setup
    run = root / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    recs = _records(run)
    steps_per_epoch = len(recs) // 12
    assert steps_per_epoch >= 2 and len(recs) == 12 * steps_per_epoch
    first = sum(r["loss_gen"] for r in recs[:steps_per_epoch]) / steps_per_epoch
    last = sum(r["loss_gen"] for r in recs[-steps_per_epoch:]) / steps_per_epoch
    assert last < 0.8 * first, (first, last)
    assert recs[-1]["align/single"] < recs[0]["align/single"]
    assert {"align/single", "align/pair", "acc_masked"} <= set(recs[0])
    assert (run / "loss.png").is_file() and (run / "checkpoints" / "latest").exists()

    # interrupted after 5 steps, then resumed, with the batches collated in 2 data-loader workers: the same curve
    run2 = root / "run2"
    main(["train", str(cfg), "train.checkpoint_every=5", "train.workers=2", "--out", str(run2), "--stop-at", "5"])
    assert main(["train", str(cfg), "train.checkpoint_every=5", "train.workers=2", "--out", str(run2),
                 "--resume"]) == 0
    again = _records(run2)
    assert [r["step"] for r in again] == [r["step"] for r in recs]
    for a, b in zip(recs, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["step"]


def test_design_fasta_and_evaluate(setup, pdb_dir, capsys):
    root, _, _ = setup
    run = root / "run"
    if not (run / "checkpoints").is_dir():
        pytest.skip("needs the trained run of the previous test")
    fasta = root / "designs.fasta"
    assert main(["sample", str(run), "--structures", str(pdb_dir / "5L33.pdb"), "--num", "2", "--out",
                 str(fasta)]) == 0
    recs = read_fasta(fasta)
    assert [r["name"] for r in recs] == ["5L33_A", "5L33_A"]
    assert all(len(r["sequence"]) == 106 and set(r["sequence"]) <= set("ACDEFGHIKLMNPQRSTVWY") for r in recs)
    assert recs[0]["fields"]["source"] == str((pdb_dir / "5L33.pdb").resolve())
    capsys.readouterr()
    out = root / "eval.json"
    assert main(["evaluate", str(fasta), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    mean_header = sum(float(r["fields"]["recovery"]) for r in recs) / 2
    assert res["recovery"] == pytest.approx(mean_header, abs=1e-4)  # equal lengths: pooled = mean
    assert res["num_residues"] == 212 and 0.0 <= res["recovery"] <= 1.0

    # a split of the run's data
    out2 = root / "eval_test.json"
    assert main(["evaluate", str(run), "--split", "test", "--out", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    assert res2["num_proteins"] == 1 and res2["perplexity"] > 1.0


def test_design_errors_name_the_input(setup, capsys):
    root, _, _ = setup
    run = root / "run"
    if not (run / "checkpoints").is_dir():
        pytest.skip("needs the trained run")
    assert main(["sample", str(run), "--structures", str(root / "missing.pdb")]) == 2
    assert "missing.pdb" in capsys.readouterr().err
    assert main(["sample", str(run)]) == 2
    assert "--structures" in capsys.readouterr().err


def test_encoder_free_dispersive_term_trains_on_proteins(setup):
    """The dispersive loss (the encoder-free method that applies to any denoiser) on the last decoder layer's
    node states, padded residues excluded; between -log B and 0."""
    root, cfg, _ = setup
    run = root / "disp"
    assert main(["train", str(cfg), "objective.method=disp", "train.epochs=1", "--out", str(run)]) == 0
    recs = _records(run)
    assert recs and all(-10 < r["dispersive"] <= 0 for r in recs) and not any(k.startswith("align/") for k in recs[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objective"]["method"] == "disp" and saved["targets"]  # the targets stay configured, unused
