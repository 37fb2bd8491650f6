"""Reliability as a figure: kill training with SIGKILL at random moments, resume each time, compare with the
uninterrupted run.

One uninterrupted reference run, then faulty runs of the same config, each killed and resumed (``reed train
--resume``, as a preemptible job would) until it finishes, compared with the reference, and started again, until
``--kills`` kills in all. The kills take turns at three kinds of moment: a uniformly random moment of the
start-up (imports, data, targets, model; before the first step), a uniformly random moment of the remaining
training steps (after the process logged its first step; saves between steps included), and inside a checkpoint
save (waiting for the save's temporary directory to appear in ``checkpoints/``, then a random 0-3 ms).
A kill counts as "inside a save" when the save's temporary directory was there after the process died.

Recorded: kills, kills inside a save, exit codes of every resume (a resume that fails is a lost run), whether the
final loss curve (every logged value of every step) and the final model/EMA/optimizer tensors equal the uninterrupted
run's bit for bit, the bytes of temporary leftovers found after each kill (removed by the next start) and the bytes
left behind at the end.

    python benchmarks/faults.py [--kills 30] [--steps 120] [--seed 0] [--out benchmarks/results]

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
MODES = ("start-up", "save", "training")  # where the kills land, in turn


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


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill(proc: subprocess.Popen) -> tuple[int, bool]:
    """SIGKILL ``proc`` if it still runs; (exit code, whether it was killed)."""
    if proc.poll() is not None:
        return proc.returncode, False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.returncode, True


def kill_at_random(cmd: list[str], delay: float) -> tuple[int, bool]:
    """Start ``cmd``, SIGKILL it after ``delay`` s (unless it ended); (exit code, killed)."""
    proc = _start(cmd)
    try:
        proc.wait(timeout=delay)
        return proc.returncode, False
    except subprocess.TimeoutExpired:
        return _kill(proc)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_in_training(cmd: list[str], metrics: Path, delay: float, timeout: float) -> tuple[int, bool]:
    """Start ``cmd``, wait until it logs its first training step, then SIGKILL it ``delay`` s later."""
    proc = _start(cmd)
    before, t_end = _lines(metrics), time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < t_end:
        if _lines(metrics) > before or (before and _lines(metrics) < before):  # a fresh start rewrites the file
            try:
                proc.wait(timeout=delay)
                return proc.returncode, False
            except subprocess.TimeoutExpired:
                break
        time.sleep(0.002)
    return _kill(proc)


def kill_in_save(cmd: list[str], ck_dir: Path, rng: random.Random, timeout: float) -> tuple[int, bool]:
    """Start ``cmd`` and SIGKILL it 0-3 ms after a checkpoint's temporary directory appears."""
    proc = _start(cmd)
    t_end = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < t_end:
        try:
            if any(e.name.startswith(".step_") and e.is_dir() for e in os.scandir(ck_dir)):
                time.sleep(rng.uniform(0, 0.003))
                return _kill(proc)
        except FileNotFoundError:
            pass
        time.sleep(0.0002)
    return _kill(proc)


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
    for kind, marker, colour in (("start-up", "o", "tab:blue"), ("training", "s", "tab:green"),
                                 ("save", "x", "tab:red")):
        xs = [i for i, e in enumerate(ev) if e["mode"] == kind]
        ys = [ev[i]["newest_checkpoint_after_kill"] for i in xs]
        ax.scatter(xs, ys, marker=marker, c=colour, label=f"kill aimed at: {kind}")
    ax.set_xlabel("kill")
    ax.set_ylabel("newest checkpoint after the kill")
    s = result["summary"]
    ax.set_title(f"{s['kills']} kills ({s['kills_inside_save']} inside a save): curve identical "
                 f"{s['curve_bit_identical']}, left behind {s['bytes_left_behind']} B", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=30)
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
    # once to fill the target cache, so the timed reference starts up as the faulty runs do (from the cache)
    subprocess.run(reed("train", str(DEMO), *ov, "train.steps=1", "--out", str(work / "cache_fill")), env=env(),
                   check=True, stdout=subprocess.DEVNULL)
    t0 = time.perf_counter()
    proc = subprocess.Popen(reed("train", str(DEMO), *ov, "--out", str(ref)), env=env(), stdout=subprocess.DEVNULL)
    startup_s = None  # seconds from the process start to its first logged step, measured on the reference
    while proc.poll() is None:
        if startup_s is None and _lines(ref / "metrics.jsonl") > 0:
            startup_s = time.perf_counter() - t0
        time.sleep(0.002)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit code {proc.returncode})")
    ref_wall = time.perf_counter() - t0
    startup_s = startup_s or ref_wall
    step_s = (ref_wall - startup_s) / a.steps  # training steps with their saves (and the run's final plot)

    from reed.checkpoint import list_checkpoints, resolve_checkpoint

    def compare(cycle: int) -> dict:
        """The finished faulty run against the reference: loss curve and final tensors, leftovers."""
        return {"cycle": cycle, "curve_bit_identical": curve(ref) == curve(run),
                "tensors_bit_identical": same_tensors(resolve_checkpoint(ref), resolve_checkpoint(run)),
                "steps_compared": len(curve(run)), "bytes_left_behind": sum(size(p) for p in temps(run))}

    events, failures, cycles = [], [], []
    # the preemptible-job pattern: always --resume (a start without a checkpoint begins at step 0)
    cmd = reed("train", str(DEMO), *ov, "--out", str(run), "--resume")
    while len(events) < a.kills:
        found = list_checkpoints(run)
        resumed = int(found[-1].name.split("_")[1]) if found else 0
        mode = MODES[len(events) % len(MODES)]
        if mode == "start-up":  # a random moment before the first step: imports, data, targets, model
            rc, killed = kill_at_random(cmd, rng.uniform(0.2, startup_s))
        elif mode == "training":  # a random moment of the remaining steps (and the saves between them)
            rc, killed = kill_in_training(cmd, run / "metrics.jsonl", rng.uniform(0, (a.steps - resumed) * step_s),
                                          timeout=3 * ref_wall)
        else:
            rc, killed = kill_in_save(cmd, run / "checkpoints", rng, timeout=3 * ref_wall)
        if not killed:
            if rc != 0:
                failures.append({"event": len(events), "exit_code": rc})
            else:  # this faulty run finished: compare it, then start the next cycle
                cycles.append(compare(len(cycles)))
                shutil.rmtree(run)
            continue
        left = temps(run)
        after = list_checkpoints(run)
        events.append({"mode": mode, "cycle": len(cycles), "resumed_from_step": resumed,
                       "newest_checkpoint_after_kill": int(after[-1].name.split("_")[1]) if after else 0,
                       "inside_save": any(p.is_dir() for p in left), "leftover_bytes": sum(size(p) for p in left)})
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True)  # finish the last cycle
    if proc.returncode != 0:
        failures.append({"event": "final", "exit_code": proc.returncode, "stderr": proc.stderr[-500:]})
    else:
        cycles.append(compare(len(cycles)))
    summary = {
        "kills": len(events),
        "kills_inside_save": sum(e["inside_save"] for e in events),
        "failed_resumes": len(failures),
        "runs_completed": len(cycles),
        "curve_bit_identical": bool(cycles) and all(c["curve_bit_identical"] for c in cycles),
        "final_tensors_bit_identical": bool(cycles) and all(c["tensors_bit_identical"] for c in cycles),
        "steps_compared": sum(c["steps_compared"] for c in cycles),
        "max_leftover_bytes_after_a_kill": max((e["leftover_bytes"] for e in events), default=0),
        "bytes_left_behind": sum(c["bytes_left_behind"] for c in cycles),
    }
    result = {
        "benchmark": "faults",
        "settings": {"config": "configs/demo.yaml", "overrides": [o.replace(str(work), "<work>") for o in ov],
                     "kills": a.kills, "steps": a.steps, "seed": a.seed, "reference_wall_s": round(ref_wall, 2),
                     "reference_startup_s": round(startup_s, 2),
                     "python": platform.python_version(), "machine": platform.machine(),
                     "cpus": os.cpu_count()},
        "summary": summary, "failures": failures, "cycles": cycles, "events": events,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "faults.png")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
