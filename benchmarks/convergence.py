"""Convergence benchmark: does REED train faster than REPA and plain SiT? (the paper's Figure 1, on our data)

Trains ``sit``, ``repa`` and ``reed`` with the same model, data, budget and seeds (the embedded digits demo config by
default), evaluates the EMA model at regular steps with the in-domain evaluator (Fréchet distance in a digits
classifier's feature space, and class accuracy of class-conditional samples; :mod:`reed.image.metrics.indomain`), and
reports quality vs step, the steps each method needs to reach SiT's final quality, and the resulting speed-ups.
A curriculum study (REED with other diffusion warm-up lengths and a decaying alignment weight) runs alongside.

    python benchmarks/convergence.py            # full: 1500 steps, seeds 0 1, + curriculum study (~40 min, 2 cores)
    python benchmarks/convergence.py --quick    # 600 steps, seeds 0 1, no study (~10 min)
    python benchmarks/convergence.py --config configs/my.yaml --steps 20000 --device cuda   # scales up unchanged

Writes ``<out>/convergence.json`` (incrementally: an interrupted benchmark resumes) and ``<out>/convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from _common import sample_euler, steps_to_reach

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sit", "repa", "reed")
COLOURS = {"sit": "#777777", "repa": "#3a8a55", "reed": "#c8502a"}


def study_variants(steps: int) -> dict[str, list[str]]:
    """Curriculum variants of REED (the demo default is a 10% linear diffusion warm-up, constant alignment)."""
    return {
        "reed, no warm-up": ["objective.curriculum.gen_warmup=0"],
        "reed, warm-up 25%": [f"objective.curriculum.gen_warmup={steps // 4}"],
        "reed, cosine align decay": ["objective.curriculum.align_decay=cosine",
                                     f"objective.curriculum.align_steps={steps // 2}"],
    }


@torch.no_grad()
def evaluate_checkpoints(run: Path, evaluator, num: int, sample_steps: int, device: str) -> list[dict]:
    from reed.checkpoint import list_checkpoints
    from reed.domains import load_denoiser

    out = []
    for ck in list_checkpoints(run):
        model, cfg, _ = load_denoiser(ck, use_ema=True, device=device)
        g = torch.Generator().manual_seed(2024)  # the same noise and labels for every checkpoint and method
        y = torch.arange(num) % cfg.image.model.num_classes
        noise = model.initial_state(num, generator=g)
        res = evaluator(sample_euler(model, noise, y, sample_steps, device), y)
        out.append({"step": int(ck.name.split("_")[1]), "fd": round(res["fd"], 5),
                    "accuracy": round(res["accuracy"], 5)})
    return out


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    steps = [p["step"] for p in curves[0]]
    return [{"step": s, "fd": float(np.mean([c[i]["fd"] for c in curves])),
             "fd_min": float(np.min([c[i]["fd"] for c in curves])),
             "fd_max": float(np.max([c[i]["fd"] for c in curves])),
             "accuracy": float(np.mean([c[i]["accuracy"] for c in curves]))} for i, s in enumerate(steps)]


def summarise(results: dict) -> dict:
    runs = results["runs"]
    by_method = {m: [r["curve"] for k, r in runs.items() if r["method"] == m and r["group"] == "main"]
                 for m in METHODS}
    means = {m: mean_curve(c) for m, c in by_method.items() if c}
    if "sit" not in means:
        return {}
    final_sit = means["sit"][-1]
    summary = {"baseline_final_step": final_sit["step"], "baseline_final_fd": final_sit["fd"], "methods": {}}
    for m, curve in means.items():
        reach = steps_to_reach(curve, final_sit["fd"])
        per_seed = [steps_to_reach(c, final_sit["fd"]) for c in by_method[m]]
        summary["methods"][m] = {
            "final_fd": curve[-1]["fd"], "final_fd_seeds": [c[-1]["fd"] for c in by_method[m]],
            "final_accuracy": curve[-1]["accuracy"],
            "steps_to_baseline_final_fd": reach,
            "speedup_vs_sit": (final_sit["step"] / reach) if reach else None,
            "speedup_vs_sit_per_seed": [(final_sit["step"] / r) if r else None for r in per_seed],
        }
    # the paper's view: steps each method needs to match SiT's quality at SiT's own evaluation steps
    # (from the point where SiT's curve starts falling monotonically)
    sit_curve = means["sit"]
    start = max((i for i in range(1, len(sit_curve)) if sit_curve[i]["fd"] > sit_curve[i - 1]["fd"]), default=0)
    summary["speedup_at_sit_quality"] = {
        str(p["step"]): {m: (round(p["step"] / r, 3) if (r := steps_to_reach(c, p["fd"])) else None)
                         for m, c in means.items() if m != "sit"}
        for p in sit_curve[start + 1 :]
    }
    return summary


def replot(results_path: Path) -> None:
    """Recompute the summary and the plot of an existing results file."""
    results = json.loads(results_path.read_text())
    results["summary"] = summarise(results)
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, results_path.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for m in METHODS:
        curves = [r["curve"] for r in runs.values() if r["method"] == m and r["group"] == "main"]
        if not curves:
            continue
        mc = mean_curve(curves)
        st = [p["step"] for p in mc]
        axes[0].plot(st, [p["fd"] for p in mc], "o-", color=COLOURS[m], label=f"{m} (mean of {len(curves)} seeds)")
        axes[0].fill_between(st, [p["fd_min"] for p in mc], [p["fd_max"] for p in mc], color=COLOURS[m], alpha=0.2)
        axes[1].plot(st, [p["accuracy"] for p in mc], "o-", color=COLOURS[m], label=m)
    summ = results.get("summary", {})
    if summ:
        axes[0].axhline(summ["baseline_final_fd"], color="#777777", ls=":", lw=1)
        txt = "\n".join(f"{m}: {v['speedup_vs_sit']:.1f}x faster to SiT's final FD" for m, v in summ["methods"].items()
                        if m != "sit" and v["speedup_vs_sit"])
        axes[0].text(0.02, 0.02, txt, transform=axes[0].transAxes, fontsize=9, va="bottom")
    for key, r in runs.items():
        if r["group"] == "study":
            axes[2].plot([p["step"] for p in r["curve"]], [p["fd"] for p in r["curve"]], "o-", label=key, ms=3)
    main_reed = [r for r in runs.values() if r["method"] == "reed" and r["group"] == "main" and r["seed"] == 0]
    if main_reed:
        axes[2].plot([p["step"] for p in main_reed[0]["curve"]], [p["fd"] for p in main_reed[0]["curve"]], "o-",
                     color=COLOURS["reed"], label="reed (config default), seed 0", ms=3)
    titles = ("in-domain FD vs training step (lower is better)", "class accuracy of samples",
              "curriculum study (REED, seed 0)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log" if results.get("spacing") == "log" else "linear")
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].set_ylabel("Fréchet distance (classifier features)")
    fig.suptitle(f"{Path(results['config']).name} — {results['model']}, batch {results['batch_size']}, "
                 f"{results['device']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--quick", action="store_true", help="600 steps, no curriculum study")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--evals", type=int, default=10, help="evaluations per run")
    ap.add_argument("--spacing", choices=["linear", "log"], default="linear",
                    help="evaluation steps evenly spaced (default) or log-spaced (for long runs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--no-study", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default=str(ROOT / ".cache" / "reed" / "convergence"))
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from reed.config import load_config
    from reed.image.data import load_dataset
    from reed.image.metrics.indomain import evaluator_for
    from reed.train import train

    steps = args.steps or (600 if args.quick else 1500)
    study = not (args.quick or args.no_study)
    # evaluation steps; checkpoints land exactly there
    grid = (np.linspace(steps / args.evals, steps, args.evals) if args.spacing == "linear"
            else np.geomspace(steps / 2 ** (args.evals - 1), steps, args.evals))
    evals = sorted({int(round(x)) for x in grid})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    name = "convergence_quick" if args.quick else "convergence"
    res_path = out / f"{name}.json"
    base = load_config(args.config, args.overrides)
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if results.get("steps") != steps or results.get("evals") != evals or results.get("config") != args.config:
        results = {"runs": {}}
    results.update({"config": args.config, "overrides": args.overrides, "steps": steps, "evals": evals,
                    "spacing": args.spacing,
                    "seeds": args.seeds, "num_samples": args.num_samples, "sample_steps": args.sample_steps,
                    "model": base.image.model.preset, "batch_size": base.train.batch_size, "device": args.device,
                    "platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "metric": "in-domain Fréchet distance (digits classifier features) of EMA samples, Euler "
                              f"{args.sample_steps} steps, no CFG, {args.num_samples} class-balanced samples"})
    ds = load_dataset(base.image.data)
    evaluator = evaluator_for(ds, base.train.cache_dir)
    results["evaluator_held_out_accuracy"] = evaluator.held_out_accuracy
    plan = [(f"{m}, seed {s}", m, s, "main", []) for s in args.seeds for m in METHODS]
    if study:
        plan += [(k, "reed", args.seeds[0], "study", v) for k, v in study_variants(steps).items()]
    common = [f"train.steps={steps}", "train.sample_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=0",
              "train.progress=false", "train.log_every=50"]
    for key, method, seed, group, extra in plan:
        if key in results["runs"]:
            print(f"[skip] {key}: already in {res_path}", flush=True)
            continue
        run_dir = work / key.replace(", ", "_").replace(" ", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(args.config, [*args.overrides, *common, f"objective.method={method}", f"seed={seed}",
                                        *extra])
        t0 = time.perf_counter()
        train(cfg, run_dir, checkpoint_steps=evals)
        t_train = time.perf_counter() - t0
        curve = evaluate_checkpoints(run_dir, evaluator, args.num_samples, args.sample_steps, args.device)
        results["runs"][key] = {"method": method, "seed": seed, "group": group, "overrides": extra,
                                "train_seconds": round(t_train, 1), "curve": curve}
        results["summary"] = summarise(results)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[done] {key}: {t_train:.0f}s, final FD {curve[-1]['fd']:.3f}, acc {curve[-1]['accuracy']:.3f}",
              flush=True)
    results["summary"] = summarise(results)
    res_path.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / f"{name}.png")
    print(json.dumps(results["summary"], indent=1))


if __name__ == "__main__":
    main()
