"""3D molecules end to end through the CLI on real QM9 molecules: fit an encoder, REED training whose loss falls,
resume that reproduces, sampling to SDF (+ grid), evaluation."""

import json
from pathlib import Path

import pytest
import yaml

from reed.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("molecule")
    cfg = yaml.safe_load(Path("configs/molecule_qm9_reed.yaml").read_text())
    cfg["molecule"]["data"].update(path=str(shared_data / "qm9_test.npz"), limit=150, atom_budget=500)
    cfg["molecule"]["model"] = {"preset": "egnn-small"}
    cfg["molecule"]["sample"] = {"steps": 8, "grid": "log", "eta": 1.0}
    cfg["molecule"].update(eval_every=0, eval_num=6)
    cfg["targets"][0].update(path=str(root / "encoder"), depth=3, projector_dim=64)
    cfg["molecule"]["fit"] = {"width": 32, "steps": 20, "lr": 1e-3}
    cfg["objective"]["curriculum"] = {"unit": "epoch", "gen_warmup": 0}
    cfg["train"].update(epochs=6, lr=2e-3, lr_warmup=0, ema_decay=0.0, log_every=1, checkpoint_every=0,
                        progress=False, cache_dir=str(root / "cache"))
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit-encoder", str(path)]) == 0
    assert (root / "encoder" / "encoder.safetensors").is_file()
    return root, path


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_train_loss_falls_and_resume_reproduces(setup):
    root, cfg = setup
    run = root / "run"
    assert main(["train", str(cfg), "--out", str(run)]) == 0
    recs = _records(run)
    spe = len(recs) // 6
    assert spe >= 2 and len(recs) == 6 * spe
    first = sum(r["loss_gen"] for r in recs[:spe]) / spe
    last = sum(r["loss_gen"] for r in recs[-spe:]) / spe
    assert last < 0.8 * first, (first, last)
    assert recs[-1]["align/mol"] < recs[0]["align/mol"]
    assert {"gen/coords", "gen/types", "gen/bonds", "gen/charges"} <= set(recs[0])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    # the recipe's type vocabulary is the reference's 18 tokens (PAD, MASK, the 16 elements)
    assert saved["molecule"]["elements"][:7] == ["<PAD>", "<MASK>", "H", "C", "N", "O", "F"]
    assert len(saved["molecule"]["elements"]) == 18

    # interrupted and resumed, with the batches collated in 2 data-loader workers: the same curve
    run2 = root / "run2"
    main(["train", str(cfg), f"train.checkpoint_every={spe * 2}", "train.workers=2", "--out", str(run2),
          "--stop-at", str(spe * 2)])
    assert main(["train", str(cfg), f"train.checkpoint_every={spe * 2}", "train.workers=2", "--out", str(run2),
                 "--resume"]) == 0
    again = _records(run2)
    assert [r["step"] for r in again] == [r["step"] for r in recs]
    for a, b in zip(recs, again):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]


def test_sample_sdf_grid_and_evaluate(setup):
    root, _ = setup
    run = root / "run"
    if not (run / "checkpoints").is_dir():
        pytest.skip("needs the trained run of the previous test")
    out = root / "mols.sdf"
    assert main(["sample", str(run), "--num", "6", "--out", str(out)]) == 0
    for suffix in (".sdf", ".npz", ".png", ".json"):
        assert out.with_suffix(suffix).is_file(), suffix
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["num"] == 6 and settings["steps"] == 8
    res_path = root / "eval.json"
    assert main(["evaluate", str(out), "--run", str(run), "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert res["n_molecules"] == 6
    assert res["aromatic_rule"] == "reference"  # the run's molecule.aromatic_rule (the recipe's)
    for k in ("atom_stability", "molecule_stability", "validity"):
        assert 0.0 <= res[k] <= 1.0
    assert main(["sample", str(run), "--num", "2", "--out", str(root / "mols.png")]) == 2  # not .sdf: clear error


def test_encoder_free_dispersive_term_trains_on_molecules(setup):
    """The dispersive loss on the last message-passing layer's atom states (padding excluded), beside REED's
    alignment: encoder-free terms join any method."""
    root, cfg = setup
    run = root / "disp"
    assert main(["train", str(cfg), "objective.dispersive.coeff=0.25", "train.epochs=1", "--out", str(run)]) == 0
    recs = _records(run)
    assert recs and all(-10 < r["dispersive"] <= 0 for r in recs) and "align/mol" in recs[0]
