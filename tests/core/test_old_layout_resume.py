"""A run directory written by reed before domain sections (tests/fixtures/old_layout_run, see its README) still
loads, samples and resumes: the resumed loss curve equals the one the old code wrote without interruption."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reed.config import load_config
from reed.domains import load_denoiser
from reed.train import train

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "old_layout_run"


def _losses(path: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [(r["step"], r["loss"], r["align/caption"]) for r in recs]


def test_old_layout_run_resumes_exactly(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    model, cfg, ckpt = load_denoiser(run)
    assert ckpt.name == "step_0000004" and cfg.image.model.depth == 2 and len(model.blocks) == 2
    resumed_cfg = load_config(run / "config.yaml", [f"train.cache_dir={tmp_path / 'cache'}"])
    res = train(resumed_cfg, run, resume=True)
    assert res.step == 8
    want = _losses(FIXTURE / "metrics_uninterrupted.jsonl")
    assert len(want) == 8 and _losses(run / "metrics.jsonl") == want
