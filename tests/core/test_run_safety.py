"""Runs are never lost: an existing run is not overwritten, resume honours or refuses what changed, checkpoints are
verified, interrupted saves and writes leave nothing that blocks or leaks (issue 11, items 1-5)."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from reed.checkpoint import (
    CHECKSUMS,
    file_sha256,
    list_checkpoints,
    load_weights,
    read_state,
    resolve_checkpoint,
)
from reed.config import load_config
from reed.errors import CheckpointError, ConfigError, NonFiniteLossError
from reed.processes.flow import FlowProcess
from reed.train import read_jsonl, train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def tiny_data(path: Path, seed: int = 0, n: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), labels=np.arange(n) % 4)
    return path


def tiny_args(tmp_path: Path, *extra: str, data: Path | None = None) -> list[str]:
    """A plain-SiT run on 32 random 8x8 images: a few steps take well under a second."""
    data = data or tmp_path / "d.npz"
    if not data.is_file():
        tiny_data(data)
    return ["image.data.name=npz", f"image.data.path={data}", "targets=[]", "objective.method=sit",
            "image.model.preset=SiT-T/4", "train.batch_size=8", "train.progress=false", "train.log_every=1",
            "train.sample_every=0", "train.lr_warmup=0", "train.checkpoint_every=2", "train.keep_checkpoints=0",
            f"train.cache_dir={tmp_path / 'cache'}", *extra]


def tiny(tmp_path: Path, *extra: str, **kw) -> object:
    return load_config(DEMO, tiny_args(tmp_path, *extra, **kw))


def metrics(run: Path) -> list[dict]:
    return read_jsonl(run / "metrics.jsonl")


# ------------------------------------------------------------------------------------------ 1. no silent overwrite


def test_training_into_an_existing_run_is_refused_and_overwrite_replaces_it(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=4"), run)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(config.yaml, metrics.jsonl.*--resume.*--overwrite"):
        train(tiny(tmp_path, "train.steps=2"), run)
    assert (run / "metrics.jsonl").read_text() == before  # untouched
    assert [c.name for c in list_checkpoints(run)] == ["step_0000002", "step_0000004"]
    res = train(tiny(tmp_path, "train.steps=2"), run, overwrite=True)
    assert res.step == 2 and [r["step"] for r in metrics(run)] == [0, 1]
    assert [c.name for c in list_checkpoints(run)] == ["step_0000002"]
    assert resolve_checkpoint(run).name == "step_0000002"


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match=r"run directory .*file is a file"):
        train(tiny(tmp_path, "train.steps=2"), f)


# ------------------------------------------------------------------------------------ 2. resume honours or refuses


def test_resume_takes_the_new_learning_rate(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=4", "train.lr=0.001"), run)
    train(tiny(tmp_path, "train.steps=6", "train.lr=0.00002"), run, resume=True)
    lrs = [r["lr"] for r in metrics(run)]
    assert lrs[:4] == [0.001] * 4 and lrs[4:] == [2e-05, 2e-05]
    state = read_state(resolve_checkpoint(run))
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [2e-05]


def test_resume_takes_the_new_warmup_schedule(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2", "train.lr=0.001", "train.lr_warmup=4"), run)
    train(tiny(tmp_path, "train.steps=4", "train.lr=0.002", "train.lr_warmup=4"), run, resume=True)
    # (s+1)/warm: steps 2, 3 at 3/4 and 4/4 of the new base lr
    assert [r["lr"] for r in metrics(run)] == pytest.approx([0.00025, 0.0005, 0.0015, 0.002])


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=4"), run)
    with pytest.raises(ConfigError, match=r"train.steps=2 is below the step of the checkpoint .*step_0000004 \(4\)"):
        train(tiny(tmp_path, "train.steps=2"), run, resume=True)


def test_resume_on_other_data_is_refused_unless_allowed(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    other = tiny_data(tmp_path / "other.npz", seed=1)
    # the same path with other content: the config matches, the data do not
    tiny_data(tmp_path / "d.npz", seed=1)
    with pytest.raises(ConfigError, match=r"training data differ .*fingerprint.*--allow-data-change"):
        train(tiny(tmp_path, "train.steps=4"), run, resume=True)
    res = train(tiny(tmp_path, "train.steps=4"), run, resume=True, allow_data_change=True)
    assert res.step == 4 and other.is_file()
    assert read_state(resolve_checkpoint(run))["extra"]["data"] != read_state(list_checkpoints(run)[0])["extra"]["data"]


def test_resuming_a_finished_run_adds_nothing(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=4"), run)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with caplog.at_level(logging.WARNING, logger="reed"):
        res = train(tiny(tmp_path, "train.steps=4"), run, resume=True)
    assert res.step == 4 and "already trained to train.steps=4" in caplog.text
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == files


# ---------------------------------------------------------------------------------------- 3. checksums, last good


def test_flipped_bytes_in_weights_name_the_file(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    ck = resolve_checkpoint(run)
    sums = json.loads((ck / CHECKSUMS).read_text())
    assert set(sums) == {"model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json", "config.yaml"}
    assert sums["model.safetensors"] == file_sha256(ck / "model.safetensors")
    path = ck / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF  # inside the last tensor's bytes: safetensors still loads it (as a wrong number)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: .*step_0000002/model.safetensors .*sha256"):
        load_weights(ck, "model")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        train(tiny(tmp_path, "train.steps=4"), run, resume=True)


class _NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a finite loss whose update makes the weights NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.nan


def test_nan_stop_names_the_last_checkpoint_with_finite_weights(tmp_path, monkeypatch):
    real = FlowProcess.loss
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return _NanGrad.apply(out) if calls["n"] == 4 else out  # step 3: finite loss, NaN update

    monkeypatch.setattr(FlowProcess, "loss", staticmethod(poisoned))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"at step 4 .*last good checkpoint: .*step_0000002$"):
        train(tiny(tmp_path, "train.steps=8", "train.grad_clip=0"), run)
    # step 4's checkpoint exists (written after the NaN update) but is marked as not finite
    assert read_state(run / "checkpoints" / "step_0000004")["extra"]["finite"] is False
    assert read_state(run / "checkpoints" / "step_0000002")["extra"]["finite"] is True


@pytest.mark.parametrize("mode", ["log", "step"])
def test_non_finite_loss_stops_before_the_next_checkpoint_in_both_check_modes(tmp_path, monkeypatch, mode):
    """finite_check=log reads the device's record of the first non-finite step at log steps and before each
    checkpoint (no per-step sync); =step at once. Either way no checkpoint after the NaN is written."""
    real = FlowProcess.loss
    calls = {"n": 0}

    def poisoned(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * math.nan if calls["n"] == 5 else out  # step 4's loss is NaN

    monkeypatch.setattr(FlowProcess, "loss", staticmethod(poisoned))
    run = tmp_path / "run"
    later = r" \(checked at step 5, every train.log_every and before each checkpoint\)" if mode == "log" else ""
    with pytest.raises(NonFiniteLossError, match=rf"loss became nan at step 4{later} \(loss_gen=nan.*last good "
                                                 r"checkpoint: .*step_0000003$"):
        train(tiny(tmp_path, "train.steps=9", "train.log_every=100", "train.checkpoint_every=3",
                   f"train.finite_check={mode}"), run)
    assert calls["n"] == (6 if mode == "log" else 5)  # log: the step before the checkpoint boundary still ran
    assert [p.name for p in list_checkpoints(run)] == ["step_0000003"]


# ----------------------------------------------------------------------------------- 4. leftovers, `latest` inside


def test_leftover_temp_checkpoints_are_removed_at_the_next_start(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    leftover = run / "checkpoints" / ".step_0000004.4242-0badcafe.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 100_000)
    stray = run / ".metrics.jsonl.4242-deadbeef.tmp"
    stray.write_text("partial")
    train(tiny(tmp_path, "train.steps=4"), run, resume=True)
    assert not leftover.exists() and not stray.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_0000002", "step_0000004"]


def test_latest_pointing_outside_the_run_is_ignored(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=4"), run)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "state.json").write_text("{}")
    for name in ("../../elsewhere", str(outside), "step_0000004/../../../elsewhere"):
        (run / "checkpoints" / "latest").write_text(name + "\n")
        assert resolve_checkpoint(run) == run / "checkpoints" / "step_0000004"


# ----------------------------------------------------------------------------------- 5. damaged logs and state


def test_partial_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 0.5')  # a crash mid-write
    (run / "eval.jsonl").write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="reed"):
        train(tiny(tmp_path, "train.steps=4"), run, resume=True)
    assert "metrics.jsonl: dropped 1 unreadable line" in caplog.text
    assert "eval.jsonl: dropped 1 unreadable line" in caplog.text
    assert [r["step"] for r in metrics(run)] == [0, 1, 2, 3]


@pytest.mark.parametrize("content, what", [
    ("[1, 2]", "non-negative integer 'step'"),
    ('{"step": "x"}', "non-negative integer 'step'"),
    ('{"step": 2, "optimizer": 5}', "'optimizer' has the wrong type"),
    ('{"step": 2', "Expecting ','"),
])
def test_damaged_state_json_names_the_file(tmp_path, content, what):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    ck = resolve_checkpoint(run)
    (ck / CHECKSUMS).unlink()  # hand-edited: no checksum to catch it first
    (ck / "state.json").write_text(content)
    with pytest.raises(CheckpointError, match=rf"state.json.*{what}"):
        train(tiny(tmp_path, "train.steps=4"), run, resume=True)


def test_damaged_config_yaml_names_the_file(tmp_path):
    run = tmp_path / "run"
    train(tiny(tmp_path, "train.steps=2"), run)
    ck = resolve_checkpoint(run)
    (ck / CHECKSUMS).unlink()
    (ck / "config.yaml").write_bytes(b"\xff\xfe: [unclosed")
    with pytest.raises(CheckpointError, match=r"step_0000002/config.yaml"):
        train(tiny(tmp_path, "train.steps=4"), run, resume=True)


# ------------------------------------------------------------------------------------------ optimizer options


def test_adam_amsgrad_and_linear_warmup_from_a_fraction(tmp_path):
    run = tmp_path / "run"
    cfg = tiny(tmp_path, "train.steps=3", "train.optimizer=adam", "train.amsgrad=true", "train.lr=0.001",
               "train.lr_warmup=2", "train.warmup_from=0.01", "train.weight_decay=0.1")
    train(cfg, run)
    # LinearLR(start_factor=0.01, total_iters=2): 0.01, 0.505, 1.0 of the lr
    assert [r["lr"] for r in metrics(run)] == pytest.approx([1e-5, 5.05e-4, 1e-3])
    groups = read_state(resolve_checkpoint(run))["optimizer"]["param_groups"]
    assert groups[0]["amsgrad"] is True and "decoupled_weight_decay" in groups[0]
    assert groups[0]["decoupled_weight_decay"] is False  # Adam: L2 in the gradient, not AdamW's decoupled decay


def test_resume_without_a_checkpoint_starts_at_step_zero(tmp_path, caplog):
    """A preemptible job always passes --resume: its first start, or a start after a kill before the first
    checkpoint (nothing checkpointed to lose), trains from step 0."""
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="reed"):
        assert train(tiny(tmp_path, "train.steps=2"), run, resume=True).step == 2
    assert "no checkpoint in" in caplog.text and [r["step"] for r in metrics(run)] == [0, 1]
    run2 = tmp_path / "run2"
    train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=10"), run2, stop_at=1)  # no checkpoint yet
    assert train(tiny(tmp_path, "train.steps=4", "train.checkpoint_every=10"), run2, resume=True).step == 4
    assert [r["step"] for r in metrics(run2)] == [0, 1, 2, 3]
