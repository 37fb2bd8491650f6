"""The trainer: HF Accelerate loop with AdamW, clipping, accumulation, mixed precision, EMA, checkpoints, logs.

The loop names no domain: the :class:`~reed.domains.Domain` of ``cfg.domain`` supplies the data, the denoiser,
the objective, the micro-batches and the in-training evaluation.

Run directory::

    <out>/config.yaml      resolved config
    <out>/metrics.jsonl    one JSON object per logged step (step, loss, loss_gen, loss_align, w_gen, w_align,
                           grad_norm, lr, align/<name>, ...)
    <out>/checkpoints/     step_XXXXXXX/ (see reed.checkpoint) and ``latest``
    <out>/samples/         preview grids from the EMA model (images)
    <out>/eval.jsonl       in-training evaluation of the EMA model (proteins: validation recovery, perplexity)
    <out>/loss.png         loss breakdown and curriculum weights

Randomness is a pure function of (seed, step, process): the batch order (``batch_indices``) and a per-step
generator for times, noise and label dropout. Together with the saved model/EMA/optimizer/scheduler state this
makes an interrupted and resumed run reproduce the uninterrupted loss curve.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from reed.checkpoint import (
    last_good_checkpoint,
    list_checkpoints,
    load_into,
    load_optimizer_state,
    load_weights,
    read_config_text,
    read_state,
    remove_stale_saves,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from reed.config import Config, config_from_yaml_text, dump_config, to_dict
from reed.domains import get_domain, get_task
from reed.ema import EMA
from reed.errors import CheckpointError, ConfigError, NonFiniteLossError
from reed.io import atomic_write_text
from reed.loader import default_workers, step_batches
from reed.plots import plot_loss_curve

__all__ = ["train", "TrainResult", "config_differences", "resume_config", "read_jsonl", "existing_run"]

log = logging.getLogger("reed")

# shared config sections that must match the checkpoint when resuming (train.* may change, e.g. more steps),
# besides the domain's own section (less what the domain lets change, e.g. image.sample)
RESUME_MUST_MATCH = ("seed", "domain", "targets", "objective")


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


def config_differences(now: Config, saved: Config) -> list[str]:
    """Keys that must match on resume but differ; fields left ``None`` now (resolved at run time) are ignored."""
    may_change = tuple(f"{saved.domain}.{k}" for k in get_domain(saved.domain).resume_may_change)
    sections = (*RESUME_MUST_MATCH, saved.domain)
    now_d, saved_d = to_dict(now), to_dict(saved)
    a = _flatten({s: now_d.get(s) for s in sections})
    b = _flatten({s: saved_d.get(s) for s in sections})
    return [f"{k} ({b.get(k)!r} in checkpoint, {a.get(k)!r} now)" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not (a.get(k) is None and k in b)
            and not any(k == m or k.startswith(m + ".") for m in may_change)]


def resume_config(now: Config, saved: Config) -> Config:
    """The checkpoint's config with what may change on resume taken from ``now``: ``train`` and the parts of the
    domain section the domain names (e.g. ``image.sample``)."""
    keep = {k: getattr(now.section, k) for k in get_domain(saved.domain).resume_may_change}
    cfg = replace(saved, train=now.train)
    return cfg.with_section(**keep) if keep else cfg


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    last_checkpoint: Path | None


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step) * 64 + rank)
    return g


RUN_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "loss.png")
RUN_DIRS = ("checkpoints", "samples")


def existing_run(run_dir: Path) -> list[str]:
    """What of a previous run ``run_dir`` holds (its config, logs, checkpoints), as names; empty if none."""
    found = [f for f in RUN_FILES if (run_dir / f).is_file()]
    ck = run_dir / "checkpoints"
    if ck.is_dir() and any(ck.iterdir()):
        found.append(f"{len(list_checkpoints(run_dir))} checkpoint(s)")
    return found


def _clear_run(run_dir: Path) -> None:
    """Remove the outputs of a previous run from ``run_dir`` (``--overwrite``); other files are left alone."""
    for f in RUN_FILES:
        (run_dir / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(run_dir / d, ignore_errors=True)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file, and one that holds a run unless resuming or overwriting."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file, not a directory; pass another --out")
    if resume or not run_dir.is_dir():
        return
    found = existing_run(run_dir)
    if found and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}); pass --resume to continue it, "
                          f"--overwrite to replace it, or another --out")


def read_jsonl(path: Path, *, keep_until: int | None = None) -> list[dict]:
    """The records of a ``metrics.jsonl`` / ``eval.jsonl``; a line that is not a JSON object with an integer
    ``step`` (a crash mid-write leaves a partial last line) is dropped with a warning naming the file and line.
    With ``keep_until``, only records with ``step <= keep_until``."""
    out, bad = [], []
    for i, ln in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            bad.append(i)
            continue
        if keep_until is None or rec["step"] <= keep_until:
            out.append(rec)
    if bad:
        log.warning("reed: %s: dropped %d unreadable line(s) (line %s; an interrupted write)", path, len(bad),
                    ", ".join(map(str, bad[:5])))
    return out


def _lr_factor(tc) -> Callable[[int], float]:
    """The warm-up factor of the learning rate at scheduler step ``s`` (see ``TrainConfig.warmup_from``)."""
    warm, start = tc.lr_warmup, tc.warmup_from
    if warm <= 0:
        return lambda s: 1.0
    if start > 0:  # torch.optim.lr_scheduler.LinearLR(start_factor=start, total_iters=warm)
        return lambda s: start + (1.0 - start) * min(s, warm) / warm
    return lambda s: min(1.0, (s + 1) / warm)


def build_optimizer(params, tc, *, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 in the gradient) per ``train.optimizer``, with ``amsgrad``;
    ``fused``: the single-kernel implementation (the same update to rounding, fewer launches)."""
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay, amsgrad=tc.amsgrad,
               **({"fused": True} if fused else {}))


def apply_new_hyperparameters(opt: torch.optim.Optimizer, sched, tc, *, fused: bool = False) -> None:
    """After loading a checkpoint's optimizer and scheduler: the config's ``train.lr``, ``betas``,
    ``weight_decay`` and ``amsgrad`` take effect (a lower lr after a divergence is really lower), and so does the
    implementation (``fused``: loading restores the checkpoint's, e.g. a CPU run's unfused one resumed on a GPU);
    the step counters move to where that implementation keeps them (the parameter's device when fused, else the
    CPU: on the device an unfused step would read them back every step)."""
    sched.base_lrs = [tc.lr for _ in opt.param_groups]
    factor = _lr_factor(tc)(sched.last_epoch)
    for g in opt.param_groups:
        g.update(lr=tc.lr * factor, initial_lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                 amsgrad=tc.amsgrad, fused=True if fused else None, foreach=None)
        for p in g["params"]:
            st = opt.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                on = p.device if fused or g.get("capturable") else torch.device("cpu")
                st["step"] = st["step"].to(device=on, dtype=torch.float32)
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def _first_non_finite(bad: dict[str, torch.Tensor] | None, logs: dict, step: int) -> dict[str, torch.Tensor]:
    """The device's record of the first step whose ``logs["loss"]`` is not finite: ``{"step": (), name: () ...}``
    with step -1 and NaN values while there is none. Pure tensor ops on the loss's device (``torch.where``, fills), so
    recording it never waits for the device; the trainer reads it at logged steps, evaluations and checkpoints."""
    loss = logs["loss"]
    dev = loss.device
    first = ~torch.isfinite(loss) if bad is None else ~torch.isfinite(loss) & (bad["step"] < 0)
    prev = bad or {"step": torch.full((), -1, dtype=torch.long, device=dev)}
    nan = torch.full((), math.nan, device=dev)  # a fill, not a copy from the host

    def on_device(v):  # numbers and CPU scalars filled on the device (no blocking copy), device tensors as they are
        if isinstance(v, torch.Tensor) and v.device == dev:
            return v.float()
        return torch.full((), float(v), device=dev)  # float() of a python number or a CPU tensor reads no device

    out = {k: torch.where(first, on_device(v), prev.get(k, nan)) for k, v in logs.items()}
    out["step"] = torch.where(first, step, prev["step"])
    return out


def _all_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def train(cfg: Config, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          allow_data_change: bool = False, stop_at: int | None = None,
          checkpoint_steps: Sequence[int] = ()) -> TrainResult:
    """Train ``cfg`` into ``out_dir``. ``resume`` continues from the newest checkpoint there.

    A directory that already holds a run is refused unless ``resume`` or ``overwrite`` (which deletes that run's
    config, logs, samples and checkpoints first); ``resume`` where no checkpoint was written yet starts at step 0.
    On resume, ``train.*`` may change and takes effect (lr, betas, weight decay, more steps); ``train.steps``
    below the checkpoint's step, other changed sections, and a different training set (fingerprint) are errors,
    the last unless ``allow_data_change``.
    ``stop_at`` ends the loop after that many steps as if interrupted (checkpoints already written are kept).
    ``checkpoint_steps`` adds checkpoints at those steps (e.g. log-spaced evaluation points of a benchmark).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    # Accelerate keeps a process-wide singleton; drop its mixed-precision settings (not the distributed state)
    # so several runs with different precision can be trained from one Python process (notebooks, tests).
    AcceleratorState._reset_state(reset_partial_state=False)

    run_dir = Path(out_dir)
    check_run_dir(run_dir, resume=resume, overwrite=overwrite)
    tc = cfg.train
    torch.set_flush_denormal(True)  # CPU: denormal activations otherwise slow small models several-fold
    # parameters that may get no gradient in a step: the domain's, or the projectors after a hard alignment stop
    unused = get_domain(cfg.domain).find_unused_parameters or cfg.objective.curriculum.align_stop > 0
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, log_with=tc.log_with or None,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available(), kwargs_handlers=handlers)
    device = accelerator.device
    set_seed(cfg.seed + accelerator.process_index)
    if accelerator.is_main_process:
        if overwrite and not resume and existing_run(run_dir):
            log.warning("reed: --overwrite: removing the previous run in %s", run_dir)
            _clear_run(run_dir)
        removed = remove_stale_saves(run_dir)
        if removed:
            log.warning("reed: removed %d leftover(s) of interrupted saves in %s", len(removed), run_dir)
    accelerator.wait_for_everyone()

    start_step, ckpt, state = 0, None, {}
    if resume and not list_checkpoints(run_dir):
        # a preemptible job that always passes --resume: its first start (or one killed before its first
        # checkpoint, which has nothing to lose) begins at step 0
        log.warning("reed: --resume: no checkpoint in %s yet; starting from step 0", run_dir)
        resume = False
    if resume:
        ckpt = resolve_checkpoint(run_dir)
        saved = config_from_yaml_text(read_config_text(ckpt), str(ckpt / "config.yaml"))
        diffs = config_differences(cfg, saved)
        if diffs:
            raise ConfigError(f"config does not match the checkpoint {ckpt}: " + "; ".join(diffs[:8]))
        state = read_state(ckpt)
        start_step = state["step"]
        cfg = resume_config(cfg, saved)
    task = get_task(cfg)
    cfg = task.setup(device=device, main_process_first=accelerator.main_process_first,
                     progress=tc.progress and accelerator.is_main_process, world=accelerator.num_processes)
    tc = cfg.train  # steps resolved (e.g. from train.epochs)
    if ckpt is not None and tc.steps < start_step:
        raise ConfigError(f"train.steps={tc.steps} is below the step of the checkpoint {ckpt} ({start_step}); "
                          f"resume with train.steps >= {start_step}")
    if ckpt is not None and start_step == tc.steps:
        log.warning("reed: %s is already trained to train.steps=%d; nothing to do (raise train.steps to continue)",
                    run_dir, tc.steps)
        return TrainResult(run_dir, start_step, ckpt)

    data_id = task.fingerprint() if hasattr(task, "fingerprint") else None
    saved_id = state.get("extra", {}).get("data")
    if ckpt is not None and data_id and saved_id and data_id != saved_id and not allow_data_change:
        raise ConfigError(f"the training data differ from the data the checkpoint {ckpt} was trained on "
                          f"(fingerprint {data_id}, checkpoint {saved_id}); pass --allow-data-change to resume on "
                          f"them anyway")

    # speed options, resolved for this device and recorded in the run's config.yaml
    tc = replace(tc, workers=tc.workers if tc.workers is not None else default_workers(device))
    cfg = replace(cfg, train=tc)
    pin = tc.pin_memory and device.type == "cuda"
    if device.type == "cuda":  # process-wide, as torch's own switch
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
            torch.backends.cuda.matmul.fp32_precision = "tf32" if tc.tf32 else "ieee"
            torch.backends.cudnn.conv.fp32_precision = "tf32" if tc.tf32 else "ieee"
        else:
            torch.backends.cuda.matmul.allow_tf32 = tc.tf32
            torch.backends.cudnn.allow_tf32 = tc.tf32

    torch.manual_seed(cfg.seed)  # model init independent of what target preparation drew from the global RNG
    denoiser = task.build_denoiser()
    if tc.activation_checkpointing:
        if not hasattr(denoiser, "set_activation_checkpointing"):
            raise ConfigError(f"config key 'train.activation_checkpointing': the {cfg.domain} denoiser "
                              f"({type(denoiser).__name__}) has no per-block activation checkpointing")
        denoiser.set_activation_checkpointing(True)
    objective = task.build_objective()
    module = objective.build_module(denoiser).to(device)
    ema = EMA(module.denoiser, tc.ema_decay)
    if objective.needs_teacher:  # SRA: the EMA model is the teacher (its weights are loaded in place on resume)
        objective.teacher = ema.model
    if tc.compile:  # in place, after the EMA copy: the state dict keeps its keys, the EMA model stays eager
        module.denoiser.compile(mode=None if tc.compile_mode == "default" else tc.compile_mode)
    fused = device.type == "cuda" and tc.fused_optimizer
    opt = build_optimizer(module.parameters(), tc, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(tc))

    if ckpt is not None:
        load_into(module, load_weights(ckpt, "model"), str(ckpt / "model.safetensors"))
        load_into(ema.model, load_weights(ckpt, "ema"), str(ckpt / "ema.safetensors"))
        opt_state, rng = load_optimizer_state(ckpt, state)
        try:
            opt.load_state_dict(opt_state)
            if state.get("scheduler"):
                sched.load_state_dict(state["scheduler"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {ckpt} does not fit this model and train.optimizer "
                                  f"({e})") from None
        apply_new_hyperparameters(opt, sched, tc, fused=fused)
        restore_rng(rng, state.get("rng", {}))

    cfg_text = dump_config(cfg)
    metrics_path, eval_path = run_dir / "metrics.jsonl", run_dir / "eval.jsonl"
    if accelerator.is_main_process:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg_text)
        # metrics.jsonl: step k = the loss of optimizer step k; eval.jsonl: step n = after n steps
        for path, last in ((metrics_path, start_step - 1), (eval_path, start_step)):
            if resume and path.is_file():  # drop records written after the checkpoint we resume from
                keep = read_jsonl(path, keep_until=last)
                atomic_write_text(path, "".join(json.dumps(k) + "\n" for k in keep))
            elif not resume:
                path.write_text("")
    if tc.log_with:
        accelerator.init_trackers("reed", config={"config": cfg_text})

    module, opt = accelerator.prepare(module, opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    last_ckpt = ckpt
    saved_loss = state.get("extra", {}).get("loss")  # None: not recorded (older checkpoints) or not finite
    last_loss = float(saved_loss) if isinstance(saved_loss, (int, float)) else math.nan
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
            # a checkpoint resumed from without a recorded loss counts as finite when its weights are
            finite = (math.isfinite(last_loss) or step == start_step) and _all_finite(unwrapped) \
                and _all_finite(ema.model)
            extra = {"method": cfg.objective.method, "loss": last_loss if math.isfinite(last_loss) else None,
                     "finite": finite, "data": data_id}
            path = save_checkpoint(run_dir, step, model=unwrapped.state_dict(), ema=ema.state_dict(),
                                   optimizer=opt.state_dict(), scheduler=sched.state_dict(), config_yaml=cfg_text,
                                   extra=extra, keep=tc.keep_checkpoints)
        accelerator.wait_for_everyone()
        return path

    def evaluate(step: int) -> None:
        if accelerator.is_main_process:
            res = task.evaluate(ema.model, run_dir, step, device)
            if res:
                with eval_path.open("a") as f:
                    f.write(json.dumps({"step": step, **res}) + "\n")
                if tc.log_with:
                    accelerator.log(res, step=step)

    def check_finite() -> None:
        """Raise at the first non-finite step recorded on the device (one host sync). With several processes the
        earliest step over all of them is agreed on first (one small all-reduce), so every process raises at the
        same call: a NaN in one process's shard must not leave the others waiting in the next collective."""
        step_t = bad["step"] if bad is not None else torch.full((), -1, dtype=torch.long, device=device)
        if world > 1:
            import torch.distributed as dist

            never = torch.iinfo(torch.long).max
            first_t = torch.where(step_t < 0, torch.full_like(step_t, never), step_t)
            dist.all_reduce(first_t, op=dist.ReduceOp.MIN)
            first = int(first_t)
            first = -1 if first == never else first
        else:
            first = int(step_t)
        if first < 0:
            return
        good = last_good_checkpoint(run_dir)
        where = f"last good checkpoint: {good}" if good else "no good checkpoint was written yet"
        later = "" if exact else f" (checked at step {done - 1}, every train.log_every and before each checkpoint)"
        if int(step_t) != first:  # another process saw it first
            raise NonFiniteLossError(f"loss became non-finite at step {first}{later} in another process; training "
                                     f"stopped. {where}")
        vals = {k: float(v) for k, v in bad.items() if k != "step"}
        detail = ", ".join(f"{k}={v:.4g}" for k, v in vals.items() if k != "loss")
        raise NonFiniteLossError(f"loss became {vals['loss']} at step {first}{later} ({detail}); "
                                 f"training stopped. {where}")

    exact = tc.finite_check == "step"
    bad: dict[str, torch.Tensor] | None = None  # the first non-finite step and its logged values, on the device
    source = functools.partial(task.host_batches, rank=rank, world=world)
    hosts = step_batches(source, start_step, end, workers=tc.workers, prefetch=tc.prefetch, pin_memory=pin)
    done = start_step
    with contextlib.closing(hosts):  # an exception ends the workers at once, not at garbage collection
        for step, host in zip(range(start_step, end), hosts, strict=True):
            g = _step_generator(cfg.seed, step, rank, device)
            logs: dict[str, torch.Tensor | float] = {}  # device tensors (python floats for schedule values)
            for k, item in enumerate(host):
                batch = task.device_batch(item, device, g)
                ctx = accelerator.no_sync(module) if k < tc.grad_accum - 1 else contextlib.nullcontext()
                with ctx, accelerator.autocast():
                    loss, parts = task.loss(objective, module, batch, step, g)
                accelerator.backward(loss / tc.grad_accum)
                for key, val in parts.items():
                    logs[key] = logs.get(key, 0.0) + val / tc.grad_accum
            clip = tc.grad_clip if tc.grad_clip > 0 else math.inf
            grad_norm = accelerator.clip_grad_norm_(module.parameters(), clip)
            bad = _first_non_finite(bad, logs, step)
            done = step + 1
            if exact:
                check_finite()
            lr = opt.param_groups[0]["lr"]  # the learning rate of this step (before the scheduler advances)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema.update(accelerator.unwrap_model(module).denoiser)
            bar.update(1)
            if step % tc.log_every == 0 or done == tc.steps:
                check_finite()
                vals = torch.stack([torch.as_tensor(v, device=device, dtype=torch.float32) for v in logs.values()])
                if world > 1:  # average the logged values over processes (each saw its shard of the batch)
                    vals = accelerator.reduce(vals, reduction="mean")
                host_logs = dict(zip(logs, vals.tolist()))  # the one host sync of a logged step
                now = time.perf_counter()
                rec = {"step": step, **{k: round(v, 6) for k, v in host_logs.items()},
                       "grad_norm": round(float(grad_norm), 6), "lr": lr, "time": round(now - t_last, 4)}
                t_last = now
                bar.set_postfix(loss=f"{host_logs['loss']:.4f}", gen=f"{host_logs['loss_gen']:.4f}",
                                w_gen=f"{host_logs['w_gen']:.2f}")
                if accelerator.is_main_process:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                if tc.log_with:
                    accelerator.log({k: v for k, v in rec.items() if k != "step"}, step=step)
            if task.eval_due(done) and done != tc.steps:
                check_finite()
                evaluate(done)
            if (tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0) or done == tc.steps or done in extra_ckpts:
                check_finite()  # a checkpoint is written only when every step before it was finite
                last_loss = float(logs["loss"])
                last_ckpt = checkpoint(done)
    check_finite()
    bar.close()
    final_step = end
    if final_step == tc.steps and accelerator.is_main_process:
        evaluate(final_step)
        plot_loss_curve(metrics_path, run_dir / "loss.png", title=task.title())
    accelerator.wait_for_everyone()
    if tc.log_with:
        accelerator.end_training()
    return TrainResult(run_dir, final_step, last_ckpt)
