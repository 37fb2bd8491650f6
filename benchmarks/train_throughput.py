"""Training throughput of the demo config for `sit`, `repa` and `reed`, side by side in one run.

For each method, a fresh subprocess trains the demo config (same model, data and batch) for a fixed number of
steps and reports steps/s (excluding start-up and target preparation) and peak memory (peak RSS on CPU, peak
allocated on CUDA). Methods are interleaved over ``--repeats`` rounds so machine noise hits them alike.
Targets are prepared (and cached) once before timing, as in real training.

    python benchmarks/train_throughput.py [--steps 200] [--repeats 2] [--out benchmarks/results] [key=value ...]

Writes ``<out>/train_throughput.json`` and ``<out>/train_throughput.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sit", "repa", "reed")

CHILD = r"""
import json, resource, sys, time, torch
from reed.config import load_config
from reed.train import train
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
out = sys.argv[3]
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
res = train(cfg, out)
wall = time.perf_counter() - t0
recs = [json.loads(l) for l in open(out + "/metrics.jsonl") if l.strip()]
# per-record 'time' is the wall time since the previous logged record; skip the first (start-up, warm-up)
steps = recs[-1]["step"] - recs[1]["step"]
secs = sum(r["time"] for r in recs[2:])
peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps({"steps_per_s": steps / secs, "peak_mem_mib": peak, "wall_s": wall,
                  "device": "cuda" if torch.cuda.is_available() else "cpu"}))
"""


def run_child(config: str, overrides: list[str], out: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, config, json.dumps(overrides), out], env=env,
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    sps = [result["methods"][m]["steps_per_s"] for m in methods]
    mem = [result["methods"][m]["peak_mem_mib"] for m in methods]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].bar(methods, sps, color=["#888", "#4a7", "#c52"])
    axes[0].set_ylabel("training steps / s")
    for i, v in enumerate(sps):
        axes[0].text(i, v, f"{v:.2f}\n({v / sps[0]:.2f}x)", ha="center", va="bottom", fontsize=8)
    axes[1].bar(methods, mem, color=["#888", "#4a7", "#c52"])
    axes[1].set_ylabel("peak memory (MiB)")
    fig.suptitle(f"demo config throughput ({result['device']}, batch {result['batch_size']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [f"train.steps={args.steps}", "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=10",
            "train.progress=false", *args.overrides]
    from reed.config import load_config
    from reed.image.data import load_dataset
    from reed.image.targets.prepare import prepare_targets

    cfg = load_config(args.config, base)
    prepare_targets(cfg.targets, load_dataset(cfg.image.data), cfg.train.cache_dir, progress=False)  # cache once
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for m in METHODS:
                res = run_child(args.config, [*base, f"objective.method={m}"], f"{tmp}/{m}-{r}")
                runs[m].append(res)
                print(f"round {r} {m}: {res['steps_per_s']:.2f} steps/s, peak {res['peak_mem_mib']:.0f} MiB",
                      flush=True)
    result = {
        "config": args.config, "overrides": base, "batch_size": cfg.train.batch_size, "model": cfg.image.model.preset,
        "device": runs["sit"][0]["device"], "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "methods": {m: {"steps_per_s": max(x["steps_per_s"] for x in v),
                        "steps_per_s_all": [round(x["steps_per_s"], 3) for x in v],
                        "peak_mem_mib": max(x["peak_mem_mib"] for x in v)} for m, v in runs.items()},
    }
    base_sps = result["methods"]["sit"]["steps_per_s"]
    for m in METHODS:
        result["methods"][m]["relative_to_sit"] = round(result["methods"][m]["steps_per_s"] / base_sps, 3)
    (out / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "train_throughput.png")
    print(json.dumps(result["methods"], indent=2))


if __name__ == "__main__":
    main()
