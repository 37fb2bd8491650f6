"""The trainer's speed options on CPU: torch.compile, activation checkpointing, the resolved worker count and the
finite check without per-step host syncs; each one recorded in the run's config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from reed.config import load_config
from reed.train import train

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo.yaml"


def _cfg(tmp_path: Path, *extra: str):
    return load_config(DEMO, ["targets=[]", "objective.method=sit", "train.batch_size=32", "train.progress=false",
                              "train.sample_every=0", "train.log_every=1", f"train.cache_dir={tmp_path / 'cache'}",
                              "train.checkpoint_every=0", "train.keep_checkpoints=0", *extra])


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_compiled_denoiser_trains_like_the_eager_one_and_keeps_its_checkpoint_keys(tmp_path):
    eager = train(_cfg(tmp_path, "train.steps=4"), tmp_path / "eager").run_dir
    compiled = train(_cfg(tmp_path, "train.steps=4", "train.compile=true"), tmp_path / "compiled").run_dir
    assert _losses(compiled) == pytest.approx(_losses(eager), rel=1e-4, abs=1e-5)
    assert yaml.safe_load((compiled / "config.yaml").read_text())["train"]["compile"] is True
    a = load_file(str(eager / "checkpoints" / "step_0000004" / "model.safetensors"))
    b = load_file(str(compiled / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert a.keys() == b.keys()  # nn.Module.compile in place: no "_orig_mod." prefix; eager tools load it


def test_activation_checkpointing_changes_memory_not_the_curve(tmp_path):
    """SiT blocks recomputed in the backward pass, a tapped hidden state included (the dispersive loss on the
    last block): the same losses to rounding."""
    extra = ("train.steps=4", "objective.method=disp")
    plain = train(_cfg(tmp_path, *extra), tmp_path / "plain").run_dir
    ckpt = train(_cfg(tmp_path, *extra, "train.activation_checkpointing=true"), tmp_path / "ckpt").run_dir
    assert _losses(ckpt) == pytest.approx(_losses(plain), rel=1e-6, abs=1e-7)
    recs = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dispersive"] != 0 for r in recs)


def test_resolved_speed_options_are_recorded_in_the_runs_config(tmp_path):
    run = train(_cfg(tmp_path, "train.steps=2"), tmp_path / "run").run_dir
    saved = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert saved["workers"] == 0  # null resolved: none on CPU
    assert saved["finite_check"] == "log" and saved["tf32"] is True and saved["activation_checkpointing"] is False
