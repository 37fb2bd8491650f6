"""The one-call device check (benchmarks/gpu_check.py): its CPU rehearsal passes every check it can run here,
records what it measured, and a failing check makes it exit 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_dry_run_passes_every_check_it_can_run_on_the_cpu(tmp_path, shared_data):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--data", str(shared_data)])
    res = json.loads((tmp_path / "gpu_dry-run.json").read_text())
    assert rc == 0, res["failed"]
    status = {k: v["status"] for k, v in res["checks"].items()}
    assert status == {"environment": "ok", "image": "ok", "resume": "ok", "compile": "ok", "syncs": "skipped",
                      "protein": "ok", "molecule": "ok", "throughput": "ok"}
    assert res["checks"]["resume"]["exact"] is True  # CPU: the resumed curve is the uninterrupted one, bit for bit
    assert res["checks"]["compile"]["max_abs_loss_difference_vs_eager"] < 1e-3
    row, ckpt = res["throughput"]  # the grid (one size in the dry run), then its largest with checkpointing
    assert row["preset"] == ckpt["preset"] == "SiT-T/4" and [row["activation_checkpointing"],
                                                             ckpt["activation_checkpointing"]] == [False, True]
    assert row["steps_per_second"] > 0 and row["model_tflops_per_step"] > 0
    assert row["mfu"] is None  # no peak FLOP rate for a CPU
    assert 0 < row["steps_per_second_online_target_estimate"] < row["steps_per_second"]
    t = res["targets"]
    assert t["store_read_ms"] > 0 and t["online_dinov2b_ms"] > 0 and t["online_dtype"] == "float32"
    assert res["settings"]["mode"] == "dry-run" and res["settings"]["workers"] == 1


def test_a_failing_check_is_recorded_and_exits_1(tmp_path, monkeypatch):
    def broken(self):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gpu_check.Check, "image", broken)
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--only", "environment", "image", "resume"])
    res = json.loads((tmp_path / "gpu_dry-run.json").read_text())
    assert rc == 1 and res["failed"] == ["image"]
    assert res["checks"]["image"]["error"] == "RuntimeError: planted failure"
    assert res["checks"]["resume"]["status"] == "skipped"  # it needs the image run


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_a_gpu_it_refuses_and_points_at_the_dry_run(capsys):
    assert gpu_check.main(["--out", "/nonexistent"]) == 2
    assert "--dry-run" in capsys.readouterr().err
