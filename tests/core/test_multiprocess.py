"""Two CPU processes (torchrun + gloo): DDP training with projectors, and sharded sampling equal to one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def test_two_process_training_and_sampling(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), labels=np.arange(64) % 4)
    np.save(tmp_path / "z.npy", rng.standard_normal((64, 16, 8)).astype(np.float32))
    target = f"[{{name: f, source: file, path: {tmp_path / 'z.npy'}, kind: tokens, depth: 1, projector_dim: 8}}]"
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "reed.cli"]
    train = [*torchrun, "train", str(ROOT / "configs" / "demo.yaml"), "image.data.name=npz",
             f"image.data.path={tmp_path / 'd.npz'}", f"targets={target}", "objective.method=repa", "train.steps=4",
             "train.batch_size=16", "train.log_every=1", "train.progress=false", "train.sample_every=0",
             f"train.cache_dir={tmp_path / 'c'}",
             "--out", str(run)]
    p = subprocess.run(train, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and "align/f" in recs[0]
    sample = [*torchrun, "sample", str(run), "--num-samples", "20", "--batch-size", "6", "--steps", "3",
              "--out", str(tmp_path / "two.npz")]
    p = subprocess.run(sample, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from reed.image.generate import generate

    generate(run, num=20, batch_size=6, steps=3, out=tmp_path / "one.npz", progress=False)
    assert np.array_equal(np.load(tmp_path / "two.npz")["arr_0"], np.load(tmp_path / "one.npz")["arr_0"])
    assert json.loads((tmp_path / "two.json").read_text())["num_processes"] == 2
