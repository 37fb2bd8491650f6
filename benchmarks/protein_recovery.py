"""Protein benchmark: sequence recovery vs epoch, discrete-diffusion baseline vs REED (the paper's protein curve).

Trains the baseline (``objective.method=baseline``) and REED with the same network, data, epochs and seeds from one
protein recipe, designs sequences for the validation (and training) chains every ``--eval-every`` epochs with the
run's sampler, and plots recovery against epoch. Targets are ESM-2 per-residue embeddings and attention maps
written once by :func:`reed.protein.targets.embed_proteins_esm2` into a protein target store.

Offline (this repository's CI machines) no pretrained ESM-2 can be downloaded: without ``--esm`` the script saves a
*randomly initialised* ESM-2-architecture model and uses its representations — an untrained sequence encoder, so
the run exercises the whole pipeline but says nothing about the value of real ESM-2 targets. On a machine with
the weights pass ``--esm facebook/esm2_t6_8M_UR50D`` (or a local directory).

    python benchmarks/protein_recovery.py           # ../shared/data/pdb, split by sequence (~6 min a run, 2 cores)
    python benchmarks/protein_recovery.py --quick           # fewer epochs
    python benchmarks/protein_recovery.py --config configs/protein_esm2_reed.yaml \\
        --esm facebook/esm2_t33_650M_UR50D --epochs 200 --eval-every 10 protein.data.path=/data/my_pdbs

Writes ``<out>/protein_recovery.json`` (one record per method, seed and evaluation) and ``protein_recovery.png``.
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


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "protein_esm2_reed.yaml"))
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both methods")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pdb"))
    p.add_argument("--esm", default=None, help="ESM-2 hub id or local dir (default: a random-weight ESM-2)")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--quick", action="store_true", help="40 epochs, one seed")
    p.add_argument("--train-recovery", action="store_true",
                   help="also design the training chains at every evaluation (slow on CPU)")
    p.add_argument("--full-model", action="store_true",
                   help="keep the recipe's model and sampler on CPU too (default on CPU: mpnn-small, 50 design steps)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=str(ROOT / ".cache" / "bench_protein"))
    p.add_argument("--plot-only", action="store_true", help="redraw the plot from <out>/protein_recovery.json")
    return p.parse_args()


def method_overrides(method: str, epochs: int) -> list[str]:
    if method == "baseline":
        return ["objective.method=baseline", "objective.curriculum.gen_warmup=0",
                "objective.curriculum.align_decay=constant"]
    # the paper's shape scaled to the run: diffusion warm-up over the first quarter, cosine alignment decay to 0
    return ["objective.method=reed", f"objective.curriculum.gen_warmup={max(epochs // 4, 1)}",
            "objective.curriculum.align_decay=cosine", f"objective.curriculum.align_steps={epochs}"]


def train_eval(cfg, run: Path, train_examples, train_recovery: bool, total_steps: int) -> list[dict]:
    """Train ``cfg`` into ``run`` (its in-training evaluation designs the validation chains) and, with
    ``train_recovery``, add the training chains' recovery at every checkpoint. A finished run is reused."""
    from reed.domains import load_denoiser
    from reed.protein.design import evaluate_split
    from reed.train import train

    done = run / "checkpoints" / f"step_{total_steps:07d}"
    if not done.is_dir():
        train(cfg, run)
    evals = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines() if ln.strip()]
    if not train_recovery:
        return evals
    from reed.checkpoint import list_checkpoints

    by_step = {int(ck.name.split("_")[1]): ck for ck in list_checkpoints(run)}
    for e in evals:
        ck = by_step.get(e["step"])
        if ck is None:
            continue
        model, c, _ = load_denoiser(ck, use_ema=True)
        tr = evaluate_split(model, c, train_examples, seed=cfg.seed)
        e["train/recovery"] = tr["recovery"]
    return evals


def main() -> None:
    args = parse_args()
    if args.plot_only:
        res = json.loads((Path(args.out) / "protein_recovery.json").read_text())
        plot(res["results"], res["info"], Path(args.out) / "protein_recovery.png")
        return
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from reed.config import load_config
    from reed.protein.targets import embed_proteins_esm2, save_random_esm2
    from reed.protein.task import load_splits

    epochs = 40 if args.quick else args.epochs
    seeds = args.seeds[:1] if args.quick else args.seeds
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    esm, esm_note = args.esm, "pretrained"
    if esm is None:
        esm, esm_note = str(save_random_esm2(work / "esm2_random", hidden=64, layers=4, heads=4)), "random weights"
    store = work / f"targets_{Path(esm).name}"
    cpu_small = [] if (torch.cuda.is_available() or args.full_model) else [
        "protein.model.preset=mpnn-small", "protein.sample.steps=50", "protein.data.token_budget=2000"]
    base = [f"protein.data.path={args.data}", f"train.epochs={epochs}", f"protein.eval_every={args.eval_every}",
            "train.checkpoint_every=0", "train.progress=false", *cpu_small, *args.overrides]
    base += [f"targets.{i}.path={store}" for i in range(2)]
    cfg0 = load_config(args.config, base)
    splits = load_splits(cfg0)
    examples = [e for s in ("train", "valid", "test") for e in splits[s].examples]
    embed_proteins_esm2([e.name for e in examples], [e.sequence for e in examples], store, model=esm,
                        progress=False)
    from reed.epochs import EpochBatches

    results: list[dict] = []
    spe_by_seed, splits_by_seed = {}, {}
    t0 = time.time()
    for seed in seeds:
        # the data split depends on the seed: steps per epoch and training chains are taken per seed
        cfg_s = load_config(args.config, base + [f"seed={seed}"])
        splits_by_seed[seed] = split = load_splits(cfg_s)
        spe = EpochBatches(split["train"].batches(cfg_s.protein.data.token_budget), seed=seed, world=1,
                           grad_accum=cfg_s.train.grad_accum).steps_per_epoch
        spe_by_seed[seed] = spe
        for method in ("baseline", "reed"):
            cfg = load_config(args.config, base + method_overrides(method, epochs) +
                              [f"seed={seed}", f"train.checkpoint_every={args.eval_every * spe}",
                               "train.keep_checkpoints=1000"])
            run = work / f"{method}_s{seed}"
            tic = time.time()
            evals = train_eval(cfg, run, split["train"].examples, args.train_recovery, epochs * spe)
            for e in evals:
                results.append({"method": method, "seed": seed, **e})
            print(f"{method} seed {seed}: final valid recovery {evals[-1]['valid/recovery']:.3f} "
                  f"({time.time() - tic:.0f} s)", flush=True)
    splits_info = {s: {k: v.names for k, v in sp.items()} for s, sp in splits_by_seed.items()}
    info = {"data": args.data, "esm": esm if args.esm else None, "esm_weights": esm_note, "epochs": epochs,
            "seeds": seeds, "steps_per_epoch": spe_by_seed, "config": args.config,
            "overrides": cpu_small + args.overrides, "splits": splits_info, "wall_s": round(time.time() - t0, 1),
            "machine": platform.platform(), "threads": torch.get_num_threads()}
    (out / "protein_recovery.json").write_text(json.dumps({"info": info, "results": results}, indent=1) + "\n")
    plot(results, info, out / "protein_recovery.png")
    print(f"wrote {out / 'protein_recovery.json'} and {out / 'protein_recovery.png'}")


def plot(results: list[dict], info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, t) for k, t in (("valid/recovery", "validation chains (unseen sequences)"),
                                  ("train/recovery", "training chains")) if any(k in r for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for method in ("baseline", "reed"):
            rows = [r for r in results if r["method"] == method and key in r]
            seeds = sorted({r["seed"] for r in rows})
            for s in seeds:
                pts = sorted((r["epoch"], r[key]) for r in rows if r["seed"] == s)
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "-o", ms=3, color=COLOURS[method],
                        alpha=0.9 if s == seeds[0] else 0.5, label=method if s == seeds[0] else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("sequence recovery (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Inverse folding on {Path(info['data']).name}: baseline vs REED (ESM-2 targets, "
                 f"{info['esm_weights']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
