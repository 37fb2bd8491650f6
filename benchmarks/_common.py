"""Pieces shared by the benchmarks (``convergence.py``, ``yardstick.py``, ``gpu_check.py``, ``data_overlap.py``); not a
benchmark itself.

Imported as ``from _common import ...``: the benchmarks run as scripts, so their own folder is on ``sys.path``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, labels: torch.Tensor, steps: int, device: str,
                 batch: int = 500) -> torch.Tensor:
    """Class-conditional samples of a SiT from ``noise`` (``model.initial_state(N)``): Euler ODE, ``steps`` steps, no
    guidance, ``batch`` images at a time; (N,C,H,W) float32 on the CPU, clamped to [-1, 1]."""
    from reed.sampling import sample

    xs = []
    for i in range(0, len(noise), batch):
        out = sample(model.velocity, noise[i : i + batch].to(device), labels[i : i + batch].to(device),
                     sampler="euler", steps=steps, null_class=model.null_class)
        xs.append(model.image_of(out).float().clamp(-1, 1).cpu())
    return torch.cat(xs)


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """First step where FD <= target, log-linearly interpolated between evaluations (None if never)."""
    prev = None
    for p in curve:
        if p["fd"] <= target:
            if prev is None or prev["fd"] <= target:
                return float(p["step"])
            a, b = math.log(prev["step"]), math.log(p["step"])
            frac = (prev["fd"] - target) / (prev["fd"] - p["fd"])
            return float(math.exp(a + frac * (b - a)))
        prev = p
    return None


def logged_steps_per_second(run: Path) -> float:
    """Training steps/s of a run from its ``metrics.jsonl`` ``time`` fields (wall time since the previous logged
    record), leaving out the first two records: step 0 and the interval after it, which hold start-up, warm-up
    (compilation) and the data-loader workers' start."""
    from reed.train import read_jsonl

    recs = read_jsonl(Path(run) / "metrics.jsonl")[1:]
    secs = sum(r["time"] for r in recs[1:])
    return (recs[-1]["step"] - recs[0]["step"]) / secs if secs > 0 else float("nan")
