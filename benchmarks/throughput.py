"""Throughput and peak memory of `sit`, `repa` and `reed` at SiT-S/B sizes on 256-px latents (4x32x32).

Each configuration trains in a fresh process on random latents with stored random targets of the paper's shapes
(DINOv2-B tokens (256, 768) at depth 8; a pooled 3584-d VLM caption embedding at depth 16 for REED — taps are
clamped to the model depth), and reports steps/s and peak memory (CUDA: max allocated; CPU: peak RSS).
Axes: method x model x {eager, torch.compile} x {fp32, bf16}. It also times the samplers (Euler ODE and
Euler–Maruyama SDE, images/s) on the same model.

    python benchmarks/throughput.py                 # full matrix (meant for a GPU)
    python benchmarks/throughput.py --cpu-subset    # what 2 CPU cores can do in ~15 min

Writes benchmarks/results/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
spec = json.loads(sys.argv[1])
torch.set_flush_denormal(True)
from reed.config import load_config
from reed.image.task import build_objective, build_sit_denoiser as build_denoiser, resolve_model_config
from reed.objective import ReedModule
from reed.image.data import load_dataset
from reed.image.targets.prepare import prepare_targets
from dataclasses import replace
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
cfg = load_config(spec["config"], spec["overrides"])
ds = load_dataset(cfg.image.data)
cfg = resolve_model_config(cfg, ds)
tg = prepare_targets([t for t in cfg.targets], ds, cfg.train.cache_dir, progress=False)
cfg = replace(cfg, targets=[replace(t, dim=tg[t.name].dim) for t in cfg.targets])
torch.manual_seed(0)
den = build_denoiser(cfg)
obj = build_objective(cfg)
mod = ReedModule(den, obj.terms, den.hidden_size).to(dev)
opt = torch.optim.AdamW(mod.parameters(), lr=1e-4)
fwd = torch.compile(mod) if spec["compile"] else mod
dtype = torch.bfloat16 if spec["precision"] == "bf16" else None
B = cfg.train.batch_size
idx = torch.arange(B)
x0, y = ds.batch(idx, device=dev)
z = {k: v.get(idx).to(dev) for k, v in tg.items()}
class Wrap(torch.nn.Module):
    def __init__(s): super().__init__(); s.m = fwd; s.projectors = mod.projectors
    def forward(s, *a, **k): return s.m(*a, **k)
w = Wrap()
def step(i):
    with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        loss, _ = obj(w, x0, y, z, 10**6, generator=torch.Generator(device=dev).manual_seed(i))
    loss.backward(); torch.nn.utils.clip_grad_norm_(mod.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
for i in range(spec["warmup"]): step(i)
sync(); t1 = time.perf_counter()
for i in range(spec["steps"]): step(100 + i)
sync(); t2 = time.perf_counter()
res = {"steps_per_s": spec["steps"] / (t2 - t1), "warmup_s": t1 - t0,
       "peak_mem_mib": (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
       "params_m": sum(p.numel() for p in den.parameters()) / 1e6, "device": dev.type}
if spec.get("sampling"):
    from reed.sampling import sample
    den.eval()
    n = spec["sample_batch"]
    noise = torch.randn(n, *x0.shape[1:], device=dev); yy = torch.arange(n, device=dev) % 1000
    for name in ("euler", "sde"):
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            sync(); a = time.perf_counter()
            sample(lambda xx, tt, yv: den(xx, tt, yv)[0], noise, yy, sampler=name, steps=spec["sample_steps"],
                   null_class=den.null_class)
            sync(); res[f"sample_{name}_images_per_s"] = n / (time.perf_counter() - a)
    res["sample_steps"] = spec["sample_steps"]
print(json.dumps(res))
"""


def make_data(tmp: Path, n: int) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(0)
    lat = np.clip(rng.standard_normal((n, 4, 32, 32)) * 0.5, -1, 1).astype(np.float32)
    np.savez(tmp / "lat.npz", images=lat, labels=np.arange(n) % 1000)
    np.save(tmp / "dino.npy", rng.standard_normal((n, 256, 768)).astype(np.float16))
    np.save(tmp / "text.npy", rng.standard_normal((n, 3584)).astype(np.float32))
    return tmp / "lat.npz", tmp / "dino.npy", tmp / "text.npy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-subset", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    cpu = args.cpu_subset
    batch = args.batch_size or (4 if cpu else 64)
    steps = args.steps or (3 if cpu else 20)
    if cpu:
        matrix = [(m, "SiT-S/2", False, "fp32") for m in ("sit", "repa", "reed")]
        matrix += [("reed", "SiT-S/2", False, "bf16"), ("reed", "SiT-S/2", True, "fp32"),
                   ("reed", "SiT-B/2", False, "fp32"), ("sit", "SiT-B/2", False, "fp32")]
    else:
        matrix = list(itertools.product(("sit", "repa", "reed"), ("SiT-S/2", "SiT-B/2"), (False, True),
                                        ("fp32", "bf16")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        lat, dino, text = make_data(tmp, max(batch, 16))
        for method, model, comp, prec in matrix:
            depth = 12
            targets = (f"[{{name: dinov2, source: file, path: {dino}, kind: tokens, depth: {min(8, depth)}}},"
                       f" {{name: text, source: file, path: {text}, kind: pooled, modality: text, "
                       f"depth: {min(16, depth)}, coeff: 0.5}}]")
            spec = {"config": str(ROOT / "configs" / "imagenet256_sit_xl2_reed.yaml"),
                    "overrides": ["image.data.name=npz", f"image.data.path={lat}", f"image.model.preset={model}",
                                  f"targets={targets}",
                                  f"objective.method={method}", f"train.batch_size={batch}",
                                  f"train.cache_dir={tmp / 'cache'}", "image.model.num_classes=1000"],
                    "compile": comp, "precision": prec, "warmup": 2 if comp else 1, "steps": steps,
                    "sampling": method == "sit" and not comp, "sample_batch": 8 if cpu else 64,
                    "sample_steps": 10 if cpu else 50}
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                                  env=env, check=False)
            if proc.returncode:
                print(proc.stderr[-3000:], file=sys.stderr)
                res = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            else:
                res = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"method": method, "model": model, "compile": comp, "precision": prec, "batch_size": batch, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "batch_size": batch,
              "measured_steps": steps, "subset": "cpu" if cpu else "full", "rows": rows}
    (out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "steps_per_s" in r]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.2))
    labels = [f"{r['method']} {r['model']} {'compile' if r['compile'] else 'eager'} {r['precision']}" for r in ok]
    ax.barh(labels, [r["steps_per_s"] for r in ok],
            color=[{"sit": "#777", "repa": "#3a8a55", "reed": "#c8502a"}[r["method"]] for r in ok])
    for i, r in enumerate(ok):
        ax.text(r["steps_per_s"], i, f" {r['steps_per_s']:.3f} steps/s, {r['peak_mem_mib']:.0f} MiB", va="center",
                fontsize=8)
    ax.set_xlabel(f"training steps / s (batch {batch})")
    ax.set_title(f"throughput on {ok[0]['device'] if ok else '?'} ({platform.machine()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)


if __name__ == "__main__":
    main()
