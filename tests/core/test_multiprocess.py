"""Two CPU processes (torchrun + gloo): DDP training with projectors, and sharded sampling equal to one process."""

import json
import os
import re
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


NAN_ON_ONE_RANK = r'''
import os, sys
import torch
from reed.config import load_config
from reed.errors import NonFiniteLossError
from reed.processes.flow import FlowProcess
from reed.train import train

rank, real, calls = int(os.environ["RANK"]), FlowProcess.loss, {"n": 0}

def poisoned(pred, target):  # rank 1's loss of step 2 is NaN; rank 0's stays finite
    calls["n"] += 1
    out = real(pred, target)
    return out * float("nan") if rank == 1 and calls["n"] == 3 else out

FlowProcess.loss = staticmethod(poisoned)
cfg = load_config(sys.argv[1], sys.argv[2:-1])
try:
    train(cfg, sys.argv[-1])
except NonFiniteLossError as e:
    print(f"rank {rank} stopped: {e}", flush=True)
    sys.exit(0)
sys.exit(f"rank {rank} did not stop")
'''


def test_a_nan_in_one_process_stops_every_process_at_the_same_step(tmp_path):
    """The first non-finite step is agreed over processes before anyone raises: no process is left waiting."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 255, (64, 8, 8), dtype=np.uint8), labels=np.arange(64) % 4)
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_ON_ONE_RANK)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
           str(ROOT / "configs" / "demo.yaml"), "image.data.name=npz", f"image.data.path={tmp_path / 'd.npz'}",
           "targets=[]", "objective.method=sit", "train.steps=8", "train.batch_size=16", "train.log_every=4",
           "train.checkpoint_every=4", "train.progress=false", "train.sample_every=0",
           f"train.cache_dir={tmp_path / 'c'}", str(tmp_path / "run")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = sorted(re.findall(r"rank \d stopped: .*?(?:yet|step_\d+)", p.stdout))  # torchrun interleaves the two
    assert len(lines) == 2, p.stdout
    assert lines[0].startswith("rank 0 stopped: loss became non-finite at step 2 (checked at step 3") and \
        "in another process" in lines[0]
    assert lines[1].startswith("rank 1 stopped: loss became nan at step 2 (checked at step 3")
    assert list((tmp_path / "run" / "checkpoints").glob("step_*")) == []  # the first would have come after step 2
