"""Yardstick benchmark: steps to a quality level for SiT, REPA and REED on the procedural ``shapes`` world.

Trains ``sit`` (generative loss only), ``repa`` (the fitted encoder's tokens; REPA uses image targets only, so the
config's caption target drops out by itself, :func:`reed.objective.active_terms`) and ``reed`` (tokens + caption
embedding + curriculum: the config as it is) with the same data, model, budget and seeds
(``configs/yardstick_shapes.yaml`` by default). The EMA model is evaluated at log-spaced steps with the shapes
evaluator (:mod:`reed.image.metrics.shapes_eval`: FD in a network trained on the world's own evaluator range,
shape/count accuracy, malformed fraction, total variation of the attributes only the captions name), from the same
noise and the same class-balanced labels for every checkpoint and method.

The field's other methods (``--methods all``, :data:`METHODS`): ``reg`` entangles the fitted encoder's pooled
vector (REG's class token; aligned as one more token of the token target), ``irepa`` (conv projector, spatial
z-score), ``haste`` (REPA stopped at half the budget, HASTE's 250K of 500K; no attention term: the fitted encoder is a
CNN without attention maps), ``sra`` (block 2 through its head to the EMA's block 3 at a less noisy time) and
``disp`` (dispersive loss on the last block), each with its paper's coefficients; no target encoder for sra and disp.
``reed+irepa+reg`` combines options: REED with iREPA's conv projector and spatial z-score on the token target and
REG's entangled pooled vector. ``--only NAME ...`` runs some of them into the same results file (a method added
later, or a pilot with ``--out`` elsewhere); the settings keep the commands of the runs already in the file.

Knowledge effect (the full and long runs): ``repa (own-data encoder)`` and ``reed (own-data encoder)`` use a VICReg
encoder fitted on the generator's own training images (``image.fit.world_size=0``) instead of one fitted on
``image.fit.world_size`` other images of the world. Both encoders are fitted once, before training, into
``<work>/encoders/`` (keyed by the data, fit settings and seed, so a short smoke fit never lands at the config's
encoder path); their fit reports (VICReg loss, linear-probe accuracy) go into the JSON.

Smoothing (:func:`smooth`, the same for every method): each seed's FD curve is replaced by local power laws, the
least-squares line of log FD on log step through 5 consecutive evaluations centred on each point. The FD estimate of
one evaluation scatters by about ±5% (1000 samples, measured: the same checkpoint from three noise seeds) and the
first design read steps to a threshold from two neighbouring evaluations only, so that scatter alone moved them by
up to 15%; the local line averages it over five. The unsmoothed numbers stay in the JSON (``unsmoothed``,
``resolution_unsmoothed``).

Quality levels (fixed from SiT, never per method): threshold k is the largest smoothed FD over the ``sit`` seeds at
25%, 50% and 100% of the budget (each seed's curve interpolated linearly in log-step), so every SiT seed reaches
every threshold within the budget (with SiT's mean FD, half of SiT's own seeds would miss the 100% one).
Steps to threshold: the first step a seed's smoothed curve reaches FD <= threshold, interpolated linearly in log-step
between evaluations (``null`` if never reached; then the method's mean and spread are ``null`` too, the method
stays).
``rel_spread`` = (max - min) / mean over seeds and ``rel_sem`` = std(ddof=1) / sqrt(n) / mean, the standard error of
the mean relative to it. The resolution check reads the issue's "spread <= 10%" as the standard error (the spread that
its remedy, more seeds, shrinks): ``resolution_ok_sem.<fd>`` says whether every method's rel_sem is <= 10%, so that
means 1.3x apart are >= 1.86 standard errors of their log-ratio apart (``resolution_sem.<fd>``: the largest rel_sem).
The range reading stays beside it: ``resolution.<fd>`` is the largest rel_spread over methods and
``resolution_ok.<fd>`` whether every method's rel_spread is <= 10% (no design measured here passes it everywhere).
Speed-ups (``speedup_vs_sit``, ``speedup_vs_repa``: baseline steps / method steps; ``knowledge_effect``: own-data
encoder steps / world encoder steps, > 1 when the encoder's extra knowledge saves steps): the ratio of mean steps,
its spread propagated by *adding the relative spreads* of numerator and denominator (first-order bound for a ratio
of means); seed-paired ratios are listed beside it.

    python benchmarks/yardstick.py --quick    # 800 steps, seeds 0 1 2, sit/repa/reed, 500 samples (~17 min on 2 cores)
    python benchmarks/yardstick.py            # 800 steps, seeds 0-4, 13 x 1500 samples, + own-data encoders (~55 min)
    python benchmarks/yardstick.py --long     # 3000 steps, seeds 0 1 2, + own-data encoders (~84 min; not resolved)
    python benchmarks/yardstick.py --smoke    # 20 steps, 1 seed, 2 evaluations, 64 samples (a test)
    python benchmarks/yardstick.py --quick --methods all   # + reg, irepa, haste, sra, disp, reed+irepa+reg
    python benchmarks/yardstick.py --device cuda --steps 3000 image.data.resolution=32 \\
        image.model.preset=SiT-S/2 image.data.size=50000    # scales up unchanged

Why the full run is 800 steps (issue 12's resolution check): the first full design trained 3000 steps with 3 seeds
(now ``--long``). Its steps to SiT's 50% and 100% quality levels spread by 25% over seeds, because single seeds sit on
a plateau between about 1000 and 1500 steps (the same seed at batch 128 and 256; half the learning rate moves the
plateau into the budget instead of removing it). The full run therefore stops at 800 steps, before the plateau, and
buys the resolution with a larger evaluation (13 evaluations x 1500 samples against the quick run's 6 x 500) and
more seeds (5). What it measures is early training; ``--long`` keeps the later phase, unresolved.

When ``--steps`` differs from the config's ``train.steps`` (3000), the curriculum and the EMA decay are scaled to the
budget (:func:`schedule_overrides`; ``--keep-schedule`` keeps them): with the config's EMA decay of 0.995 a 500-step
run's EMA would still hold 8% of the initial weights at the end.

Time budget (2 CPU cores, SiT-T/4 on 16x16 RGB = 16 tokens, batch 128; measured): training ~12.6 steps/s, ~3 s
set-up per run; sampling ~5000 image-evaluations/s, so one evaluation costs num_samples x sample_steps / 5000 s +
~0.5 s; the first run also fits the shapes evaluator (~100 s), the world encoder (600 VICReg steps on 30k images +
probe, ~120 s), the own-data encoder (~100 s) and embeds the captions (cached under train.cache_dir and ``--work``).
  * full: 25 runs x (800 / 12.6 + 13 x (1500 x 12 / 5000 + 0.5) + 3) s ~ 50 min + ~5 min fits = ~55 min
  * long: 15 runs x (3000 / 12.6 + 13 x (1500 x 12 / 5000 + 0.5) + 3) s ~ 74 min + ~4 min fits = ~78 min
    (13 evaluations from steps/8: the first design's 9 from steps/16 spent 4 of them before SiT's 25% threshold)
  * quick: 9 runs x (800 / 12.6 + 6 x (500 x 10 / 5000 + 0.5) + 3) s ~ 11 min + ~5 min fits = ~16-17 min
(SiT-T/2, 64 tokens, trains at ~3 steps/s here: 3000 steps would take ~17 min per run; use it on a GPU.)

Writes ``<out>/yardstick.json`` (``yardstick_<mode>.json`` for quick, long and smoke; incrementally: an interrupted
benchmark resumes with the runs it has, ``settings.wall_seconds`` adds up the invocations) and the plot
``<out>/yardstick.png`` (``--replot`` redraws both from the JSON).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import sample_euler, steps_to_reach

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "yardstick_shapes.yaml"
OWN = " (own-data encoder)"
#: name -> (objective.method, encoder: "world" | "own" | None, extra overrides in the config's step units)
METHODS: dict[str, tuple[str, str | None, tuple[str, ...]]] = {
    "sit": ("sit", None, ()), "repa": ("repa", "world", ()), "reed": ("reed", "world", ()),
    f"repa{OWN}": ("repa", "own", ()), f"reed{OWN}": ("reed", "own", ()),
    # the peer methods (issue 13), each with its paper's rule mapped onto this model and budget:
    "reg": ("reg", "world", ("@entangle",)),  # the fitted encoder's pooled vector, entangled (see with_entangled)
    "irepa": ("irepa", "world", ()),  # conv 3x3 projector, spatial z-score gamma 0.6 (the preset's auto values)
    "haste": ("haste", "world", ("objective.curriculum.align_stop=1500",)),  # HASTE: stop at 250K of 500K -> half
    # SRA's student block is REPA's (depth 2 here; 8 of 28 in SiT-XL/2), its teacher block 20 of 28 -> 3 of 4
    "sra": ("sra", None, ("objective.self_align.student_depth=2", "objective.self_align.teacher_depth=3")),
    "disp": ("disp", None, ()),  # lambda 0.25, tau 1, the last block (the PyTorch code)
    # a combination (issue 13): REED (tokens + caption + curriculum) with iREPA's conv projector and spatial z-score on
    # the token target and REG's entangled pooled vector ("{enc}": the fitted-encoder target's index)
    "reed+irepa+reg": ("reed", "world", ("@entangle", "targets.{enc}.projector=conv",
                                          "targets.{enc}.target_norm=spatial")),
}
BASE_METHODS = ("sit", "repa", "reed")
PEER_METHODS = ("reg", "irepa", "haste", "sra", "disp", "reed+irepa+reg")
COLOURS = {"sit": "#777777", "repa": "#3a8a55", "reed": "#c8502a", f"repa{OWN}": "#2f6db5",
           f"reed{OWN}": "#9b4dca", "reg": "#d4a017", "irepa": "#17becf", "haste": "#8c564b", "sra": "#e377c2",
           "disp": "#1f1f7a", "reed+irepa+reg": "#e41a1c"}
THRESHOLD_FRACTIONS = (0.25, 0.5, 1.0)
RESOLUTION_LIMIT = 0.10
EVAL_SEED = 2024  # the noise of every evaluation
SMOOTH_WINDOW = 5  # evaluation points per local log-log line of the smoothed FD curve (see smooth)
MODES = {  # steps, seeds, evaluation points from steps/first, samples per evaluation, Euler steps, knowledge variants
    "smoke": dict(steps=20, seeds=[0], evals=2, first=16, num_samples=64, sample_steps=4, knowledge=True),
    "quick": dict(steps=800, seeds=[0, 1, 2], evals=6, first=16, num_samples=500, sample_steps=10, knowledge=False),
    # the resolved design (issue 12): the budget ends before the plateau on which single seeds sit in "long"
    "full": dict(steps=800, seeds=[0, 1, 2, 3, 4], evals=13, first=8, num_samples=1500, sample_steps=12,
                 knowledge=True),
    "long": dict(steps=3000, seeds=[0, 1, 2], evals=13, first=8, num_samples=1500, sample_steps=12, knowledge=True),
}
SAMPLE_BATCH = 250  # images per sampler call (the fastest on 2 CPU cores)


# ------------------------------------------------------------------------------------------------ evaluation


def schedule_overrides(base, steps: int) -> list[str]:
    """Overrides that shrink (or stretch) the config's schedule with the budget when ``steps`` differs from its
    ``train.steps``: the curriculum counts (``gen_start``, ``gen_warmup``, ``align_steps``) in proportion, and
    ``train.ema_decay`` so that the EMA averages the same fraction of the run (1 - decay scales as 1 / steps; the
    decay stays >= 0). The learning-rate warm-up stays (it is about optimizer stability, not the budget). Empty when
    steps are the config's.
    """
    ref = base.train.steps
    if steps == ref:
        return []
    f = steps / ref
    c = base.objective.curriculum
    out = [f"objective.curriculum.{k}={round(getattr(c, k) * f)}" for k in ("gen_start", "gen_warmup", "align_steps")
           if getattr(c, k) > 0]
    return [*out, f"train.ema_decay={max(0.0, 1 - (1 - base.train.ema_decay) / f):.6g}"]


def scale_counts(overrides: tuple[str, ...], steps: int, config_steps: int) -> list[str]:
    """A method's extra overrides with step counts (``curriculum.align_stop``) scaled from the config's
    ``train.steps`` to the budget, like :func:`schedule_overrides`."""
    out = []
    for o in overrides:
        if o.startswith("@"):  # a marker (e.g. @entangle), not an override
            out.append(o)
            continue
        key, _, val = o.partition("=")
        if key == "objective.curriculum.align_stop":
            val = str(max(1, round(int(val) * steps / config_steps)))
        out.append(f"{key}={val}")
    return out


def with_entangled(base, enc_index: int, path: str) -> str:
    """The ``targets=[...]`` override of the ``reg`` runs: the config's targets plus the fitted encoder's pooled
    vector as REG's entangled target (same depth and width as the token target, so it is aligned as one more
    token of it, as REG does with DINOv2's class token)."""
    from reed.config import to_dict

    targets = [to_dict(t) for t in base.targets]
    targets[enc_index]["path"] = path
    ent = {**targets[enc_index], "name": f"{targets[enc_index]['name']}_vector", "kind": "pooled", "entangle": True}
    return "targets=" + json.dumps([*targets, ent])  # JSON is YAML flow syntax


def eval_steps(steps: int, n: int, first: int = 16) -> list[int]:
    """``n`` log-spaced evaluation steps from steps/first to steps (9 points from steps/16, or 13 from steps/8,
    land on steps/4 and steps/2 exactly)."""
    if n <= 1:
        return [steps]
    return sorted({max(1, int(round(x))) for x in np.geomspace(steps / first, steps, n)})


def _earlier_commands(settings: dict, now: str) -> list[str]:
    """The commands that wrote the runs already in a results file (e.g. a method added later with ``--only``)."""
    cmds = [*settings.get("earlier_commands", []), *([settings["command"]] if "command" in settings else [])]
    return [c for i, c in enumerate(cmds) if c != now and c not in cmds[:i]]


def _r(x: float) -> float:
    return round(float(x), 5)


@torch.no_grad()
def evaluate_checkpoints(run: Path, evaluator, num: int, sample_steps: int, device: str, label: str) -> dict:
    """{step: metrics} of every checkpoint's EMA model, from the same noise and class-balanced labels."""
    from reed.checkpoint import list_checkpoints
    from reed.domains import load_denoiser

    out = {}
    for ck in list_checkpoints(run):
        t0 = time.perf_counter()
        model, cfg, _ = load_denoiser(ck, use_ema=True, device=device)
        g = torch.Generator().manual_seed(EVAL_SEED)  # the same noise and labels for every checkpoint and method
        y = torch.arange(num) % cfg.image.model.num_classes
        noise = model.initial_state(num, generator=g)  # for SiT: randn(num, C, H, W); REG: + its vector's noise
        res = evaluator(sample_euler(model, noise, y, sample_steps, device, batch=SAMPLE_BATCH), y)
        step = int(ck.name.split("_")[1])
        out[str(step)] = {"fd": _r(res["fd"]), "accuracy": _r(res["accuracy"]),
                          "attribute_accuracy": {a: _r(v) for a, v in res["attribute_accuracy"].items()},
                          "malformed": _r(res["malformed"]),
                          "attribute_tv": {a: _r(v) for a, v in res["attribute_tv"].items()}}
        print(f"[eval] {label}, step {step}: FD {res['fd']:.4f}, accuracy {res['accuracy']:.3f}, "
              f"malformed {res['malformed']:.3f} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return out


def as_curve(record: dict) -> list[dict]:
    """A seed record's ``curve`` ({step: metrics}) as a list sorted by step, each with its ``step``."""
    return [{"step": int(s), **m} for s, m in sorted(record["curve"].items(), key=lambda kv: int(kv[0]))]


def value_at(curve: list[dict], step: float, key: str = "fd") -> float:
    """``key`` of a curve at ``step``, linear in log-step between evaluations (the nearest end outside them)."""
    pts = [(p["step"], p[key]) for p in curve]
    if step <= pts[0][0]:
        return float(pts[0][1])
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if step <= s1:
            frac = (math.log(step) - math.log(s0)) / (math.log(s1) - math.log(s0))
            return float(v0 + frac * (v1 - v0))
    return float(pts[-1][1])


def smooth(curve: list[dict], window: int = SMOOTH_WINDOW) -> list[dict]:
    """The curve with each FD replaced by a local power law: the least-squares line of log FD on log step through
    ``window`` consecutive evaluations centred on it (shifted inward at the ends, all points if fewer), read at
    its step. A first-order Savitzky-Golay filter in log-log: with 5 points it divides the variance of the FD
    estimate's noise by 5 at the centre (by ~1.7 at the ends), at the price of rounding sharp bends.
    """
    x = np.log([p["step"] for p in curve])
    y = np.log([p["fd"] for p in curve])
    n, w = len(curve), min(window, len(curve))
    out = []
    for i, p in enumerate(curve):
        lo = min(max(0, i - w // 2), n - w)
        xs, ys = x[lo : lo + w], y[lo : lo + w]
        if w < 2 or np.ptp(xs) == 0:
            fd = p["fd"]
        else:
            slope, icept = np.polyfit(xs, ys, 1)
            fd = float(np.exp(icept + slope * x[i]))
        out.append({"step": p["step"], "fd": fd})
    return out


# --------------------------------------------------------------------------------------------------- summary


def thresholds_of(results: dict) -> dict[str, dict]:
    """{key: {value, rule, fraction, step}} from the ``sit`` seeds only (empty until SiT has run)."""
    sit = results["methods"].get("sit", {}).get("seeds", [])
    if not sit:
        return {}
    steps = results["settings"]["steps"]
    out = {}
    for f in THRESHOLD_FRACTIONS:
        v = max(value_at(smooth(as_curve(r)), f * steps) for r in sit)
        out.setdefault(f"{v:.4g}", {"value": v, "fraction": f, "step": f * steps,
                                    "rule": f"max over {len(sit)} sit seed(s) of smoothed FD at {f:.0%} of the budget"})
    return out


def spread(values: list[float | None]) -> dict:
    """{per_seed, mean, rel_spread, rel_sem}: mean, (max - min) / mean (the range reading of the resolution check)
    and the standard error of the mean relative to it, std(ddof=1) / sqrt(n) / mean (the standard-error reading,
    which, unlike the range, shrinks with more seeds), all null if any value is null."""
    ok = bool(values) and all(v is not None for v in values)
    mean = float(np.mean(values)) if ok else None
    rel = float((max(values) - min(values)) / mean) if ok and mean else None
    sem = float(np.std(values, ddof=1) / np.sqrt(len(values)) / mean) if ok and mean and len(values) > 1 else None
    return {"per_seed": [None if v is None else round(v, 2) for v in values],
            "mean": None if mean is None else round(mean, 2), "rel_spread": None if rel is None else round(rel, 4),
            "rel_sem": None if sem is None else round(sem, 4)}


def ratio(num: dict, den: dict, num_seeds: list[int], den_seeds: list[int]) -> dict:
    """num.mean / den.mean with the relative spreads added, its relative standard error (the two means' relative
    standard errors in quadrature: first order, independent seeds) and the seed-paired ratios beside it."""
    pair = {s: (a, b) for s, a in zip(num_seeds, num["per_seed"]) for t, b in zip(den_seeds, den["per_seed"]) if s == t}
    per_seed = [round(a / b, 3) if a is not None and b else None for a, b in pair.values()]
    if num["mean"] is None or not den["mean"]:
        return {"value": None, "rel_spread": None, "rel_sem": None, "per_seed": per_seed, "seeds": list(pair)}
    sems = (num.get("rel_sem"), den.get("rel_sem"))
    rel_sem = None if None in sems else round(math.hypot(*sems), 4)
    return {"value": round(num["mean"] / den["mean"], 3), "rel_spread": round(num["rel_spread"] + den["rel_spread"], 4),
            "rel_sem": rel_sem, "per_seed": per_seed, "seeds": list(pair)}


def summary_rules() -> dict[str, object]:
    """The rules :func:`summarise` applies, for ``settings`` (rewritten by ``--replot`` with the summary)."""
    return {
        "smoothing": f"log FD: least-squares line on log step through {SMOOTH_WINDOW} consecutive evaluations centred "
                     "on each (shifted inward at the ends); thresholds and steps to them from the smoothed curves, "
                     "the unsmoothed steps beside them",
        "threshold_rule": "max over the sit seeds of smoothed FD at "
                          + ", ".join(f"{f:.0%}" for f in THRESHOLD_FRACTIONS)
                          + " of the budget (log-step interpolation); never per method",
        "threshold_fractions": list(THRESHOLD_FRACTIONS),
        "steps_to_threshold_rule": "first step with smoothed FD <= threshold, linear in log-step between evaluations",
        "rel_spread": "(max - min) / mean over seeds", "resolution_limit": RESOLUTION_LIMIT,
        "rel_sem": "std(ddof=1) / sqrt(n) / mean over seeds",
        "resolution_check": "range reading: resolution_ok (every method's rel_spread <= limit); "
                            "standard-error reading: resolution_ok_sem (every method's rel_sem <= limit, so two "
                            "means 1.3x apart differ by >= ln 1.3 / (sqrt 2 x 0.10) = 1.86 standard errors of their "
                            "log-ratio)",
        "speedup_spread": "relative spreads of the two means added (seed-paired ratios listed as per_seed); rel_sem: "
                          "the two relative standard errors in quadrature",
    }


def summarise(results: dict) -> None:
    """Fill thresholds, steps_to_threshold, final metrics, resolution and the speed-up ratios in ``results``."""
    methods = results["methods"]
    thr = thresholds_of(results)
    results["thresholds"] = thr
    floor = results.get("floor", {}).get("fd")
    for v in thr.values():
        v["above_floor"] = None if floor is None else bool(v["value"] > floor)
    for m in methods.values():
        seeds = m["seeds"]
        curves = [as_curve(r) for r in seeds]
        m["seed_list"] = [r["seed"] for r in seeds]
        m["steps_to_threshold"] = {}
        for key, t in thr.items():
            reach = [steps_to_reach(smooth(c), t["value"]) for c in curves]
            rec = spread(reach)
            rec["reached_at_first_eval"] = any(r is not None and r == c[0]["step"] for r, c in zip(reach, curves))
            rec["unsmoothed"] = spread([steps_to_reach(c, t["value"]) for c in curves])
            m["steps_to_threshold"][key] = rec
        last = [c[-1] for c in curves]
        m["final"] = {"step": last[0]["step"], "fd_mean": _r(np.mean([p["fd"] for p in last])),
                      "fd_per_seed": [p["fd"] for p in last],
                      "accuracy_mean": _r(np.mean([p["accuracy"] for p in last])),
                      "malformed_mean": _r(np.mean([p["malformed"] for p in last])),
                      "attribute_tv_mean": {a: _r(np.mean([p["attribute_tv"][a] for p in last]))
                                            for a in last[0]["attribute_tv"]}} if last else {}
    ran = [m for m in methods.values() if m["seeds"]]
    for name in ("resolution", "resolution_ok", "resolution_unsmoothed", "resolution_sem", "resolution_ok_sem"):
        results[name] = {}
    for key in thr:
        recs = [m["steps_to_threshold"][key] for m in ran]
        for stat, worst, ok in (("rel_spread", "resolution", "resolution_ok"),
                                ("rel_sem", "resolution_sem", "resolution_ok_sem")):
            vals = [r.get(stat) for r in recs]  # null where a method never reached the threshold
            results[worst][key] = max([v for v in vals if v is not None], default=None)
            results[ok][key] = bool(vals) and all(v is not None and v <= RESOLUTION_LIMIT for v in vals)
        raw = [r["unsmoothed"]["rel_spread"] for r in recs]
        results["resolution_unsmoothed"][key] = max([v for v in raw if v is not None], default=None)

    def ratios(base: str, names) -> dict:
        if base not in methods:
            return {}
        b = methods[base]
        return {n: {key: ratio(b["steps_to_threshold"][key], methods[n]["steps_to_threshold"][key], b["seed_list"],
                               methods[n]["seed_list"]) for key in thr} for n in names if n in methods and n != base}

    results["speedup_vs_sit"] = ratios("sit", list(methods))
    results["speedup_vs_repa"] = ratios("repa", list(methods))
    results["knowledge_effect"] = {
        m: {key: ratio(methods[m + OWN]["steps_to_threshold"][key], methods[m]["steps_to_threshold"][key],
                       methods[m + OWN]["seed_list"], methods[m]["seed_list"]) for key in thr}
        for m in ("repa", "reed") if m in methods and m + OWN in methods}


def report(results: dict) -> list[str]:
    """One line per threshold: mean steps to it (and their rel_spread) per method, the resolution check."""
    lines = []
    for key, t in results["thresholds"].items():
        parts = []
        for name, m in results["methods"].items():
            r = m["steps_to_threshold"].get(key)
            if m["seeds"] and r is not None:
                parts.append(f"{name} {r['mean']:.0f} (±{r['rel_spread']:.0%})" if r["mean"] is not None
                             else f"{name} not reached")
        sem_ok = results.get("resolution_ok_sem", {}).get(key)
        ok = ("range: " + ("resolved" if results["resolution_ok"][key] else "NOT resolved (> 10% or not reached)")
              + "; standard error: " + ("resolved" if sem_ok else "NOT resolved"))
        lines.append(f"[steps to FD <= {key} (sit@{t['fraction']:.0%})] " + ", ".join(parts) + f"; {ok}")
    for base in ("sit", "repa"):
        for name, per in results.get(f"speedup_vs_{base}", {}).items():
            vals = [f"{k}: {v['value']:.2f}x (±{v['rel_spread']:.0%})" for k, v in per.items()
                    if v["value"] is not None]
            if vals:
                lines.append(f"[speed-up of {name} vs {base}] " + ", ".join(vals))
    return lines


def _ratio_cell(v: dict) -> str:
    """A speed-up as a table cell: the ratio of means, its summed relative spreads and its relative standard error."""
    if v["value"] is None:
        return "—"
    se = "" if v.get("rel_sem") is None else f"; s.e. {v['rel_sem']:.0%}"
    return f"{v['value']:.2f}× (±{v['rel_spread']:.0%}{se})"


def markdown(results: dict) -> str:
    """The README's tables from a results file: steps to each threshold per method (mean, spread) with the
    resolution check, then the speed-ups against SiT and REPA (ratio of means, summed relative spreads)."""
    methods = {n: m for n, m in results["methods"].items() if m["seeds"]}
    thr = results["thresholds"]
    head = ("| FD threshold (from SiT) | " + " | ".join(methods)
            + " | range ≤ 10% for all? | standard error ≤ 10% for all? |")
    lines = [head, "|" + "---|" * (len(methods) + 3)]

    def check(ok: bool | None, worst: float | None) -> str:
        return ("**yes**" if ok else "no") + ("" if worst is None else f" (max {worst:.1%})")

    for key, t in thr.items():
        cells = []
        for m in methods.values():
            r = m["steps_to_threshold"][key]
            se = "" if r.get("rel_sem") is None else f"; s.e. {r['rel_sem']:.1%}"  # none from a single seed
            cells.append("not reached" if r["mean"] is None else f"{r['mean']:.0f} ({r['rel_spread']:.1%}{se})")
        ranges = check(results["resolution_ok"][key], results["resolution"][key])
        sems = check(results.get("resolution_ok_sem", {}).get(key), results.get("resolution_sem", {}).get(key))
        lines.append(f"| {float(key):.0f} (SiT at {t['fraction']:.0%}) | " + " | ".join(cells)
                     + f" | {ranges} | {sems} |")
    lines += ["", "| speed-up (steps of the baseline / steps of the method) | " + " | ".join(
        f"FD {float(k):.0f}" for k in thr) + " |", "|" + "---|" * (len(thr) + 1)]
    for base in ("sit", "repa"):
        for name, per in results.get(f"speedup_vs_{base}", {}).items():
            if name == "sit":
                continue
            cells = [_ratio_cell(v) for v in per.values()]
            lines.append(f"| {name} vs {base} | " + " | ".join(cells) + " |")
    for name, per in results.get("knowledge_effect", {}).items():
        cells = [_ratio_cell(v) for v in per.values()]
        lines.append(f"| {name}: world encoder vs own-data encoder | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plot


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    panels = (("fd", "FD vs training step (lower is better)", lambda p: p["fd"]),
              ("accuracy", "class accuracy of samples (shape x count)", lambda p: p["accuracy"]),
              ("attr", "attribute accuracy (mean of shape, count)",
               lambda p: float(np.mean(list(p["attribute_accuracy"].values())))),
              ("tv", "caption-only attributes: mean TV to the world (lower is better)",
               lambda p: float(np.mean(list(p["attribute_tv"].values())))))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    for name, m in results["methods"].items():
        curves = [as_curve(r) for r in m["seeds"]]
        if not curves:
            continue
        st = [p["step"] for p in curves[0]]
        ls = "--" if name.endswith(OWN) else "-"
        label = f"{name} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        for i, (ax, (_, _, get)) in enumerate(zip(axes.flat, panels)):
            vals = np.array([[get(p) for p in c] for c in curves])
            if i == 0:  # FD: the evaluations as dots, the smoothed curves (what the thresholds read) as the line
                ax.plot(st, vals.mean(0), "o", color=COLOURS.get(name), ms=3)
                ax.plot(st, np.mean([[p["fd"] for p in smooth(c)] for c in curves], 0), ls, color=COLOURS.get(name),
                        label=label)
            else:
                ax.plot(st, vals.mean(0), "o" + ls, color=COLOURS.get(name), ms=3, label=label)
            ax.fill_between(st, vals.min(0), vals.max(0), color=COLOURS.get(name), alpha=0.15)
    ax = axes.flat[0]
    for key, t in results.get("thresholds", {}).items():
        ax.axhline(t["value"], color="#777777", ls=":", lw=1)
        ax.text(0.01, t["value"], f"FD {key} (sit@{t['fraction']:.0%})", fontsize=7, va="bottom",
                transform=ax.get_yaxis_transform())
    floor = results.get("floor", {}).get("fd")
    if floor is not None:
        ax.axhline(floor, color="black", ls="--", lw=0.8)
        ax.text(0.01, floor, "real images (floor)", fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
    ax.set_yscale("log")
    ax.set_ylabel("Fréchet distance (dots: evaluations; lines: smoothed)")
    evals = results["settings"]["eval_steps"]
    for ax, (_, title, _) in zip(axes.flat, panels):
        ax.set_xscale("log")
        ax.set_xticks(evals, [str(x) for x in evals], fontsize=6 if len(evals) > 9 else 7)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    s = results["settings"]
    fig.suptitle(f"{Path(s['config']).name}: {s['model']}, batch {s['batch_size']}, {s['steps']} steps, "
                 f"{s['num_samples']} samples, {s['device']} — mean and min/max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- run


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fit_encoders(config: str, overrides: list[str], roles: list[str], work: Path, target_index: int,
                 previous: dict) -> dict:
    """Fit (or reuse) the ``world`` and/or ``own`` encoders; {role: fit report + path, fit images, seconds} (the
    seconds of the fit itself: kept from ``previous`` when an encoder fitted earlier is reused)."""
    from reed.config import load_config, to_dict
    from reed.image.cli import cmd_fit_encoder

    out = {}
    for role in roles:
        extra = ["image.fit.world_size=0"] if role == "own" else []
        cfg = load_config(config, [*overrides, "train.progress=false", *extra])
        im = cfg.image
        path = work / "encoders" / f"{role}-{_key([to_dict(im.data), to_dict(im.fit), cfg.seed, role])}"
        cfg = load_config(config, [*overrides, "train.progress=false", *extra, f"targets.{target_index}.path={path}"])
        report = path / "fit_report.json"
        fit_now = not report.is_file()
        t0 = time.perf_counter()
        cmd_fit_encoder(argparse.Namespace(force=fit_now), cfg)
        seconds = time.perf_counter() - t0
        if not fit_now and previous.get(role, {}).get("path") == str(path):
            seconds = previous[role]["seconds"]
        n = cfg.image.fit.world_size
        out[role] = {**json.loads(report.read_text()), "path": str(path),
                     "fitted_on": f"{n} world images (encoder range)" if n > 0 else
                     f"the generator's {cfg.image.data.size} training images",
                     "fit_images": n if n > 0 else cfg.image.data.size, "fit_steps": cfg.image.fit.steps,
                     "seconds": round(seconds, 1), "fitted_by_this_invocation": fit_now}
        print(f"[fit] {role} encoder: linear-probe accuracy {out[role]['linear_probe_accuracy']:.3f} "
              f"({out[role]['fitted_on']}, {out[role]['seconds']:.0f}s)", flush=True)
    return out


def machine() -> dict:
    """The machine a result came from; CPU kernels differ by instruction set, so fits on two machines differ."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "cpu": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(), "gpu": gpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(DEFAULT_CONFIG))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="800 steps, sit/repa/reed only (<= 20 min, 2 cores)")
    mode.add_argument("--smoke", action="store_true", help="20 steps, 1 seed, 2 evaluations, 64 samples (a test)")
    mode.add_argument("--long", action="store_true",
                      help="3000 steps, 3 seeds, + own-data encoder variants (not resolved: seeds plateau, ~84 min)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: per mode)")
    ap.add_argument("--evals", type=int, default=None,
                    help="log-spaced evaluations up to steps (from steps/16 in quick, steps/8 in full and long)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--num-samples", type=int, default=None, help="samples per evaluation (class-balanced)")
    ap.add_argument("--sample-steps", type=int, default=None, help="Euler steps per sample (default: per mode)")
    ap.add_argument("--keep-schedule", action="store_true",
                    help="keep the config's curriculum and EMA decay when --steps differs from train.steps")
    know = ap.add_mutually_exclusive_group()
    know.add_argument("--knowledge", dest="knowledge", action="store_true", default=None,
                      help="also run repa/reed with the own-data encoder (default in full, long and smoke)")
    know.add_argument("--no-knowledge", dest="knowledge", action="store_false")
    ap.add_argument("--methods", choices=("base", "all"), default="base",
                    help="base: sit, repa, reed (issue 12); all: + reg, irepa, haste, sra, disp (writes "
                         "yardstick_methods*.json)")
    ap.add_argument("--only", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                    help="run only these of the chosen methods (a pilot of a design change, e.g. --only sit "
                         "--out /tmp/pilot train.batch_size=256)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--work", default=str(ROOT / ".cache" / "reed" / "yardstick"), help="run dirs and encoders")
    ap.add_argument("--replot", action="store_true", help="recompute the summary and plot of the results file")
    ap.add_argument("--markdown", action="store_true", help="print the results file's tables as markdown")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (key.sub=value)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.set_flush_denormal(True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from reed.config import load_config
    from reed.image.metrics.shapes_eval import shapes_evaluator
    from reed.train import train

    name = "smoke" if args.smoke else "quick" if args.quick else "long" if args.long else "full"
    defaults = MODES[name]
    steps = args.steps or defaults["steps"]
    seeds = args.seeds or defaults["seeds"]
    num = args.num_samples or defaults["num_samples"]
    sample_steps = args.sample_steps or defaults["sample_steps"]
    evals = eval_steps(steps, args.evals or defaults["evals"], defaults["first"])
    knowledge = defaults["knowledge"] if args.knowledge is None else args.knowledge
    chosen = BASE_METHODS + (PEER_METHODS if args.methods == "all" else ())
    methods = [m for m in METHODS if m in chosen or (knowledge and m.endswith(OWN))]
    if args.only:
        methods = [m for m in methods if m in args.only] or list(args.only)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    stem = "yardstick" + ("_methods" if args.methods == "all" else "")
    res_path = out / (f"{stem}.json" if name == "full" else f"{stem}_{name}.json")
    if args.markdown:
        print(markdown(json.loads(res_path.read_text())))
        return
    if args.replot:
        results = json.loads(res_path.read_text())
        rules = {**summary_rules(), "summary_recomputed_by": "--replot (curves as measured, rules as above)"}
        results["settings"] = dict(sorted({**results["settings"], **rules}.items()))
        summarise(results)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        plot(results, res_path.with_suffix(".png"))
        return

    base = load_config(args.config, args.overrides)
    if base.image.data.name != "shapes":
        raise SystemExit(f"the yardstick needs image.data.name=shapes (its evaluator knows that world), "
                         f"got {base.image.data.name!r}")
    enc_index = [i for i, t in enumerate(base.targets) if t.source == "fitted_encoder"]
    if len(enc_index) != 1:
        raise SystemExit(f"the yardstick needs exactly one target with source fitted_encoder, found {len(enc_index)}")
    schedule = [] if args.keep_schedule else schedule_overrides(base, steps)
    identity = {"config": args.config, "overrides": args.overrides, "steps": steps, "eval_steps": evals,
                "num_samples": num, "sample_steps": sample_steps, "schedule_overrides": schedule}
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    if {k: results.get("settings", {}).get(k) for k in identity} != identity:
        results = {}
    prev_wall = results.get("settings", {}).get("wall_seconds", 0.0)
    results.setdefault("methods", {})
    for m in methods:
        results["methods"].setdefault(m, {"seeds": []})
    results["settings"] = {
        **identity, "command": shlex.join([sys.executable, *sys.argv]), "mode": name, "seeds": seeds,
        "earlier_commands": _earlier_commands(results.get("settings", {}), shlex.join([sys.executable, *sys.argv])),
        "methods": {**results.get("settings", {}).get("methods", {}),  # the methods of earlier runs into this file
                    **{m: {"objective.method": METHODS[m][0], "encoder": METHODS[m][1],
                           "overrides": scale_counts(METHODS[m][2], steps, base.train.steps)} for m in methods}},
        "eval_points": len(evals), "eval_spacing": f"log, steps/{defaults['first']} .. steps",
        "sampler": f"euler {sample_steps} steps, no CFG, EMA weights",
        "schedule_rule": "none (--keep-schedule or the config's steps)" if not schedule else
                         f"config schedule scaled by {steps}/{base.train.steps}: curriculum counts in proportion, "
                         "1 - ema_decay inversely (the lr warm-up kept)",
        "config_steps": base.train.steps, "labels": "class-balanced (i mod K)",
        "eval_noise_seed": EVAL_SEED,
        "model": base.image.model.preset, "batch_size": base.train.batch_size, "resolution": base.image.data.resolution,
        "train_size": base.image.data.size, "encoder_world_size": base.image.fit.world_size,
        "encoder_fit_steps": base.image.fit.steps, "device": args.device, "machine": machine(),
        "torch": torch.__version__, "wall_seconds": prev_wall, **summary_rules(),
    }
    results["settings"] = {k: results["settings"][k] for k in sorted(results["settings"])}

    def save() -> None:
        results["settings"]["wall_seconds"] = round(prev_wall + time.perf_counter() - t_start, 1)
        summarise(results)
        res_path.write_text(json.dumps(results, indent=1) + "\n")
        if any(m["seeds"] for m in results["methods"].values()):
            plot(results, res_path.with_suffix(".png"))

    ev = shapes_evaluator(base.image.data, base.train.cache_dir)
    results["floor"] = {"fd": _r(ev.fd_floor(num)), "num_samples": num,
                        "definition": f"FD of {num} held-out real images against the reference set",
                        "held_out_accuracy": {k: _r(v) for k, v in ev.held_out_accuracy.items()}}
    print(f"[evaluator] held-out accuracy {results['floor']['held_out_accuracy']}, FD floor "
          f"{results['floor']['fd']:.4f} ({num} real images)", flush=True)
    roles = sorted({METHODS[m][1] for m in methods} - {None}, key=["world", "own"].index)
    results["encoders"] = fit_encoders(args.config, args.overrides, roles, work, enc_index[0],
                                       results.get("encoders", {}))
    save()

    common = [f"train.steps={steps}", "train.sample_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=0",
              "train.progress=false", "train.log_every=50"]
    plan = [(m, s) for s in seeds for m in methods]
    for m, seed in plan:
        label = f"{m}, seed {seed}"
        if any(r["seed"] == seed for r in results["methods"][m]["seeds"]):
            print(f"[skip] {label}: already in {res_path}", flush=True)
            continue
        method, enc, more = METHODS[m]
        extra = ["targets=[]"] if enc is None else [f"targets.{enc_index[0]}.path={results['encoders'][enc]['path']}"]
        if "@entangle" in more:
            extra = [with_entangled(base, enc_index[0], results["encoders"][enc]["path"])]
        extra += scale_counts(tuple(o.replace("{enc}", str(enc_index[0])) for o in more if o != "@entangle"), steps,
                              base.train.steps)
        run_dir = work / "runs" / f"{m.replace(OWN, '-own')}_seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = load_config(args.config, [*schedule, *args.overrides, *common, f"objective.method={method}",
                                        f"seed={seed}", *extra])
        t0 = time.perf_counter()
        train(cfg, run_dir, checkpoint_steps=evals)
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        curve = evaluate_checkpoints(run_dir, ev, num, sample_steps, args.device, label)
        t_eval = time.perf_counter() - t0
        rec = {"seed": seed, "train_seconds": round(t_train, 1), "steps_per_second": round(steps / t_train, 2),
               "eval_seconds": round(t_eval, 1), "curve": curve}
        results["methods"][m]["seeds"] = sorted([*results["methods"][m]["seeds"], rec], key=lambda r: r["seed"])
        save()
        shutil.rmtree(run_dir, ignore_errors=True)
        last = curve[str(steps)]
        print(f"[done] {label}: train {t_train:.0f}s ({steps / t_train:.1f} steps/s), eval {t_eval:.0f}s, "
              f"final FD {last['fd']:.4f}, accuracy {last['accuracy']:.3f}", flush=True)
    save()
    for line in report(results):
        print(line)
    print(f"wrote {res_path} and {res_path.with_suffix('.png')} ({results['settings']['wall_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
