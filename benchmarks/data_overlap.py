"""Does preparing micro-batches in data-loader workers overlap with training? Steps/s with 0 and 2 workers, side by
side in one run, on two deliberately slow data sources.

* ``image-io``: the digits with SiT-T/4 (REPA's fitted-encoder tokens read from memory), where every step's host
  batch additionally waits ``--latency-ms`` (default 40 ms) before it is returned: a read from slow storage (a network
  file system, an object store), which costs wall time but no CPU.
* ``image-cpu``: the same, but the host batch first computes for ``--latency-ms`` of CPU time (a decode or an
  augmentation): on a machine whose cores the training step already uses, the workers compete with it.
* ``protein``: inverse folding on the shared PDB files (mpnn-small), whose host batches are the real work of
  collating chains into padded tensors (cheap here: the measured host time per step is reported beside it).

Each (source, workers) pair is trained ``--repeats`` times for ``--steps`` steps, the pairs interleaved so that
machine noise hits them alike; steps/s is read from the trainer's own log (the first logged interval, start-up and
the workers' fork, excluded). Reported per source: steps/s of each worker count (mean and min..max over repeats),
the speed-up of 2 workers over 0 with its range, and the host time per step the source costs (measured alone).

    python benchmarks/data_overlap.py [--steps 120] [--repeats 3] [--latency-ms 40] [--out benchmarks/results]

Writes ``<out>/data_overlap.json`` and ``<out>/data_overlap.png``. Run it alone: on 2 cores anything else beside it
changes the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import logged_steps_per_second

ROOT = Path(__file__).resolve().parents[1]


def _slow_image_task(latency_ms: float, kind: str):
    """ImageTask whose host batches first wait ``latency_ms`` (``io``: slow storage, no CPU) or compute for that long
    (``cpu``: thread CPU time, a decode); the workers are forked, so the class need not be importable."""
    from reed.image.task import ImageTask

    class SlowImageTask(ImageTask):
        def host_batches(self, step: int, rank: int, world: int) -> list:
            if kind == "io":
                time.sleep(latency_ms / 1000)
            else:
                t0 = time.thread_time()
                while time.thread_time() - t0 < latency_ms / 1000:
                    pass
            return super().host_batches(step, rank, world)

    return SlowImageTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--latency-ms", type=float, default=40.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import dataclasses

    import reed.domains as domains
    from reed.cli import main as cli
    from reed.config import load_config
    from reed.train import train

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="reed-overlap-"))
    enc = tmp / "encoder"
    assert cli(["fit-encoder", str(ROOT / "configs" / "demo.yaml"), f"targets.0.path={enc}", "image.fit.steps=100",
                "train.progress=false"]) == 0
    common = [f"train.steps={args.steps}", "train.log_every=10", "train.checkpoint_every=0", "train.keep_checkpoints=1",
              "train.progress=false", "train.sample_every=0", f"train.cache_dir={tmp / 'cache'}"]
    sources = {
        "image-io": (ROOT / "configs" / "demo.yaml",
                     [f"targets.0.path={enc}", "objective.method=repa", "train.batch_size=64", *common]),
        "image-cpu": (ROOT / "configs" / "demo.yaml",
                      [f"targets.0.path={enc}", "objective.method=repa", "train.batch_size=64", *common]),
        "protein": (ROOT / "configs" / "protein_esm2_reed.yaml",
                    [f"protein.data.path={Path(args.data) / 'pdb'}", "protein.data.token_budget=600",
                     "protein.model.preset=mpnn-small", "protein.eval_every=0", "objective.method=baseline",
                     "targets=[]", "train.epochs=0", *common]),
    }
    image_spec = domains.get_domain("image")
    slow = {f"image-{k}": dataclasses.replace(image_spec, task=_slow_image_task(args.latency_ms, k))
            for k in ("io", "cpu")}
    results: dict = {name: {str(w): [] for w in args.workers} for name in sources}
    host_ms: dict = {}
    for rep in range(args.repeats):
        for name, (config, overrides) in sources.items():
            for w in args.workers:
                domains.register_domain("image", slow.get(name, image_spec))
                cfg = load_config(config, [*overrides, f"train.workers={w}", f"seed={rep}"])
                run = tmp / f"{name}_{w}_{rep}"
                train(cfg, run)
                sps = logged_steps_per_second(run)
                results[name][str(w)].append(round(sps, 3))
                print(f"[overlap] {name}, {w} workers, repeat {rep}: {sps:.2f} steps/s", flush=True)
                shutil.rmtree(run, ignore_errors=True)
                if rep == 0 and w == args.workers[0]:
                    host_ms[name] = _host_ms(cfg)
    domains.register_domain("image", image_spec)

    summary = {}
    for name, per in results.items():
        base = per[str(args.workers[0])]
        row = {}
        for w, vals in per.items():
            row[w] = {"steps_per_second": vals, "mean": round(statistics.mean(vals), 3),
                      "min": min(vals), "max": max(vals)}
        for w in args.workers[1:]:
            ratios = [a / b for a, b in zip(per[str(w)], base)]
            row[f"speedup_{w}_vs_{args.workers[0]}"] = {"per_repeat": [round(r, 3) for r in ratios],
                                                        "mean": round(statistics.mean(ratios), 3),
                                                        "min": round(min(ratios), 3), "max": round(max(ratios), 3)}
        row["host_ms_per_step"] = host_ms.get(name)
        summary[name] = row
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {"command": " ".join([sys.executable, *sys.argv]), "steps": args.steps,
                        "repeats": args.repeats, "workers": args.workers, "latency_ms": args.latency_ms,
                        "sources": {k: {"config": str(v[0].relative_to(ROOT)), "overrides": v[1]}
                                    for k, v in sources.items()},
                        "rule": "steps/s from the trainer's log, first logged interval excluded; pairs interleaved; "
                                "speed-up per repeat (same seed), then mean and range",
                        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
                        "wall_seconds": round(time.perf_counter() - t_start, 1)},
           "results": summary}
    (out / "data_overlap.json").write_text(json.dumps(res, indent=1) + "\n")
    _plot(res, out / "data_overlap.png")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, row in summary.items():
        sp = row.get(f"speedup_{args.workers[-1]}_vs_{args.workers[0]}", {})
        print(f"{name}: " + ", ".join(f"{w} workers {row[str(w)]['mean']:.2f} steps/s" for w in args.workers)
              + f"; speed-up {sp.get('mean')} ({sp.get('min')}..{sp.get('max')}); host {row['host_ms_per_step']} ms")
    print(f"wrote {out / 'data_overlap.json'} and {out / 'data_overlap.png'}")


def _host_ms(cfg, reps: int = 10) -> float:
    """Milliseconds the source's host_batches take per step, on the main thread alone."""
    from reed.domains import get_task

    task = get_task(cfg)
    task.setup(device=torch.device("cpu"), main_process_first=contextlib.nullcontext, progress=False)
    task.host_batches(0, 0, 1)
    t0 = time.perf_counter()
    for s in range(1, reps + 1):
        task.host_batches(s, 0, 1)
    return round((time.perf_counter() - t0) / reps * 1e3, 2)


def _plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["results"])
    workers = res["settings"]["workers"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(workers)
    for j, w in enumerate(workers):
        means = [res["results"][n][str(w)]["mean"] for n in names]
        lo = [m - res["results"][n][str(w)]["min"] for m, n in zip(means, names)]
        hi = [res["results"][n][str(w)]["max"] - m for m, n in zip(means, names)]
        xs = [i + (j - (len(workers) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width, yerr=[lo, hi], capsize=3, label=f"{w} workers")
    labels = [f"{n}\n(host {res['results'][n]['host_ms_per_step']} ms/step)" for n in names]
    ax.set_xticks(range(len(names)), labels)
    ax.set_ylabel("training steps / s (mean, min..max)")
    ax.set_title(f"data-loader workers, {res['settings']['repeats']} repeats, "
                 f"{res['settings']['machine']['cpu_count']} CPU cores", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
