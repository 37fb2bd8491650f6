"""Molecule benchmark: stability and validity vs training step, flow-matching baseline vs REED, on QM9.

Uses the shared QM9 file (13,083 molecules with hydrogens) divided 90/10 into train/validation, fits the
equivariant encoder that provides REED's targets once (``reed fit-encoder``), trains the baseline and REED with the
same model, data, steps and seed, and every ``--eval-every`` steps samples ``--eval-num`` molecules from the EMA
model (atom counts from the training set) and scores atom/molecule stability, validity, connected validity,
uniqueness and novelty with RDKit.

    python benchmarks/molecule_qm9.py --quick      # egnn-small, 1500 steps each (about 40 min on 2 CPU cores)
    python benchmarks/molecule_qm9.py              # semla-small, 20 epochs each (a GPU is advisable)
    python benchmarks/molecule_qm9.py --preset semla --epochs 300 --eval-every 5000   # the recipe, on a GPU

Writes ``<out>/molecule_qm9.json`` and ``molecule_qm9.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"baseline": "#777777", "reed": "#c8502a"}
METRICS = ("atom_stability", "molecule_stability", "validity", "connected_validity")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both methods")
    p.add_argument("--config", default=str(ROOT / "configs" / "molecule_qm9_reed.yaml"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "qm9_test.npz"))
    p.add_argument("--preset", default=None, help="model preset (default: egnn-small with --quick, else semla-small)")
    p.add_argument("--steps", type=int, default=None, help="training steps per method (quick: 1500)")
    p.add_argument("--epochs", type=int, default=20, help="epochs per method when --steps is not given")
    p.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (quick: 250)")
    p.add_argument("--eval-num", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench_molecule"))
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_flush_denormal(True)
    from reed.config import load_config
    from reed.molecule.cli import fit_encoders
    from reed.train import train

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    preset = args.preset or ("egnn-small" if args.quick else "semla-small")
    steps = args.steps or (1500 if args.quick else None)
    eval_every = args.eval_every or (250 if args.quick else 1000)
    layers = {"egnn-small": 4, "egnn": 9, "semla-small": 6, "semla": 12}[preset]
    base = [f"molecule.data.path={args.data}", f"molecule.model.preset={preset}", f"seed={args.seed}",
            f"molecule.eval_every={eval_every}", f"molecule.eval_num={args.eval_num}",
            f"targets.0.path={work / 'encoder'}", f"targets.0.depth={min(5, layers - 1)}",
            f"train.cache_dir={work / 'cache'}", "train.progress=false", "train.checkpoint_every=0",
            "train.log_every=25", "molecule.fit.steps=1000", "molecule.fit.width=64"]
    if steps:
        # a step budget: the curriculum's 30-epoch ramp becomes the first 10% of the run
        # EMA decay 0.99: with the recipe's 0.999 a few hundred steps leave the EMA weights mostly at their init
        base += ["train.epochs=0", f"train.steps={steps}", "train.lr_warmup=100", "train.lr=1e-3",
                 "train.ema_decay=0.99", "objective.curriculum.unit=step",
                 f"objective.curriculum.gen_warmup={steps // 10}"]
    else:
        base += [f"train.epochs={args.epochs}"]
    base += args.overrides
    cfg_reed = load_config(args.config, base)
    t0 = time.time()
    fit_encoders(cfg_reed)
    fit_s = time.time() - t0
    results, timing = [], {}
    for method in ("baseline", "reed"):
        cfg = load_config(args.config, base + ([] if method == "reed" else ["objective.method=baseline"]))
        run = work / method
        tic = time.time()
        train(cfg, run)
        timing[method] = round(time.time() - tic, 1)
        for ln in (run / "eval.jsonl").read_text().splitlines():
            if ln.strip():
                results.append({"method": method, **json.loads(ln)})
        last = [r for r in results if r["method"] == method][-1]
        print(f"{method}: " + ", ".join(f"{k} {last[k]:.3f}" for k in METRICS if k in last) +
              f" ({timing[method]} s)", flush=True)
    info = {"data": args.data, "preset": preset, "seed": args.seed, "config": args.config, "overrides": base,
            "eval_num": args.eval_num, "encoder_fit_s": round(fit_s, 1), "train_s": timing,
            "machine": platform.platform(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    (out / "molecule_qm9.json").write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    plot(results, info, out / "molecule_qm9.png")
    print(f"wrote {out / 'molecule_qm9.json'} and {out / 'molecule_qm9.png'}")


def plot(results: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    for ax, key in zip(axes, METRICS):
        for method in ("baseline", "reed"):
            pts = [(r["step"], r[key]) for r in results if r["method"] == method and key in r]
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "-o", ms=3, color=COLOURS[method], label=method)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("training step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"QM9 ({info['preset']}, {info['eval_num']} samples per point): flow matching vs REED", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
