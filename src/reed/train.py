"""The trainer: HF Accelerate loop with AdamW, clipping, accumulation, mixed precision, EMA, checkpoints, logs.

Run directory::

    <out>/config.yaml      resolved config
    <out>/metrics.jsonl    one JSON object per logged step (step, loss, loss_gen, loss_align, w_gen, w_align,
                           grad_norm, lr, align/<name>, ...)
    <out>/checkpoints/     step_XXXXXXX/ (see reed.checkpoint) and ``latest``
    <out>/samples/         preview grids from the EMA model
    <out>/loss.png         loss breakdown and curriculum weights

Randomness is a pure function of (seed, step, process): the batch order (``batch_indices``) and a per-step
generator for times, noise and label dropout. Together with the saved model/EMA/optimizer/scheduler state this
makes an interrupted and resumed run reproduce the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from reed.checkpoint import (
    atomic_write_text,
    load_into,
    load_optimizer_state,
    load_weights,
    read_config_text,
    read_state,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from reed.config import Config, config_from_yaml_text, dump_config, to_dict
from reed.data.images import batch_indices, load_dataset, to_uint8
from reed.ema import EMA
from reed.errors import ConfigError, NonFiniteLossError
from reed.models.sit import SiT, build_sit, drop_labels
from reed.objective import AlignTerm, Curriculum, Objective, ReedModule, active_terms
from reed.plots import plot_loss_curve, save_image_grid
from reed.processes.flow import FlowProcess
from reed.sampling.samplers import sample as run_sampler
from reed.targets.prepare import prepare_targets

# config sections that must match the checkpoint when resuming (train.* may change, e.g. more steps)
RESUME_MUST_MATCH = ("seed", "data", "model", "process", "targets", "objective")


def resolve_model_config(cfg: Config, ds) -> Config:
    """Fill model.input_size / in_channels / num_classes from the data set; error if they contradict it."""
    c, h, w = ds.shape
    if h != w:
        raise ConfigError(f"images must be square for SiT, got {h}x{w}")
    m = cfg.model
    for key, have in (("input_size", h), ("in_channels", c)):
        val = getattr(m, key)
        if val is not None and val != have:
            raise ConfigError(f"config key 'model.{key}' is {val} but the data set '{ds.name}' has {have}")
    if m.num_classes is not None and m.num_classes < ds.num_classes:
        raise ConfigError(f"config key 'model.num_classes' is {m.num_classes} but the data have {ds.num_classes} "
                          "classes")
    m = replace(m, input_size=h, in_channels=c, num_classes=m.num_classes or ds.num_classes)
    return replace(cfg, model=m)


def build_denoiser(cfg: Config) -> SiT:
    """The SiT described by ``cfg.model`` (input_size/in_channels/num_classes must be resolved)."""
    m = cfg.model
    over = {k: v for k, v in to_dict(m).items() if k != "preset" and v is not None}
    try:
        return build_sit(m.preset, **over)
    except ValueError as e:
        raise ConfigError(f"model config: {e}") from None


def align_terms(cfg: Config) -> list[AlignTerm]:
    """Alignment terms of the config (target ``dim`` must be resolved)."""
    return [AlignTerm(name=t.name, dim=int(t.dim or 0), depth=t.depth, kind=t.kind, coeff=t.coeff,
                      time_weight=t.time_weight, cutoffs=tuple(t.cutoffs), modality=t.modality,
                      projector_dim=t.projector_dim) for t in cfg.targets]


def build_objective(cfg: Config) -> Objective:
    p = cfg.process
    process = FlowProcess(p.path, p.time_sampling, p.lognormal_mean, p.lognormal_std)
    c = cfg.objective.curriculum
    cur = Curriculum(gen_start=c.gen_start, gen_warmup=c.gen_warmup, gen_decay=c.gen_decay,
                     align_decay=c.align_decay, align_steps=c.align_steps, total=cfg.train.steps)
    return Objective(process, align_terms(cfg), method=cfg.objective.method, proj_coeff=cfg.objective.proj_coeff,
                     curriculum=cur)


def _check_depths(cfg: Config, depth: int) -> None:
    for i, t in enumerate(cfg.targets):
        if t.depth > depth:
            raise ConfigError(f"config key 'targets.{i}.depth' is {t.depth} but the model has only {depth} blocks")


def _flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts/lists -> {"a.b.0.c": value}."""
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        items = ((str(i), v) for i, v in enumerate(obj))
    else:
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_differences(now: Config, saved: Config, sections=RESUME_MUST_MATCH) -> list[str]:
    """Keys in ``sections`` whose values differ; fields left ``None`` now (resolved at run time) are ignored."""
    a = _flatten({s: to_dict(now)[s] for s in sections})
    b = _flatten({s: to_dict(saved)[s] for s in sections})
    return [f"{k} ({b.get(k)!r} in checkpoint, {a.get(k)!r} now)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not (a.get(k) is None and k in b)]


@torch.no_grad()
def preview_samples(denoiser: SiT, cfg: Config, num: int, device: torch.device, seed: int) -> torch.Tensor:
    """Class-balanced samples (num,C,H,W) in [-1,1] from ``denoiser`` in eval mode with fixed noise and labels."""
    was_training = denoiser.training
    denoiser.eval()
    g = torch.Generator().manual_seed(seed)
    c, s = cfg.model.in_channels, cfg.model.input_size
    noise = torch.randn(num, c, s, s, generator=g).to(device)
    y = (torch.arange(num) % cfg.model.num_classes).to(device)
    sc = cfg.sample
    out = run_sampler(lambda x, t, yy: denoiser(x, t, yy)[0], noise, y, sampler=sc.sampler, steps=sc.steps,
                      null_class=denoiser.null_class, cfg_scale=sc.cfg_scale,
                      guidance=(sc.guidance_low, sc.guidance_high),
                      process=FlowProcess(cfg.process.path),
                      generator=torch.Generator(device=device).manual_seed(seed + 1))
    denoiser.train(was_training)
    return out.float().clamp(-1, 1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 64 + rank)
    return g


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, stop_at: int | None = None,
          checkpoint_steps: Sequence[int] = ()) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``resume`` continues from the newest checkpoint there.

    ``stop_at`` ends the loop after that many steps as if interrupted (checkpoints already written are kept).
    ``checkpoint_steps`` adds checkpoints at those steps (e.g. log-spaced evaluation points of a benchmark).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # Accelerate keeps a process-wide singleton; drop its mixed-precision settings (not the distributed state)
    # so several runs with different precision can be trained from one Python process (notebooks, tests).
    AcceleratorState._reset_state(reset_partial_state=False)

    run_dir = Path(out_dir)
    tc = cfg.train
    torch.set_flush_denormal(True)  # CPU: denormal activations otherwise slow small models several-fold
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, log_with=tc.log_with or None,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(cfg.seed + accelerator.process_index)

    start_step, ckpt = 0, None
    if resume:
        ckpt = resolve_checkpoint(run_dir)
        saved = config_from_yaml_text(read_config_text(ckpt), str(ckpt))
        diffs = config_differences(cfg, saved)
        if diffs:
            raise ConfigError(f"config does not match the checkpoint {ckpt}: " + "; ".join(diffs[:8]))
        cfg = replace(saved, train=cfg.train, sample=cfg.sample)
    ds = load_dataset(cfg.data)
    cfg = resolve_model_config(cfg, ds)
    active = {a.name for a in active_terms(align_terms(cfg), cfg.objective.method)}
    terms_cfg = [t for t in cfg.targets if t.name in active]  # sit needs no targets, repa only image ones
    with accelerator.main_process_first():
        targets = prepare_targets(terms_cfg, ds, tc.cache_dir, progress=tc.progress and accelerator.is_main_process,
                                  device=device)
    cfg = replace(cfg, targets=[replace(t, dim=int(targets[t.name].dim)) if t.name in targets else t
                                for t in cfg.targets])

    torch.manual_seed(cfg.seed)  # model init independent of what target preparation drew from the global RNG
    denoiser = build_denoiser(cfg)
    _check_depths(cfg, denoiser.depth)
    objective = build_objective(cfg)
    module = ReedModule(denoiser, objective.terms, denoiser.hidden_size).to(device)
    ema = EMA(module.denoiser, tc.ema_decay)
    opt = torch.optim.AdamW(module.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    warm = tc.lr_warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)

    if ckpt is not None:
        state = read_state(ckpt)
        load_into(module, load_weights(ckpt, "model"), str(ckpt / "model.safetensors"))
        load_into(ema.model, load_weights(ckpt, "ema"), str(ckpt / "ema.safetensors"))
        opt_state, rng = load_optimizer_state(ckpt, state)
        opt.load_state_dict(opt_state)
        if state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        restore_rng(rng, state.get("rng", {}))
        start_step = int(state["step"])

    cfg_text = dump_config(cfg)
    metrics_path = run_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg_text)
        if resume and metrics_path.is_file():  # drop records written after the checkpoint we resume from
            keep = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()
                    and json.loads(ln)["step"] < start_step]
            atomic_write_text(metrics_path, "".join(k + "\n" for k in keep))
        elif not resume:
            metrics_path.write_text("")
    if tc.log_with:
        accelerator.init_trackers("reed", config={"config": cfg_text})

    module, opt = accelerator.prepare(module, opt)
    n, world, rank = len(ds), accelerator.num_processes, accelerator.process_index
    if tc.batch_size % (world * tc.grad_accum):
        raise ConfigError(f"train.batch_size ({tc.batch_size}) must be divisible by processes x grad_accum "
                          f"({world} x {tc.grad_accum})")
    micro = tc.batch_size // world // tc.grad_accum
    null_class = denoiser.null_class
    last_ckpt = ckpt
    extra_ckpts = set(checkpoint_steps)
    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and accelerator.is_main_process),
               desc="train", dynamic_ncols=True)
    t_last = time.perf_counter()
    module.train()

    def checkpoint(step: int) -> Path | None:
        path = None
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(module)
            path = save_checkpoint(run_dir, step, model=unwrapped.state_dict(), ema=ema.state_dict(),
                                   optimizer=opt.state_dict(), scheduler=sched.state_dict(), config_yaml=cfg_text,
                                   extra={"method": cfg.objective.method}, keep=tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    def previews(step: int) -> None:
        if accelerator.is_main_process:
            x = preview_samples(ema.model, cfg, tc.num_preview, device, cfg.seed)
            nrow = cfg.model.num_classes if cfg.model.num_classes <= 16 else None
            save_image_grid(to_uint8(x), run_dir / "samples" / f"step_{step:07d}.png", nrow=nrow)

    for step in range(start_step, end):
        idx = batch_indices(step, n, tc.batch_size, cfg.seed)[rank::world]
        g = _step_generator(cfg.seed, step, rank, device)
        logs: dict[str, float] = {}
        for k in range(tc.grad_accum):
            sl = idx[k * micro : (k + 1) * micro]
            x0, y = ds.batch(sl, generator=g, device=device)
            y = drop_labels(y, cfg.process.label_dropout, null_class, g)
            z = {name: t.get(sl).to(device, non_blocking=True) for name, t in targets.items()}
            ctx = accelerator.no_sync(module) if k < tc.grad_accum - 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss, parts = objective(module, x0, y, z, step, generator=g)
            if not torch.isfinite(loss):
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                detail = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
                raise NonFiniteLossError(f"loss became {float(loss.detach())} at step {step} ({detail}); "
                                         f"training stopped. {where}")
            accelerator.backward(loss / tc.grad_accum)
            for key, val in parts.items():
                logs[key] = logs.get(key, 0.0) + float(val) / tc.grad_accum
        clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
        grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), clip))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema.update(accelerator.unwrap_model(module).denoiser)
        done = step + 1
        bar.update(1)
        if step % tc.log_every == 0 or done == tc.steps:
            if world > 1:  # average the logged values over processes (each saw its shard of the batch)
                vals = accelerator.reduce(torch.tensor(list(logs.values()), device=device), reduction="mean")
                logs = dict(zip(logs, vals.tolist()))
            now = time.perf_counter()
            rec = {"step": step, **{k: round(v, 6) for k, v in logs.items()}, "grad_norm": round(grad_norm, 6),
                   "lr": sched.get_last_lr()[0], "time": round(now - t_last, 4)}
            t_last = now
            bar.set_postfix(loss=f"{logs['loss']:.4f}", gen=f"{logs['loss_gen']:.4f}", w_gen=f"{logs['w_gen']:.2f}")
            if accelerator.is_main_process:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if tc.log_with:
                accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
        if tc.sample_every > 0 and (done % tc.sample_every == 0 or done == 1) and done != tc.steps:
            previews(done)
        if (tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0) or done == tc.steps or done in extra_ckpts:
            last_ckpt = checkpoint(done)
    bar.close()
    final_step = end
    if final_step == tc.steps and accelerator.is_main_process:
        previews(final_step)
        plot_loss_curve(metrics_path, run_dir / "loss.png", title=f"{cfg.objective.method}: {cfg.model.preset}")
    if tc.log_with:
        accelerator.end_training()
    return TrainResult(run_dir, final_step, last_ckpt)
