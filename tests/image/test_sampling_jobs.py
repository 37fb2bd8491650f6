"""`reed sample` as a sharded, resumable job: results independent of the number of processes."""

import json
from pathlib import Path

import numpy as np
import pytest

from reed.config import load_config
from reed.errors import CheckpointError
from reed.image.generate import generate
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_cache):
    d = tmp_path_factory.mktemp("sjob")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["objective.method=sit", "train.steps=3", "train.batch_size=32",
                                                       "train.progress=false", f"train.cache_dir={digits_cache}"])
    train(cfg, d / "run")
    return d / "run"


def test_processes_and_resume_give_identical_samples(run, tmp_path):
    kw = dict(num=10, batch_size=4, sampler="euler", steps=3, progress=False)
    one = generate(run, out=tmp_path / "one.npz", **kw)
    a = np.load(tmp_path / "one.npz")
    assert a["arr_0"].shape == (10, 8, 8, 1) and a["arr_1"].tolist() == [i % 10 for i in range(10)]
    assert one["num_processes"] == 1 and one["batch_size"] == 4
    # two processes: chunks 1 (of 0..2) belong to process 1, which writes parts and returns
    r1 = generate(run, out=tmp_path / "two.npz", process_index=1, num_processes=2, **kw)
    assert r1 == {"chunks_done": 1, "chunks_skipped": 0}
    generate(run, out=tmp_path / "two.npz", process_index=0, num_processes=2, **kw)
    assert np.array_equal(np.load(tmp_path / "two.npz")["arr_0"], a["arr_0"])
    # interrupted job: one chunk lost -> rerun recomputes only it and packs the same result
    generate(run, out=tmp_path / "three.npz", keep_parts=True, **kw)
    parts = tmp_path / "three.npz.parts"
    (parts / "chunk_000001.npy").unlink()
    generate(run, out=tmp_path / "three.npz", keep_parts=True, **kw)
    assert np.array_equal(np.load(tmp_path / "three.npz")["arr_0"], a["arr_0"])
    # a different job may not reuse those parts
    with pytest.raises(CheckpointError, match="different sampling job"):
        generate(run, out=tmp_path / "three.npz", **{**kw, "steps": 4})


def test_random_labels_recorded_and_seeded(run, tmp_path):
    rec = generate(run, out=tmp_path / "r.npz", num=20, batch_size=8, labels="random", seed=3, steps=2,
                   sampler="sde", cfg_scale=2.0, guidance=(0.0, 0.5), progress=False)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == rec
    assert (rec["labels"], rec["sampler"], rec["cfg_scale"], rec["guidance_high"], rec["seed"]) == (
        "random", "sde", 2.0, 0.5, 3)
    y = np.load(tmp_path / "r.npz")["arr_1"]
    assert len(set(y.tolist())) > 3
    generate(run, out=tmp_path / "r2.npz", num=20, batch_size=8, labels="random", seed=3, steps=2, sampler="sde",
             cfg_scale=2.0, guidance=(0.0, 0.5), progress=False)
    assert np.array_equal(np.load(tmp_path / "r2.npz")["arr_0"], np.load(tmp_path / "r.npz")["arr_0"])


def test_evaluate_in_domain_via_cli(run, tmp_path, capsys):
    from reed.cli import main

    assert main(["sample", str(run), "--num", "30", "--steps", "2", "--out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "s.npz"), "--run", str(run), "--out", str(tmp_path / "ev.json")]) == 0
    res = json.loads((tmp_path / "ev.json").read_text())
    ind = res["in_domain"]
    assert ind["num_samples"] == 30 and ind["fd"] > 0 and 0 <= ind["accuracy"] <= 1
    assert ind["evaluator_held_out_accuracy"] > 0.9  # the yardstick itself recognises real digits
    assert res["sampling"]["steps"] == 2
    assert main(["evaluate", str(tmp_path / "s.npz")]) == 2
    assert "--ref" in capsys.readouterr().err
