"""Reliability as a figure: kill training with SIGKILL at random moments, resume each time, compare with the
uninterrupted run.

One uninterrupted reference run, then a faulty run of the same config that is killed ``--kills`` times and resumed
(``reed train --resume``) after each kill until it finishes. Half of the kills come at a uniformly random moment of
the process's life (start-up, target preparation, training, saving); the other half wait for a checkpoint save to
begin (its temporary directory appears in ``checkpoints/``) and kill a random 0-3 ms later, i.e. inside the save.
A kill counts as "inside a save" when the save's temporary directory was there after the process died.

Recorded: kills, kills inside a save, exit codes of every resume (a resume that fails is a lost run), whether the
final loss curve (every logged value of every step) and the final model/EMA/optimizer tensors equal the uninterrupted
run's bit for bit, the bytes of temporary leftovers found after each kill (removed by the next start) and the bytes
left behind at the end.

    python benchmarks/faults.py [--kills 20] [--steps 120] [--seed 0] [--out benchmarks/results]

Writes ``<out>/faults.json`` and ``<out>/faults.png``. Run it alone (it measures correctness, not speed, but a
busy machine makes it slow).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def overrides(work: Path, steps: int) -> list[str]:
    """The demo's REED config (fitted-encoder tokens + MiniLM caption, curriculum) shrunk to run in seconds, with
    a checkpoint every 4 steps so that many kills land in saves."""
    return [f"targets.0.path={work / 'encoder'}", f"train.cache_dir={work / 'cache'}", f"train.steps={steps}",
            "train.batch_size=32", "train.checkpoint_every=4", "train.keep_checkpoints=2", "train.sample_every=0",
            "train.log_every=1", "train.progress=false", "objective.curriculum.gen_warmup=20", "train.lr_warmup=5"]


def reed(*args: str) -> list[str]:
    return [sys.executable, "-m", "reed.cli", *args]


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def temps(run: Path) -> list[Path]:
    from reed.io import stale_temps

    return [p for root in (run, run / "checkpoints") for p in stale_temps(root)]


def size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def kill_at_random(cmd: list[str], delay: float) -> tuple[int, bool]:
    """Start ``cmd``, SIGKILL it after ``delay`` s (unless it ended); (exit code, killed)."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=delay)
        return proc.returncode, False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.returncode, True


def kill_in_save(cmd: list[str], ck_dir: Path, rng: random.Random, timeout: float) -> tuple[int, bool]:
    """Start ``cmd`` and SIGKILL it 0-3 ms after a checkpoint's temporary directory appears."""
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < t_end:
        try:
            if any(e.name.startswith(".step_") and e.is_dir() for e in os.scandir(ck_dir)):
                time.sleep(rng.uniform(0, 0.003))
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return proc.returncode, True
        except FileNotFoundError:
            pass
        time.sleep(0.0002)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.returncode, True
    return proc.returncode, False


def curve(run: Path) -> list[dict]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return [{k: v for k, v in r.items() if k != "time"} for r in recs]


def same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        if set(ta) != set(tb) or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = result["events"]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for kind, marker, colour in (("random", "o", "tab:blue"), ("save", "x", "tab:red")):
        xs = [i for i, e in enumerate(ev) if e["mode"] == kind]
        ys = [ev[i]["resumed_from_step"] for i in xs]
        label = "kill at a random moment" if kind == "random" else "kill inside a save"
        ax.scatter(xs, ys, marker=marker, c=colour, label=label)
    ax.set_xlabel("kill")
    ax.set_ylabel("checkpoint step resumed from")
    s = result["summary"]
    ax.set_title(f"{s['kills']} kills ({s['kills_inside_save']} inside a save): curve identical "
                 f"{s['curve_bit_identical']}, left behind {s['bytes_left_behind']} B", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="reed_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    ov = overrides(work, a.steps)

    subprocess.run(reed("fit-encoder", str(DEMO), *ov, "image.fit.steps=40"), env=env(), check=True,
                   stdout=subprocess.DEVNULL)
    ref, run = work / "reference", work / "faulty"
    t0 = time.perf_counter()
    subprocess.run(reed("train", str(DEMO), *ov, "--out", str(ref)), env=env(), check=True, stdout=subprocess.DEVNULL)
    ref_wall = time.perf_counter() - t0

    events, failures = [], []
    first, restarts = True, 0
    while len(events) < a.kills:
        # the preemptible-job pattern: always --resume (a start without a checkpoint begins at step 0)
        cmd = reed("train", str(DEMO), *ov, "--out", str(run), "--resume")
        ck = run / "checkpoints"
        from reed.checkpoint import resolve_checkpoint

        try:
            resumed = int(resolve_checkpoint(run).name.split("_")[1]) if not first else 0
        except Exception:
            resumed = 0
        mode = "save" if len(events) % 2 else "random"
        if mode == "random":
            rc, killed = kill_at_random(cmd, rng.uniform(0.5, ref_wall))
        else:
            rc, killed = kill_in_save(cmd, ck, rng, timeout=3 * ref_wall)
        first = False
        if not killed:
            if rc != 0:
                failures.append({"event": len(events), "exit_code": rc})
            if rc == 0:
                # finished before the kill: start the faulty run again so every kill interrupts something
                shutil.rmtree(run)
                first = True
                restarts += 1
            continue
        left = temps(run)
        events.append({"mode": mode, "resumed_from_step": resumed, "inside_save": any(p.is_dir() for p in left),
                       "leftover_bytes": sum(size(p) for p in left)})
    # finish: resume until done
    cmd = reed("train", str(DEMO), *ov, "--out", str(run), "--resume")
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if proc.returncode != 0:
        failures.append({"event": "final", "exit_code": proc.returncode, "stderr": proc.stderr[-500:]})
    a_curve, b_curve = curve(ref), curve(run)
    identical = a_curve == b_curve
    from reed.checkpoint import resolve_checkpoint

    tensors_identical = same_tensors(resolve_checkpoint(ref), resolve_checkpoint(run))
    left_behind = sum(size(p) for p in temps(run))
    summary = {
        "kills": len(events),
        "kills_inside_save": sum(e["inside_save"] for e in events),
        "failed_resumes": len(failures),
        "curve_bit_identical": identical,
        "final_tensors_bit_identical": tensors_identical,
        "steps_compared": len(b_curve),
        "max_leftover_bytes_after_a_kill": max((e["leftover_bytes"] for e in events), default=0),
        "bytes_left_behind": left_behind,
        "runs_finished_before_a_kill": restarts,
    }
    result = {
        "benchmark": "faults",
        "settings": {"config": "configs/demo.yaml", "overrides": [o.replace(str(work), "<work>") for o in ov],
                     "kills": a.kills, "steps": a.steps, "seed": a.seed, "reference_wall_s": round(ref_wall, 2),
                     "python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
        "summary": summary, "failures": failures, "events": events,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "faults.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
