"""Training throughput with targets read from a precomputed store vs an encoder run online every step.

The reference computes DINOv2 targets inside every training step. reed computes them once (`reed embed`) into a
memory-mapped store. This benchmark trains the same SiT, data and batch both ways, side by side in one run
(interleaved rounds, fresh processes), with a DINOv2 of a real size (random weights; only its cost matters here),
and also records the one-off embedding time.

Data: the sklearn digits rendered as 64x64 RGB (a prepared `reed prepare images` directory made on the fly), so the
DINOv2 input is 56 px = 4x4 patch tokens; SiT-T with patch 16 on pixels gives the same 16 tokens.

    python benchmarks/target_store.py [--encoder-size small|base] [--steps 40] [--repeats 2] [--device cpu|cuda]

Writes benchmarks/results/target_store.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
         "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)}

CHILD = r"""
import json, sys, time, torch
from reed.config import load_config
from reed.train import train
cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))
res = train(cfg, sys.argv[3])
recs = [json.loads(l) for l in open(sys.argv[3] + "/metrics.jsonl") if l.strip()]
steps = recs[-1]["step"] - recs[1]["step"]
print(json.dumps({"steps_per_s": steps / sum(r["time"] for r in recs[2:])}))
"""


def make_data(tmp: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    src = tmp / "raw"
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        folder = src / f"class_{y}"
        folder.mkdir(parents=True, exist_ok=True)
        g = (img / 16 * 255).astype(np.uint8)
        Image.fromarray(np.stack([g] * 3, -1)).resize((64, 64), Image.BICUBIC).save(folder / f"{i:05d}.png")
    from reed.image.prepare import prepare_images

    prepare_images(src, tmp / "images", resolution=64, shard_size=1000, progress=False)
    return tmp / "images"


def make_encoder(tmp: Path, size: str) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=224, patch_size=14, **SIZES[size])).save_pretrained(tmp / "dinov2")
    return tmp / "dinov2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder-size", choices=list(SIZES), default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        images = make_data(tmp)
        enc = make_encoder(tmp, args.encoder_size)
        target = (f"{{name: dinov2, source: encoder, encoder: dinov2-vit-s, path: {enc}, kind: tokens, depth: 2, "
                  f"projector_dim: 256}}")
        base = ["image.data.name=images", f"image.data.path={images}", "image.model.preset=SiT-T/4",
                "image.model.patch_size=16",
                f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.sample_every=0",
                "train.checkpoint_every=0", "train.log_every=5", "train.progress=false", "objective.method=repa",
                f"train.cache_dir={tmp / 'cache'}"]
        cfg_path = str(ROOT / "configs" / "demo.yaml")
        from reed.config import load_config
        from reed.image.targets.embed import embed_target

        cfg = load_config(cfg_path, [*base, f"targets=[{target}]"])
        t0 = time.perf_counter()
        rep = embed_target(cfg, "dinov2", tmp / "store", progress=False, batch_size=128)
        embed_s = time.perf_counter() - t0
        variants = {"online encoder": [f"targets=[{target}]"],
                    "target store": [f"targets=[{target[:-1]}, store: {tmp / 'store'}}}]"]}
        runs: dict[str, list[float]] = {k: [] for k in variants}
        for r in range(args.repeats):
            for name, extra in variants.items():
                proc = subprocess.run([sys.executable, "-c", CHILD, cfg_path, json.dumps([*base, *extra]),
                                       str(tmp / f"run-{r}-{len(runs[name])}-{name[:6]}")], env=env,
                                      capture_output=True, text=True, check=False)
                if proc.returncode:
                    raise RuntimeError(proc.stderr[-3000:])
                sps = json.loads(proc.stdout.strip().splitlines()[-1])["steps_per_s"]
                runs[name].append(sps)
                print(f"round {r} {name}: {sps:.2f} steps/s", flush=True)
    import torch

    best = {k: max(v) for k, v in runs.items()}
    result = {"encoder": f"DINOv2-{args.encoder_size} architecture (random weights), 56 px input, 16 tokens",
              "device": "cuda" if torch.cuda.is_available() else "cpu", "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "batch_size": args.batch_size, "steps": args.steps,
              "examples": rep["count"], "embed_seconds": round(embed_s, 2),
              "steps_per_s": {k: round(v, 3) for k, v in best.items()},
              "steps_per_s_all": {k: [round(x, 3) for x in v] for k, v in runs.items()},
              "speedup_store_vs_online": round(best["target store"] / best["online encoder"], 3)}
    (out / "target_store.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    names = list(best)
    ax.bar(names, [best[n] for n in names], color=["#c52", "#4a7"])
    for i, n in enumerate(names):
        ax.text(i, best[n], f"{best[n]:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("training steps / s")
    ax.set_title(f"targets: online DINOv2-{args.encoder_size} vs store "
                 f"({result['speedup_store_vs_online']:.2f}x; {result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "target_store.png", dpi=110)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
